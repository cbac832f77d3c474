#!/usr/bin/env bash
# Runs every cargo-fuzz target that fuzz/Cargo.toml lists (`cargo fuzz list`; FUZZ_TARGETS="a b"
# runs only those) for FUZZ_SECONDS each (default 60), from its committed seed corpus
# fuzz/corpus/<target>. Inputs a run adds go to fuzz/target/corpus/<target> (ignored), so a run
# leaves the tree as it was; FUZZ_KEEP_CORPUS=1 adds them to fuzz/corpus/<target> instead (to
# commit, after `cargo fuzz cmin`). A crash, panic, sanitizer report, hang (FUZZ_TIMEOUT seconds
# for one input, default 15) or OOM stops that target with its input in fuzz/artifacts/<target>/;
# the other targets still run, then the script exits 1 naming the failed ones.
# FUZZ_BUILD_ONLY=1 builds every target and runs none.
# The toolchain is stable: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
seconds=${FUZZ_SECONDS:-60}
read -r -a targets <<<"${FUZZ_TARGETS:-$(cargo fuzz list | tr '\n' ' ')}"
[ ${#targets[@]} -gt 0 ] || { echo "fuzz: no targets" >&2; exit 1; }
# FUZZ_DEV=1: an unoptimized build, for a quick local check (measured here: 503 s cold at nice
# 19 beside the test suite, against ~19 min for the release build, but only hundreds of
# executions per target in 15 s: CI keeps the release build).
profile=()
[ "${FUZZ_DEV:-0}" = 1 ] && profile=(--dev)
# One build of every target; each run below finds it up to date.
start=$SECONDS
cargo fuzz build "${profile[@]}"
echo "fuzz: built ${#targets[@]} targets in $((SECONDS - start)) s"
# FUZZ_BUILD_ONLY=1: build and stop (.ci/run builds beside the test suite, runs after it).
[ "${FUZZ_BUILD_ONLY:-0}" = 1 ] && exit 0
# FUZZ_JOBS targets at once (default: one per core; each libFuzzer run uses one), each
# with its own log, printed when it fails or ends.
jobs_max=${FUZZ_JOBS:-$(nproc)}
mkdir -p target/logs
declare -A running=() # pid -> target
failed=()
reap() { # waits for one run; prints its log's tail and records a failure
  local pid rc=0
  wait -n -p pid || rc=$?
  local t=${running[$pid]}
  unset "running[$pid]"
  if [ "$rc" != 0 ]; then
    cat "target/logs/$t.log"
    failed+=("$t")
  else
    tail -n 4 "target/logs/$t.log"
  fi
  echo "fuzz: $t done (exit $rc)"
}
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "target/corpus/$t"
  if [ "${FUZZ_KEEP_CORPUS:-0}" = 1 ]; then
    dirs=("corpus/$t")
  else
    # libFuzzer writes new inputs to the first directory and only reads the others.
    dirs=("target/corpus/$t" "corpus/$t")
  fi
  while [ "${#running[@]}" -ge "$jobs_max" ]; do reap; done
  echo "fuzz: $t for $seconds s"
  cargo fuzz run "${profile[@]}" "$t" "${dirs[@]}" -- -max_total_time="$seconds" \
    -timeout="${FUZZ_TIMEOUT:-15}" -rss_limit_mb=2048 -print_final_stats=1 >"target/logs/$t.log" 2>&1 &
  running[$!]=$t
done
while [ "${#running[@]}" -gt 0 ]; do reap; done
echo "fuzz: ${#targets[@]} targets, $seconds s each, $((SECONDS - start)) s in all"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
  exit 1
fi
