PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEFAULT_MODEL := models/pit-tiny

.PHONY: demo test test-slow lint install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned, so no later resolver step can pick another build.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default model: check it, export for Android and ONNX Runtime (each validated through
# its own runtime before it is written), then generate from the ONNX artifact.
demo: $(STAMP)
	$(BIN)/pit-export inspect $(DEFAULT_MODEL)
	$(BIN)/pit-export validate $(DEFAULT_MODEL) --layout untied,shared-z --n-windows 4
	$(BIN)/pit-export export $(DEFAULT_MODEL) --target android --out out/android
	$(BIN)/pit-export export $(DEFAULT_MODEL) --target onnx-cpu --out out/onnx-cpu
	$(BIN)/pit-export generate out/onnx-cpu --prompt "def read_file(path):" --max-new-tokens 48

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check pit_export models runtimes tests benchmarks
	$(BIN)/ruff format --check pit_export models runtimes tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
