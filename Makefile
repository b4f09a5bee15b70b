PYTHON ?= python
# torch is installed first, only when missing: a CUDA build you installed stays. On a
# CPU-only machine this takes the CPU wheel of torch 2.13.0 (see README for GPU set-up).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint bench bench-official bench-data bench-contention run docs

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[dev]"

test:
	$(PYTHON) -m pytest -p no:cacheprovider

lint:
	ruff check hrnn_lit tests experiments

run:
	$(PYTHON) -m hrnn_lit

bench:
	$(PYTHON) experiments/bench.py --json bench.json

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
