# make demo: create .venv, install, compress DeiT-Small (merging; merging + pruning to ~0.5x FLOPs) and print the speed table.
# make test: create .venv if missing, install, run the test suite.
# make bench: every benchmark number (models, kernels on a GPU, accuracy/segmentation results) -> bench/results/report-<device>/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Exact versions known to work here (setup.py keeps loose ranges for real users).
PINS := torch==2.14.1 torchvision==0.29.1 triton==3.8.0 timm==1.0.31 pytest==9.2.0 pytest-benchmark==5.3.1 tqdm==4.70.1 ruff==0.17.6 safetensors==0.8.0 scikit-learn==1.9.1 matplotlib==3.11.2 jsonschema==4.26.0 ninja==1.13.2 onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.31.1
CHECKPOINT ?=

.PHONY: demo test bench clean

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
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(VENV)/bin/cait bench --all

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
