# VBQ Registry — two commands: `make run` (embedded demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-12)
ADDR ?= 127.0.0.1:8000
# Pure modules checked by mypy (no Django inside).
MYPY_PURE ?= registry/codes.py registry/demo.py registry/labels.py integrations/dicom/vbq_sr.py $(wildcard registry/followup.py) $(wildcard registry/reports/survival.py) $(wildcard registry/reports/cohort.py) $(wildcard registry/reports/roc.py) $(wildcard registry/reports/kpis.py) $(wildcard registry/reports/ph_test.py) $(wildcard scoring/engine)

.PHONY: run test lint typecheck pytest venv clean screenshots

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	rm -f $(VENV)/.installed-*
	touch $@

run: venv
	DEMO_MODE=true DEBUG=true $(PY) manage.py migrate --noinput
	DEMO_MODE=true DEBUG=true $(PY) manage.py demo_cohort --if-empty --phantoms 8
	DEMO_MODE=true DEBUG=true $(PY) manage.py followup_sweep
	DEMO_MODE=true DEBUG=true $(PY) manage.py ensure_demo_users
	DEMO_MODE=true DEBUG=true $(PY) manage.py run_embedded --addr $(ADDR)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff format --check $(MYPY_PURE) || true

typecheck: venv
	$(VENV)/bin/mypy $(MYPY_PURE)

pytest: venv
	$(PY) scripts/run_tests.py $(PYTEST_ARGS)

test: lint typecheck pytest

# Refresh docs/screenshots/ from the browser tests (needs PostgreSQL and Debian chromium).
screenshots: venv
	UPDATE_SCREENSHOTS=1 $(PY) scripts/run_tests.py tests/ui/test_clinic_pages_in_chromium.py tests/ui/test_worklist_and_pages_in_chromium.py -q

clean:
	rm -rf var/ .pytest_cache .mypy_cache .ruff_cache
