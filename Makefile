# One-command entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default; on a CUDA machine install the torch build you want into $(VENV) first
# (or set TORCH_SPEC) and it is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

test: setup
	KERAS_BACKEND=torch $(BIN)/python -m pytest -q

demo: setup
	KERAS_BACKEND=torch $(BIN)/python scripts/train.py --preset demo --overwrite

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
