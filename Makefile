# `make run` and `make test` are all a fresh machine needs (README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WEB_PORT ?= 8000
# Tests and benchmarks use real PostgreSQL and Redis; override to point elsewhere.
TEST_DATABASE_URL ?= postgres://postgres:postgres@127.0.0.1:5432/incidents
TEST_REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: install run migrate demo test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

migrate: export DJANGO_DEBUG ?= true
migrate: install
	$(BIN)/python manage.py migrate --no-input

demo: export DJANGO_DEBUG ?= true
demo: migrate
	$(BIN)/python manage.py load_demo

# Embedded defaults (SQLite, filesystem broker) unless DATABASE_URL / REDIS_URL are set.
run: export DJANGO_DEBUG ?= true
run: export WEB_PORT := $(WEB_PORT)
run: export SITE_URL ?= http://127.0.0.1:$(WEB_PORT)
run: migrate
	$(BIN)/python manage.py load_demo --admin-url http://127.0.0.1:$(WEB_PORT)/admin/
	@echo "  Web, Celery worker and Celery beat run below; Ctrl-C stops all three."
	@echo
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start -f Procfile

# Tests and benchmarks sign with a throwaway key of their own.
test bench: export DJANGO_SECRET_KEY := $(or $(DJANGO_SECRET_KEY),test-only-key-not-for-production)
test: export DATABASE_URL := $(or $(DATABASE_URL),$(TEST_DATABASE_URL))
test: export REDIS_URL := $(or $(REDIS_URL),$(TEST_REDIS_URL))
test: install
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: export DATABASE_URL := $(or $(DATABASE_URL),$(TEST_DATABASE_URL))
bench: export REDIS_URL := $(or $(REDIS_URL),$(TEST_REDIS_URL))
bench: install
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) var
