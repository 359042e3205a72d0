# hoptrace: two commands on a fresh machine.
#   make demo   bring up the local stack (PostgreSQL, Kafka, collector, services) and run payments
#   make test   lint + the whole test suite against the real stack
# Prerequisites: README.md ("Two commands"). Opt-out: HOPTRACE_SKIP_BROWSER=1 installs no
# Chromium and skips the dashboard's browser test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format bootstrap install up down status bench chaos tools

# HOPTRACE_SKIP_BROWSER=1: no Chromium (scripts/bootstrap.sh), so no browser test either
ifeq ($(HOPTRACE_SKIP_BROWSER),1)
SKIP_TESTS := --ignore=tests/dashboard/test_browser.py
endif

NATIVE := native/Cargo.toml native/Cargo.lock native/pyproject.toml $(wildcard native/src/*.rs)
# rustup's default location, for shells that did not source ~/.cargo/env
export PATH := $(HOME)/.cargo/bin:$(PATH)

$(STAMP): pyproject.toml constraints.txt $(NATIVE)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@if command -v cargo >/dev/null 2>&1; then $(BIN)/python -m pip install -q ./native; \
	else echo "install: no Rust toolchain (cargo): hoptrace_native not built, the pure-Python OTLP codec is used (its tests fail)"; fi
	@touch $(STAMP)

install: $(STAMP)

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap install
	@scripts/demo.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: bootstrap install lint
	scripts/go-tools.sh
	scripts/interop.sh
	$(BIN)/hoptrace dev up --infra-only
	$(BIN)/python -m pytest -q -p no:cacheprovider $(SKIP_TESTS) $(PYTEST_ARGS)

up: bootstrap install
	$(BIN)/hoptrace dev up

down:
	$(BIN)/hoptrace dev down

status:
	$(BIN)/hoptrace dev status

tools:
	scripts/go-tools.sh

chaos: install
	$(BIN)/python benchmarks/chaos.py

bench: install
	$(BIN)/hoptrace dev up --infra-only
	@# every benchmark script (the files with a __main__; the others are their shared modules)
	@for b in $$(grep -l '__name__ == "__main__"' benchmarks/*.py); do [ "$$b" = benchmarks/chaos.py ] && continue; echo "== $$b"; $(BIN)/python $$b || exit 1; done
