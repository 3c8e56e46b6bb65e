"""`seglabel bench` on the CPU with the tiny architecture: the figures are there and agree with
each other. Speed is measured by the bench, never asserted here."""

from __future__ import annotations

import json
import math
import re
import tempfile

import pytest
import yaml

from helpers import ROOT
from seglabel.bench import BenchConfig, bench_images, memory_report, parse_size, report, run_bench
from seglabel.cli import main
from seglabel.core.config import EngineConfig
from seglabel.core.errors import ConfigError

TASKS = ("instance", "semantic", "panoptic")


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@pytest.fixture(scope="module")
def without_pipeline(tmp_path_factory):
    """(a) and (b) for each task on a few images, with the JSON written."""
    out = {}
    for task in TASKS:
        path = tmp_path_factory.mktemp("bench") / f"{task}.json"
        config = BenchConfig.from_mapping(
            {
                "arch": "tiny",
                "task": task,
                "images": 3,
                "batch_size": 2,
                "skip_pipeline": True,
                "json": str(path),
            }
        )
        result = run_bench(config)
        out[task] = (result, json.loads(path.read_text()))
    return out


@pytest.mark.parametrize("task", TASKS)
def test_rates_ratios_and_segments(without_pipeline, task):
    result, written = without_pipeline[task]
    a, b = written["hf_loop"], written["segmenter"]
    assert a["images"] == b["images"] == 3
    for phase in (a, b):
        assert phase["images_per_s"] > 0
        assert close(phase["images_per_s"], phase["images"] / phase["seconds"])
        # The confident random model gives every path segments to work on.
        assert phase["segments_per_image"] > 0
    assert close(written["ratios"]["b/a"], b["images_per_s"] / a["images_per_s"])
    assert written["ratios"]["c/a"] is None and "pipeline" not in written
    assert b["model_images_per_s"] >= b["images_per_s"] >= b["with_png_images_per_s"] > 0
    # What the function returned is what was written.
    assert written["ratios"] == json.loads(json.dumps(result["ratios"]))


@pytest.mark.parametrize("task", TASKS)
def test_stage_times_are_positive(without_pipeline, task):
    _, written = without_pipeline[task]
    assert set(written["hf_loop"]["stages_s"]) == {"processor", "forward", "postprocess"}
    assert set(written["segmenter"]["stages_s"]) == {"preprocess", "forward", "postprocess", "rle", "png"}
    for phase in ("hf_loop", "segmenter"):
        stages = written[phase]["stages_s"]
        assert all(v > 0 for v in stages.values()), stages
        assert sum(stages.values()) <= written[phase]["seconds"] * 1.5 + 0.01
        assert set(written[phase]["ms_per_image"]) == set(stages)


def test_environment_checkpoint_and_report(without_pipeline):
    result, written = without_pipeline["instance"]
    env = written["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["transformers"] and env["device_name"]
    ck = written["checkpoint"]
    assert ck["arch"] == "tiny" and ck["num_queries"] == 10 and ck["num_labels"] == 80
    assert 0 < ck["calibration"]["mask_coverage"] < 0.5
    assert written["images"] == {**written["images"], "count": 3, "size": "384x384"}
    assert written["hf_loop"]["gpu_util"]["available"] is False
    # The CPU goal for the tiny model is judged (met or not), never asserted.
    assert any("3x" in g["goal"] for g in written["goals"])
    text = report(result)
    assert "(a) usual HF loop" in text and "(b) Segmenter alone" in text and "b/a" in text


# The pipeline phase joins the Ray this process holds, as it does any (job.cluster.connect): the
# tests' shared one, not one of its own to start and stop (about 13 s of CPU on 2 cores).
@pytest.mark.usefixtures("ray_session")
def test_pipeline_on_a_handful_of_images(tmp_path):
    path = tmp_path / "bench.json"
    result = run_bench(BenchConfig.from_mapping(
        {"arch": "tiny", "task": "instance", "images": 6, "batch_size": 2, "json": str(path),
         "pipeline_warm_up": 2}))
    written = json.loads(path.read_text())
    c = written["pipeline"]
    assert c["images"] == 6 and c["ok"] == 6 and c["errors"] == 0
    # An untimed job ran first, into its own output: the timed one still labeled all six, and
    # the goals judged on the rate with start-up say that it came after one.
    assert written["settings"]["pipeline_warm_up"] == 2 and c["warm_up"]["ok"] == 2
    assert any(g["goal"].endswith("(after a warm-up job)") for g in written["goals"])
    assert "after an untimed 2-image job" in report(result)
    assert c["formats"] == {"jpg": 5, "png": 1}
    assert c["images_per_s"] > 0 and c["segments_per_image"] > 0
    assert c["decode_ms_per_image"] > 0 and c["ray"]["init_s"] >= 0
    ra, rb, rc = (written[k]["images_per_s"] for k in ("hf_loop", "segmenter", "pipeline"))
    ratios = written["ratios"]
    assert close(ratios["b/a"], rb / ra) and close(ratios["c/a"], rc / ra) and close(ratios["c/b"], rc / rb)
    assert any("90%" in g["goal"] for g in written["goals"])
    assert "(c) pipeline" in report(result)


@pytest.mark.usefixtures("ray_session")
def test_stand_in_bench_measures_the_pipeline_without_the_model(tmp_path, capsys):
    """(r) the CPU work in one loop and (p) seglabel run with the stand-in, on the same JPEG
    files; the efficiency is p / (r x cores), and every stage's CPU is reported."""
    path = tmp_path / "plumbing.json"
    assert main(["bench", "--stand-in", "segments=5,coverage=0.04", "--images", "24", "--size", "96x128",
                 "--batch-size", "4", "--pipeline-warm-up", "30", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    written = json.loads(path.read_text())
    raw, pipeline = written["raw"], written["pipeline"]
    assert raw["images"] == pipeline["images"] == pipeline["ok"] == 24
    # The untimed job ran first, on 30 images (the 24 cycled) in an output of its own: the timed
    # job still labeled all 24 (sharing an output, it would have resumed past them).
    assert pipeline["warm_up"]["images"] == pipeline["warm_up"]["ok"] == 30
    assert "after an untimed job of 30 images (30 ok" in out
    assert written["batch_size"] == 4
    assert pipeline["formats"] == {"jpg": 24, "png": 0}
    assert raw["segments_per_image"] == pipeline["segments_per_image"] == 5
    cores = written["cores"]
    assert cores == written["pipeline"]["ray"]["resources"]["CPU"]
    assert close(written["efficiency"], pipeline["images_per_s"] / (raw["images_per_s"] * cores))
    assert set(raw["cpu_ms_per_image"]) == {"read+decode", "stand-in", "rle+png", "write"}
    stages = pipeline["stage_cpu_ms_per_image"]
    assert {"read+decode", "segment", "encode+write", "driver"} <= set(stages)
    assert all(stages[k] > 0 for k in ("read+decode", "segment", "encode+write"))
    # The cores' share the pipeline's processes kept busy: its CPU seconds over wall × cores.
    cpu_s = sum(stages.values()) * 24 / 1000
    assert close(written["cores_busy"], cpu_s / (pipeline["seconds"] * cores))
    assert 0 < written["cores_busy"] < 1.5
    assert written["cpu"] in out and "efficiency p / (r x" in out and "cores busy" in out
    # What the stand-in's actor does not load, timed apart: a real actor's start adds it.
    assert written["model_imports_s"] > 0 and f"imports, {written['model_imports_s']:.1f} s" in out
    assert written["tempdir"] == tempfile.gettempdir()


def test_cli_json(tmp_path, capsys):
    path = tmp_path / "cli.json"
    code = main(["bench", "--images", "2", "--batch-size", "2", "--skip-pipeline", "--skip-hf",
                 "--target-segments", "0", "--json", str(path)])
    assert code == 0
    written = json.loads(path.read_text())
    assert "hf_loop" not in written and written["segmenter"]["images"] == 2
    assert "skipped" in capsys.readouterr().out


def test_cli_config_spec(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("arch: tiny\nimages: 2\nbatch_size: 2\nskip_hf: true\nskip_pipeline: true\n")
    assert main(["bench", "--config", str(spec), "--images", "3", "--json", str(tmp_path / "o.json")]) == 0
    written = json.loads((tmp_path / "o.json").read_text())
    assert written["segmenter"]["images"] == 3  # the flag overrides the spec
    spec.write_text("arch: tiny\nbatchsize: 2\n")
    assert main(["bench", "--config", str(spec)]) == 2
    assert "batchsize" in capsys.readouterr().err


def test_job_spec_uses_bench_settings():
    spec = yaml.safe_load((ROOT / "jobs" / "bench.yaml").read_text())
    config = BenchConfig.from_spec(str(ROOT / "jobs" / "bench.yaml"), {})
    assert config.arch == spec["arch"] and config.engine.batch_size == spec["batch_size"]
    assert config.engine.dtype == spec["dtype"] and config.pipeline_repeat == spec["pipeline_repeat"]


def test_bench_config_is_validated_and_shares_the_engine_defaults():
    config = BenchConfig()
    assert config.arch == "tiny" and config.task == "instance"
    # The thresholds and batch size are the engine's own defaults, not a second copy of them.
    assert config.engine == EngineConfig()
    assert BenchConfig.from_mapping({"score-threshold": 0.3}).engine.score_threshold == 0.3
    for bad, message in (
        ({"model": "x-instance", "arch": "tiny"}, "not both"),
        ({"images": 0}, "images"),
        ({"size": "big"}, "--size"),
        ({"score_threshold": 2}, "score_threshold"),
        ({"batchsize": 2}, "unknown bench setting(s) batchsize"),
        ({"arch": "swin-xl"}, "arch"),
        ({"pipeline_warm_up": -1}, "pipeline_warm_up"),
        ({"pipeline_warm_up": True}, "pipeline_warm_up"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            BenchConfig.from_mapping(bad)
    assert BenchConfig.from_mapping({"model": "org/m2f-coco-panoptic"}).task == "panoptic"


def test_sizes_and_images():
    assert parse_size("384") == (384, 384)
    assert parse_size("800x1088") == (800, 1088)
    assert parse_size("native") is None
    with pytest.raises(ConfigError):
        parse_size("big")
    images, info = bench_images(10, (64, 96))
    assert len(images) == 10 and all(a.shape == (64, 96, 3) for a in images)
    assert info["source"] == "skimage.data" and len(info["photos"]) >= 4
    # Later rounds of the same photo are not the same pixels.
    n = len(info["photos"])
    assert (images[0] != images[n]).any()


def test_memory_report_measures_every_structure_at_two_sizes():
    from seglabel.bench import memory_text

    mem = memory_report(entries=12_000)
    assert mem["sizes"] == [2_000, 12_000]
    names = set(mem["measures"])
    assert names == {"enumerate", "resume_scan", "commit_guard", "counts", "dry_run", "inspect"}
    for name, measure in mem["measures"].items():
        runs = measure["runs"]
        for n in ("2000", "12000"):
            assert 10 < runs[n]["peak_mb"] < 4096 and runs[n]["seconds"] > 0, (name, runs[n])
        slope = (runs["12000"]["peak_mb"] - runs["2000"]["peak_mb"]) * 2**20 / 10_000
        assert measure["bytes_per_image"] == round(slope, 1)
    # Each structure really held the images it stands for.
    large = {name: measure["runs"]["12000"] for name, measure in mem["measures"].items()}
    assert large["enumerate"]["found"] == large["resume_scan"]["keys"] == 12_000
    assert large["counts"]["total"] == large["commit_guard"]["rows"] == 12_000
    text = memory_text(mem)
    assert "B/image" in text and "dry_run" in text and "64 MiB" in text
