# HomeFleet: every command sets itself up (creates and reuses .venv).
# torch==2.13.0 goes in first and exactly so: any other spec pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.homefleet-installed

.PHONY: setup demo test bench lint protos clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[edge,controller,dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m demo

test: setup
	$(PY) -m pytest -q

# Long (about an hour on 2 cores): every workload x device class, targets, techniques.
bench: setup
	$(PY) -m bench

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

protos: setup
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/fleet.proto

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
