"""The frozen, validated config, the job record, the error base and the CLI's structure, without
Ray or a model."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT
from seglabel.config import DEFAULT_EXTENSIONS, ConfigError, EngineConfig, JobConfig, Resolution, load_spec
from seglabel.errors import SeglabelError, one_line


def test_defaults_and_normalisation():
    config = JobConfig.from_mapping({"input": "in", "output": "out", "extensions": ".JPG,png",
                                     "labels": "person, car", "resolution": "800"})
    assert config.extensions == ("jpg", "png")
    assert config.engine.labels == ("person", "car")
    assert config.engine.resolution == Resolution("shortest", shortest=800, longest=1333)
    assert JobConfig(output="o", input="i").extensions == DEFAULT_EXTENSIONS
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.output = "elsewhere"  # type: ignore[misc]


@pytest.mark.parametrize("values, message", [
    ({"input": "i"}, "an output URL is required"),
    ({"output": "o"}, "exactly one of --input"),
    ({"output": "o", "input": "i", "manifest": "m"}, "exactly one of --input"),
    ({"output": "o", "input": "o"}, "must not be the input folder"),
    ({"output": "o", "input": "i", "batch_size": 0}, "batch_size"),
    ({"output": "o", "input": "i", "score_threshold": 1.5}, "score_threshold"),
    ({"output": "o", "input": "i", "resolution": "big"}, "resolution"),
    ({"output": "o", "input": "i", "max_errors": 1.5}, "max_errors"),
    ({"output": "o", "input": "i", "task": "detection"}, "task"),
    ({"output": "o", "input": "i", "batchsize": 3}, "unknown setting(s) batchsize"),
    ({"output": "o", "input": "i", "input_storage_options": "anon"}, "mapping"),
    ({"output": "o", "input": "i", "stand_in": "segments=x"}, "stand_in: cannot read 'segments=x'"),
    ({"output": "o", "input": "i", "stand_in": "kill=13"}, "stand_in: cannot read 'kill=13'"),
    ({"output": "o", "input": "i", "stand_in": "coverage=2"}, "coverage in (0, 1]"),
])
def test_bad_settings_are_one_line_config_errors(values, message):
    with pytest.raises(ConfigError) as err:
        JobConfig.from_mapping(values)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, SeglabelError) and err.value.exit_status == 2


def test_specs_from_files_and_the_environment(tmp_path, monkeypatch):
    spec = tmp_path / "job.yaml"
    spec.write_text("input: in\noutput: out\nbatch_size: 4\n")
    assert JobConfig.from_mapping(load_spec(str(spec))).engine.batch_size == 4
    monkeypatch.setenv("SPEC", "output: o\nmanifest: m.txt\n")
    assert load_spec("env:SPEC") == {"output": "o", "manifest": "m.txt"}
    for text, message in (("[1, 2]", "must be a mapping"), ("a: [", "not valid YAML")):
        spec.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_spec(str(spec))
    with pytest.raises(ConfigError, match="not found"):
        load_spec(str(tmp_path / "missing.yaml"))


def test_job_record_holds_each_setting_once():
    from seglabel.pipeline import _job_record

    config = JobConfig.from_mapping({"input": "/in", "output": "/out", "model": "/ckpt/m-instance",
                                     "score_threshold": 0.3, "resolution": "384x384", "labels": "a,b"})
    from seglabel.license import License

    record = _job_record(config, "instance", "abc123", {0: "a", 1: "b"}, "eomt", License("mit", "its card"))
    assert "settings" not in record
    assert record["family"] == "eomt"
    assert record["model_license"] == {"license": "mit", "source": "its card", "card": None}
    flat = json.dumps(record)
    assert flat.count('"score_threshold"') == 1 and flat.count('"resolution"') == 1
    assert (
        record["score_threshold"] == 0.3
        and record["resolution"] == "384x384"
        and record["labels"] == ["a", "b"]
    )
    assert (record["task"], record["revision"], record["model"]) == ("instance", "abc123", "/ckpt/m-instance")
    assert set(EngineConfig.MASK_FIELDS) <= set(record)


def test_resume_check_reads_new_and_old_job_records():
    from seglabel.pipeline import _check_same_settings, _job_record

    engine = EngineConfig(model="/ckpt/m-instance", score_threshold=0.3)
    config = JobConfig(output="/out", input="/in", engine=engine)
    from seglabel.license import License

    record = _job_record(config, "instance", None, {}, "mask2former", License("unknown", "no card"))
    _check_same_settings(record, engine, "instance", None, "/out")  # same: nothing raised
    with pytest.raises(ConfigError, match="family: 'mask2former' -> 'eomt'"):
        _check_same_settings(record, engine, "instance", None, "/out", "eomt")
    with pytest.raises(ConfigError, match="score_threshold: 0.3 -> 0.5"):
        _check_same_settings(record, engine.replace(score_threshold=0.5), "instance", None, "/out")
    with pytest.raises(ConfigError, match="revision"):
        _check_same_settings(record, engine, "instance", "a-new-commit", "/out")
    # A job.json written before settings were recorded once kept them in "settings".
    old = {"task": "instance", "revision": "resolved", "settings": engine.mask_settings()}
    _check_same_settings(old, engine, "instance", "resolved", "/out")
    with pytest.raises(ConfigError, match="min_area"):
        _check_same_settings(old, engine.replace(min_area=5), "instance", "resolved", "/out")


def test_an_old_record_with_a_relative_checkpoint_path_still_resumes(tmp_path, monkeypatch):
    """seglabel 0.1.0 recorded a local checkpoint as typed; the driver now makes it absolute."""
    from seglabel.pipeline import _absolute_paths, _check_same_settings

    (tmp_path / "ckpt-instance").mkdir()
    monkeypatch.chdir(tmp_path)
    config = _absolute_paths(
        JobConfig.from_mapping({"input": "in", "output": "out", "model": "./ckpt-instance"})
    )
    old = {"task": "instance", "settings": {**config.engine.mask_settings(), "model": "./ckpt-instance"}}
    _check_same_settings(old, config.engine, "instance", None, str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="model"):
        _check_same_settings({**old, "settings": {**old["settings"], "model": "./other-instance"}},
                             config.engine, "instance", None, str(tmp_path / "out"))


def test_absolute_paths_in_the_driver(tmp_path, monkeypatch):
    from seglabel.pipeline import _absolute_paths

    (tmp_path / "ckpt-instance").mkdir()
    monkeypatch.chdir(tmp_path)
    config = JobConfig.from_mapping({"input": "./images", "output": "labels", "model": "ckpt-instance"})
    resolved = _absolute_paths(config)
    assert resolved.input == str(tmp_path / "images") and resolved.output == str(tmp_path / "labels")
    assert resolved.engine.model == str(tmp_path / "ckpt-instance")
    hub = JobConfig.from_mapping({"manifest": "s3://b/m.txt", "output": "s3://b/out",
                                  "model": "facebook/mask2former-swin-small-coco-instance"})
    assert _absolute_paths(hub) == hub  # URLs and Hub ids stay as given


def test_errors_are_one_line_and_share_one_base():
    from seglabel.checkpoint import CheckpointError
    from seglabel.decode import DecodeError
    from seglabel.export import ExportError
    from seglabel.pipeline import JobError
    from seglabel.sink import OutputError
    from seglabel.sources import SourceError

    for cls in (ConfigError, SourceError, CheckpointError, OutputError, ExportError, JobError, DecodeError):
        assert issubclass(cls, SeglabelError)
    assert JobError.exit_status == 1 and OutputError.exit_status == 2
    assert one_line(ValueError("a\n  b\tc")) == "a b c"
    assert one_line(ValueError("")) == "ValueError"
    assert one_line(ValueError("x" * 500), 20) == "x" * 17 + "..."


def _imports(path: Path) -> set[str]:
    """Modules a file imports (absolute names; relative imports resolved against seglabel)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_nothing_below_the_cli_imports_it_and_config_imports_no_stage():
    library = [
        p for p in (ROOT / "seglabel").rglob("*.py") if "cli" not in p.relative_to(ROOT / "seglabel").parts
    ]
    entry_points = {ROOT / "seglabel" / "__main__.py", ROOT / "seglabel" / "jobs_entry.py"}
    for path in library:
        if path in entry_points:
            continue
        assert not any(m == "seglabel.cli" or m.startswith("seglabel.cli.") for m in _imports(path)), path
    own = {m for m in _imports(ROOT / "seglabel" / "config.py") if m.startswith("seglabel")}
    assert own <= {"seglabel.errors", "seglabel.errors.SeglabelError"}, own


def test_help_does_not_load_torch_or_ray():
    code = ("import sys; from seglabel.cli import main; main(['--help'])\n"
            "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr
    assert "usage: seglabel" in done.stdout


def test_resume_accepts_an_old_url_checkpoint_record_and_refuses_a_stand_in_on_real_masks():
    """seglabel recorded no revision for URL checkpoints before fingerprints: accepted (and
    recorded by the run). A stand-in never adds fake rows to an output a real model made."""
    from seglabel.pipeline import _check_same_settings, _mask_settings

    engine = EngineConfig(model="s3://b/m-instance")
    old = {**_mask_settings(engine, "instance", None)}
    old.pop("stand_in")
    _check_same_settings(old, engine, "instance", "files-0123456789abcdef", "out")
    with pytest.raises(ConfigError, match="stand_in"):
        _check_same_settings(old, engine.replace(stand_in="default"), "instance", None, "out")
    with pytest.raises(ConfigError, match="revision"):
        _check_same_settings({**old, "revision": "files-1"}, engine, "instance", "files-2", "out")
