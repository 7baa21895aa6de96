#!/usr/bin/env bash
# Retrieval-quality benchmark on CIFAR-10 (the paper's protocol).
#
#   benchmarks/bench_cifar_map.sh              # small net, 48 bits (make bench-map)
#   BITS=12 benchmarks/bench_cifar_map.sh      # or 128
#   NET=efficientnet_lite0 benchmarks/bench_cifar_map.sh   # the ImageNet backbone recipe
#                                              # (make bench-map NET=efficientnet_lite0)
#   NET=fast benchmarks/bench_cifar_map.sh     # the fast from-scratch recipe (pycaffe;
#                                              # EPOCHS=N; make bench-map NET=fast)
#
# NET=<backbone> runs `python/train.py --data data/cifar10/train --test
# data/cifar10/test` (the CPU recipe: frozen layers cached with mirror
# images, the upper layers fine-tuned; SIZE, SPLIT, EPOCHS, BATCH, LR pass
# through), then the same extraction and evaluation with the run's deploy
# net and recorded preprocessing; see the end of this script for the backbone
# flow. Every step's wall time and the machine's load are in the summary.
#
# Prepares CIFAR-10 (make data + the 4-pixel padded training LMDB), trains
# prototxt/cifar_hash$BITS from scratch on the CPU (python/train.py), extracts
# codes and fc7 of the 50,000 training images (database) and the 10,000 test
# images (queries), and evaluates: mAP@1000 by Hamming ranking (ties broken by
# database order) and coarse-to-fine (Hamming candidates re-ranked by fc7 L2),
# mAP over the whole ranking, P@1000, plus the classifier's test accuracy.
#
# Environment:
#   BITS=48         code length (12, 48, 128: the checked-in solvers)
#   MAX_ITER=N      shorter/longer schedule (train.py scales the lr steps)
#   SKIP_TRAIN=1    reuse runs/cifar_hash$BITS/cifar_hash$BITS.caffemodel
#   PCA_MAP=0       skip the PCA re-rank sweep (benchmarks/bench_pca_map.py:
#                   fc7 vs PCA-32/64/128/256, plain and whitened, with and
#                   without the exact top 200; ~17 evaluations, ~25 min)
#   RUNS_DIR=runs   where the run folder goes
#   OPENBLAS_NUM_THREADS (default 1): one BLAS thread trains fastest on the
#                   2 cores, quiet or not: measured on a quiet machine, 0.49 s
#                   per iteration with 1 thread, 0.68 s with 2 (OpenBLAS's
#                   idle thread spins against Caffe's data prefetch thread),
#                   0.51 s with 2 and OPENBLAS_THREAD_TIMEOUT=4; under load ~4
#                   0.55-0.58 vs 1.16 s.
# Everything lands in $RUNS_DIR/cifar_hash$BITS/: train.log, train_summary.json,
# db_train.lmdb, db_test.lmdb, evaluation/ and bench_summary.json.
# Timings depend on what else the machine runs; report the load with them.
set -euo pipefail
cd "$(dirname "$0")/.."

NET=${NET:-cifar}
if [ "$NET" != cifar ] && [ "$NET" != fast ]; then
    exec "$(dirname "$0")/bench_backbone_map.sh"
fi

BITS=${BITS:-48}
PY=${PY:-.venv/bin/python}
D=${CIFAR_DIR:-data/cifar10}
RUNS_DIR=${RUNS_DIR:-runs}
NAME=${NET}_hash$BITS
RUN=$RUNS_DIR/$NAME
WEIGHTS=$RUN/$NAME.caffemodel
MEAN=$D/cifar10_train_32_mean.npy
PAD_LMDB=$D/cifar10_train_32pad4_lmdb
if [ "$NET" = fast ]; then
    # the run folder's deploy net and preprocessing record (its mean, flip averaging)
    DEPLOY=$RUN/deploy.prototxt
    PREP_ARGS=()
    # one process steps the net (no data thread beside it): both cores to BLAS
    export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-2}
else
    DEPLOY=prototxt/${NAME}_deploy.prototxt
    PREP_ARGS=(--mean "$MEAN")
    export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
fi

log() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }
t0=$(date +%s)

# ---- data ------------------------------------------------------------------
# (make data also runs `make caffe`, which waits for any other Caffe build on
# the machine: skip it when everything is there already)
if [ -e "$D/cifar10_train_32_lmdb/data.mdb" ] && [ -e "$D/cifar10_test_32_lmdb/data.mdb" ] \
        && [ -e "$PAD_LMDB/data.mdb" ] && [ -e "$MEAN" ]; then
    log "data: $D is ready"
else
    log "data: make data (CIFAR-10 folders, 32x32 LMDBs + the 4-pixel padded training LMDB, mean)"
    make --no-print-directory data CIFAR_DIR="$D"
fi
[ -e "$PAD_LMDB/data.mdb" ] || "$PY" data/pad_lmdb.py "$D/cifar10_train_32_lmdb" "$PAD_LMDB" --pad 4

# ---- training --------------------------------------------------------------
if [ "${SKIP_TRAIN:-0}" = 1 ] && [ -e "$WEIGHTS" ]; then
    log "train: skipped (SKIP_TRAIN=1), using $WEIGHTS"
else
    log "train: $NAME from scratch ($(nproc) cores, OPENBLAS_NUM_THREADS=$OPENBLAS_NUM_THREADS, load $(cut -d' ' -f1-3 /proc/loadavg))"
    if [ "$NET" = fast ]; then
        # a fresh run, unless RESUME=1 continues the last one at its last epoch
        RESUME_ARGS=()
        if [ "${RESUME:-0}" = 1 ]; then RESUME_ARGS=(--resume auto)
        else rm -rf "$RUN/checkpoints" "$RUN/data"; fi
        "$PY" python/train.py --net fast --bits "$BITS" --runs-dir "$RUNS_DIR" "${RESUME_ARGS[@]}" \
            ${MAX_ITER:+--max-iter "$MAX_ITER"} ${EPOCHS:+--epochs "$EPOCHS"}
    else
        "$PY" python/train.py --net cifar --bits "$BITS" --runs-dir "$RUNS_DIR" \
            ${MAX_ITER:+--max-iter "$MAX_ITER"}
    fi
    # features of other weights must not be mixed in: start the stores afresh
    rm -rf "$RUN/db_train.lmdb" "$RUN/db_test.lmdb"
fi

# ---- extraction ------------------------------------------------------------
for split in train test; do
    log "extract: $D/$split.txt -> $RUN/db_$split.lmdb"
    "$PY" python/extract.py "$D/$split.txt" --root "$D" --deploy "$DEPLOY" \
        --weights "$WEIGHTS" "${PREP_ARGS[@]}" --out "$RUN/db_$split.lmdb" \
        | tee "$RUN/extract_$split.txt"
done

# ---- evaluation ------------------------------------------------------------
mkdir -p "$RUN/evaluation"
log "evaluate: python/evaluate.py"
"$PY" python/evaluate.py --database "$RUN/db_train.lmdb" --queries "$RUN/db_test.lmdb" \
    --top-k 1000 --out-dir "$RUN/evaluation" | tee "$RUN/evaluation/evaluate_stdout.txt"

# ---- the PCA re-rank store ---------------------------------------------------
if [ "${PCA_MAP:-1}" = 1 ]; then
    log "PCA re-rank sweep: benchmarks/bench_pca_map.py"
    "$PY" benchmarks/bench_pca_map.py --database "$RUN/db_train.lmdb" --queries "$RUN/db_test.lmdb" \
        --json "$RUN/evaluation/pca_map.json" | tee "$RUN/evaluation/pca_map.txt"
fi

# ---- summary ---------------------------------------------------------------
"$PY" benchmarks/bench_summary.py "$RUN" "$BITS" "$(( $(date +%s) - t0 ))"
log "done in $(( $(date +%s) - t0 )) s; summary: $RUN/bench_summary.json"
