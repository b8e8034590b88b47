# ringlb: the two commands a new user needs are `make run` and `make test`.

CARGO ?= cargo
CONFIG ?= config/ringlb.toml

.PHONY: all build run test lint ci bench deb clean

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

## Load test against HAProxy (mode tcp) and nginx stream; installs them with apt-get when run as
## root. Results in bench-results/. Options through ARGS, e.g. make bench ARGS=--quick
bench: build
	scripts/bench.sh $(ARGS)

## A Debian package in target/debian/ (binary, systemd units, /etc/ringlb/ringlb.toml, ringlb(8)).
deb:
	scripts/deb.sh

clean:
	$(CARGO) clean
