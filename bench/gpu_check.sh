#!/usr/bin/env bash
# seglabel's GPU check and benchmark (issue 7) as ONE prepared script for the device machine:
# one H100 (or H200), Python 3.12, torch 2.11 CUDA, transformers 5.17, no ray/s3fs/moto/scikit-image,
# no network. See bench/README.md for the goals.
#
# 1. Prepare once, on a machine with the network (the CPU machine), from the repo root:
#        bash bench/gpu_check.sh --prepare
#    -> .carry/ray-py312.tar.xz    Ray + jsonschema + pycocotools for Python 3.12 (../shared/tools/device-pack-ray)
#    -> .carry/bench-photos/*.png  the skimage.data photos the bench cycles (the device has no scikit-image)
#    (.carry/ is git-ignored; about 30 MB in all, under the 64 MiB carry limit.)
# 2. Run on the device (the `run` tool), carrying .carry:
#        run(command="bash bench/gpu_check.sh", carry=[".carry"], timeout_s=480)
#    Everything lands in $OUT: one JSON per bench, one log per step, steps.tsv, summary.txt;
#    the summary table is printed last. Give the machine back afterwards.
#
# Steps (each under its own time limit, all under BUDGET_S; a step that no longer fits is skipped):
#   pytest  pytest -m gpu for the repo (modules that need moto / scikit-image fail to import
#           there and are reported as collection errors; the gpu-marked tests of the rest run)
#   nan     the tiny model's outputs in fp32 / bf16 / fp16 at batch 1 and 2: NaN or finite
#   review  bench/review_cost.py: post-processing with and without the review score's device work
#           (REVIEW_DEVICE, default cuda; REVIEW_REPEATS, default 7)
#   plumb   seglabel bench --stand-in --images PLUMB_IMAGES --size 480x640 --batch-size BS (as the
#           2-core figures in bench/README.md): the pipeline without the
#           model on every core (issue 10: >= 800 images/s on the 16-core machine) and its efficiency
#   s384    seglabel bench --arch swin-s --task instance --images 512 --batch-size 32 --dtype bf16 (384x384)
#   s384c   s384 with --compile, (a) left out (its first compile falls in (b)'s timed warm-up); not by default
#   s800    the same at --size 800x1088 (the usual loop on the first HF_IMAGES_LARGE images only)
#   l384    seglabel bench --arch swin-l --task panoptic ... (384x384)
#   e640    seglabel bench --arch eomt-l --task panoptic --size 480x640 --batch-size 32 --dtype bf16: EoMT-L at
#           its 640x640 input (goal: end to end >= 256 images/s and >= 90% of the Segmenter alone)
#   e640c   e640 with --compile, (a) left out; not by default
#   mem     seglabel bench --memory (driver bytes per image, 2e5 vs 1.2e6 images); not by default
# (c), the whole pipeline, runs on each image written REPEAT times (384²: 4, so 2048 files; 800x1088:
# REPEAT_LARGE, 1) so that the job's fixed start-up (Ray actor, model load: seconds) weighs less;
# its steady-state rate, start-up left out, is reported beside it.
# Knobs (environment): STEPS, BUDGET_S (440), IMAGES (512), BS (32), BS_LARGE (32), HF_IMAGES (all),
# HF_IMAGES_LARGE (128), REPEAT (4), REPEAT_LARGE (1), ARCH_S (swin-s), ARCH_L (swin-l), ARCH_E (eomt-l),
# PY (python3), PLUMB_IMAGES (3000). A CPU dry run: STEPS="e640" ARCH_E=eomt-tiny IMAGES=16 BS=8 REPEAT=1.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PACK=${PACK:-.carry/ray-py312.tar.xz}
PHOTOS=${PHOTOS:-.carry/bench-photos}

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    PYHERE=${PYHERE:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
    mkdir -p "$PHOTOS"
    "$PYHERE" - "$PHOTOS" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
from seglabel.bench.images import photos
arrays, names, source = photos(None)
out = Path(sys.argv[1])
for array, name in zip(arrays, names):
    Image.fromarray(array).save(out / f"{name}.png", compress_level=6)
print(f"wrote {len(names)} photos from {source} to {out}")
EOF
    if [[ -f "$PACK" ]]; then
        echo "$PACK exists; delete it to rebuild"
    else
        ray_version=$("$PYHERE" -c 'import ray; print(ray.__version__)' 2>/dev/null || echo 2.60.0)
        PATH="$(dirname "$PYHERE"):$PATH" bash ../shared/tools/device-pack-ray "$ray_version" "$(dirname "$PACK")"
    fi
    du -sh .carry
    exit 0
fi

OUT=${OUT:-$(mktemp -d /tmp/seglabel-gpu-check.XXXXXX)}
mkdir -p "$OUT"
PY=${PY:-python3}
STEPS=${STEPS:-"pytest nan review s384 plumb s800 l384 e640"}
BUDGET_S=${BUDGET_S:-440}
IMAGES=${IMAGES:-512}
BS=${BS:-32}
BS_LARGE=${BS_LARGE:-32}
HF_IMAGES=${HF_IMAGES:-}
HF_IMAGES_LARGE=${HF_IMAGES_LARGE:-128}
REPEAT=${REPEAT:-4}
REPEAT_LARGE=${REPEAT_LARGE:-1}
PLUMB_IMAGES=${PLUMB_IMAGES:-3000}
ARCH_S=${ARCH_S:-swin-s}
ARCH_L=${ARCH_L:-swin-l}
ARCH_E=${ARCH_E:-eomt-l}
START=$(date +%s)

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_VERBOSITY=error
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/steps.tsv"

# -- Ray (and pycocotools) from the carried pack ------------------------------------------------
if "$PY" -c 'import ray, pycocotools' >/dev/null 2>&1; then
    echo "ray and pycocotools already importable"
elif [[ -f "$PACK" ]]; then
    t0=$(date +%s)
    mkdir -p /tmp/site && tar xJf "$PACK" -C /tmp/site
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
    echo "unpacked $PACK in $(( $(date +%s) - t0 )) s"
else
    echo "no $PACK: run 'bash bench/gpu_check.sh --prepare' where there is network, and carry .carry" | tee "$OUT/ERROR.txt"
fi
PIPELINE_FLAGS=()
if ! "$PY" -c 'import ray' >/dev/null 2>&1; then
    echo "ray does not import: the pipeline phase (c) is skipped" | tee -a "$OUT/ERROR.txt"
    PIPELINE_FLAGS=(--skip-pipeline)
fi
PHOTO_FLAGS=()
[[ -d "$PHOTOS" ]] && PHOTO_FLAGS=(--photos "$PHOTOS")

{
    date -u
    nvidia-smi -L 2>&1
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" - <<'EOF' 2>&1
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "cuda available", torch.cuda.is_available())
try:
    import ray; print("ray", ray.__version__)
except Exception as exc:
    print("ray: not importable:", exc)
EOF
    nproc
} > "$OUT/env.txt"
cat "$OUT/env.txt"

BENCH=("$PY" -m seglabel bench)   # `seglabel bench`, without needing the console script installed

# run_step NAME LIMIT_S COMMAND...: own process group, SIGINT at the limit (Ray shuts down
# cleanly), the group killed after; rc and seconds to steps.tsv.
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$(( START + BUDGET_S - $(date +%s) ))
    if (( left < 45 )); then
        printf '%s\tskipped\t0\t(budget spent)\n' "$name" >> "$OUT/steps.tsv"
        echo "== $name: skipped, $left s of the budget left"
        return
    fi
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit} s): $*"
    local t0
    t0=$(date +%s)
    setsid timeout -s INT -k 20 "$limit" "$@" > "$OUT/$name.log" 2>&1 &
    local pid=$!
    wait "$pid"
    local rc=$?
    kill -- "-$pid" 2>/dev/null
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$*" >> "$OUT/steps.tsv"
    tail -n 4 "$OUT/$name.log"
}

# The tiny model's raw outputs, in each dtype at batch 1 and 2, checked for NaN: on the CPU bf16
# and fp16 give NaN at batch 1 (torch's reduced-precision grid_sample), which empties the masks.
NAN_CHECK='
import tempfile, numpy as np, torch
from seglabel.engine.preprocess import preprocess, to_device
from seglabel.engine.segmenter import Segmenter
from seglabel.engine.synthetic import save_random_checkpoint
images = [np.random.default_rng(i).integers(0, 255, (384, 384, 3), dtype=np.uint8) for i in range(2)]
device = "cuda" if torch.cuda.is_available() else "cpu"
for arch in ("tiny", "eomt-tiny"):
  checkpoint = save_random_checkpoint(tempfile.mkdtemp() + "/tiny-instance", arch)
  for dtype in ("fp32", "bf16", "fp16"):
    seg = Segmenter(str(checkpoint), dtype=dtype, device=device)
    for n in (1, 2):
        size = seg.preprocess_spec.input_size(384, 384)
        with torch.inference_mode():
            pixels, _ = preprocess([to_device(a, seg.device) for a in images[:n]], seg.preprocess_spec, size, seg.dtype)
            out = seg.model(pixel_values=pixels)
        nan = bool(torch.isnan(out.masks_queries_logits).any() or torch.isnan(out.class_queries_logits).any())
        state = "NaN" if nan else "finite"
        print(f"{arch} {device} {dtype} batch {n}: {state}")
'
printf '%s\n' "$NAN_CHECK" > "$OUT/nan_check.py"  # a file: steps.tsv keeps one line per step

for step in $STEPS; do
    case $step in
        pytest)
            run_step pytest 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
                -o addopts="" -W ignore::DeprecationWarning tests ;;
        s384)
            run_step s384 200 "${BENCH[@]}" --arch "$ARCH_S" --task instance --images "$IMAGES" --batch-size "$BS" \
                --dtype bf16 ${HF_IMAGES:+--hf-images "$HF_IMAGES"} --pipeline-repeat "$REPEAT" "${PHOTO_FLAGS[@]}" \
                "${PIPELINE_FLAGS[@]}" --json "$OUT/$ARCH_S-instance-384.json" ;;
        s384c)
            run_step s384c 240 "${BENCH[@]}" --arch "$ARCH_S" --task instance --images "$IMAGES" --batch-size "$BS" \
                --dtype bf16 --compile --skip-hf --pipeline-repeat "$REPEAT" "${PHOTO_FLAGS[@]}" \
                "${PIPELINE_FLAGS[@]}" --json "$OUT/$ARCH_S-instance-384-compiled.json" ;;
        s800)
            run_step s800 240 "${BENCH[@]}" --arch "$ARCH_S" --task instance --images "$IMAGES" --batch-size "$BS_LARGE" \
                --dtype bf16 --size 800x1088 --hf-images "$HF_IMAGES_LARGE" --pipeline-repeat "$REPEAT_LARGE" \
                "${PHOTO_FLAGS[@]}" "${PIPELINE_FLAGS[@]}" --json "$OUT/$ARCH_S-instance-800x1088.json" ;;
        l384)
            run_step l384 200 "${BENCH[@]}" --arch "$ARCH_L" --task panoptic --images "$IMAGES" --batch-size "$BS" \
                --dtype bf16 ${HF_IMAGES:+--hf-images "$HF_IMAGES"} --pipeline-repeat "$REPEAT" "${PHOTO_FLAGS[@]}" \
                "${PIPELINE_FLAGS[@]}" --json "$OUT/$ARCH_L-panoptic-384.json" ;;
        e640)
            run_step e640 200 "${BENCH[@]}" --arch "$ARCH_E" --task panoptic --images "$IMAGES" --batch-size "$BS" \
                --dtype bf16 --size 480x640 ${HF_IMAGES:+--hf-images "$HF_IMAGES"} --pipeline-repeat "$REPEAT" \
                "${PHOTO_FLAGS[@]}" "${PIPELINE_FLAGS[@]}" --json "$OUT/$ARCH_E-panoptic-640.json" ;;
        e640c)
            run_step e640c 240 "${BENCH[@]}" --arch "$ARCH_E" --task panoptic --images "$IMAGES" --batch-size "$BS" \
                --dtype bf16 --size 480x640 --compile --skip-hf --pipeline-repeat "$REPEAT" "${PHOTO_FLAGS[@]}" \
                "${PIPELINE_FLAGS[@]}" --json "$OUT/$ARCH_E-panoptic-640-compiled.json" ;;
        nan)
            run_step nan 90 "$PY" "$OUT/nan_check.py" ;;
        review)
            run_step review 90 "$PY" bench/review_cost.py --device "${REVIEW_DEVICE:-cuda}" --repeats "${REVIEW_REPEATS:-7}" \
                --json "$OUT/review-cost.json" ;;
        plumb)
            if [[ ${#PIPELINE_FLAGS[@]} -gt 0 ]]; then
                printf 'plumb\tskipped\t0\t(no ray)\n' >> "$OUT/steps.tsv"
            else
                run_step plumb 120 "${BENCH[@]}" --stand-in --images "$PLUMB_IMAGES" --size 480x640 \
                    --batch-size "$BS" "${PHOTO_FLAGS[@]}" --json "$OUT/plumbing.json"
            fi ;;
        mem)
            run_step mem 120 "${BENCH[@]}" --memory --json "$OUT/memory.json" ;;
        *)
            echo "unknown step $step (pytest nan review s384 s384c plumb s800 l384 e640 e640c mem)" ;;
    esac
done

# -- the table, last ---------------------------------------------------------------------------
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def f(v, d=1):
    return "-" if v is None else f"{v:.{d}f}"
print()
print("steps (rc 0 ok, 124 timed out, 5 = pytest selected no test):")
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, secs, *_ = line.split("\t")
    print(f"  {name:8} rc {rc:>7}  {secs:>4} s")
log = out / "pytest.log"
if log.exists():
    tail = [l for l in log.read_text().splitlines() if l.strip()]
    print("  pytest -m gpu:", tail[-1] if tail else "(no output)")
print()
head = f"{'bench':30} {'(a) HF':>7} {'(b) Seg':>8} {'(c) run':>8} {'c steady':>8} {'b/a':>6} {'c/a':>6} {'c/b':>5} {'seg/img a/b/c':>15} {'GPU% a/b/c':>12}"
print(head)
goals = []
for path in sorted(out.glob("*.json")):
    r = json.loads(path.read_text())
    if "settings" not in r:
        if "memory" in r:
            m = r["memory"]["measures"]
            print("memory, bytes per image: " + ", ".join(f"{k} {v['bytes_per_image']}" for k, v in m.items()))
        if "raw" in r:  # the plumbing bench (stand-in model)
            p = r["pipeline"]
            print(f"plumbing on {r['cpu']}, {r['cores']:g} cores: (r) {f(r['raw']['images_per_s'])} img/s on one core, "
                  f"(p) {f(p['images_per_s'])} img/s, {f(p['steady_images_per_s'])} steady; efficiency "
                  f"{f(r['efficiency'], 2)} / {f(r['steady_efficiency'], 2)} steady")
            met = (p.get("steady_images_per_s") or 0) >= 800
            goals.append(f"  {'MET    ' if met else 'NOT MET'} plumbing: stand-in pipeline >= 800 images/s (steady): "
                         f"{f(p.get('steady_images_per_s'))}")
        continue
    a, b, c = (r.get(k) or {} for k in ("hf_loop", "segmenter", "pipeline"))
    ra = r["ratios"]
    def util(p):
        u = p.get("gpu_util") or {}
        return f"{u['mean_pct']:.0f}" if u.get("available") else "-"
    seg = "/".join(f(p.get("segments_per_image")) for p in (a, b, c))
    gpu = "/".join(util(p) for p in (a, b, c))
    print(f"{path.stem:30} {f(a.get('images_per_s')):>7} {f(b.get('images_per_s')):>8} {f(c.get('images_per_s')):>8} "
          f"{f(c.get('steady_images_per_s')):>8} {f(ra.get('b/a')):>6} {f(ra.get('c/a')):>6} {f(ra.get('c/b'), 2):>5} "
          f"{seg:>15} {gpu:>12}")
    for g in r.get("goals", []):
        goals.append(f"  {'MET    ' if g['met'] else 'NOT MET'} {path.stem}: {g['goal']}: {g['value']:.2f} (target {g['target']})")
if goals:
    print("goals:")
    print("\n".join(goals))
EOF
echo "outputs in $OUT"
