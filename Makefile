# The two entry points of the README: `make demo` (the main job) and `make test` (the whole suite).
# Both create the virtual environment in .venv/ when it is missing.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.plmetric-installed
# Exact versions of every installed package (pip freeze of the environment the suite was run with);
# pyproject.toml keeps ranges. Regenerate with `pip freeze --all --exclude-editable` after an upgrade.
CONSTRAINTS := constraints.txt
# torch first and pinned: on the reference machine these wheels lie on local disk (CUDA build, runs on CPU).
TORCH_SPEC_DEFAULT := torch==2.14.1 torchvision==0.29.1
TORCH_SPEC ?= $(TORCH_SPEC_DEFAULT)
# With TORCH_SPEC overridden, the pins of the torch build (torch, torchvision, triton, nvidia-*, cuda-*)
# would contradict it: both install steps then use a copy of the constraints without them.
TORCH_BUILD_PACKAGES := ^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==
ifeq ($(strip $(TORCH_SPEC)),$(TORCH_SPEC_DEFAULT))
INSTALL_CONSTRAINTS := $(CONSTRAINTS)
else
INSTALL_CONSTRAINTS := $(VENV)/constraints-without-torch.txt
endif

# `make test` runs the numeric test files a second time on other code paths, so that a result which
# passes only by the rounding of one kernel cannot hide:
#   ATEN_CPU_CAPABILITY=default   torch's baseline CPU kernels instead of its AVX2/AVX-512 ones;
#   MKL_ENABLE_INSTRUCTIONS=SSE4_2  MKL's (BLAS/LAPACK behind torch) SSE4.2 code path;
#   OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1  one thread (other blockings, no
#                                 parallel reduction order);
#   OPENBLAS_CORETYPE=Sandybridge  NumPy/SciPy's OpenBLAS AVX kernels without FMA (the references' side);
#   NPY_DISABLE_CPU_FEATURES=<all of NumPy's dispatched features>  NumPy's baseline SIMD loops;
#   FAISS_SIMD_LEVEL=NONE         faiss's scalar distance kernels.
# `make test-codepaths` first checks that they took effect (tests/numerics.py, check_codepaths): verified
# on the AMD EPYC reference machine are ATEN_CPU_CAPABILITY (get_cpu_capability() == "DEFAULT"), the
# thread counts (torch.get_num_threads(), threadpoolctl; MKL_VERBOSE=1 shows NThr:1), OPENBLAS_CORETYPE
# (threadpoolctl's architecture), NPY_DISABLE_CPU_FEATURES (numpy's __cpu_features__) and
# FAISS_SIMD_LEVEL (faiss.SIMDConfig). MKL_ENABLE_INSTRUCTIONS cannot be read back and did not change
# MKL's speed on that AMD CPU (MKL documents it for Intel processors); it is set for the Intel machines.
CODEPATH_TESTS := tests/manifold/test_pieces.py tests/methods/test_losses.py tests/methods/test_plm.py \
	tests/methods/test_stml.py tests/evaluation/test_estimators.py tests/evaluation/test_metrics.py tests/manifold/test_ann.py
CODEPATH_ENV := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 \
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OPENBLAS_CORETYPE=Sandybridge FAISS_SIMD_LEVEL=NONE
NPY_DISPATCHED = $$($(PY) -c "import numpy; c = getattr(numpy, '_core', None) or numpy.core; print(' '.join(c._multiarray_umath.__cpu_dispatch__))")

.PHONY: venv demo test test-codepaths test-fast clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	grep -v -i -E '$(TORCH_BUILD_PACKAGES)' $(CONSTRAINTS) > $(VENV)/constraints-without-torch.txt
	$(PY) -m pip install --quiet --upgrade -c $(INSTALL_CONSTRAINTS) pip
	$(PY) -m pip install --quiet -c $(INSTALL_CONSTRAINTS) $(TORCH_SPEC)
	$(PY) -m pip install --quiet -c $(INSTALL_CONSTRAINTS) --build-constraint $(INSTALL_CONSTRAINTS) -e ".[test,faiss,export,serve,parquet]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/plmetric demo

test: $(STAMP)
	$(VENV)/bin/pytest -q
	$(MAKE) --no-print-directory test-codepaths

test-codepaths: $(STAMP)
	env $(CODEPATH_ENV) NPY_DISABLE_CPU_FEATURES="$(NPY_DISPATCHED)" $(PY) tests/numerics.py --check-codepaths
	env $(CODEPATH_ENV) NPY_DISABLE_CPU_FEATURES="$(NPY_DISPATCHED)" $(VENV)/bin/pytest -q $(CODEPATH_TESTS)

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
