# make demo: create .venv, install, compress DeiT-Small (merging; merging + pruning to ~0.5x FLOPs) and print the speed table.
# make test: create .venv if missing, install, run the test suite.
# make bench: every benchmark number (models, kernels on a GPU, accuracy/segmentation results) -> bench/results/report-<device>/.
# make sanitize: the C++ CPU kernel's tests with the kernel built under AddressSanitizer + UndefinedBehaviorSanitizer.
# make compat: the whole suite in a second venv (.venv-compat) with the oldest torch/triton/timm setup.py claims.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Exact versions known to work here (setup.py keeps loose ranges for real users).
FRAMEWORK_PINS := torch==2.14.1 torchvision==0.29.1 triton==3.8.0 timm==1.0.31
TOOL_PINS := pytest==9.2.0 pytest-xdist==3.8.0 pytest-benchmark==5.3.1 tqdm==4.70.1 ruff==0.17.6 safetensors==0.8.0 scikit-learn==1.9.1 matplotlib==3.11.2 jsonschema==4.26.0 ninja==1.13.2 hypothesis==6.170.17 onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.31.1 transformers==5.25.0
PINS := $(FRAMEWORK_PINS) $(TOOL_PINS)
# make test runs one pytest-xdist worker per core (each on one thread, tests/conftest.py); TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= auto
# The floors of setup.py: torch/triton of the GPU machine this project is benchmarked on, the oldest timm that passes.
COMPAT := .venv-compat
# numpy < 2.4: triton 3.6's interpreter turns 1-element arrays into ints, an error since numpy 2.4 (interpreter tests only).
COMPAT_PINS := torch==2.11.0 torchvision==0.26.0 triton==3.6.0 timm==1.0.7 numpy==2.3.5
CHECKPOINT ?=
# The sanitized kernel loads into an uninstrumented python: the ASan runtime (and libstdc++, whose
# exceptions it intercepts) must be preloaded; python and torch leak by design at exit, so leak checks are off.
SANITIZE_ENV := CAIT_KERNELS_SANITIZE=1 ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so.6)"

.PHONY: demo test bench sanitize compat clean

$(VENV)/.installed: setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PINS)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/cait bench --models deit_small_patch16_224 --batch 8 --variant merge=0.6 --variant merge=0.7,prune=0.5/0.75/0.75 $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

test: $(VENV)/.installed
	$(VENV)/bin/ruff check cait cait_kernels tests bench
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

bench: $(VENV)/.installed
	$(VENV)/bin/cait bench --all

# --capture=sys: a sanitizer report goes to the terminal even when it ends the process.
sanitize: $(VENV)/.installed
	env $(SANITIZE_ENV) $(PY) -m pytest -q --capture=sys -p no:cacheprovider -k cpu \
		tests/test_atme_cpu.py tests/test_degenerate.py tests/test_precision.py tests/test_properties.py

$(COMPAT)/.installed: setup.py Makefile
	test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q --upgrade pip
	$(COMPAT)/bin/python -m pip install -q $(COMPAT_PINS) $(filter-out ruff==%,$(TOOL_PINS))
	$(COMPAT)/bin/python -m pip install -q --no-deps -e .
	touch $@

compat: $(COMPAT)/.installed
	$(COMPAT)/bin/python -c "import torch, triton, timm; print('compat:', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
	$(COMPAT)/bin/python -m pytest -q -n $(TEST_WORKERS) tests

clean:
	rm -rf $(VENV) $(COMPAT) *.egg-info .pytest_cache .hypothesis
