# `make demo` and `make test` each create .venv when missing and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/study.py jobs/configs/local.yaml
	@echo "look at runs/demo/report.html (the configurations side by side, their samples); runs/demo/study.json"

lint: $(STAMP)
	$(BIN)/ruff check .

# Headless Chromium for the page tests (report.html, the serving gallery), from Debian's packages when run
# as root; elsewhere those tests skip and say so.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium not installed: page tests will be skipped"

# tests/e2e (each module its own `ray start --head` on free ports, mostly waiting on jobs and servers) and
# tests/multinode (several raylets of one ray.cluster_utils.Cluster, this process its driver) run beside
# tests/unit + tests/ray (one shared local cluster); their log is printed when both are done.
test: lint browser
	@mkdir -p runs
	@echo "tests/e2e and tests/multinode run alongside, logging to runs/test-e2e.log (printed at the end)"
	@$(BIN)/python -m pytest -q -ra --durations=10 -p no:cacheprovider tests/e2e tests/multinode \
	  >runs/test-e2e.log 2>&1 & e2e=$$!; \
	$(BIN)/python -m pytest -q -ra --durations=25 tests/unit tests/ray; s=$$?; \
	wait $$e2e; e=$$?; echo "==== tests/e2e tests/multinode (exit $$e) ===="; cat runs/test-e2e.log; \
	exit $$(( s != 0 || e != 0 ))

clean:
	rm -rf runs .pytest_cache .ruff_cache
