# ssam — the commands people run. `make test` and `make demo` create .venv on first use.
PY      ?= python3
VENV    := .venv
PYTHON  := $(VENV)/bin/python

.PHONY: test demo venv clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e .
	touch $@

test: venv
	$(PYTHON) -m pytest tests

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
