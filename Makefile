# Quick start: `make pipeline` (setup + dvc repro on params.yaml) and `make test` (setup + pytest).
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup pipeline test test-fast lint seed-cache bench

setup:
	@bash scripts/setup.sh

# Each run names its CPU first: compiled runtimes take CPU-specific paths (docs/export.md, GGUF on CPUs with AMX).
pipeline: setup
	@bash scripts/cpu_summary.sh
	dvc repro

test: setup
	@bash scripts/cpu_summary.sh
	ruff check .
	ruff format --check .
	python -m pytest

# The unit tier: tests/unit/ without the tests marked integration (stages, DVC, servers, Prefect, runtimes).
test-fast: setup
	ruff check .
	ruff format --check .
	python -m pytest -m "not integration"

lint: setup
	ruff check .
	ruff format --check .

# Offline: put the shared demo files into the download cache so the default URLs resolve without network.
seed-cache: setup
	python -m pipeline cache add ../shared/data/quijote.txt ../shared/data/instruction-data.json ../shared/data/instruction-data-with-preference.json ../shared/data/the-verdict.txt
