# textrefiner — every target bootstraps .venv through `install` when it is missing.
PYTHON := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: install test
install: $(VENV_STAMP)

# Idempotent: re-runs only when requirements.txt changes or .venv is gone.
$(VENV_STAMP): requirements.txt
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(VENV_STAMP)

# tests/conftest.py switches Triton to its CPU interpreter when CUDA is absent.
test: $(VENV_STAMP)
	$(PYTHON) -m pytest -q tests
