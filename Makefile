# The two README commands: `make demo` and `make test`. Both set everything up from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO_OUT ?= demo_out

.PHONY: demo test test-fabric install install-test system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install only when the dependency list changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Debian tools the tests use: dciodvfy (DICOM conformance) from dicom3tools; ip (network
# namespaces for the multi-host trial) from iproute2.
system-deps:
	@{ command -v dciodvfy && command -v ip; } >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dicom3tools iproute2; }

demo: install
	$(BIN)/clinfed demo --out $(DEMO_OUT)

test: install-test system-deps
	$(BIN)/python -m pytest

# The Fabric network tests: need the Fabric binaries from fabric_network/install.sh (see its README).
test-fabric: install-test
	bash fabric_network/install.sh >/dev/null
	$(BIN)/python -m pytest -m fabric tests/fabric tests/ledger

clean:
	rm -rf $(VENV) $(DEMO_OUT)
