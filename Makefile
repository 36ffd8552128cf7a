# The README's two commands. Each sets everything up on a fresh machine first:
#   make test      build, then the Python tests (pytest) and the C++ test (ctest)
#   make profile   build, then condconv-profile on tf_efficientnet_cc_b0_8e (the main job):
#                  parameters, multiply-adds, whole-model and per-layer latency, fused vs
#                  unfused vs static; tables printed, files and plots in profile-results/
#
# Where python3 already imports torch (a machine with torch preinstalled, possibly offline),
# that interpreter is used as it is and nothing is downloaded. Otherwise a virtual environment
# (.venv, --system-site-packages) is made and gets torch==2.13.0 only if torch is missing.
SHELL := /bin/bash
.DEFAULT_GOAL := test

SYSTEM_TORCH := $(shell python3 -c "import torch" >/dev/null 2>&1 && echo yes)
ifeq ($(SYSTEM_TORCH),yes)
PYTHON ?= python3
PIP_INSTALL := $(PYTHON) -m pip install --no-build-isolation --no-deps
else
PYTHON ?= .venv/bin/python
PIP_INSTALL := $(PYTHON) -m pip install --no-build-isolation
endif
BUILD := build
STAMP := $(BUILD)/.installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)
PROFILE_ARGS ?= --model tf_efficientnet_cc_b0_8e --layers --out profile-results

.PHONY: setup test test-python test-cpp profile clean

setup: $(STAMP)

.venv/bin/python:
	python3 -m venv --system-site-packages .venv

$(STAMP): $(SOURCES) | $(if $(filter yes,$(SYSTEM_TORCH)),,.venv/bin/python)
	@mkdir -p $(BUILD)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -c "import setuptools, wheel" 2>/dev/null || $(PYTHON) -m pip install setuptools wheel \
		|| echo "setuptools/wheel could not be installed: trying with what is there"
	$(PYTHON) -c "import pytest" 2>/dev/null || $(PYTHON) -m pip install pytest
	$(PYTHON) -c "import hypothesis" 2>/dev/null || $(PYTHON) -m pip install hypothesis \
		|| echo "hypothesis could not be installed: the property-based tests will be skipped"
	$(PYTHON) -c "import onnx, onnxscript, onnxruntime" 2>/dev/null \
		|| $(PYTHON) -m pip install onnx onnxscript onnxruntime \
		|| echo "onnx/onnxscript/onnxruntime could not be installed: the ONNX tests will be skipped"
	$(PYTHON) -c "import sklearn" 2>/dev/null || $(PYTHON) -m pip install scikit-learn \
		|| echo "scikit-learn could not be installed: the digits training test will be skipped"
	$(PYTHON) -c "import triton" 2>/dev/null || $(PYTHON) -m pip install triton==3.6.0 \
		|| echo "triton could not be installed: the triton backend will not be tested"
	@# Triton 3.6's interpreter (the triton backend on CPU tensors, for tests) needs numpy < 2.3.
	$(PYTHON) -c "import numpy as n, sys; sys.exit(tuple(map(int, n.__version__.split('.')[:2])) >= (2, 3))" \
		2>/dev/null || $(PYTHON) -m pip install "numpy<2.3" \
		|| echo "numpy<2.3 could not be installed: Triton's interpreter may fail"
	@# Where the CUDA kernels fail to build, the CPU kernels are still built so that everything
	@# else can be tested; tests/test_gpu.py then fails on the missing cuda backend.
	$(PIP_INSTALL) -e . \
		|| (echo "*** the CUDA build failed: building the CPU kernels only (CONDCONV_SKIP_CUDA=1) ***" \
			&& CONDCONV_SKIP_CUDA=1 $(PIP_INSTALL) -e .) \
		|| $(PYTHON) setup.py build_ext --inplace
	@touch $@

test: test-python test-cpp

test-python: $(STAMP)
	$(PYTHON) -m pytest tests -q

test-cpp: $(STAMP)
	@if ! command -v cmake >/dev/null; then echo "cmake not found: C++ test not run"; exit 1; fi
	cmake -S . -B $(BUILD)/cmake -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build $(BUILD)/cmake -j 2
	ctest --test-dir $(BUILD)/cmake --output-on-failure

profile: $(STAMP)
	@# Fixed malloc thresholds: no variant pays page faults another does not (see profile/timing.py).
	GLIBC_TUNABLES=$${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296} \
		$(PYTHON) -m condconv_kernels.profile.cli $(PROFILE_ARGS)

clean:
	rm -rf $(BUILD) condconv_kernels/_C*.so *.egg-info
