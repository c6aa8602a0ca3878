# All set-up happens here: `make run` and `make test` work on a fresh machine.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.zoo-installed
# Compiled graphs are cached outside the clone so reruns (and CI on the same machine) start warm.
export TORCHINDUCTOR_CACHE_DIR ?= $(HOME)/.cache/zoo/inductor
export TORCH_DEVICE_BACKEND_AUTOLOAD ?= 0

.PHONY: venv run test test-all clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned: no later step may pull another torch or torch-npu.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,serve,bench]'
	$(PY) -c "import torch, transformers, safetensors; print('torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m zoo.llama.infer --compiled

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

clean:
	rm -rf $(VENV) build *.egg-info
