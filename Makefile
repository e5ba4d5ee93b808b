# backdoors — build, test, demo. Everything is installed here; nothing by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all venv system-deps test demo bench clean

all: test

# Debian packages the tests and benchmarks use (gcc for the C Sensor Box writer test,
# curl for the unmodified-client recovery test, haproxy for the recovery benchmark,
# catatonit for the PID 1 and exec shim of nodes as containers; libseccomp2 for the sealed
# agent's filter; etcd-server for a fleet of monitors; nats-server for warnings between
# clusters).
system-deps:
	@missing=""; \
	for p in gcc curl strace haproxy catatonit; do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	ldconfig -p | grep -q 'libseccomp\.so\.2 ' || missing="$$missing libseccomp2"; \
	command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	command -v nats-server >/dev/null 2>&1 || missing="$$missing nats-server"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,report]'
	touch $(STAMP)

venv: $(STAMP)

test: system-deps $(STAMP)
	$(BIN)/python -m pytest

demo: system-deps $(STAMP)
	$(BIN)/backdoors demo

bench: system-deps $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
