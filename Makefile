# `make demo`: set up and run the whole toy pipeline; `make test`: the test suite (what CI runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OUT := runs/toy

.PHONY: demo test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) 00_base_model.py --out_dir $(OUT)/base

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf runs
