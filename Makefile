# QuotaGate: `make run` sets everything up and runs the gateway (`quotagate serve`); `make test` sets everything
# up and runs the whole test suite (ruff, mypy, pytest) as CI does (.ci/run).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Re-install only when pyproject.toml changes (or the virtualenv is new).
STAMP  := $(VENV)/.installed

.PHONY: run test install services lint clean

run: install
	$(BIN)/quotagate serve

test: install services lint
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# PostgreSQL (127.0.0.1:5432), on which the migrations are tested (no test needs Redis yet):
# started if it is installed but down, a clear error if it cannot be reached.
services:
	@if ! pg_isready -q -h 127.0.0.1 2>/dev/null; then \
		echo "PostgreSQL is down: starting it"; \
		pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql 2>/dev/null | head -n 1) main start \
			|| true; \
		for i in 1 2 3 4 5 6 7 8 9 10; do pg_isready -q -h 127.0.0.1 2>/dev/null && break; sleep 1; done; \
		if ! pg_isready -q -h 127.0.0.1 2>/dev/null; then \
			echo "error: PostgreSQL is not accepting connections on 127.0.0.1:5432;" \
				"install and start it (user postgres, trust auth) to run the tests" >&2; \
			exit 1; \
		fi; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
