#!/usr/bin/env bash
# The training recipes side by side on a collection of small images, as a
# user gets them (`python/train.py --data`, every default but --net), then
# extract.py and evaluate.py with the run's records: mAP@1000 coarse, the
# default answer (--rerank auto) and every fine stage, with each step's wall
# time and the load average beside it.
#
#   python data/get_fashion_mnist.py --per-class 500 --test-per-class 100
#   ROOT=data/fashion-mnist-500x100 benchmarks/bench_small_images.sh
#   NETS="fast cifar" BITS=48 ROOT=... RUNS_DIR=runs/small benchmarks/bench_small_images.sh
#
# ROOT holds train/ and test/ (class folders) with train.txt and test.txt
# (`path label`, paths relative to ROOT), as data/get_*.py write them. The
# test images are the queries and, as train.py --test makes them, also the
# held-out images each run chooses its fine stage on (say so beside figures).
# EXTRA_<net> (e.g. EXTRA_fast="--batch-size 100") passes options to one
# net's train.py. Writes $RUNS_DIR/<run>/bench_small.json and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT=${ROOT:?set ROOT to a folder with train/, test/, train.txt, test.txt}
NETS=${NETS:-fast cifar efficientnet_lite0}
BITS=${BITS:-48}
PY=${PY:-.venv/bin/python}
RUNS_DIR=${RUNS_DIR:-runs/small}
TAG=${TAG:-}
coll=$(basename "$ROOT")
log() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

runs=()
for net in $NETS; do
    name=${net}_hash${BITS}_${coll}${TAG}
    run=$RUNS_DIR/$name
    extra_var=EXTRA_${net}
    timing=$run.timing
    mkdir -p "$RUNS_DIR"
    : > "$timing"
    log "train $name, load $(load)"
    t=$(date +%s)
    echo "train_start_load $(load)" >> "$timing"
    rm -rf "$run"
    # shellcheck disable=SC2086
    "$PY" python/train.py --data "$ROOT/train" --test "$ROOT/test" --net "$net" --bits "$BITS" \
        --name "$name" --runs-dir "$RUNS_DIR" ${!extra_var:-} 2>&1 \
        | grep --line-buffered -v "ETA" >&2
    echo "train_seconds $(( $(date +%s) - t )) load $(load)" >> "$timing"
    for split in train test; do
        t=$(date +%s)
        "$PY" python/extract.py "$ROOT/$split.txt" --root "$ROOT" --deploy "$run/deploy.prototxt" \
            --weights "$run/$name.caffemodel" --out "$run/db_$split.lmdb" > "$run/extract_$split.txt"
        echo "extract_${split}_seconds $(( $(date +%s) - t )) load $(load)" >> "$timing"
    done
    mkdir -p "$run/evaluation"
    "$PY" python/evaluate.py --database "$run/db_train.lmdb" --queries "$run/db_test.lmdb" \
        --top-k 1000 --out-dir "$run/evaluation" > "$run/evaluation/evaluate_stdout.txt"
    mv "$timing" "$run/bench_timing.txt"
    runs+=("$run")
done
"$PY" - "${runs[@]}" <<'PYEOF'
import json, sys
from pathlib import Path
print(f"{'run':44s} {'accuracy':>8s} {'train s':>8s} {'coarse':>7s} {'default':>8s}  stages")
for run in map(Path, sys.argv[1:]):
    fig = json.loads((run / "evaluation" / "figures.json").read_text())
    summary = json.loads((run / "train_summary.json").read_text())
    timing = dict(line.split(" ", 1) for line in (run / "bench_timing.txt").read_text().splitlines())
    acc = summary.get("test", {})
    acc = acc.get("accuracy") if isinstance(acc, dict) else acc
    stages = {k: round(v["map_at_k"], 4) for k, v in fig.get("fine_stages", {}).items()}
    row = dict(run=run.name, accuracy=acc, train=timing["train_seconds"],
               coarse=round(fig["coarse"]["map_at_k"], 4),
               default=round(fig["fine"]["map_at_k"], 4) if "fine" in fig else None,
               default_stage=fig.get("fine", {}).get("stage"), stages=stages,
               timing=timing, queries=fig["n_queries"], database=fig["n_database"],
               rerank_note=fig.get("rerank_note"))
    (run / "bench_small.json").write_text(json.dumps(row, indent=2))
    print(f"{run.name:44s} {acc if acc is None else round(float(acc), 4)!s:>8s} "
          f"{float(timing['train_seconds'].split()[0]):8.0f} {row['coarse']:7.4f} "
          f"{row['default'] if row['default'] is None else round(row['default'], 4)!s:>8s}  "
          f"{row['default_stage']} {stages}")
PYEOF
