#!/usr/bin/env bash
# Retrieval quality of an ImageNet backbone's CPU recipe on CIFAR-10, the
# paper's protocol, with the wall time of every step (make bench-map NET=...).
#
#   NET=efficientnet_lite0 BITS="12 48 128" benchmarks/bench_backbone_map.sh
#
# Steps, each timed (wall seconds) with the load average beside it:
#   features   the frozen layers' output of the 50,000 training images and
#              their mirror images, and of the 10,000 test images (cached
#              under data/features/, shared by the code lengths: the first
#              BITS pays for it, later ones find it)
#   train      `caffe train` of the upper layers on the cache
#   extract    python/extract.py: the 50,000 (database) and 10,000 (queries)
#              through the whole deploy net, preprocessing from the run folder
#   evaluate   python/evaluate.py: mAP@1000 coarse and coarse-to-fine, P@1000,
#              precision within Hamming radius 2
# The bar (issue 10) counts features + training.
#
# Environment: NET, BITS (space-separated), SIZE (input side), SPLIT (frozen
# below this blob), EPOCHS, BATCH, LR, FLIPS=0, RUNS_DIR, CIFAR_DIR,
# SKIP_EXTRACT=1 (training figures only). CIFAR-10 here is the shared JPEG
# re-encoding; say so beside the figures.
set -euo pipefail
cd "$(dirname "$0")/.."

NET=${NET:-efficientnet_lite0}
BITS=${BITS:-48}
PY=${PY:-.venv/bin/python}
D=${CIFAR_DIR:-data/cifar10}
RUNS_DIR=${RUNS_DIR:-runs/bench}
log() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

if [ ! -e "$D/cifar10.complete.json" ]; then
    log "data: CIFAR-10 image folders"
    "$PY" data/get_cifar10.py --dest "$D"
fi

for bits in $BITS; do
    name=${NET}_hash${bits}_cifar10
    run=$RUNS_DIR/$name
    mkdir -p "$run"
    timing=$run/bench_timing.txt
    : > "$timing"
    log "train $name (features + training), load $(load)"
    echo "train_start_load $(load)" >> "$timing"
    "$PY" python/train.py --data "$D/train" --test "$D/test" --net "$NET" --bits "$bits" \
        --name "$name" --runs-dir "$RUNS_DIR" \
        ${SIZE:+--size "$SIZE"} ${SIZE:+--resize "$SIZE"} ${SPLIT:+--split "$SPLIT"} \
        ${EPOCHS:+--epochs "$EPOCHS"} ${BATCH:+--batch-size "$BATCH"} ${LR:+--base-lr "$LR"} \
        $([ "${FLIPS:-1}" = 0 ] && echo --no-flips) 2>&1 | tee "$run/train_stdout.txt" \
        | grep -v "^features.*ETA" >&2
    echo "train_end_load $(load)" >> "$timing"
    weights=$run/$name.caffemodel
    if [ "${SKIP_EXTRACT:-0}" != 1 ]; then
        for split in train test; do
            t=$(date +%s)
            log "extract $split, load $(load)"
            rm -rf "$run/db_$split.lmdb"
            "$PY" python/extract.py "$D/$split.txt" --root "$D" --deploy "$run/deploy.prototxt" \
                --weights "$weights" --out "$run/db_$split.lmdb" | tee "$run/extract_$split.txt"
            echo "extract_${split}_seconds $(( $(date +%s) - t )) load $(load)" >> "$timing"
        done
        t=$(date +%s)
        mkdir -p "$run/evaluation"
        "$PY" python/evaluate.py --database "$run/db_train.lmdb" --queries "$run/db_test.lmdb" \
            --top-k 1000 --out-dir "$run/evaluation" | tee "$run/evaluation/evaluate_stdout.txt"
        echo "evaluate_seconds $(( $(date +%s) - t )) load $(load)" >> "$timing"
    fi
    "$PY" benchmarks/bench_summary.py "$run" "$bits"
    log "done: $run/bench_summary.json"
done
