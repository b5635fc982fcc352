# ckpt: `make demo` runs the main job end to end, `make test` runs every test.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all deps build demo test lint unit zdtm bench clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --release --bins

demo: build
	scripts/demo.sh

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --release -- -D warnings

# The zdtm cases checkpoint real processes: the binaries must exist first.
test: lint build
	$(CARGO) test --workspace --release

bench: build
	$(CARGO) bench -p ckpt-agent --bench dump_restore

clean:
	$(CARGO) clean
