"""The frozen, validated config, the job record, the error base and the CLI's structure, without
Ray or a model."""

from __future__ import annotations

import dataclasses
import json

import pytest

from seglabel.core.config import DEFAULT_EXTENSIONS, EngineConfig, JobConfig, Resolution
from seglabel.core.errors import ConfigError, SeglabelError, one_line
from seglabel.storage.spec import load_spec


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
    # Every setting's type (issue 24): templating tools quote booleans, and a string is true.
    ({"output": "o", "input": "i", "overwrite": "false"}, "overwrite must be true or false, got 'false'"),
    ({"output": "o", "input": "i", "retry_errors": "no"}, "retry_errors must be true or false"),
    ({"output": "o", "input": "i", "dry_run": "false"}, "dry_run must be true or false"),
    ({"output": "o", "input": "i", "compat": 1}, "compat must be true or false"),
    ({"output": "o", "input": "i", "min_area": "10"}, "min_area must be a whole number, got '10'"),
    ({"output": "o", "input": "i", "score_threshold": "0.5"}, "score_threshold must be a number"),
    ({"output": "o", "input": "i", "max_pixels": "1e6"}, "max_pixels must be a whole number"),
    ({"output": "o", "input": "i", "max_errors": True}, "max_errors must be a number"),
    ({"output": "o", "input": ["a", "b"]}, "input must be a string"),
    ({"output": ["o"], "input": "i"}, "an output URL is required"),
    ({"output": "o", "input": "i", "resolution": [1, 2]}, "resolution must be HxW"),
    ({"output": "o", "input": "i", "batch_size": True}, "batch_size must be a whole number"),
    ({"output": "o", "input": "i", "rows_per_part": True}, "rows_per_part must be a whole number"),
    ({"output": "o", "input": "i", "batch_size": 10**20}, "batch_size must be between 1 and 65536"),
    ({"output": "o", "input": "i", "min_area": 2.5}, "min_area must be a whole number, got 2.5"),
    ({"output": "o", "input": "i", "labels": {"a": 1}}, "labels must be a list of label names or ids"),
    ({"output": "o", "input": "i", "extensions": 5}, "extensions must be file extensions"),
    ({"output": "o", "input": "i", "stand_in": 3}, "stand_in must be a string"),
])
def test_bad_settings_are_one_line_config_errors(values, message):
    with pytest.raises(ConfigError) as err:
        JobConfig.from_mapping(values)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, SeglabelError) and err.value.exit_status == 2


def test_paths_from_python_are_taken_as_strings(tmp_path):
    config = JobConfig.from_mapping({"input": tmp_path / "in", "output": tmp_path / "out",
                                     "model": tmp_path / "m"})
    given = tuple(str(tmp_path / n) for n in ("in", "out", "m"))
    assert (config.input, config.output, config.engine.model) == given


def test_labels_take_a_list_a_string_or_one_id():
    base = {"output": "o", "input": "i"}
    assert JobConfig.from_mapping({**base, "labels": 5}).engine.labels == ("5",)
    assert JobConfig.from_mapping({**base, "labels": ["a", 7]}).engine.labels == ("a", "7")
    assert JobConfig.from_mapping({**base, "thing_labels": "a, b"}).engine.thing_labels == ("a", "b")


def test_a_quoted_false_in_a_spec_is_refused_before_anything_is_deleted(tmp_path, capsys):
    """``overwrite: "false"`` (as templating tools write YAML) once deleted the last results."""
    from seglabel.cli import main

    out = tmp_path / "labels"
    (out / "metadata").mkdir(parents=True)
    (out / "metadata" / "part-1.parquet").write_bytes(b"results")
    (tmp_path / "in").mkdir()
    spec = tmp_path / "job.yaml"
    spec.write_text(f'input: {tmp_path / "in"}\noutput: {out}\noverwrite: "false"\n')
    assert main(["run", "--config", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "overwrite must be true or false" in err[0]
    assert (out / "metadata" / "part-1.parquet").read_bytes() == b"results"


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


def test_yaml_alias_bombs_are_refused_at_once(tmp_path, capsys):
    """Nested aliases (nine levels of nine: 9^9 values once expanded) are refused while the
    spec is read, after a bounded walk, before any other walk of its settings; so is a spec
    past 1 MiB, and a bad alias in a ``--input-option`` value is one line, not a traceback.
    Anchors that share storage options, merge keys included, still read."""
    from seglabel.cli import main

    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    spec = tmp_path / "bomb.yaml"
    spec.write_text("output: o\ninput: i\n" + "\n".join(levels) + "\n")
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        load_spec(str(spec))
    spec.write_text("output: o\ninput: i\ninput_storage_options: &s3 {endpoint_url: 'http://127.0.0.1:9000'}\n"
                    "output_storage_options: {<<: *s3, anon: true}\nmax_pixels: 1.0e+8\n")
    config = JobConfig.from_mapping(load_spec(str(spec)))
    assert config.output_storage_options == {"endpoint_url": "http://127.0.0.1:9000", "anon": True}
    assert config.max_pixels == 100_000_000 and isinstance(config.max_pixels, int)
    spec.write_text("output: o\ninput: i\nnote: " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="over 1 MiB"):
        load_spec(str(spec))
    assert main(["run", "--input", "i", "--output", "o", "--input-option", "a=*x"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the value of 'a=*x'" in err and "Traceback" not in err


def test_job_record_holds_each_setting_once():
    from seglabel.outputs.record import JobRecord

    config = JobConfig.from_mapping({"input": "/in", "output": "/out", "model": "/ckpt/m-instance",
                                     "score_threshold": 0.3, "resolution": "384x384", "labels": "a,b"})
    from seglabel.core.license import License

    mit = License("mit", "its card")
    record = JobRecord.new(config, "instance", "abc123", {0: "a", 1: "b"}, "eomt", mit).values
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
    from seglabel.outputs.record import JobRecord

    engine = EngineConfig(model="/ckpt/m-instance", score_threshold=0.3)
    config = JobConfig(output="/out", input="/in", engine=engine)
    from seglabel.core.license import License

    record = JobRecord.new(config, "instance", None, {}, "mask2former", License("unknown", "no card"))
    record.check_settings(engine, "instance", None, "/out")  # same: nothing raised
    with pytest.raises(ConfigError, match="family: 'mask2former' -> 'eomt'"):
        record.check_settings(engine, "instance", None, "/out", "eomt")
    with pytest.raises(ConfigError, match="score_threshold: 0.3 -> 0.5"):
        record.check_settings(engine.replace(score_threshold=0.5), "instance", None, "/out")
    with pytest.raises(ConfigError, match="revision"):
        record.check_settings(engine, "instance", "a-new-commit", "/out")
    # A job.json written before settings were recorded once kept them in "settings".
    old = JobRecord({"task": "instance", "revision": "resolved", "settings": engine.mask_settings()})
    old.check_settings(engine, "instance", "resolved", "/out")
    with pytest.raises(ConfigError, match="min_area"):
        old.check_settings(engine.replace(min_area=5), "instance", "resolved", "/out")


def test_an_old_record_with_a_relative_checkpoint_path_still_resumes(tmp_path, monkeypatch):
    """seglabel 0.1.0 recorded a local checkpoint as typed; the driver now makes it absolute."""
    from seglabel.job.plan import absolute_paths
    from seglabel.outputs.record import JobRecord

    (tmp_path / "ckpt-instance").mkdir()
    monkeypatch.chdir(tmp_path)
    config = absolute_paths(
        JobConfig.from_mapping({"input": "in", "output": "out", "model": "./ckpt-instance"})
    )
    old = {"task": "instance", "settings": {**config.engine.mask_settings(), "model": "./ckpt-instance"}}
    JobRecord(old).check_settings(config.engine, "instance", None, str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="model"):
        JobRecord({**old, "settings": {**old["settings"], "model": "./other-instance"}}).check_settings(
            config.engine, "instance", None, str(tmp_path / "out"))


def test_absolute_paths_in_the_driver(tmp_path, monkeypatch):
    from seglabel.job.plan import absolute_paths

    (tmp_path / "ckpt-instance").mkdir()
    monkeypatch.chdir(tmp_path)
    config = JobConfig.from_mapping({"input": "./images", "output": "labels", "model": "ckpt-instance"})
    resolved = absolute_paths(config)
    assert resolved.input == str(tmp_path / "images") and resolved.output == str(tmp_path / "labels")
    assert resolved.engine.model == str(tmp_path / "ckpt-instance")
    hub = JobConfig.from_mapping({"manifest": "s3://b/m.txt", "output": "s3://b/out",
                                  "model": "facebook/mask2former-swin-small-coco-instance"})
    assert absolute_paths(hub) == hub  # URLs and Hub ids stay as given


def test_errors_are_one_line_and_share_one_base():
    from seglabel.core.errors import (
        CheckpointError,
        DecodeError,
        ExportError,
        JobError,
        OutputError,
        SourceError,
    )

    for cls in (ConfigError, SourceError, CheckpointError, OutputError, ExportError, JobError, DecodeError):
        assert issubclass(cls, SeglabelError)
    assert JobError.exit_status == 1 and OutputError.exit_status == 2
    assert one_line(ValueError("a\n  b\tc")) == "a b c"
    assert one_line(ValueError("")) == "ValueError"
    assert one_line(ValueError("x" * 500), 20) == "x" * 17 + "..."


def test_resume_accepts_an_old_url_checkpoint_record_and_refuses_a_stand_in_on_real_masks():
    """seglabel recorded no revision for URL checkpoints before fingerprints: accepted (and
    recorded by the run). A stand-in never adds fake rows to an output a real model made."""
    from seglabel.outputs.record import JobRecord, mask_settings

    engine = EngineConfig(model="s3://b/m-instance")
    old = {**mask_settings(engine, "instance", None)}
    old.pop("stand_in")
    JobRecord(old).check_settings(engine, "instance", "files-0123456789abcdef", "out")
    with pytest.raises(ConfigError, match="stand_in"):
        JobRecord(old).check_settings(engine.replace(stand_in="default"), "instance", None, "out")
    with pytest.raises(ConfigError, match="revision"):
        JobRecord({**old, "revision": "files-1"}).check_settings(engine, "instance", "files-2", "out")
