"""Never label with weights the checkpoint does not have (issue 27): incomplete, mismatched and
foreign checkpoints are refused in one line, exit 2, before the first image, with the output
left empty; and the Hub's failures are said once, with how to run offline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from seglabel.cli import main
from seglabel.core.errors import CheckpointError
from seglabel.engine.checkpoint import inspect_checkpoint
from seglabel.engine.load import load_checkpoint

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
    return root


def edited(source: Path, folder: Path, drop=(), add=None, labels: int | None = None) -> Path:
    """A copy of ``source`` whose weights lose the tensors named in ``drop`` (prefixes) and gain
    ``add``, or whose config names ``labels`` labels."""
    shutil.copytree(source, folder)
    weights = load_file(folder / "model.safetensors")
    weights = {k: v for k, v in weights.items() if not k.startswith(tuple(drop))}
    weights.update(add or {})
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    if labels is not None:
        config = json.loads((folder / "config.json").read_text())
        config["id2label"] = {str(i): f"label{i}" for i in range(labels)}
        config["label2id"] = {f"label{i}": i for i in range(labels)}
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def refusal(capsys, images: Path, out: Path, model: Path) -> str:
    code = main(["run", "--input", str(images), "--output", str(out), "--model", str(model)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err[-5:]
    assert err[-1].startswith("seglabel: error: "), err[-5:]
    return err[-1]


def left_empty(out: Path) -> bool:
    """Nothing of the job in the output: no record, no rows, no masks (an emptied scratch
    folder may remain)."""
    return not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


@pytest.fixture(params=["mask2former", "eomt"])
def complete(request, checkpoints, eomt_checkpoints) -> Path:
    return (checkpoints if request.param == "mask2former" else eomt_checkpoints)["instance"]


def test_a_missing_class_head_is_refused_by_the_driver(complete, images, tmp_path, capsys):
    model = edited(complete, tmp_path / "partial-instance", drop=["class_predictor."])
    with pytest.raises(CheckpointError, match=r"no class head \(class_predictor.weight\)"):
        inspect_checkpoint(str(model))
    missing = r"2 tensors missing \(class_predictor.bias, class_predictor.weight\)"
    with pytest.raises(CheckpointError, match=missing):
        load_checkpoint(str(model))
    out = tmp_path / "out"
    assert "no class head" in refusal(capsys, images, out, model)
    assert left_empty(out)


def test_labels_and_head_that_disagree_are_refused(complete, images, tmp_path, capsys):
    model = edited(complete, tmp_path / "relabeled-instance", labels=9)
    with pytest.raises(CheckpointError, match=r"3 tensors of another shape"):
        load_checkpoint(str(model))  # no traceback from transformers: one line
    out = tmp_path / "out"
    line = refusal(capsys, images, out, model)
    assert "names 9 labels but its class head has 5" in line
    assert left_empty(out)


def test_weights_the_driver_cannot_see_are_refused_by_the_segmenter(checkpoints, images, tmp_path, capsys):
    """A tensor of the backbone missing and one that does not belong: the driver reads only the
    class head's shape, so the Segmenter's load refuses, and the job ends with its line."""
    source = checkpoints["semantic"]
    names = load_file(source / "model.safetensors")
    dropped = sorted(k for k in names if k.startswith("model.pixel_level"))[0]
    model = edited(source, tmp_path / "damaged-semantic", drop=[dropped],
                   add={"stray.weight": torch.zeros(3)})
    inspect_checkpoint(str(model))  # the driver's look finds nothing wrong
    out = tmp_path / "out"
    line = refusal(capsys, images, out, model)
    assert "1 tensor missing" in line and dropped in line and "1 tensor unexpected (stray.weight)" in line
    assert left_empty(out)


def test_url_checkpoint_head_is_read_from_the_header_alone(checkpoints, s3_bucket, tmp_path):
    import boto3

    model = edited(checkpoints["instance"], tmp_path / "relabeled-instance", labels=2)
    client = boto3.client("s3")
    for f in model.iterdir():
        client.put_object(Bucket=s3_bucket, Key=f"m/relabeled-instance/{f.name}", Body=f.read_bytes())
    with pytest.raises(CheckpointError, match="names 2 labels but its class head has 5"):
        inspect_checkpoint(f"s3://{s3_bucket}/m/relabeled-instance")


def sharded(source: Path, model: Path) -> dict[str, str]:
    """``source``'s weights as two shards and an index in ``model``; the index's weight map."""
    shutil.copytree(source, model)
    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: weights[k] for k in keys}, model / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    index = {"metadata": {}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def test_sharded_weights_are_followed_and_a_stray_shard_name_refused(checkpoints, tmp_path):
    model = tmp_path / "sharded-instance"
    weight_map = sharded(checkpoints["instance"], model)
    index = model / "model.safetensors.index.json"
    assert inspect_checkpoint(str(model)).family == "mask2former"
    assert load_checkpoint(str(model)).family == "mask2former"
    for stray in ("../../elsewhere.safetensors", "model-00003-of-00003.safetensors"):
        index.write_text(json.dumps({"weight_map": {**weight_map, "class_predictor.weight": stray}}))
        with pytest.raises(CheckpointError, match="class head|missing"):
            inspect_checkpoint(str(model))
    (model / "model-00003-of-00003.safetensors").write_bytes(b"\xff" * 8 + b"{}")  # a header 2^64 long
    with pytest.raises(CheckpointError, match="cannot read the weights"):
        inspect_checkpoint(str(model))


def test_random_bench_checkpoints_are_whole(tmp_path):
    from seglabel.bench.calibrate import build_checkpoint

    for arch, task in (("tiny", "panoptic"), ("eomt-tiny", "semantic")):
        path, _ = build_checkpoint(tmp_path / f"bench-{arch}-{task}", arch, task)
        assert load_checkpoint(str(path)).family in ("mask2former", "eomt")


# -- the Hub, unreachable ------------------------------------------------------------------------


def test_hub_offline_fails_at_once_and_says_how_to_run_offline(images, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run(
        [sys.executable, "-m", "seglabel", "run", "--input", str(images), "--output", str(tmp_path / "out"),
         "--model", "someorg/some-model-instance", "--dry-run"],
        capture_output=True, text=True, timeout=120, env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "someorg/some-model-instance" in last and "HF_HUB_OFFLINE=1" in last
    assert "local checkpoint folder" in last
    assert "Retry" not in done.stderr


def test_library_warnings_are_printed_once():
    """huggingface_hub and transformers print through handlers of their own: seglabel's root
    handler must not print their lines a second time (the Hub's five retry warnings, offline).
    In a process of its own, as the command runs: pytest's capture would hide either handler."""
    code = (
        "import logging, huggingface_hub.utils.logging as hub\n"
        "from transformers.utils import logging as tf\n"
        "from seglabel.cli.common import setup_logging\n"
        "setup_logging('info')\n"
        "hub.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')\n"
        "tf.get_logger('transformers.modeling_utils').warning('a transformers warning')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("Retrying in 1s [Retry 1/5].") == 1, done.stderr
    assert done.stderr.count("a transformers warning") == 1, done.stderr


def write_header(path: Path, header: bytes) -> None:
    path.write_bytes(len(header).to_bytes(8, "little") + header)


@pytest.mark.parametrize(
    "shape", ['["6", 32]', "[[6], 32]", "[null, 32]", "[true, 32]", "[-1, 32]", "[6.5, 32]"]
)
def test_a_class_head_shape_that_is_not_a_count_is_one_line(checkpoints, tmp_path, shape):
    model = tmp_path / "odd-instance"
    shutil.copytree(checkpoints["instance"], model)
    header = '{"class_predictor.weight": {"dtype": "F32", "shape": %s, "data_offsets": [0, 0]}}' % shape
    write_header(model / "model.safetensors", header.encode())
    with pytest.raises(CheckpointError, match="no class head"):
        inspect_checkpoint(str(model))


def test_damaged_files_are_one_line_in_the_driver_and_the_segmenter(checkpoints, tmp_path):
    deep = b"[" * 200_000 + b"]" * 200_000
    for name, damage in (("config.json", deep), ("model.safetensors", None)):
        model = tmp_path / f"deep-{name}-instance"
        shutil.copytree(checkpoints["instance"], model)
        if damage is None:
            write_header(model / name, deep)
        else:
            (model / name).write_bytes(damage)
        with pytest.raises(CheckpointError, match="cannot read"):
            inspect_checkpoint(str(model))
    # Half a weights file (an interrupted copy): the Segmenter's load says so in one line too.
    model = tmp_path / "cut-instance"
    shutil.copytree(checkpoints["instance"], model)
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(str(model))


def test_no_labels_a_dangling_weights_link_and_a_path_argument(checkpoints, tmp_path):
    model = tmp_path / "nolabels-instance"
    shutil.copytree(checkpoints["instance"], model)
    config = json.loads((model / "config.json").read_text())
    config.pop("id2label")
    config.pop("label2id", None)
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="names no labels"):
        inspect_checkpoint(model)  # a Path, as save_random_checkpoint returns
    linked = tmp_path / "dangling-instance"
    shutil.copytree(checkpoints["instance"], linked)
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(CheckpointError, match="weights file model.safetensors is missing"):
        inspect_checkpoint(str(linked))


# -- checkpoints that lie (issue 39) ---------------------------------------------------------------


def with_config_text(source: Path, folder: Path, id2label_json: str) -> Path:
    """A copy of ``source`` whose config's id2label is the JSON text given, written as is (so
    that a key can be written twice)."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("label2id", None)
    config["id2label"] = "@ID2LABEL@"
    text = json.dumps(config).replace('"@ID2LABEL@"', id2label_json)
    (folder / "config.json").write_text(text)
    return folder


# Each has as many entries as the 5-label head has label rows, so only the ids or names are wrong.
LYING_ID2LABEL = {
    "from-one": ('{"1": "a", "2": "b", "3": "c", "4": "d", "5": "e"}',
                 r"numbers its 5 labels 1\.\.5, not 0\.\.4"),
    "spaced-twice": ('{"0": "a", "1": "b", "2": "c", " 2": "c2", "3": "d", "4": "e"}', r"has the key ' 2'"),
    "written-twice": ('{"0": "a", "1": "b", "2": "c", "2": "c2", "3": "d", "4": "e"}',
                      r"'2' is written twice"),
    "list-name": ('{"0": ["person"], "1": "b", "2": "c", "3": "d", "4": "e"}',
                  r"names label 0 with \['person'\]"),
    "number-name": ('{"0": 7, "1": "b", "2": "c", "3": "d", "4": "e"}', r"names label 0 with 7"),
    "gap": ('{"0": "a", "1": "b", "2": "c", "3": "d", "9": "e"}', r"numbers its 5 labels 0, 1, 2, 3, 9"),
    # The review of the fixes: an id past int()'s limit failed as a ValueError (exit 1); names
    # that look empty or hold control characters passed.
    "huge-id": ('{"0": "a", "1": "b", "2": "c", "3": "d", "%s": "e"}' % ("9" * 5000), r"has the key '9999"),
    "invisible-name": ('{"0": "\\u200b", "1": "b", "2": "c", "3": "d", "4": "e"}', r"names label 0 with"),
    "newline-name": ('{"0": "a\\nb", "1": "b", "2": "c", "3": "d", "4": "e"}', r"names label 0 with 'a\\nb'"),
}


@pytest.mark.parametrize("case", sorted(LYING_ID2LABEL))
def test_label_ids_that_are_not_the_head_rows_are_refused(checkpoints, tmp_path, case):
    """Before: each passed (the count matched the head) and every name in the rows and exports
    was wrong or a list's text."""
    text, reason = LYING_ID2LABEL[case]
    model = with_config_text(checkpoints["instance"], tmp_path / f"{case}-instance", text)
    with pytest.raises(CheckpointError, match=reason):
        inspect_checkpoint(str(model))


def test_label_ids_from_one_stop_the_run_before_anything_is_written(checkpoints, images, tmp_path, capsys):
    text, _ = LYING_ID2LABEL["from-one"]
    model = with_config_text(checkpoints["instance"], tmp_path / "from-one-instance", text)
    out = tmp_path / "out"
    line = refusal(capsys, images, out, model)
    assert "id2label numbers its 5 labels 1..5, not 0..4" in line, line
    assert left_empty(out)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_a_class_head_that_is_not_floating_point_is_refused(checkpoints, tmp_path, dtype):
    head = load_file(checkpoints["instance"] / "model.safetensors")["class_predictor.weight"]
    model = edited(checkpoints["instance"], tmp_path / "int-instance",
                   add={"class_predictor.weight": (head * 10).to(dtype)})
    with pytest.raises(CheckpointError, match=r"class head \(class_predictor.weight in model.safetensors\) "
                                             r"is stored as '(I64|I8|BOOL)', not floating point"):
        inspect_checkpoint(str(model))


# A head of the right shape that is not the one checked: all zeros.
UNCHECKED_HEAD = {"class_predictor.weight": torch.zeros(6, 32), "class_predictor.bias": torch.zeros(6)}


def test_a_stale_single_file_beside_an_index_is_refused(checkpoints, tmp_path):
    """Before: the driver read the shard the index names, and transformers loads a
    model.safetensors beside an index first: the model ran on a head never checked."""
    stale = tmp_path / "stale-instance"
    sharded(checkpoints["instance"], stale)
    whole = load_file(checkpoints["instance"] / "model.safetensors")
    save_file({**whole, **UNCHECKED_HEAD}, stale / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="holds both model.safetensors and model.safetensors.index"):
        inspect_checkpoint(str(stale))


def test_a_class_head_in_a_shard_the_index_does_not_assign_is_refused(checkpoints, tmp_path):
    """Before: only the assigned shard's header was read; transformers reads every shard."""
    twice = tmp_path / "twice-instance"
    weight_map = sharded(checkpoints["instance"], twice)
    assert inspect_checkpoint(str(twice)).family == "mask2former"
    other = next(s for s in sorted(set(weight_map.values())) if s != weight_map["class_predictor.weight"])
    head = {"class_predictor.weight": UNCHECKED_HEAD["class_predictor.weight"]}
    save_file({**load_file(twice / other), **head}, twice / other, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"is in model-00001-of-00002.safetensors and "
                                             r"model-00002-of-00002.safetensors, but its index assigns"):
        inspect_checkpoint(str(twice))


def test_a_config_naming_its_own_weights_file_is_refused(checkpoints, tmp_path):
    """Before: transformers followed ``transformers_weights`` to a file the driver never read."""
    named = tmp_path / "named-instance"
    shutil.copytree(checkpoints["instance"], named)
    whole = load_file(checkpoints["instance"] / "model.safetensors")
    save_file({**whole, **UNCHECKED_HEAD}, named / "other.safetensors", metadata={"format": "pt"})
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**config, "transformers_weights": "other.safetensors"}))
    with pytest.raises(CheckpointError, match="names its own weights file"):
        inspect_checkpoint(str(named))


def test_num_labels_that_disagree_with_id2label_are_refused_by_the_driver(checkpoints, tmp_path):
    """transformers makes num_labels win (LABEL_0.. names, a head of another size): the review
    found the driver accepted it and every actor's load failed later."""
    model = tmp_path / "counted-instance"
    shutil.copytree(checkpoints["instance"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_labels": 7}))
    with pytest.raises(CheckpointError, match="num_labels 7 is not the 5 labels its id2label names"):
        inspect_checkpoint(str(model))


def test_an_index_naming_a_list_for_a_shard_is_one_line(checkpoints, tmp_path):
    model = tmp_path / "listed-instance"
    weight_map = sharded(checkpoints["instance"], model)
    index = {"weight_map": {**weight_map, "stray.weight": ["model-00001-of-00002.safetensors"]}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"\['model-00001-of-00002.safetensors'\]\", not a shard"):
        inspect_checkpoint(str(model))
