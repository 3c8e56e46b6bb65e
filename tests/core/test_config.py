"""The frozen, validated config, the job record, the error base and the CLI's structure, without
Ray or a model."""

from __future__ import annotations

import dataclasses

import pytest

from seglabel.core.config import DEFAULT_EXTENSIONS, JobConfig, Resolution
from seglabel.core.errors import ConfigError, SeglabelError


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
