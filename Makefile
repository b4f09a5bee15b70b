PYTHON ?= python
# torch is installed first, only when missing: a CUDA build you installed stays. On a
# CPU-only machine this takes the CPU wheel of torch 2.13.0 (see README for GPU set-up).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint bench bench-compare bench-official bench-data bench-contention run docs

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[dev]"

test:
	$(PYTHON) -m pytest -p no:cacheprovider

lint:
	ruff check hrnn_lit tests experiments

run:
	$(PYTHON) -m hrnn_lit

# Training and evaluation events/s through the public API (experiments/bench.py; 2 torch
# threads as the issue's figures; BENCH_ARGS="--quick" for a smoke run)
BENCH_ARGS ?= --threads 2
bench:
	$(PYTHON) experiments/bench.py $(BENCH_ARGS) --json bench.json

# This checkout and BASE (any git revision, e.g. 23d3f7c) side by side in one run: a
# temporary worktree of BASE, the two measured alternately per config; ratios in bench.json
bench-compare:
	@test -n "$(BASE)" || { echo "usage: make bench-compare BASE=<git revision>" >&2; exit 2; }
	$(PYTHON) experiments/bench.py $(BENCH_ARGS) --baseline-rev "$(BASE)" --json bench.json

# The official GRU4Rec code (OFFICIAL=its checkout, never vendored) vs ours, both engines,
# on config (a): ratios merged into bench.json (key official_comparison)
bench-official:
	$(PYTHON) experiments/bench_official.py --out bench_official_data --official "$(OFFICIAL)" --threads 2 --json bench.json

bench-data:
	$(PYTHON) experiments/bench_prepare.py --json bench_prepare.json

# docs/benchmarks.md from experiments/results/ (and bench.json when present)
docs:
	$(PYTHON) experiments/benchmarks_doc.py

# Two default training runs started at once vs one alone (shared cores; target share >= 0.75)
bench-contention:
	$(PYTHON) experiments/bench_contention.py --json bench_contention.json
