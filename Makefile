# make demo  - set up (first time only) and run the demo arena: SmolLM2-135M + LoRA forgets, the monitor rewinds it
# make test  - set up (first time only) and run the tests
# make test-integrations - one environment per training tool that pins its own versions
#              (scripts/integration_env.sh: Axolotl, LLaMA-Factory) and its tests (integration_tests/)
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

.PHONY: setup demo test test-integrations lint clean distclean

INTEGRATIONS ?= axolotl llamafactory

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) examples/arena.py $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-integrations:
	set -e; for tool in $(INTEGRATIONS); do \
	  bash scripts/integration_env.sh $$tool; \
	  .venvs/$$tool/bin/python -m pytest -q -p no:cacheprovider integration_tests/$$tool $(PYTEST_ARGS); \
	done

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .cache .pytest_cache build dist *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf .venv .venvs
