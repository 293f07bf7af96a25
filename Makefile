# One command each (see README): `make demo` sets up and runs the main job; `make test` sets up
# and runs the tests. Everything runs .venv/bin/python.
PY := .venv/bin/python
PIP := $(PY) -m pip
# The pinned CPU wheel on this machine's disk; installed first so that the project's torch range
# is already satisfied and pip never pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test lint clean

setup: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_PIN)"
	$(PIP) install --quiet -e ".[dev]"
	touch $@

demo: setup
	@art=$$($(PY) -m compiler recipe=demo) && UIW_ARTIFACTS="$$art" $(PY) scripts/demo.py out/demo.png

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

clean:
	rm -rf .venv out
