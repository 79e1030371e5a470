# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and
# installs what it needs. torch==2.13.0 (a CPU wheel) is installed only where no torch is
# importable in the venv, so a CUDA torch that a user installed first is kept.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.polyprune-installed
DEMO_OUT ?= runs/demo-sparsegpt-de-en

.PHONY: demo test lint bench table1 clean

# No pip cache: the wheels would be kept twice on disk (CI machines can be short of it).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-cache-dir torch==2.13.0
	$(PY) -m pip install -q --no-cache-dir -e ".[test,eval,ray,real]"
	touch $(STAMP)

# The main job on the bundled demo model: SparseGPT at 50% calibrated on German + English
# (64 + 64 windows of 256 tokens from the offline corpus), then held-out perplexity per language.
demo: $(STAMP)
	$(VENV)/bin/polyprune prune --model demo --method sparsegpt --sparsity 0.5 --calib de,en \
		--source bundled --nsamples 128 --seqlen 256 --out $(DEMO_OUT) --save-masks --overwrite
	$(PY) scripts/demo_report.py --dense demo --compressed $(DEMO_OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check polyprune tests scripts
	$(VENV)/bin/ruff check polyprune tests scripts

test: lint
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -q tests

# Table 1 on a real pretrained multilingual model, offline: Gemma 3 270M (converted once from
# its GGUF into the polyprune cache), magnitude / Wanda / SparseGPT at 50% calibrated on each of
# seven languages, held-out perplexity in all seven. Resumable: a rerun skips finished cells.
table1: $(STAMP)
	$(VENV)/bin/polyprune matrix configs/gemma3-270m-table1.yaml

bench: $(STAMP)
	$(PY) scripts/bench_prune.py

clean:
	rm -rf $(VENV) runs .pytest_cache
