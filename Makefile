# Two commands for a fresh clone: `make demo` and `make test`. Both create and use .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint clean venv test-arm

venv: $(STAMP)

# Host install (torch pinned to the CPU build 2.13.0) plus test tools; editable, so edits take effect.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[host,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edge demo --json demo.json

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Long runs: real pretrained models and benchmarks. Writes JSON and updates BENCHMARKS.md.
bench: $(STAMP)
	$(BIN)/python -m pytest -q -m slow
	$(BIN)/edge bench switch --json bench-switch.json --md BENCHMARKS.md
	$(BIN)/edge bench update --json bench-update.json --md BENCHMARKS.md
	$(BIN)/edge bench ood --minilm --json bench-ood.json --md BENCHMARKS.md
	$(BIN)/edge bench lowbit --json bench-lowbit.json --md BENCHMARKS.md

# Device-side tests on aarch64 under qemu-user (needs root; builds and caches a Debian arm64 root in .arm-root/).
test-arm:
	bash scripts/arm/test-arm.sh

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache demo.json bench-*.json
