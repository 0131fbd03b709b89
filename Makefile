# Two commands for a fresh clone: `make demo` and `make test`. Both create and use .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch==2.13.0 from PyPI is the CUDA build on Linux x86_64; PyTorch's CPU index has the CPU build under the same
# pin. Used when reachable (a machine with its own wheelhouse, like CI's, already serves the CPU build).
TORCH_CPU_INDEX = $(shell $(PYTHON) -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/', timeout=3)" 2>/dev/null && echo --extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: demo demo-tflite test test-tflite bench lint clean venv test-arm registry

venv: $(STAMP)

# Host install (torch pinned to the CPU build 2.13.0) plus test tools; editable, so edits take effect.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_CPU_INDEX) -e '.[host,fleet,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edge demo --json demo.json

# The TFLite path in its own venv (litert-torch pulls jax and ~90 packages, ~2 GB; torch stays pinned to CPU 2.13.0).
TFLITE_VENV := .venv-tflite
$(TFLITE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TFLITE_VENV)
	$(TFLITE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TFLITE_VENV)/bin/python -m pip install --quiet $(TORCH_CPU_INDEX) -e '.[host,tflite-export,test]'
	touch $@

demo-tflite: $(TFLITE_VENV)/.installed
	$(TFLITE_VENV)/bin/edge demo --backend tflite --json demo-tflite.json

# The TFLite export tests (litert-torch): conv layouts and folded BatchNorm, 17 HF families on LiteRT (slow ones too).
test-tflite: $(TFLITE_VENV)/.installed
	$(TFLITE_VENV)/bin/python -m pytest -q -m "slow or not slow" tests/host/test_tflite_conv.py tests/host/test_tflite_hf.py tests/host/test_layout_match.py tests/device/test_litert.py tests/host/test_tflite_quant.py \
		tests/host/test_cli_quantize.py tests/host/test_outside_int8.py tests/host/test_outside_tflite.py
	$(TFLITE_VENV)/bin/python -m pytest -q -m "slow or not slow" tests/host/test_hf_matrix.py -k litert

# The OCI registry (Debian's docker-registry) that the fleet tests start on 127.0.0.1; skipped with a message if
# it cannot be installed here.
registry:
	bash scripts/install-registry.sh

# Bytecode compiled first, as pip install compiles an installed package: with PYTHONDONTWRITEBYTECODE set, every
# CLI the tests spawn would compile each module it imports again (about 0.1 s per process here).
test: $(STAMP) registry
	$(BIN)/python -m compileall -q edge runtimes lab exporters
	$(BIN)/python -m pytest -q

# Long runs: real pretrained models and benchmarks. Writes JSON and regenerates BENCHMARKS.md's sections.
bench: $(STAMP) $(TFLITE_VENV)/.installed registry
	$(BIN)/python -m compileall -q edge runtimes lab exporters
	$(BIN)/python -m pytest -q -m slow
	$(BIN)/edge bench switch --peers --json bench-switch.json --md BENCHMARKS.md
	$(BIN)/edge bench memory --json bench-memory.json --md BENCHMARKS.md
	$(BIN)/edge bench coldstart --json bench-coldstart.json --md BENCHMARKS.md
	$(BIN)/edge bench masks --json bench-masks.json --md BENCHMARKS.md
	$(BIN)/edge bench update --json bench-update.json --md BENCHMARKS.md
	$(BIN)/edge bench ood --minilm --json bench-ood.json --md BENCHMARKS.md
	$(BIN)/edge bench ood --taps mlp-in:1 --json bench-ood-mlp-in.json --md BENCHMARKS.md
	$(BIN)/edge bench ood --taps all --json bench-ood-all.json --md BENCHMARKS.md
	$(BIN)/edge bench ood --model cnn --json bench-ood-cnn.json --md BENCHMARKS.md
	$(BIN)/edge bench ood --model cnn --taps auto --json bench-ood-cnn-auto.json --md BENCHMARKS.md
	$(BIN)/edge bench fleet --json bench-fleet.json --md BENCHMARKS.md
	$(BIN)/edge bench lowbit --json bench-lowbit.json --md BENCHMARKS.md
	$(BIN)/edge bench quantized --json bench-quantized.json --md BENCHMARKS.md
	$(TFLITE_VENV)/bin/edge bench switch --backend tflite --json bench-switch-tflite.json --md BENCHMARKS.md
	$(TFLITE_VENV)/bin/edge bench quantized --backend tflite --json bench-quantized-tflite.json --md BENCHMARKS.md
	$(TFLITE_VENV)/bin/python -m lab.bench_litert all --md BENCHMARKS.md > bench-litert-ways.json
	$(BIN)/edge bench engines --json bench-engines.json --md BENCHMARKS.md

# Device-side tests on aarch64 under qemu-user (needs root; builds and caches a Debian arm64 root in .arm-root/).
test-arm:
	bash scripts/arm/test-arm.sh

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

clean:
	rm -rf $(VENV) $(TFLITE_VENV) .pytest_cache demo.json demo-tflite.json bench-*.json
