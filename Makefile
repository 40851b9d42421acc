# Quick start: `make pipeline` (setup + dvc repro on params.yaml) and `make test` (setup + pytest).
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup pipeline test lint seed-cache bench

setup:
	@bash scripts/setup.sh

pipeline: setup
	dvc repro

test: setup
	ruff check .
	python -m pytest

lint: setup
	ruff check .

# Offline: put the shared demo files into the download cache so the default URLs resolve without network.
seed-cache: setup
	python -m pipeline cache add ../shared/data/quijote.txt ../shared/data/instruction-data.json ../shared/data/instruction-data-with-preference.json ../shared/data/the-verdict.txt
