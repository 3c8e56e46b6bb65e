"""Random-weight Mask2Former checkpoints for tests and benchmarks.

No weights can be downloaded on the machines this project is built and benchmarked on, so tests
and ``seglabel bench`` build Mask2Former checkpoints from configs. Random weights score so low
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
}


def build_random_model(
    arch: str,
    id2label: Mapping[int, str],
    *,
    confident: bool = True,
    seed: int = 0,
    class_scale: float = 30.0,
    mask_scale: float = 10.0,
):
    """Build a random-weight ``Mask2FormerForUniversalSegmentation`` of a named architecture.

    With ``confident`` the class head is scaled (and the no-object logit lowered) so that queries
    pick one label with high probability, and the mask head is scaled so that masks are sharp.
    """
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    torch.manual_seed(seed)
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
            head = model.class_predictor
            head.weight.mul_(class_scale)
            head.bias.zero_()
            head.bias[-1] = -class_scale  # the no-object class
            embedder = model.model.transformer_module.decoder.mask_predictor.mask_embedder
            last = [m for m in embedder.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.mul_(mask_scale)
    return model


def preprocessor_config(size: Mapping[str, int] | None = None, size_divisor: int = 32) -> dict:
    """A Mask2Former ``preprocessor_config.json`` as the Hub checkpoints ship it (fixed 384×384)."""
    return {
        "image_processor_type": "Mask2FormerImageProcessor",
        "do_resize": True,
        "size": dict(size or {"height": 384, "width": 384}),
        "size_divisor": size_divisor,
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
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
) -> Path:
    """Save a random-weight checkpoint (model + preprocessor config) to a local directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    id2label = id2label or {i: f"label{i}" for i in range(5)}
    model = build_random_model(arch, id2label, confident=confident, seed=seed)
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(size), indent=2))
    return path
