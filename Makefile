# One entry point for users and CI. Everything lives in .venv/ at the repository root.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

EXAMPLE := example-data/points.tensor
FLOAT   := model/resnet50/bevfusion-det.pth
PTQ     := model/resnet50int8/bevfusion_ptq.pth

.PHONY: help setup data model export export-fp16 test bench clean

help:
	@echo "make export       set up, make demo data and checkpoints if missing, export INT8 ONNX"
	@echo "make export-fp16  same, FP16 ONNX"
	@echo "make test         set up, run the tests"
	@echo "make bench        set up, run the benchmarks (writes bench/results and BENCHMARKS.md tables)"
	@echo "make model        demo float + PTQ checkpoints only"
	@echo "make clean        remove generated data, checkpoints and exports (keeps .venv)"

setup: $(STAMP)
$(STAMP): requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

data: $(EXAMPLE)
$(EXAMPLE): | $(STAMP)
	$(PY) example-data/generate.py --out example-data

model: $(PTQ)
$(FLOAT): | $(EXAMPLE)
	$(PY) -m lean.demo --out $(FLOAT) --data example-data
$(PTQ): | $(FLOAT)
	$(PY) -m lean.ptq --ckpt $(FLOAT) --out $(PTQ) --data example-data

export: $(PTQ)
	$(PY) export_camera.py --ckpt $(PTQ)

export-fp16: $(PTQ)
	$(PY) export_camera.py --ckpt $(PTQ) --fp16

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(PTQ)
	$(PY) -m bench

clean:
	rm -rf qat example-data/*.jpg example-data/*.tensor model/*/*.pth
