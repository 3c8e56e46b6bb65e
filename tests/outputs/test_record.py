"""job.json, the job record: each setting held once, both layouts read, and the resume checks."""

from __future__ import annotations

import json

import pytest

from seglabel.core.config import EngineConfig, JobConfig
from seglabel.core.errors import ConfigError


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
