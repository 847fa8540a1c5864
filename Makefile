# `make test` and `make run` bootstrap .venv (pinned by constraints.txt) on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The compilation cache outlives the checkout: JAX keys entries by program, jaxlib version and
# flags, not by path, so a new clone or worktree reuses what an earlier one compiled.
export JAX_COMPILATION_CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/genctl_jax/jax
RUN_WORKDIR ?= runs/shapes_t2i
CLASS_WORKDIR ?= runs/shapes_diffusion
# On a CPU-only machine two fake devices keep both cores busy (one XLA CPU device uses ~1.3
# cores on small convolutions); accelerators ignore this setting.
RUN_CPU_DEVICES ?= 2
# A genctl_jax module on those devices: `$(RUN_MODULE) genctl_jax.train ...`.
RUN_MODULE = JAX_NUM_CPU_DEVICES=$(RUN_CPU_DEVICES) $(PY) -m

# The ControlNet demo's base (the text-to-image run of `make run`) and ControlNet runs.
T2I_WORKDIR ?= $(RUN_WORKDIR)
CONTROLNET_WORKDIR ?= runs/shapes_controlnet

.PHONY: test run run-class run-controlnet lint format clean-cache

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[test]'
	touch $(STAMP)

# Two pytest workers (pytest-xdist), one per core: compiles are single-threaded, so this
# roughly halves the suite's wall time. A test file stays on one worker (--dist loadfile);
# files go out in collection order (tests/conftest.py puts the longest first), not xdist's
# most-tests-first order, so that no long file starts last.
PYTEST_WORKERS ?= 2

test: $(STAMP) lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Trains (or resumes) config $(1) in workdir $(2), then draws $(3) samples there with
# DDIM-50 at guidance 3 and prints the analytic checker's fidelity.
define train_and_sample
	$(RUN_MODULE) genctl_jax.train --config $(1) --workdir $(2)
	$(RUN_MODULE) genctl_jax.sample --workdir $(2) \
	    --num_samples $(3) --sampler ddim --steps 50 --guidance_scale 3 --out $(2)/samples.png
endef

# Text-to-image on the shapes captions: prompt fidelity on 128 held-out test captions.
run: $(STAMP)
	$(call train_and_sample,configs/shapes_t2i.py,$(RUN_WORKDIR),128)

# The class-conditional counterpart (48 classes = shape x colour): class fidelity.
run-class: $(STAMP)
	$(call train_and_sample,configs/shapes_diffusion.py,$(CLASS_WORKDIR),64)

# Trains (or resumes, a no-op once finished) the text-to-image base, then a ControlNet on
# its frozen UNet with the dataset's edge maps, and prints control fidelity (edge F1 of the
# samples' edges against the control maps) and prompt fidelity on held-out test examples,
# with the ControlNet off (conditioning scale 0: the base alone) and on (scale 1).
run-controlnet: $(STAMP)
	$(RUN_MODULE) genctl_jax.train --config configs/shapes_t2i.py --workdir $(T2I_WORKDIR)
	$(RUN_MODULE) genctl_jax.train \
	    --config configs/shapes_controlnet.py:base=$(T2I_WORKDIR) --workdir $(CONTROLNET_WORKDIR)
	$(RUN_MODULE) genctl_jax.evaluate \
	    --workdir $(CONTROLNET_WORKDIR) --metrics control,fidelity --num_samples 64 \
	    --sweep conditioning_scale=0,1 --name control_demo

clean-cache:
	rm -rf $(JAX_COMPILATION_CACHE_DIR)
