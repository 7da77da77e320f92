# mmtrain — `make demo` runs the main job, `make test` runs every CPU test tier.
# Both create (or reuse) .venv themselves.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmtrain-installed
# --isolated: ignore machine-wide pip settings (a local CPU-only torch wheel would shadow PyPI's
# build, and PyPI's torchvision, which open_clip needs, only loads with PyPI's torch).
PIP := $(PY) -m pip install --isolated --disable-pip-version-check -q
PYTEST_ARGS ?=

.PHONY: help install demo test test-unit test-dist test-e2e lint clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(STAMP)  ## create or reuse .venv with mmtrain and its test dependencies

$(STAMP): setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: install  ## synthetic VQA -> 2-rank ZeRO-3 training -> export -> eval; prints one JSON line
	$(VENV)/bin/mmtrain demo --workdir demo_data

test: install  ## every tier that runs without a GPU (unit, dist, e2e)
	$(PY) -m pytest tests -q -ra $(PYTEST_ARGS)

test-unit: install  ## unit tests only (seconds)
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

test-dist: install  ## 2-rank DeepSpeed ZeRO-3 tests on CPU
	$(PY) -m pytest tests/dist -q $(PYTEST_ARGS)

lint: install  ## ruff
	$(VENV)/bin/ruff check mmtrain data_tools tests bench launch

clean:  ## remove the virtual environment and local outputs
	rm -rf $(VENV) runs demo_data .pytest_cache
