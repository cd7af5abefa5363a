# sglang-dp: `make test` installs everything it needs from scratch, then lints, type-checks and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# mypyc compiles these at install time (setup.py; the list is compiled.txt, which
# tests/conftest.py reads too): a change to them needs a reinstall.
COMPILED := $(shell cat compiled.txt)

.PHONY: install test lint typecheck pytest bench demo dist clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py compiled.txt $(COMPILED)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

test: lint typecheck pytest

# bench_ray.py is skipped: bench_launch.py prints its figures too
bench: install
	@for script in benchmarks/bench_*.py; do \
		[ "$$script" = benchmarks/bench_ray.py ] && continue; \
		echo "== $$script"; \
		$(BIN)/python $$script || exit 1; \
	done

# A simulated 4-worker cluster with a live dashboard and a steady shared-prefix load; Ctrl-C stops all.
demo: install
	@$(BIN)/python examples/steady_load.py --url http://127.0.0.1:30000 & LOAD=$$!; \
	$(BIN)/sglang-dp launch --simulate --dp 4 --port 30000 -- --time-scale 5; \
	kill $$LOAD 2>/dev/null; wait $$LOAD 2>/dev/null; true

# A wheel (routing core compiled with mypyc) and an sdist in dist/, then a smoke test of the wheel
# in a fresh virtual environment.
dist: install
	rm -rf dist
	$(BIN)/python -m build --outdir dist
	rm -rf build/dist-check && $(PYTHON) -m venv build/dist-check
	build/dist-check/bin/pip install --quiet dist/*.whl
	build/dist-check/bin/sglang-dp --version
	build/dist-check/bin/sglang-dp --help

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .pytest_cache .ruff_cache
	find src -name '*.so' -delete
