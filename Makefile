# wagate — common tasks. `make test` is the test command CI runs.
.PHONY: dev test lint bench loadtest build release fuzz

dev:            ## run the gateway with everything embedded
	cargo run --bin wagate -- serve --dev

test:           ## whole suite: installs/starts Tansu on loopback, runs every test
	scripts/test.sh

lint:           ## formatting and clippy, warnings are errors
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fuzz:           ## the fan-out's property tests with many cases (WAGATE_FUZZ_CASES, default 20000)
	WAGATE_FUZZ_CASES=$${WAGATE_FUZZ_CASES:-20000} cargo test --release --lib -- fuzz depth_limit --nocapture

bench:          ## criterion benches (CPU cost per webhook)
	cargo bench --bench ingress

loadtest:       ## bounded load run against Tansu: gateway vs bare hyper (see BENCHMARKS.md)
	scripts/loadtest.sh

build:
	cargo build --workspace

release:
	cargo build --release --workspace
