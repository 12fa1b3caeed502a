# Everything runs in .venv. TORCH_SPEC lets GPU users keep their own torch build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install assets test demo bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

assets: install
	$(VENV)/bin/adapruner assets fetch smollm2-135m data

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

test: assets lint
	$(PY) -m pytest -q

demo: assets
	$(PY) scripts/demo.py

bench: assets
	$(PY) benchmarks/importance_memory.py
	$(PY) benchmarks/importance_memory.py --no-checkpointing
	$(PY) benchmarks/importance_speed.py
	$(PY) benchmarks/speedup.py

clean:
	rm -rf $(VENV) build *.egg-info
