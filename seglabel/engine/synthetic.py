"""Random-weight Mask2Former and EoMT checkpoints for tests and benchmarks.

No weights can be downloaded on the machines this project is built and benchmarked on, so tests
and ``seglabel bench`` build checkpoints from configs. Random weights score so low
that every threshold removes every segment, which would make post-processing look free and
leave the segment paths untested; ``confident=True`` scales the class and mask heads so that
each image carries a realistic number of segments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

# Architectures by name. "tiny" is the 1.3M-parameter model of ENVIRONMENT.md; "swin-s" and
# "swin-l" have the shapes of the Hub's swin-small / swin-large Mask2Former checkpoints.
ARCHITECTURES: dict[str, dict] = {
    "tiny": {
        "backbone": {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "window_size": 7},
        "model": {
            "feature_size": 32,
            "mask_feature_size": 32,
            "hidden_dim": 32,
            "encoder_feedforward_dim": 64,
            "dim_feedforward": 64,
            "encoder_layers": 1,
            "decoder_layers": 2,
            "num_attention_heads": 2,
            "num_queries": 10,
        },
    },
    "swin-s": {
        "backbone": {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24], "window_size": 7},
        "model": {"num_queries": 100},
    },
    "swin-l": {
        "backbone": {
            "embed_dim": 192,
            "depths": [2, 2, 18, 2],
            "num_heads": [6, 12, 24, 48],
            "window_size": 12,
        },
        "model": {"num_queries": 200},
    },
    # EoMT: a plain ViT with queries in its last blocks. "eomt-tiny" is ENVIRONMENT.md's 0.3M
    # test model; "eomt-s" / "eomt-l" have the shapes of the paper's ViT-S/16 and ViT-L/16
    # (DINOv2 with 4 register tokens, 200 queries in the last 4 blocks, 640x640 input).
    "eomt-tiny": {
        "family": "eomt",
        "model": {
            "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 128,
            "num_queries": 12, "num_blocks": 2, "image_size": 128, "patch_size": 16,
        },
    },
    "eomt-s": {
        "family": "eomt",
        "model": {
            "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536,
            "num_queries": 200, "num_blocks": 4, "image_size": 640, "patch_size": 16,
        },
    },
    "eomt-l": {
        "family": "eomt",
        "model": {
            "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
            "intermediate_size": 4096, "num_queries": 200, "num_blocks": 4, "image_size": 640,
            "patch_size": 16,
        },
    },
    # The DINOv3-backbone variant at the tiny size: its own model class and licence rule.
    "eomt-dinov3-tiny": {
        "family": "eomt_dinov3",
        "model": {
            "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 128,
            "num_queries": 12, "num_blocks": 2, "image_size": 128, "patch_size": 16,
        },
    },
}


def family(arch: str) -> str:
    """The model family (``model_type``) of a named architecture."""
    return ARCHITECTURES[arch].get("family", "mask2former")


def build_random_model(
    arch: str,
    id2label: Mapping[int, str],
    *,
    confident: bool = True,
    seed: int = 0,
    class_scale: float = 30.0,
    mask_scale: float = 10.0,
):
    """Build a random-weight model of a named architecture (``ARCHITECTURES``).

    With ``confident`` the class head is scaled (and the no-object logit lowered) so that queries
    pick one label with high probability, and the mask head is scaled so that masks are sharp.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    if family(arch) != "mask2former":
        return _eomt(arch, id2label, confident, class_scale, mask_scale, seed)
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(out_features=["stage1", "stage2", "stage3", "stage4"], **spec["backbone"])
    id2label = {int(k): str(v) for k, v in id2label.items()}
    config = Mask2FormerConfig(
        backbone_config=backbone,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        **spec["model"],
    )
    model = Mask2FormerForUniversalSegmentation(config).eval()
    if confident:
        with torch.no_grad():
            _sure_labels(model.class_predictor, class_scale)
            embedder = model.model.transformer_module.decoder.mask_predictor.mask_embedder
            last = [m for m in embedder.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.mul_(mask_scale)
    return model


def _sure_labels(head: torch.nn.Linear, scale: float) -> None:
    """Scale a class head so that each query is sure of one label (the no-object one lowered)."""
    head.weight.mul_(scale)
    head.bias.zero_()
    head.bias[-1] = -scale  # the no-object class


def _eomt(arch: str, id2label: Mapping[int, str], confident: bool, class_scale: float, mask_scale: float,
          seed: int = 0):
    import transformers

    kind = family(arch)
    config_class, model_class = (
        (transformers.EomtConfig, transformers.EomtForUniversalSegmentation)
        if kind == "eomt"
        else (transformers.EomtDinov3Config, transformers.EomtDinov3ForUniversalSegmentation)
    )
    id2label = {int(k): str(v) for k, v in id2label.items()}
    config = config_class(
        id2label=id2label, label2id={v: k for k, v in id2label.items()}, **ARCHITECTURES[arch]["model"]
    )
    model = model_class(config).eval()
    with torch.no_grad():
        # As a trained checkpoint ends its mask annealing: no masked attention at inference
        # (a fresh model masks every query's attention, with a prediction in each last block).
        model.attn_mask_probs.zero_()
    if confident:
        with torch.no_grad():
            _sure_labels(model.class_predictor, class_scale)
            # A random mask head draws every query's mask over about half of the image, so
            # queries overlap and panoptic merging keeps none. A constant channel in the pixel
            # features (the last LayerNorm's bias, its scale zeroed) lets the mask head offset
            # every mask logit: set so that a mask covers about a tenth of an image.
            head = model.mask_head.fc3
            head.weight.mul_(mask_scale)
            norm = model.upscale_block.block[-1].layernorm2d
            norm.weight[0] = 0.0
            norm.bias[0] = 1.0
            head.weight[0] = 0.0
            head.bias[0] = 0.0
            side = int(config.image_size)
            g = torch.Generator().manual_seed(seed)
            coarse = torch.randn(2, 3, 8, 8, generator=g)
            probe = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")
            logits = model(pixel_values=probe).masks_queries_logits
            head.bias[0] = -float(logits.mean() + 1.3 * logits.std())
    return model


# Bilinear resize, then ImageNet normalisation: what both families' Hub processors do.
_IMAGENET_PIXELS = {
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


def eomt_preprocessor_config(image_size: int, split: bool = False) -> dict:
    """An EoMT ``preprocessor_config.json`` as the Hub checkpoints ship it: the image fitted into
    the model's square input and padded to it (panoptic, instance); or, ``split``, resized to a
    shortest edge of the input's side and cut into overlapping square crops (semantic)."""
    return {
        "image_processor_type": "EomtImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size, "longest_edge": None if split else image_size},
        "do_pad": not split,
        "do_split_image": split,
        **_IMAGENET_PIXELS,
        "ignore_index": None,
    }


def preprocessor_config(size: Mapping[str, int] | None = None, size_divisor: int = 32) -> dict:
    """A Mask2Former ``preprocessor_config.json`` as the Hub checkpoints ship it (fixed 384×384)."""
    return {
        "image_processor_type": "Mask2FormerImageProcessor",
        "do_resize": True,
        "size": dict(size or {"height": 384, "width": 384}),
        "size_divisor": size_divisor,
        **_IMAGENET_PIXELS,
        "ignore_index": 255,
        "do_reduce_labels": False,
    }


def save_random_checkpoint(
    path: str | Path,
    arch: str = "tiny",
    id2label: Mapping[int, str] | None = None,
    *,
    size: Mapping[str, int] | None = None,
    confident: bool = True,
    seed: int = 0,
    split: bool = False,
    license: str | None = None,
) -> Path:
    """Save a random-weight checkpoint (model + preprocessor config) to a local directory.

    EoMT architectures get an EoMT preprocessor config (``split``: semantic crops); ``license``
    writes a model card declaring it, as a Hub repository's README.md does.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    id2label = id2label or {i: f"label{i}" for i in range(5)}
    model = build_random_model(arch, id2label, confident=confident, seed=seed)
    model.save_pretrained(path)
    if family(arch) == "mask2former":
        processor = preprocessor_config(size)
    else:
        processor = eomt_preprocessor_config(int(model.config.image_size), split)
    (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    if license is not None:
        (path / "README.md").write_text(f"---\nlicense: {license}\n---\n\n# A random-weight {arch} model\n")
    return path
