#!/usr/bin/env bash
# slow-tier.sh — the slow tier of `make test`, after nextest:
#
#   one core:    the simulator sweeps (ci-small 2,000 seeds, ci-medium 300)
#                and the planted mutants; each sweep is single-threaded;
#   other core:  every cargo-fuzz target built (one build job) and run for
#                SECONDS each from its committed seeds (fuzz/run.sh).
#
# Both halves always run to the end; the tier fails if either failed, and
# the fuzz log (executions per target, or the crashing input's path) is
# printed after the sweeps' output.
#
#   bash deploy/scripts/slow-tier.sh [SECONDS_PER_FUZZ_TARGET]   (default 60)
set -uo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-60}"
mkdir -p target
fuzz_log=target/fuzz-ci.log

# A fixed libFuzzer seed: a crash found here is found again by the same
# command (FUZZ_SEED=1 bash fuzz/run.sh 60) on the same commit.
CARGO_BUILD_JOBS=1 FUZZ_SEED="${FUZZ_SEED:-1}" bash fuzz/run.sh "$secs" >"$fuzz_log" 2>&1 &
fuzz_pid=$!

sim() { cargo run --release -p sim "$@"; }
sweeps=0
sim --bin kizuna-sim -- sweep --scenario sim/scenarios/ci-small.toml --seeds 2000 || sweeps=1
sim --bin kizuna-sim -- sweep --scenario sim/scenarios/ci-medium.toml --seeds 300 || sweeps=1
sim --features mutants --bin kizuna-sim -- mutants --scenario sim/scenarios/ci-small.toml --seeds 50 || sweeps=1

echo "slow-tier: simulator done (exit $sweeps); waiting for the fuzz targets"
wait "$fuzz_pid"
fuzz=$?
grep -v '^ *\(Compiling\|Downloaded\|Downloading\|Updating\|Locking\)' "$fuzz_log" | tail -60
echo "slow-tier: simulator exit $sweeps, fuzz exit $fuzz"
[ "$sweeps" -eq 0 ] && [ "$fuzz" -eq 0 ]
