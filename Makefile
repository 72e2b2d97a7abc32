# The two commands (README.md): `make run` and `make test`. Both set up what they need.
.PHONY: run test test-fast lint docs chaos fuzz bench setup setup-test check

run: setup
	mkdir -p var/inbox
	.venv/bin/watcherd run --config config/local.yaml

test: setup-test
	.venv/bin/python -m pytest $(PYTEST_ARGS)

# Layer contracts (pyproject.toml, [tool.importlinter]), ruff, mypy and the docs site, strict.
lint: setup-test
	.venv/bin/lint-imports
	.venv/bin/ruff check watcherd tests benchmarks
	.venv/bin/ruff format --check watcherd tests benchmarks
	.venv/bin/mypy watcherd
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir build/site

docs: setup-test
	.venv/bin/mkdocs serve

# Units, contracts, engines and writers in-process: no real daemon or server (tests/conftest.py, `slow`).
test-fast: setup-test
	.venv/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

chaos: setup-test
	.venv/bin/python -m pytest -m chaos -q $(PYTEST_ARGS)

# The fuzz targets alone, for longer than the suite's bounded run (WATCHERD_FUZZ_SECONDS=24).
fuzz: setup-test
	WATCHERD_FUZZ_SECONDS=$${WATCHERD_FUZZ_SECONDS:-600} .venv/bin/python -m pytest -m fuzz -q $(PYTEST_ARGS)

bench: setup-test
	cd benchmarks && ../.venv/bin/python embedded.py && ../.venv/bin/python overhead.py

check: setup
	mkdir -p var/inbox
	.venv/bin/watcherd check --config config/local.yaml

setup:
	scripts/setup

setup-test:
	scripts/setup --test
