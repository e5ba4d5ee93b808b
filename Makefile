# backdoors — build, test, demo. Everything is installed here; nothing by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all venv system-deps vm-kernel test demo bench clean

all: test

# Debian packages the tests and benchmarks use (gcc for the C Sensor Box writer test and,
# with libc6-dev's static libc, the VM guest's STREAM benchmark;
# curl for the unmodified-client recovery test, haproxy for the recovery benchmark,
# catatonit for the PID 1 and exec shim of nodes as containers; libseccomp2 for the sealed
# agent's filter; etcd-server for a fleet of monitors, nftables to cut a monitor off
# from it (the fleet scenario); nats-server for warnings between
# clusters; postgresql for the case study's database; qemu-system-x86 and busybox-static
# for VM nodes, docs/vm-backdoor.md).
system-deps:
	@missing=""; \
	for p in gcc curl strace haproxy catatonit; do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	ls /usr/lib/*/libc.a >/dev/null 2>&1 || missing="$$missing libc6-dev"; \
	ldconfig -p | grep -q 'libseccomp\.so\.2 ' || missing="$$missing libseccomp2"; \
	command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	command -v nft >/dev/null 2>&1 || missing="$$missing nftables"; \
	command -v nats-server >/dev/null 2>&1 || missing="$$missing nats-server"; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v qemu-system-x86_64 >/dev/null 2>&1 || missing="$$missing qemu-system-x86"; \
	[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || missing="$$missing busybox-static"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

# The guest kernel of VM nodes: Debian's cloud kernel package, downloaded and unpacked
# (never installed) into $(VM_DIR)/root; the initramfs is built from it by the code.
VM_DIR   := .cache/vm
VM_STAMP := $(VM_DIR)/root/.unpacked

$(VM_STAMP):
	@mkdir -p $(VM_DIR)/deb
	@pkg=$$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $$2; exit}'); \
	[ -n "$$pkg" ] || { apt-get update -q && pkg=$$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $$2; exit}'); }; \
	[ -n "$$pkg" ] || { echo "no linux-image-*-cloud-amd64 package found (apt-cache depends linux-image-cloud-amd64)"; exit 1; }; \
	echo "downloading the guest kernel $$pkg"; \
	rm -f $(VM_DIR)/deb/*.deb; \
	cd $(VM_DIR)/deb && apt-get download -q "$$pkg" 2>&1 | grep -v unsandboxed; cd - >/dev/null; \
	rm -rf $(VM_DIR)/root && dpkg-deb -x $(VM_DIR)/deb/$${pkg}_*.deb $(VM_DIR)/root
	@touch $(VM_STAMP)

vm-kernel: $(VM_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,report,casestudy]'
	touch $(STAMP)

venv: $(STAMP)

test: system-deps $(STAMP) $(VM_STAMP)
	$(BIN)/python -m pytest

demo: system-deps $(STAMP)
	$(BIN)/backdoors demo

bench: system-deps $(STAMP) $(VM_STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .cache build *.egg-info src/*.egg-info
