#!/usr/bin/env bash
# run.sh — runs every cargo-fuzz target for a short time (CI) or a long
# one (release soak) and prints the executions of each.
#
#   bash fuzz/run.sh [SECONDS_PER_TARGET]     (default 30; `make fuzz` and
#                                             `make test` run 60)
#
# FUZZ_SEED=N fixes libFuzzer's random seed, so the inputs a run tries
# are the same, in the same order, on every machine. With FUZZ_SEED=1
# each target also stops after the executions listed in `ci_runs` below
# (what seed 1 reached in 60 s on this 2-core machine under load, all
# without a crash), so the run is the same prefix wherever it runs: a
# crash in CI is found again by the same command, and a faster machine
# does not wander past what was run before. `make test` runs it so
# (deploy/scripts/slow-tier.sh); unset, each run draws its own seed and
# runs for the whole time, which is what a long soak wants.
#
# Each target starts from its committed seeds (fuzz/seeds/<target>/) in a
# scratch corpus, so runs never change the repository. A crash stops the
# run with the failing input under fuzz/artifacts/<target>/: minimise it
# (`cargo +nightly fuzz tmin <target> <file>`), commit it to
# fuzz/regressions/<target>/ and fix the bug; node/tests/it/fuzz_regressions.rs
# replays that directory in every normal test run from then on.
#
# Built without a sanitizer (-s none): the code under test has no unsafe
# blocks (the workspace denies it), so what is looked for is panics,
# failed assertions, runaway memory and hangs; the build stays small
# enough for CI.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
targets=(sync_frame automerge_doc domain_text apdu config crl csv_import api_body)
declare -A ci_runs=([sync_frame]=2600000 [automerge_doc]=510000 [domain_text]=480000 [apdu]=1500000
                    [config]=570000 [crl]=320000 [csv_import]=890000 [api_body]=46000)
cargo +nightly fuzz build -O -s none
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
total=0
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "fuzz/artifacts/$t"
  cp fuzz/seeds/"$t"/* "$scratch/$t"/
  log="$scratch/$t.log"
  if ! cargo +nightly fuzz run -O -s none "$t" "$scratch/$t" -- \
      ${FUZZ_SEED:+-seed="$FUZZ_SEED"} ${FUZZ_SEED:+$([ "$FUZZ_SEED" = 1 ] && echo "-runs=${ci_runs[$t]}")} \
      -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz: target $t FAILED; the input is under fuzz/artifacts/$t/ (commit it to fuzz/regressions/$t/)"
    exit 1
  fi
  n="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)"
  n="${n:-0}"
  total=$((total + n))
  echo "fuzz: $t: $n executions (at most ${secs} s${FUZZ_SEED:+, seed $FUZZ_SEED}), no crash"
done
echo "fuzz: ${#targets[@]} targets, $total executions, no crash"
