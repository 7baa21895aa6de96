# dlbhc: deep binary hash codes for fast image retrieval (Caffe).
#
#   make test            build everything needed and run the tests
#   make demo            the whole pipeline end to end on CIFAR-10 (small net, CPU)
#   make caffe [GPU=1 [CUDNN=1]]   build Caffe (cached under ~/.cache/dlbhc/caffe)
#   make data            CIFAR-10 -> image folders, LMDBs and means under data/cifar10
#   make weights         download bvlc_alexnet.caffemodel (sha1-checked)
#   make train [NET=cifar|alexnet] [BITS=48] [GPU=1] [MAX_ITER=N] [RESUME=file.solverstate]
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

.PHONY: all venv caffe test data data-alexnet weights weights-caffenet train demo \
        prototxt bench-extract bench-search bench-map clean-runs help

all: caffe

help:
	@sed -n '1,12p' Makefile

# ---- environment -----------------------------------------------------------
$(VENV)/.requirements-installed: requirements.txt
	test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.requirements-installed

# ---- Caffe -----------------------------------------------------------------
# The build script keys its cache by source, config, patches and toolchain;
# a clean clone finds the cached build and only links it. The .pth file lets
# the venv's python import caffe and dlbhc with nothing exported.
caffe: venv
	PYTHON=$(abspath $(PY)) GPU=$(GPU) CUDNN=$(CUDNN) caffe-build/build.sh
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  printf '%s\n%s\n' "$(abspath .caffe/python)" "$(abspath python)" > $$site/dlbhc-caffe.pth

# ---- tests -----------------------------------------------------------------
test: caffe
	$(PY) -m pytest tests -q

prototxt: venv
	$(PY) prototxt/generate.py

# ---- data and weights --------------------------------------------------------
data: caffe
	$(PY) data/get_cifar10.py --dest $(CIFAR_DIR)
	$(PY) data/convert_imageset.py $(CIFAR_DIR)/train.txt --root $(CIFAR_DIR) \
	    $(CIFAR_DIR)/cifar10_train_32_lmdb --size 32 --shuffle-seed 1 \
	    --mean $(CIFAR_DIR)/cifar10_train_32_mean
	$(PY) data/convert_imageset.py $(CIFAR_DIR)/test.txt --root $(CIFAR_DIR) \
	    $(CIFAR_DIR)/cifar10_test_32_lmdb --size 32

# The 256x256 LMDBs AlexNet fine-tunes on (about 12 GB for CIFAR-10).
data-alexnet: data
	$(PY) data/convert_imageset.py $(CIFAR_DIR)/train.txt --root $(CIFAR_DIR) \
	    $(CIFAR_DIR)/cifar10_train_256_lmdb --size 256 --shuffle-seed 1 \
	    --mean $(CIFAR_DIR)/cifar10_train_256_mean
	$(PY) data/convert_imageset.py $(CIFAR_DIR)/test.txt --root $(CIFAR_DIR) \
	    $(CIFAR_DIR)/cifar10_test_256_lmdb --size 256

weights: venv
	$(PY) python/get_weights.py bvlc_alexnet

weights-caffenet: venv
	$(PY) python/get_weights.py bvlc_reference_caffenet

# ---- training --------------------------------------------------------------
train: caffe
	$(PY) python/train.py --net $(NET) --bits $(BITS) \
	    $(if $(filter 1,$(GPU)),--gpu 0) \
	    $(if $(WEIGHTS),--weights $(WEIGHTS)) \
	    $(if $(MAX_ITER),--max-iter $(MAX_ITER)) \
	    $(if $(RESUME),--resume $(RESUME))

clean-runs:
	rm -rf runs
