# The whole set-up on a fresh machine is `make run` (or `make test`): each creates the project's
# virtual environment in .venv, installs genrep into it, and runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)  ## the main job: pretrain the default recipe on digits, probe it, print the summary
	$(VENV)/bin/genrep run

test: $(STAMP)  ## every test, slow ones included (what CI runs)
	$(PY) -m pytest

test-fast: $(STAMP)  ## skip the tests marked slow, while iterating
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
