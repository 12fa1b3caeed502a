# Everything runs in .venv. TORCH_SPEC lets GPU users keep their own torch build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# llama-cpp-python compiles llama.cpp: only the library (no tools, servers, examples or llava), native CPU.
# GPU users add their backend, e.g. LLAMA_CMAKE_ARGS="-DGGML_CUDA=on".
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
STAMP := $(VENV)/.installed

.PHONY: install assets postgres test demo bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" $(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

assets: install
	$(VENV)/bin/adapruner assets fetch smollm2-135m data

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# PostgreSQL server binaries for tests/test_search_postgres.py (the test runs its own throwaway server).
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "postgres: server binaries found"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; \
	else \
		echo "postgres: no PostgreSQL server found and not root: install it (Debian/Ubuntu:" \
			"sudo apt-get install postgresql) or the PostgreSQL test fails; ADAPRUNER_SKIP_POSTGRES=1 skips it"; \
	fi

test: assets lint postgres
	$(PY) -m pytest -q

demo: assets
	$(VENV)/bin/adapruner run --config configs/demo.yaml --output runs/demo

bench: assets
	$(PY) benchmarks/importance_memory.py
	$(PY) benchmarks/importance_memory.py --no-checkpointing
	$(PY) benchmarks/importance_speed.py
	$(PY) benchmarks/speedup.py
	$(PY) benchmarks/refit_ablation.py
	$(PY) benchmarks/local_memory.py
	$(PY) benchmarks/compare_methods.py
	$(PY) benchmarks/engine_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
