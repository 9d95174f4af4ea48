# The README's two commands: `make demo` and `make test`. Each creates .venv when it
# is missing and installs the project into it (a no-op when pyproject.toml is unchanged).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# The official MOTChallenge evaluator (pyproject.toml says why it is installed without its deps).
TRACKEVAL_VERSION := 1.3.0

.PHONY: demo test install ffmpeg clean-demo

install: $(INSTALLED)

$(INSTALLED): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[dev,crf]"
	$(BIN)/python -m pip install --quiet --no-deps trackeval==$(TRACKEVAL_VERSION)
	$(BIN)/python -c "import torch, torchvision, timm, lightning; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__, '| lightning', lightning.__version__)"
	$(MAKE) --no-print-directory ffmpeg
	touch $(INSTALLED)

# The FFmpeg shared libraries torchcodec loads (Debian 12's FFmpeg 5.1), installed with apt-get
# where this runs as root; elsewhere a note: the video backend `auto` then decodes with decord.
FFMPEG_LIBS := libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59 libavfilter8
ffmpeg:
	@if ldconfig -p 2>/dev/null | grep -q 'libavcodec.so.59 '; then 	  echo "FFmpeg libraries present: torchcodec can decode"; 	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then 	  echo "installing the FFmpeg libraries for torchcodec with apt-get"; 	  apt-get install -y -q --no-install-recommends $(FFMPEG_LIBS) >/tmp/visionzoo-ffmpeg-apt.log 2>&1 || 	  { apt-get update -q >>/tmp/visionzoo-ffmpeg-apt.log 2>&1 && 	    apt-get install -y -q --no-install-recommends $(FFMPEG_LIBS) >>/tmp/visionzoo-ffmpeg-apt.log 2>&1; } || 	  echo "apt-get could not install $(FFMPEG_LIBS) (log: /tmp/visionzoo-ffmpeg-apt.log): videos decode with decord"; 	else 	  echo "FFmpeg libraries missing ($(FFMPEG_LIBS) on Debian; root needed): videos decode with decord, not torchcodec"; 	fi

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
