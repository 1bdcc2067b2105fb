# The two README commands: `make demo` and `make test`. Both set everything up from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO_OUT ?= demo_out
DEMO_FLAGS ?=

.PHONY: demo test test-fabric install install-test system-deps clean

$(BIN)/python:
	@echo "setting up $(VENV) (first run: about 4 minutes)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip

# Re-install only when the dependency list changes. pip's and the build backend's chatter goes to
# a log, shown only if the install fails, so `make demo` prints the demo.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@$(BIN)/pip install --quiet -e . > $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Debian tools the tests use: dciodvfy (DICOM conformance) from dicom3tools; ip (network
# namespaces for the multi-host trial) from iproute2; Chromium and its
# driver for the browser tests of the demo report and the audit web view (selenium drives
# /usr/bin/chromium through /usr/bin/chromedriver; nothing downloads a browser).
SYSTEM_PACKAGES := dicom3tools iproute2 chromium chromium-driver
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	[ -z "$$missing" ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; }

demo: install
	@$(BIN)/clinfed demo --out $(DEMO_OUT) $(DEMO_FLAGS)

test: install-test system-deps
	$(BIN)/python -m pytest

# The Fabric network tests: need the Fabric binaries from fabric_network/install.sh (see its README).
test-fabric: install-test
	bash fabric_network/install.sh >/dev/null
	$(BIN)/python -m pytest -m fabric tests/fabric tests/ledger

clean:
	rm -rf $(VENV) $(DEMO_OUT)
