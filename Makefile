# ringlb: the two commands a new user needs are `make run` and `make test`.

CARGO ?= cargo
CONFIG ?= config/ringlb.toml

.PHONY: all build run test lint ci clean

all: build

build:
	$(CARGO) build --release --bins

## Start ringlb on $(CONFIG) together with the demo backends it points at.
run: build
	scripts/run-demo.sh $(CONFIG)

## The whole test suite: unit, property and integration tests (nothing to install).
test:
	$(CARGO) test --all-targets
	$(CARGO) test --doc

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

## What CI runs.
ci:
	bash .ci/run

clean:
	$(CARGO) clean
