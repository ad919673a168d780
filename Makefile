# HomeFleet: every command sets itself up (creates and reuses .venv).
# torch==2.13.0 goes in first and exactly so: any other spec pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.homefleet-installed

.PHONY: setup demo test bench system-tools lint protos clean

setup: $(STAMP)

$(STAMP): pyproject.toml artifact/delta/_native.c artifact/delta/qdq/_wire.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[edge,controller,dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m demo

test: setup system-tools
	$(PY) -m pytest -q

# Long (about an hour on 2 cores): every workload x device class, targets, techniques.
bench: setup system-tools
	$(PY) -m bench

# The generic diff tools the delta tests and benchmark compare against, the browser the
# dashboard test drives through Playwright (chromium is /usr/bin/chromium), and the
# PostgreSQL server the store's tests start a private cluster of, and systemd-analyze for
# the units in deploy/systemd (Debian packages).
# Each entry is COMMAND:PACKAGE (the command proves the package is there). Another
# apt-get holding the lock (a boot-time apt-daily, a second make) is waited for.
SYSTEM_TOOLS := zstd:zstd xdelta3:xdelta3 bsdiff:bsdiff chromium:chromium psql:postgresql \
	systemd-analyze:systemd
system-tools:
	@missing=""; for entry in $(SYSTEM_TOOLS); do \
		command -v $${entry%%:*} >/dev/null 2>&1 || missing="$$missing $${entry#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
		echo "installing$$missing (apt-get)"; \
		apt() { for try in $$(seq 60); do \
			out=$$($$sudo apt-get -o DPkg::Lock::Timeout=600 "$$@" 2>&1) && return 0; \
			echo "$$out" | grep -q "Could not get lock" || { echo "$$out" >&2; return 1; }; \
			echo "apt-get $$1: another apt-get holds the lock; waiting"; sleep 10; \
		done; return 1; }; \
		{ apt update && apt install -y$$missing; } || { \
			echo "error: cannot install$$missing; install them (Debian packages:$$missing) and rerun" >&2; \
			exit 1; }; \
	fi

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

protos: setup
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/fleet.proto

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
