"""What the review score costs post-processing, in one process on one device.

Post-processing of fixed model outputs (8 images of 480x640, 100 queries, 80 labels, mask
logits at 96x128, canvas 384x512) with the review score's device work (``band_counts``,
``class_doubt``) and with it replaced by zeros, alternated batch by batch so that both meet the
same machine load; the median seconds per batch of each and their ratio, per task. (The
instance overlap counts, made inside ``_instance_maps``' chunks, are in both.)

    python bench/review_cost.py [--repeats 7] [--device cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

import seglabel.engine.postprocess as pp


def outputs(device: str):
    torch.manual_seed(0)
    batch, queries, labels = 8, 100, 80
    class_logits = torch.randn(batch, queries, labels + 1) * 2
    class_logits[..., :labels] += F.one_hot(torch.randint(0, labels, (batch, queries)), labels) * 6
    coarse = torch.randn(batch, queries, 12, 16) * 4 - 2
    masks = F.interpolate(coarse, size=(96, 128), mode="bilinear", align_corners=False)
    return class_logits.to(device), masks.to(device), [(480, 640)] * batch, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    class_logits, masks, sizes, labels = outputs(args.device)
    real = (pp.band_counts, pp.class_doubt)
    stub = (lambda logits, lo, hi: torch.zeros(logits.shape[0], 2, dtype=torch.int64, device=logits.device),
            lambda scores: torch.zeros(2, device=scores.device))
    result = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
              "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "repeats": args.repeats, "tasks": {}}
    for task in ("instance", "panoptic", "semantic"):
        post = pp.Postprocessor(pp.PostprocessSpec(task, score_threshold=0.3), labels)
        post(class_logits, masks, sizes, (384, 512))  # warm-up
        times: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(args.repeats):
            for name, functions in (("with", real), ("without", stub)):
                pp.band_counts, pp.class_doubt = functions
                if args.device != "cpu":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                post(class_logits, masks, sizes, (384, 512))
                times[name].append(time.perf_counter() - start)
        pp.band_counts, pp.class_doubt = real
        median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
        result["tasks"][task] = {"with_s": median["with"], "without_s": median["without"],
                                 "ratio": median["with"] / median["without"], "all_s": times}
        print(f"{task:9s} with {median['with']:.3f} s, without {median['without']:.3f} s a batch: "
              f"{median['with'] / median['without']:.3f}x")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
