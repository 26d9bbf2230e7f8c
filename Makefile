# make demo  - set up (first time only) and run the demo arena: SmolLM2-135M + LoRA forgets, the monitor rewinds it
# make test  - set up (first time only) and run the tests
# make lint  - ruff check (the rules in pyproject.toml); .ci/run runs it before the tests
# make setup - only the set-up (scripts/setup.sh: venv, CPU torch where there is no GPU, package)
# make clean - remove demo outputs and caches (make distclean also removes .venv)
#
# The environment is $(VENV): the active virtualenv if there is one, else .venv here.
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
export VENV

DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean distclean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) examples/arena.py $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .cache .pytest_cache build dist *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf .venv
