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

# PostgreSQL (127.0.0.1:5432), on which the migrations are tested, and Redis (127.0.0.1:6379),
# for the shared-store tests: each started if it is installed but down, a clear error (and a
# failed run) if it cannot be.
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
	@if ! redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then \
		echo "Redis is down: starting it"; \
		mkdir -p /var/lib/redis /var/log/redis 2>/dev/null; \
		redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
			--dir /var/lib/redis --logfile /var/log/redis/ci.log || true; \
		for i in 1 2 3 4 5 6 7 8 9 10; do \
			redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG && break; sleep 1; done; \
		if ! redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then \
			echo "error: Redis is not answering on 127.0.0.1:6379;" \
				"install and start redis-server to run the tests" >&2; \
			exit 1; \
		fi; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
