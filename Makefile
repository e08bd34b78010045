# The README's commands, and the checks CI runs.
.PHONY: install run test test-all lint format bench

install:
	pip install -e ".[test,dashboard]"

run:
	python -m qsweep

test:
	python -m pytest

test-all:
	python -m pytest -m "slow or not slow"

lint:
	ruff check . && ruff format --check .

format:
	ruff check --fix . && ruff format .

bench:
	python -m qsweep.bench.evaluate
