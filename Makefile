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

# The main job on built-in mini data: write the mini MVTec AD set, fit and test MSFlow on
# each of its categories on the CPU, print the leaderboard and where the pictures are.
MINI_MVTEC := data/mini/mvtec
MINI_CATEGORIES := weave speckle_gray
MSFLOW_MINI := --config configs/mvtec/msflow.yaml --config configs/mvtec/mini.yaml --config configs/trainer/cpu.yaml --data.init_args.root $(MINI_MVTEC)

demo: $(INSTALLED)
	$(BIN)/python -m datamodules.mini mvtec $(MINI_MVTEC)
	for category in $(MINI_CATEGORIES); do \
	  $(BIN)/visionzoo fit $(MSFLOW_MINI) --data.init_args.category $$category --overwrite true && \
	  $(BIN)/visionzoo test $(MSFLOW_MINI) --data.init_args.category $$category --ckpt_path last || exit 1; \
	done
	$(BIN)/python -m benchmarks.leaderboard runs
	@for category in $(MINI_CATEGORIES); do echo "pictures: runs/mvtec/msflow/$$category/anomaly_maps/"; done

test: $(INSTALLED)
	$(BIN)/python -m pytest -q -ra tests

clean-demo:
	rm -rf $(MINI_MVTEC) $(foreach category,$(MINI_CATEGORIES),runs/mvtec/msflow/$(category))
