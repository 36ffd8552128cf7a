# The README's two commands. Each sets everything up on a fresh machine first:
#   make test      build, then the Python tests (pytest) and the C++ test (ctest), then test-asan
#   make profile   build, then condconv-profile on tf_efficientnet_cc_b0_8e (the main job):
#                  parameters, multiply-adds, whole-model and per-layer latency, fused vs
#                  unfused vs static; tables printed, files and plots in profile-results/
#   make fuzz      the fuzz tests (tests/test_fuzz.py, tests/test_crash_fuzz.py) with FUZZ_RUNS
#                  random seeds each (default 8), to find new failures; `make test` runs them
#                  with one fixed seed
# and the one `make test` ends with:
#   make test-asan the C++ kernels built with AddressSanitizer and UndefinedBehaviorSanitizer
#                  (CONDCONV_SANITIZE=address,undefined; -O1 -g; any report aborts), apart from the
#                  normal build: the extension in build/asan (rebuilt when csrc/ changes) under
#                  tests/test_{op,reference,registration,fuzz}.py and the scales' float64 matrix
#                  and batch chunks in tests/test_scales.py (ASAN_PYTESTS), and the C++
#                  tests condconv_vs_conv2d and cuda_views_vs_conv2d, built in build/cmake-asan.
#                  The two emulated-CUDA tests (minutes to build and to run sanitized) are left out
#                  unless asked for: make test-asan ASAN_CTEST_TARGETS=all ASAN_CTEST_REGEX=.
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

SANITIZE ?= address,undefined
ASAN := $(BUILD)/asan
ASAN_STAMP := $(ASAN)/.built
ASAN_SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*)
ASAN_PYTESTS ?= tests/test_op.py tests/test_reference.py tests/test_registration.py \
	tests/test_fuzz.py tests/test_scales.py::test_float64_all_scales \
	tests/test_scales.py::test_cpu_batch_in_several_chunks
ASAN_CTEST_TARGETS ?= test_condconv test_cuda_views
ASAN_CTEST_REGEX ?= condconv_vs_conv2d|cuda_views_vs_conv2d
# Python and torch are not instrumented, so the sanitizer runtime must be loaded before them.
# Beyond that, a run needs no special ASAN_OPTIONS (no alloc_dealloc_mismatch=0,
# protect_shadow_gap=0 (CUDA only) or verify_asan_link_order=0 (the preload comes first)), but
# detect_leaks=0: the interpreter and torch keep memory to the end by design, and LSan cannot be
# told to ignore only theirs, as every allocation of the kernels is also made under the
# interpreter's and torch's frames. The C++ tests run with leak detection (no Python there).
ASAN_RUNTIME = $(shell $${CXX:-c++} -print-file-name=libasan.so)
UBSAN_ENV := UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# pytest with the sanitized _C: build/asan/lib first on sys.path (python -m would put the
# repository, with the normal _C, first), checked before any test runs.
ASAN_PYTEST = LD_PRELOAD=$(ASAN_RUNTIME) ASAN_OPTIONS=detect_leaks=0 $(UBSAN_ENV) $(PYTHON) -c \
	'import sys; sys.path.insert(0, "$(CURDIR)/$(ASAN)/lib"); import condconv_kernels._C as c; \
	assert c.__file__.startswith("$(CURDIR)/$(ASAN)/lib/"), c.__file__; \
	import pytest; sys.exit(pytest.main())'

.PHONY: fuzz setup test test-python test-cpp test-asan test-asan-python test-asan-cpp profile clean

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

test: test-python test-cpp test-asan

test-python: $(STAMP)
	$(PYTHON) -m pytest tests -q

FUZZ_RUNS ?= 8
fuzz: $(STAMP)
	@for i in $$(seq $(FUZZ_RUNS)); do \
		CONDCONV_CRASH_FUZZ_SEED=random CONDCONV_FUZZ_SEED=random $(PYTHON) -m pytest -q -s \
			tests/test_fuzz.py tests/test_crash_fuzz.py \
			|| exit 1; \
	done

test-cpp: $(STAMP)
	@if ! command -v cmake >/dev/null; then echo "cmake not found: C++ test not run"; exit 1; fi
	cmake -S . -B $(BUILD)/cmake -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build $(BUILD)/cmake -j 2
	ctest --test-dir $(BUILD)/cmake --output-on-failure -j 2

# Only the CPU extension (CONDCONV_SANITIZE leaves CUDA out), into build/asan/lib: the normal
# in-place condconv_kernels/_C*.so stays as it is.
$(ASAN_STAMP): $(ASAN_SOURCES) | $(STAMP)
	CONDCONV_SANITIZE=$(SANITIZE) $(PYTHON) setup.py build_ext --build-lib $(ASAN)/lib \
		--build-temp $(ASAN)/tmp
	@touch $@

test-asan: test-asan-python test-asan-cpp

test-asan-python: $(ASAN_STAMP)
	@# The package's files linked next to the sanitized _C (again each run: files come and go).
	@find $(ASAN)/lib/condconv_kernels -maxdepth 1 -type l -delete
	@for f in $(CURDIR)/condconv_kernels/*; do \
		case $$f in *.so|*/__pycache__) ;; *) ln -s $$f $(ASAN)/lib/condconv_kernels/ ;; esac; done
	@# --capture=sys: pytest's capture of fd 2 would swallow a sanitizer's report (the process
	@# ends inside the test).
	$(ASAN_PYTEST) -q --capture=sys $(ASAN_PYTESTS)

test-asan-cpp: $(STAMP)
	@if ! command -v cmake >/dev/null; then echo "cmake not found: C++ test not run"; exit 1; fi
	cmake -S . -B $(BUILD)/cmake-asan -DCONDCONV_SANITIZE=$(SANITIZE) \
		-DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build $(BUILD)/cmake-asan -j 2 --target $(ASAN_CTEST_TARGETS)
	ASAN_OPTIONS=detect_leaks=1 $(UBSAN_ENV) \
		ctest --test-dir $(BUILD)/cmake-asan --output-on-failure -R '$(ASAN_CTEST_REGEX)'

profile: $(STAMP)
	@# Fixed malloc thresholds: no variant pays page faults another does not (see profile/timing.py).
	@GLIBC_TUNABLES=$${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296} \
		$(PYTHON) -m condconv_kernels.profile.cli $(PROFILE_ARGS)

clean:
	rm -rf $(BUILD) condconv_kernels/_C*.so *.egg-info
