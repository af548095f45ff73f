# The two commands of the README.
#   make demo   sets up this machine and runs a demo mesh (hq, two shelters,
#               a clinic, an ambulance) with a synthetic registry on loopback.
#   make test   sets up this machine and runs every test, slow tiers included.

.PHONY: demo test bench fuzz

demo:
	bash deploy/scripts/setup.sh
	cargo run --release -p node --bin kizuna -- demo

test:
	bash deploy/scripts/setup.sh
	cargo nextest run --workspace --release --no-fail-fast --profile ci
	cargo run --release -p sim --bin kizuna-sim -- sweep --scenario sim/scenarios/ci-small.toml --seeds 2000
	cargo run --release -p sim --bin kizuna-sim -- sweep --scenario sim/scenarios/ci-medium.toml --seeds 300
	cargo run --release -p sim --features mutants --bin kizuna-sim -- mutants --scenario sim/scenarios/ci-small.toml --seeds 50
	# Every bench must keep building (they run under `make bench`).
	cargo bench --workspace --benches --no-run

bench:
	cargo bench -p crdt --bench reconcile -- --docs 100000 --divergence 0.01
	cargo bench -p node --bench store -- --residents 1000000
	cargo bench -p node --bench tap -- --residents 1000000
	cargo bench -p tests --bench chain -- --checkins 200 --per-side 1000

# Real fuzzing (nightly + cargo-fuzz, its own build: long the first time).
# Not part of `make test`: the committed seeds and crashers are replayed on
# stable there by node/tests/it/fuzz_regressions.rs.
fuzz:
	bash fuzz/run.sh 60
