# Set up a virtual environment and run the tests or the demo from a fresh clone.
# TORCH pins the CPU build of PyTorch that this project is developed against; override it
# (e.g. `make test TORCH=torch`) to let pip choose a build for your platform.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup test test-zoo clean demo

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

clean:
	rm -rf $(VENV) $(ZOO_VENV) .pytest_cache .hypothesis zoo-results.md

# `make demo`: a tour of the bmrs command in about a minute on 2 CPU cores. On the small
# digits set it trains an MLP three ways (gates without pruning; BMRS_N as the paper's
# code computes it; exact BMRS_N), sweeps post-training pruning criteria over the unpruned
# model, and writes a report (table and plots) into $(DEMO_OUT)/report.
DEMO_OUT ?= demo-out
DEMO_TRAIN = --dataset digits --model mlp --width 64 --epochs 30 --finetune-epochs 5 \
	--batch-size 32 --lr 0.02 --kl-reduction elbo --threads 1 --no-progress

demo: setup
	rm -rf $(DEMO_OUT)
	$(BIN)/bmrs train $(DEMO_TRAIN) --method none --out $(DEMO_OUT)/none
	$(BIN)/bmrs train $(DEMO_TRAIN) --method bmrs-n-code --out $(DEMO_OUT)/bmrs-n-code
	$(BIN)/bmrs train $(DEMO_TRAIN) --method bmrs-n --out $(DEMO_OUT)/bmrs-n
	$(BIN)/bmrs sweep --run $(DEMO_OUT)/none --threads 1 --no-progress --out $(DEMO_OUT)/sweep
	$(BIN)/bmrs report $(DEMO_OUT) --out $(DEMO_OUT)/report
	@echo
	@echo "Table: $(DEMO_OUT)/report/results.md"
	@echo "Plots: $(DEMO_OUT)/report/accuracy_vs_compression.png (accuracy vs compression, stopping points as stars)"
	@echo "       $(DEMO_OUT)/report/widths.png (kept neurons per layer)"
	@echo "Compacted networks: $(DEMO_OUT)/*/compact.pt (try: $(BIN)/bmrs info $(DEMO_OUT)/bmrs-n-code)"
