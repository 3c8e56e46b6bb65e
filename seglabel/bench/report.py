"""What a bench run found, for people and for machines: the goals that apply judged met or not
(never asserted), a short table, and the JSON file."""

from __future__ import annotations

import json
from typing import Any, Mapping

from .measure import ratio


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals that apply to this run, each with its value and whether it is met."""
    s = result["settings"]
    a, b, c = (result.get(k) or {} for k in ("hf_loop", "segmenter", "pipeline"))
    ra, rb, rc = a.get("images_per_s"), b.get("images_per_s"), c.get("images_per_s")
    cuda = result["environment"]["device"].startswith("cuda")
    name = f"{s.get('arch') or ''} {s.get('model') or ''}".lower()
    swin_s = "swin-s" in name or "swin-small" in name
    size = result["images"]["size"]
    found: list[dict[str, Any]] = []

    steady = c.get("steady_images_per_s")
    # After a warm-up job the rate with start-up is a best case (bench.pipeline.run_pipeline).
    warm = " (after a warm-up job)" if c.get("warm_up") else ""

    def goal(text: str, value: float | None, target: float) -> None:
        if value is not None:
            found.append({"goal": text, "value": round(value, 3), "target": target, "met": value >= target})

    # Each end-to-end goal twice: over the whole job (start-up included), and in its steady state.
    if cuda and swin_s and s["task"] == "instance" and size == "384x384":
        goal(f"end to end >= 400 img/s (Swin-S instance, 384², one GPU){warm}", rc, 400)
        goal("end to end, steady state, >= 400 img/s", steady, 400)
        goal(f"end to end >= 18x the usual loop{warm}", ratio(rc, ra), 18)
        goal("end to end, steady state, >= 18x the usual loop", ratio(steady, ra), 18)
    if cuda and s.get("arch") == "eomt-l" and s["task"] == "panoptic":
        # Twice the authors' batch-1, forward-only 128 FPS (EoMT-L, COCO panoptic 640, H100).
        goal(f"end to end >= 256 img/s (EoMT-L panoptic, 640², one GPU){warm}", rc, 256)
        goal("end to end, steady state, >= 256 img/s (EoMT-L)", steady, 256)
    if cuda and swin_s and size == "800x1088":
        goal(f"end to end >= 60 img/s at 800x1088{warm}", rc, 60)
        goal("end to end, steady state, >= 60 img/s at 800x1088", steady, 60)
    goal(f"end to end >= 90% of the Segmenter alone{warm}", ratio(rc, rb), 0.9)
    goal("end to end, steady state, >= 90% of the Segmenter alone", ratio(steady, rb), 0.9)
    if not cuda and s.get("arch") == "tiny":
        goal("CPU, tiny: Segmenter alone >= 3x the usual loop", ratio(rb, ra), 3)
    return found


def busy_warning(result: Mapping[str, Any]) -> str | None:
    """A warning when other processes used the CPUs as the bench started or during (a), (b)."""
    env = result["environment"]
    if not env.get("device", "cpu").startswith("cpu"):
        return None
    shares = {"before": env.get("cpu_busy_before")}
    for key, name in (("hf_loop", "(a)"), ("segmenter", "(b)")):
        shares[name] = (result.get(key) or {}).get("others_cpu_share")
    worst = {k: v for k, v in shares.items() if v is not None and v > 0.1}
    if worst:
        text = ", ".join(f"{k} {v:.0%}" for k, v in worst.items())
        return (f"other processes took CPU time ({text} of all CPUs): CPU figures are not reliable "
                "(torch threads wait on each other); rerun on an idle machine")
    return None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _util(phase: Mapping[str, Any]) -> str:
    util = phase.get("gpu_util") or {}
    return f"{util['mean_pct']:.0f}%" if util.get("available") else "n/a"


def report(result: Mapping[str, Any]) -> str:
    """The figures as a short table for people."""
    s, env, ck = result["settings"], result["environment"], result["checkpoint"]
    lines = []
    what = ck["model"]
    if "num_queries" in ck:
        what += f" ({ck['num_queries']} queries, {ck['num_labels']} labels)"
    lines.append(
        f"seglabel bench: {s['task']} with {what}; {result['images']['count']} images "
        f"{result['images']['size']} ({result['images']['source']})"
    )
    lines.append(
        f"device {env['device']} ({env['device_name']}), torch {env['torch']}, "
        f"transformers {env['transformers']}, "
        f"{env['torch_threads']} torch threads; Segmenter {s['dtype']}, batch {s['batch_size']}"
    )
    lines.append(f"{'':34} {'images/s':>9} {'seg/img':>8} {'GPU':>5}  per image (ms)")
    rows = [
        ("(a) usual HF loop (fp32, batch 1)", result.get("hf_loop")),
        ("(b) Segmenter alone", result.get("segmenter")),
        ("(c) pipeline (seglabel run)", result.get("pipeline")),
    ]
    for name, phase in rows:
        if not phase:
            lines.append(f"{name:34} {'skipped':>9}")
            continue
        stages = ", ".join(f"{k} {v:.2f}" for k, v in phase.get("ms_per_image", {}).items())
        if name.startswith("(c)"):
            stages = (
                f"steady {_fmt(phase.get('steady_images_per_s'))} img/s; "
                f"Ray start {phase['ray']['init_s']:.1f} s "
                f"apart; decode {_fmt(phase.get('decode_ms_per_image'), 2)} ms/img/core; "
                f"{phase['ok']} ok, {phase['errors']} errors"
                + (f"; after an untimed {warm['images']}-image job in the same Ray (a best-case start)"
                   if (warm := phase.get("warm_up")) else "")
            )
        lines.append(
            f"{name:34} {_fmt(phase.get('images_per_s')):>9} {_fmt(phase.get('segments_per_image')):>8} "
            f"{_util(phase):>5}  {stages}"
        )
    b = result["segmenter"]
    lines.append(f"{'    Segmenter, model only':34} {_fmt(b.get('model_images_per_s')):>9}")
    lines.append(f"{'    Segmenter, with PNG':34} {_fmt(b.get('with_png_images_per_s')):>9}")
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in result["ratios"].items() if v is not None)
    lines.append(f"ratios: {ratios or '-'}")
    for g in result.get("goals", []):
        lines.append(
            f"goal {'MET' if g['met'] else 'not met'}: {g['goal']}: {g['value']:.2f} (target {g['target']})"
        )
    busy = busy_warning(result)
    if busy:
        lines.append(f"WARNING: {busy}")
    return "\n".join(lines)


def memory_text(report_: Mapping[str, Any]) -> str:
    """The driver-memory figures as a short table: bytes per image (the slope of peak RSS
    between the two sizes), what that makes at 10^8 images, and seconds per 10^6."""
    small, large = report_["sizes"]
    lines = [
        f"driver memory per image: slope of peak RSS between {small:,} and {large:,} images "
        "(each in a fresh process)",
        f"  {'':14} {'B/image':>8} {'at 10^8':>9} {'s/10^6':>7}  what",
    ]
    for name, m in report_["measures"].items():
        figures = f"{m['bytes_per_image']:8.1f} {m['at_1e8_gb']:7.2f}GB {m['seconds_per_million']:7.2f}"
        lines.append(f"  {name:14} {figures}  {m['what']}")
    part = report_["part_buffer"]
    lines.append(
        f"  a part's rows before commit: at most {part['rows']:,} rows or "
        f"{part['max_bytes'] / 2**20:.0f} MiB (then written), whatever the corpus"
    )
    return "\n".join(lines)


def write_json(result: Mapping[str, Any], path: str) -> None:
    import fsspec

    with fsspec.open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


__all__ = ["busy_warning", "goals", "memory_text", "report", "write_json"]
