#!/usr/bin/env python3
"""bench_summary.json of a retrieval-quality benchmark run folder.

    python benchmarks/bench_summary.py RUN BITS [TOTAL_SECONDS]

Gathers what the steps left in RUN: train_summary.json (python/train.py:
the CIFAR-10 net's schedule, the fast recipe's, or a --data run's recipe with its feature and
training seconds), bench_timing.txt (`key seconds [load ...]` lines the
backbone benchmark writes per step), extract_{train,test}.txt (extract.py's
img/s) and evaluation/*.json (python/evaluate.py; scalars only, no curves).
Prints the summary and writes RUN/bench_summary.json.
"""
import json
import re
import sys
from pathlib import Path


def scalars(d):
    """The figures without the curves (lists)."""
    return {k: scalars(v) if isinstance(v, dict) else v for k, v in d.items()
            if not isinstance(v, list)}


def training_figures(t):
    if t.get("recipe") == "fast":   # the fast recipe (python/dlbhc/training/fast.py)
        return {"recipe": "fast", "schedule": t["schedule"], "steps": t["iterations"],
                "data_seconds": t["data_seconds"], "train_seconds": t["train_seconds"],
                "data_plus_train_minutes": round((t["data_seconds"] + t["train_seconds"]) / 60,
                                                 1),
                "epoch_seconds": t["epoch_seconds"], "test_accuracy": t["test_accuracy"],
                "load_average_start": t["load_average_start"],
                "load_average_end": t["load_average_end"]}
    if "recipe" in t:   # python/train.py --data
        features = t["recipe"].get("features") or {}
        return {"recipe": {k: v for k, v in t["recipe"].items() if k != "features"},
                "features_seconds": t["data_seconds"], "train_seconds": t["train_seconds"],
                "features_plus_train_minutes": round((t["data_seconds"] + t["train_seconds"])
                                                     / 60, 1),
                "iterations": t["iterations"], "seconds_per_iter": t["seconds_per_iter"],
                "test": t["test"],
                "feature_cache": {k: features.get(k) for k in (
                    "images", "records", "shape", "images_per_second", "seconds")}}
    return {"train_seconds": t["seconds"], "train_iterations": t["iterations"],
            "seconds_per_iter": t["seconds_per_iter"],
            "test_accuracy": t["test"].get("accuracy"), "test_loss": t["test"].get("loss")}


def main(argv):
    run, bits = Path(argv[0]), int(argv[1])
    summary = {"bits": bits}
    if len(argv) > 2:
        summary["wall_seconds_total"] = int(argv[2])
    train = run / "train_summary.json"
    if train.exists():
        trained = json.loads(train.read_text())
        summary.update(training_figures(trained))
        # the head refitted to the final features (training/headfit.py): its
        # seconds are training's too, outside train_seconds (the loop's)
        if "head_refit" in trained:
            summary["head_refit"] = trained["head_refit"]
    timing = run / "bench_timing.txt"
    for line in (timing.read_text().splitlines() if timing.exists() else []):
        key, value, *rest = line.split()
        if key.endswith("_load"):
            summary[key] = " ".join([value] + rest)
        else:
            summary[key] = float(value)
            if rest:
                summary[key.replace("_seconds", "") + "_load"] = " ".join(rest[1:])
    for split in ("train", "test"):
        f = run / f"extract_{split}.txt"
        m = re.search(r"\(([\d.]+) img/s\)", f.read_text()) if f.exists() else None
        summary[f"extract_{split}_img_per_s"] = float(m.group(1)) if m else None
    for f in sorted((run / "evaluation").glob("*.json")):
        try:
            summary[f"evaluation/{f.name}"] = scalars(json.loads(f.read_text()))
        except ValueError:
            pass
    (run / "bench_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
