# peftbench: `make run` sets up and runs the quickstart benchmark; `make test` sets up and tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.peftbench-installed
TORCH_VERSION ?= 2.13.0

.PHONY: install browser run test test-fast lint smoke clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[dev,ray]"
	@touch $(STAMP)

install: $(STAMP)

# the report's browser test needs Chromium; installed when apt-get can (else that test skips)
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium) \
	  >/dev/null 2>&1 || echo "note: chromium not installed; the report browser test will skip"; }

run: install
	$(VENV)/bin/peftbench run quickstart
	$(VENV)/bin/peftbench results --suite quickstart
	$(VENV)/bin/peftbench report --suite quickstart --out quickstart-report.html

test: install browser
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

smoke: install
	$(VENV)/bin/peftbench run smoke --db smoke.sqlite

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs
