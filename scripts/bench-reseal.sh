#!/usr/bin/env bash
# Reseal vs the only way before it (unseal to tmpfs, then seal again), in one run:
# `scripts/bench-reseal.sh [SIZE_MIB] [REPS] [STORE]`. STORE is a local directory (default
# $BENCH_TMP/store, on the disk) or s3://BUCKET/PREFIX (with AWS_ENDPOINT_URL set, e.g. the
# peer harness's s3s-fs-1m). Both paths re-encrypt the same sealed model under a new key;
# wall time and peak RSS (the sum of unseal's and seal's times, the larger of their peaks).
# Data lives under $BENCH_TMP (default /tmp/sealfs-bench-reseal), never in the project.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
reps=${2:-3}
tmp=${BENCH_TMP:-/tmp/sealfs-bench-reseal}
store=${3:-$tmp/store}
shm=/dev/shm/sealfs-bench-reseal
mkdir -p "$tmp/src" "$shm"
trap 'rm -rf "$shm"' EXIT
cargo build --release --quiet --bin sealfs
s=target/release/sealfs
for k in k1 k2; do [ -f "$tmp/$k" ] || $s keygen "$tmp/$k" >/dev/null; done
file="$tmp/src/model.bin"
[ -f "$file" ] && [ "$(stat -c %s "$file")" = $((size_mib << 20)) ] || head -c $((size_mib << 20)) /dev/urandom > "$file"
bytes=$((size_mib << 20))

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
run() { # prints "seconds peak_kib"
  local t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -f "%M" -o "$tmp/rss" "$@" >/dev/null 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
  t1=$(date +%s.%N)
  echo "$(echo "$t1 - $t0" | bc) $(cat "$tmp/rss")"
}
reseal=(); twostep=(); reseal_rss=(); twostep_rss=()
for i in $(seq "$reps"); do
  for w in a b; do
    $s seal "$tmp/src" "$store/$w$i" --key "file:$tmp/k1" --force >/dev/null 2>&1
  done
  sync
  read -r t r < <(run $s reseal "$store/a$i" --key "file:$tmp/k1" --to-key "file:$tmp/k2" --unverified-origin)
  reseal+=("$t"); reseal_rss+=("$r")
  sync
  read -r t1 r1 < <(run $s unseal "$store/b$i" "$shm/out" --key "file:$tmp/k1" --force)
  read -r t2 r2 < <(run $s seal "$shm/out" "$store/b$i" --key "file:$tmp/k2" --force)
  rm -rf "$shm/out"
  twostep+=("$(echo "$t1 + $t2" | bc)"); twostep_rss+=("$(( r1 > r2 ? r1 : r2 ))")
  case "$store" in s3://*) ;; *) rm -rf "$store/a$i" "$store/b$i" ;; esac
done
rs=$(printf '%s\n' "${reseal[@]}" | median); ts=$(printf '%s\n' "${twostep[@]}" | median)
rmbs=$(echo "$bytes / $rs / 1000000" | bc -l); tmbs=$(echo "$bytes / $ts / 1000000" | bc -l)
rr=$(( $(printf '%s\n' "${reseal_rss[@]}" | median) / 1024 )); tr=$(( $(printf '%s\n' "${twostep_rss[@]}" | median) / 1024 ))
printf '| %s MiB model, store %s | reseal | unseal to tmpfs + seal | ratio |\n|---|---:|---:|---:|\n' "$size_mib" "${store%%/*}"
printf '| throughput | %.0f MB/s | %.0f MB/s | %.2f |\n' "$rmbs" "$tmbs" "$(echo "$rmbs / $tmbs" | bc -l)"
printf '| peak RSS | %s MiB | %s MiB | %.2f |\n' "$rr" "$tr" "$(echo "$rr / $tr" | bc -l)"
echo "(median of $reps; every run: reseal ${reseal[*]} s, unseal+seal ${twostep[*]} s)"
