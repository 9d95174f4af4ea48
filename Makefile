# The README's two commands: `make demo` and `make test`. Each creates .venv when it
# is missing and installs the project into it (a no-op when pyproject.toml is unchanged).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test install clean-demo

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -c "import torch, torchvision, timm, lightning; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__, '| lightning', lightning.__version__)"
	touch $(INSTALLED)

demo: $(INSTALLED)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash benchmarks/demo.sh

test: $(INSTALLED)
	$(BIN)/python -m pytest -q -ra tests

clean-demo:
	rm -rf data/mini runs/mvtec/msflow/mini_*
