# Every target creates .venv and installs the project into it if missing, then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch that these machines carry; on a GPU box set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast demo gpu-check lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests

# The edit-test loop: everything but the tests marked slow, on 2 worker processes (pytest-xdist).
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -m "not slow" -n 2 -q

demo: install
	$(PY) two_stage.py experiment=quick

# One GPU: benchmarks on CUDA + a short experiment=full pipeline through accelerate launch, one table
# (<= 8 min on an H100). `bash benchmarks/gpu_check.sh --device cpu --quick` is its dry path on any machine.
gpu-check: install
	PYTHON=$(PY) bash benchmarks/gpu_check.sh

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs data outputs
