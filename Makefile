# The whole set-up on a fresh machine is `make run` (or `make test`): each creates the project's
# virtual environment in .venv, installs genrep into it, and runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast install browser gpu-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)  ## the main job: pretrain the default recipe on digits, probe it, print the summary
	$(VENV)/bin/genrep run

# The tests run in one pytest-xdist worker per core (at most 4, so that a many-core machine does not hold a dozen copies of torch and the data), a test file per worker
# at a time, so a module's shared fixtures are built once; conftest gives each worker its share of torch's threads.
XDIST := -n auto --maxprocesses 4 --dist loadfile

test: $(STAMP) browser  ## every test, slow ones included (what CI runs)
	GENREP_REQUIRE_BROWSER=1 $(PY) -m pytest $(XDIST)

# The report test renders the HTML report in a real headless browser: Debian's chromium.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing Debian's chromium for the report test"; \
	    apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; }

test-fast: $(STAMP)  ## skip the tests marked slow, while iterating
	$(PY) -m pytest $(XDIST) -m "not slow"

# Pure-Python dependencies for the lent GPU machine, which has PyTorch but not all of genrep's deps
# (benchmarks/gpu_check.sh puts this folder on PYTHONPATH; pass it to the device in `carry`).
gpu-deps: $(STAMP)
	rm -rf gpu-deps && mkdir gpu-deps
	cp -r $$($(PY) -c "import torchmetrics, torch_fidelity, lightning_utilities as l, os; \
	  print(' '.join(os.path.dirname(m.__file__) for m in (torchmetrics, torch_fidelity, l)))") gpu-deps/

clean:
	rm -rf $(VENV) runs .pytest_cache
