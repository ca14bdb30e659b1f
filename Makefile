# `make quickstart`, `make demo` and `make test` create .venv and install what they need on first use.
# TORCH pins the CPU wheel that this project's machines carry on disk; on a GPU machine use
# e.g. `make test TORCH=torch` to keep or install the CUDA build of your choice.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup quickstart demo test parity bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,video]"
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(VENV)/bin/ddlp quickstart --out runs/quickstart --data data/balls

demo: setup
	$(VENV)/bin/ddlp demo --out outputs/demo.png

test: setup
	$(PY) -m pytest -q

parity: setup
	$(PY) -m ddlp.parity ../shared/fixtures/parity/*_small.pt

bench: setup
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
