# The two commands a new user needs: `make train` and `make test`. Both create the virtual environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= workdirs/tiny_cpu
CONFIG ?= configs/tiny_cpu.py

.PHONY: setup train test test-all clean

# Re-install only when setup.py changes.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# The tests also need the [hf] extra (transformers + CPU torch: the reference for the weight-import parity tests);
# `make train` does not, so it stays a separate step.
# open_clip is a reference for the tokenizer and loss tests; --no-deps keeps out its torchvision (see setup.py).
$(VENV)/.installed-hf: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test,hf]"
	$(BIN)/python -m pip install -q --no-deps open-clip-torch==3.3.0
	$(BIN)/python -m pip install -q --no-deps clip-benchmark==1.6.2
	touch $@

setup: $(VENV)/.installed

# Train the default config on the embedded dataset (prepared on first use), then print the zero-shot report.
# Re-running resumes from the last checkpoint in $(WORKDIR).
train: setup
	$(BIN)/python -m clip_jax.main train --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(VENV)/.installed-hf
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: $(VENV)/.installed-hf
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) workdirs tfds_data *.egg-info
