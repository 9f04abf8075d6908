# diffkiln — developer entry points. `make install` builds .venv with the CPU torch wheel and the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install test test-fast lint format bench bench-export cpp clean

install: $(BIN)/diffkiln

$(BIN)/diffkiln: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[export,dev,openvino]"
	$(BIN)/diffkiln export demo  # the default model of `run`, exported into the user cache once (~8 s)
	@touch $@

# the C++ runtime (cpp/): diffkiln_rt + diffkiln-cpp, against the OpenVINO wheel's C++ SDK (headers, libs, CMake config)
cpp: install
	cmake -S cpp -B cpp/build -DCMAKE_BUILD_TYPE=Release \
	  -DOpenVINO_DIR="$$($(BIN)/python -c 'import openvino, os; print(os.path.join(os.path.dirname(openvino.__file__), "cmake"))')"
	cmake --build cpp/build -j2

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

lint: install
	$(BIN)/ruff check diffkiln tests benchmarks tools
	$(BIN)/ruff format --check diffkiln tests benchmarks tools

format: install
	$(BIN)/ruff format diffkiln tests benchmarks tools
	$(BIN)/ruff check --fix diffkiln tests benchmarks tools

bench: install
	$(BIN)/python benchmarks/bench_sd15_256.py

bench-export: install
	$(BIN)/python benchmarks/export_memory.py sd15 sdxl

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache cpp/build
