# Two entry points for a fresh machine with only Python:
#   make demo   train the quickstart model, scan its trajectory, show the induction heads, write a report
#   make test   install what the tests need and run them (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
DEMO_OUT ?= runs/quickstart

.PHONY: demo test test-slow bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/jaxinduct quickstart --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/jaxinduct bench --shape pythia-70m --examples 64
	$(BIN)/python bench/quickstart_phase_change.py
	$(BIN)/python bench/score_throughput.py
	$(BIN)/python bench/scan_throughput.py
	$(BIN)/python bench/vs_transformer_lens.py

clean:
	rm -rf $(VENV) runs .pytest_cache
