# ood_bench — `make help` lists the targets.
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip
export OOD_BENCH_DATA ?= $(abspath ../shared/data)
export OOD_BENCH_WEIGHTS ?= $(abspath ../shared/weights)

.DEFAULT_GOAL := help
.PHONY: help install run test test-full lint format clean clean-logs tables figures bench

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: ## Create .venv and install the package with its dev extra (CPU or GPU torch <= 2.14.1)
	python3 -m venv .venv
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[dev]'

run: ## Run the embedded default (LMD on sklearn digits); pass ARGS="method=lmd data=..." for more
	$(PY) run.py $(ARGS)

tables: ## Paper tables from results/runs.csv: ours, the paper's number, delta (Markdown, LaTeX, CSV in results/tables)
	PYTHONPATH=$(CURDIR) $(PY) scripts/make_tables.py $(ARGS)

figures: ## AUROC against NFE and seconds per image across runs (results/figures), missing per-run ROC figures
	PYTHONPATH=$(CURDIR) $(PY) scripts/make_figures.py $(ARGS)

bench: ## Time every method (images/s, NFE, time per phase, peak memory, loop efficiency) -> results/bench/bench.csv
	PYTHONPATH=$(CURDIR) $(PY) scripts/bench.py $(ARGS)

test: ## Default test suite (excludes tests marked slow)
	$(PY) -m pytest -m "not slow" -q

test-full: ## All tests, slow ones included
	$(PY) -m pytest -q

lint: ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: ## Auto-format with ruff
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean-logs: ## Remove Hydra run logs
	rm -rf logs/ outputs/ multirun/ wandb/

clean: clean-logs ## Remove caches and build artefacts (keeps results/)
	rm -rf .cache/ .pytest_cache/ .ruff_cache/ *.egg-info
