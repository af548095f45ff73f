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
	# The simulator sweeps and mutants, and beside them on the other core
	# every fuzz target for 60 s (deploy/scripts/slow-tier.sh).
	bash deploy/scripts/slow-tier.sh 60
	# Every bench must keep building (they run under `make bench`).
	cargo bench --workspace --benches --no-run

bench:
	cargo bench -p crdt --bench reconcile -- --docs 100000 --divergence 0.01
	cargo bench -p node --bench store -- --residents 1000000
	cargo bench -p node --bench tap -- --residents 1000000
	cargo bench -p tests --bench chain -- --checkins 200 --per-side 1000

# Fuzzing alone (nightly + cargo-fuzz, its own build: long the first
# time). `make test` runs the same 60 s per target beside the sweeps; the
# committed seeds and crashers are also replayed on stable by
# node/tests/it/fuzz_regressions.rs. A longer soak: bash fuzz/run.sh 3600
fuzz:
	bash fuzz/run.sh 60
