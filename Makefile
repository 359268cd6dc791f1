PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEFAULT_MODEL := models/pit-tiny
BASELINE_MODEL := models/tied-tiny

.PHONY: demo test test-slow lint install clean emu peers mutate wheel-check

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned, so no later resolver step can pick another build.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default model: fold, quantize, export for every target, validate each artifact through
# its own runtime, report (sizes against the tied baseline), then the training graph's and each artifact's
# continuation of one prompt, side by side on one sampling seed, with the first token where each differs.
demo: $(STAMP)
	$(BIN)/pit-export inspect $(DEFAULT_MODEL)
	$(BIN)/pit-export export $(DEFAULT_MODEL) --target all --baseline $(BASELINE_MODEL) --out out/demo --force
	$(BIN)/pit-export generate $(DEFAULT_MODEL) --prompt "def read_file(path):" --max-new-tokens 48 \
		--temperature 0.8 --top-p 0.95 --seed 0 \
		--artifact out/demo/android --artifact out/demo/onnx-cpu --artifact out/demo/ios
	@echo "report: out/demo/report.md (machine-readable: out/demo/report.json)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The built wheel in a fresh venv (torch pinned, then the wheel under constraints.txt), run from outside the repository:
# inspect, validate and export the shipped model, so package data missing from pyproject.toml fails here. ~3 min.
wheel-check: $(STAMP)
	PY=$(PY) bash tests/wheel_check.sh

# Deliberate faults in the validator (tests/mutate.py), each against the damaged-artifact gate tests: all must be caught.
mutate: $(STAMP)
	$(BIN)/python -m tests.mutate

lint: $(STAMP)
	$(BIN)/ruff check pit_export models runtimes tests benchmarks
	$(BIN)/ruff format --check pit_export models runtimes tests benchmarks

# An emulated ARM64 userland (Debian bookworm) for `--where arm64-emu` (validate, bench) and the adb stand-in
# (benchmarks/emu/device): numpy + onnxruntime (+ onnxruntime-genai), and ExecuTorch 1.5.1 with the aarch64 torch it
# links, whose CUDA libraries are replaced by stand-ins (benchmarks/emu/cuda_stubs.py; EMU_EXECUTORCH=0 skips this
# layer). Installs qemu-user-static, qemu-user (loads TCG plugins: instruction counts), debootstrap and
# gcc-aarch64-linux-gnu with apt-get when missing (root, Debian registries) and compiles the counting plugin.
# ~5 min, ~450 MB of wheels cached in .emu/wheels-arm64, ~1.6 GB root in .emu/arm64.
EMU_ROOT := .emu/arm64
emu:
	sh benchmarks/emu/build-arm64.sh $(EMU_ROOT) $(PY)

# pit-export beside optimum-executorch and the onnxruntime-genai builder on the SmolLM2-135M configuration (random
# init, built here): one venv per peer in .peers/venvs (pinned; torch held at the CPU wheel), every export in its own
# process (wall time, peak RSS), every artifact timed the same way. Stages are cached in .peers/work.
# Writes benchmarks/results/peers.json.
peers: $(STAMP)
	$(BIN)/python benchmarks/peers.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
