# Two entry points (see README): `make demo` and `make test`. Each creates .venv when absent.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-slow bench bench-gpu bench-quality clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and alone: the pinned CPU build lies on local disk, everything else comes from PyPI.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/peftkit demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow

bench: $(VENV)/.installed
	$(BIN)/python -m bench.run_all

# On a CUDA machine: random-weight models at SmolLM2 / Llama-3.2-1B / Llama-3.1-8B shapes.
bench-quality: $(VENV)/.installed
	$(BIN)/python -m bench.quality

bench-gpu: $(VENV)/.installed
	$(BIN)/python -m bench.gpu --device cuda

clean:
	rm -rf $(VENV) *.egg-info
