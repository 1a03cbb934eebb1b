# scalepub: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-postgres lint bench bench-storm loadtest venv packages client stack-up stack-down clean

## demo: local Redis + ejabberd, the example project, `scalepub run --shards 8`, a tweet
##       producer and a live terminal feed (Ctrl-C stops everything it started)
demo: venv client
	ops/demo

## test: lint, type-check and the whole test suite (starts its own Redis + ejabberd)
test: venv packages lint client
	cd client/js && npm test
	$(BIN)/pytest -q
	$(MAKE) --no-print-directory test-postgres

## test-postgres: the Django database tests again, on the test stack's PostgreSQL
PG_TESTS := tests/test_atomic.py tests/test_outbox.py tests/test_django_handoff.py \
	tests/test_checks.py tests/test_registry.py tests/test_relay_start.py tests/test_hostile.py \
	tests/test_admin.py tests/test_postgres.py tests/test_relay_order.py \
	tests/test_outbox_writes.py tests/test_fast_serializer.py tests/test_outer_transaction.py \
	tests/test_one_statement.py tests/test_prepared.py tests/test_relay_round.py \
	tests/test_notify_quiet.py tests/test_inheritance.py
test-postgres: venv
	SCALEPUB_TEST_DATABASE=postgres $(BIN)/pytest -q -m "django_db or postgres" $(PG_TESTS)

## lint: ruff, mypy --strict (pyproject.toml [tool.mypy] files), the layering contracts (import-linter)
lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## bench: the benchmarks (needs `eval "$$(ops/stack env)"` or a running `make stack-up`)
bench: venv stack-up
	eval "$$(ops/stack env)" && $(BIN)/python loadtest/bench_ingest.py
	eval "$$(ops/stack env)" && $(BIN)/python loadtest/bench_nudge.py
	eval "$$(ops/stack env)" && $(BIN)/python loadtest/bench_publish.py
	eval "$$(ops/stack env)" && $(BIN)/python loadtest/bench_history.py
	$(BIN)/python loadtest/bench_decode.py
	$(BIN)/python loadtest/bench_entry_build.py
	$(BIN)/python loadtest/bench_node_burst.py --own-stack
	$(BIN)/python loadtest/bench_cluster.py
	$(BIN)/python loadtest/bench_scaleout.py

## bench-storm: 500 anonymous BOSH clients reconnect at once with catch-up while publishing
##              (its own Redis + ejabberd on free ports, ~85 s; loads the whole box)
bench-storm: venv packages
	$(BIN)/python loadtest/bench_storm.py

## loadtest: one load-test scenario, headless, on its own Redis + ejabberd (free ports);
##           SCENARIO=smoke|steady|fanout|ramp (loadtest/scenarios/), report in loadtest/reports/
SCENARIO ?= smoke
loadtest: venv packages
	$(BIN)/python -m loadtest.run loadtest/scenarios/$(SCENARIO).toml

## client: the browser client's bundle (client/js/dist), built from the lock file
client:
	cd client/js && npm ci --no-audit --no-fund --loglevel=error && npm run build

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Redis, ejabberd and Prometheus (for the observability tests) from Debian, if missing.
packages:
	ops/stack install

stack-up:
	ops/stack up

stack-down:
	ops/stack down

clean: stack-down
	rm -rf $(VENV) .stack example/db.sqlite3 artifacts client/js/node_modules client/js/dist
