#!/usr/bin/env bash
# `--cache-dir` (issue 22), side by side in one run, medians of REPS (default 3), page cache
# dropped before every read (root). One model of SIZE_MIB (default 1024) random bytes in a
# local store on this disk, read with `cat FILE > /dev/null` through:
#   cold, no cache dir     a new daemon, every chunk from the store
#   cold, cache dir on     a new daemon, an empty DIR being filled behind the reads
#   restart from DIR       a new daemon, every chunk but chunk 0 in DIR
#   cat of DIR's entries   the same sealed bytes read straight from the same disk: the
#                          physical limit of a restart (a disk read, then a decrypt)
# Prints MB/s (plaintext bytes / wall seconds) and the daemon's CPU seconds per GiB.
# Usage: scripts/bench-cache-dir.sh [target/release/sealfs]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-target/release/sealfs}")
SIZE_MIB=${SIZE_MIB:-1024}
REPS=${REPS:-3}
[ "$(id -u)" = 0 ] || { echo "bench-cache-dir.sh: root needed (drop_caches, mount)" >&2; exit 1; }
work=$(mktemp -d /var/tmp/sealfs-bench-cache.XXXXXX)
mnt="$work/mnt"
mkdir -p "$mnt" "$work/src"
pid=""
cleanup() {
  fusermount3 -u "$mnt" 2>/dev/null || true
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
"$BIN" keygen "$work/k" >/dev/null
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$work/src/model.bin"
"$BIN" seal "$work/src" "$work/store" --key "file:$work/k" >/dev/null
bytes=$((SIZE_MIB << 20))

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# mount ARGS...: a new daemon in the foreground, waited for.
start() {
  "$BIN" mount "$work/store" "$mnt" --key "file:$work/k" --foreground --cache-size 256MiB "$@" \
    </dev/null >/dev/null 2>>"$work/daemon.log" &
  pid=$!
  for _ in $(seq 200); do grep -q " $mnt " /proc/mounts && return 0; sleep 0.05; done
  echo "mount did not come up" >&2; exit 1
}
stop() {
  fusermount3 -u "$mnt"
  wait "$pid" || true
  pid=""
}
cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# timed CMD: wall seconds of CMD.
timed() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }
# read_mount ARGS...: appends "MB/s CPU-s/GiB" of one cold read of the model to $out
# (not through $(...): the daemon started here must stay in this shell).
read_mount() {
  drop
  start "$@"
  local c0 s c1 tck
  c0=$(cpu_of "$pid")
  s=$(timed cat "$mnt/model.bin")
  c1=$(cpu_of "$pid")
  tck=$(getconf CLK_TCK)
  echo "$(echo "$bytes / $s / 1000000" | bc -l) $(echo "($c1 - $c0) / $tck / ($bytes / 1073741824)" | bc -l)" >>"$out"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }

declare -A mbs cpu
run() { # run NAME ARGS...
  local name=$1; shift
  out="$work/$name.txt"
  : >"$out"
  for _ in $(seq "$REPS"); do
    read_mount "$@"
    # The writer is behind the reads: let it finish before the daemon goes.
    if [ "$name" = cold_cache ]; then sleep 2; fi
    stop
    if [ "$name" = cold_cache ]; then
      find "$work/cache/v1" -type f -name '????????????????????????????????????????????????????????????????' | wc -l >>"$work/cold_entries.txt"
      rm -rf "$work/cache"
    fi
  done
  mbs[$name]=$(cut -d' ' -f1 "$work/$name.txt" | median)
  cpu[$name]=$(cut -d' ' -f2 "$work/$name.txt" | median)
}
run cold_nocache
run cold_cache --cache-dir "$work/cache" --cache-dir-size 4GiB
# Fill DIR once, then restart from it.
drop; start --cache-dir "$work/cache" --cache-dir-size 4GiB; cat "$mnt/model.bin" >/dev/null; sleep 3; stop
run restart --cache-dir "$work/cache" --cache-dir-size 4GiB
: >"$work/cat.txt"
for _ in $(seq "$REPS"); do
  drop
  s=$(timed sh -c "find '$work/cache/v1' -type f -name '????????????????????????????????????????????????????????????????' -exec cat {} +")
  echo "$bytes / $s / 1000000" | bc -l >>"$work/cat.txt"
done
mbs[cat]=$(median <"$work/cat.txt")
entries=$(find "$work/cache/v1" -type f | wc -l)

printf 'bench-cache-dir: %s MiB model, %s entries in DIR, median of %s, %s\n' "$SIZE_MIB" "$entries" "$REPS" "$(nproc) cores"
printf '%-26s %10s %14s\n' "read" "MB/s" "daemon CPU s/GiB"
printf '%-26s %10.0f %14.3f\n' "cold, no cache dir" "${mbs[cold_nocache]}" "${cpu[cold_nocache]}"
printf '%-26s %10.0f %14.3f\n' "cold, cache dir on" "${mbs[cold_cache]}" "${cpu[cold_cache]}"
printf '%-26s %10.0f %14.3f\n' "restart from DIR" "${mbs[restart]}" "${cpu[restart]}"
printf '%-26s %10.0f %14s\n' "cat of DIR's entries" "${mbs[cat]}" "-"
printf 'entries the cold read with the cache dir left (of %s chunks after chunk 0): %s\n' \
  "$((SIZE_MIB - 1))" "$(median <"$work/cold_entries.txt")"
printf 'restart / cat: %.2f; cold with / without the cache dir: %.2f\n' \
  "$(echo "${mbs[restart]} / ${mbs[cat]}" | bc -l)" "$(echo "${mbs[cold_cache]} / ${mbs[cold_nocache]}" | bc -l)"
