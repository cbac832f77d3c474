#!/usr/bin/env bash
# Daemon CPU per GiB of a cold sequential read through the mount, with and without
# --trust-signer (every chunk's BLAKE3 checked against the signed manifest), alternating
# runs on the same sealed model. Local store, so the figure is the daemon's own work.
# Usage: scripts/trust-cost.sh [SIZE_MIB (default 1024)] [REPS (default 3)] [SEALFS binary]
set -euo pipefail
size=${1:-1024}; reps=${2:-3}; bin=${3:-target/release/sealfs}
work=$(mktemp -d); trap 'fusermount3 -u "$work/mnt" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/src" "$work/mnt"
head -c "$((size << 20))" /dev/urandom > "$work/src/model.bin"
"$bin" keygen "$work/k" >/dev/null
"$bin" keygen --signing "$work/pub.key" >/dev/null
"$bin" seal "$work/src" "$work/sealed" --key "file:$work/k" --sign "file:$work/pub.key" >/dev/null
rm "$work/src/model.bin"
tick=$(getconf CLK_TCK)
for r in $(seq "$reps"); do
  for mode in plain trust; do
    extra=(); [ "$mode" = trust ] && extra=(--trust-signer "file:$work/pub.key.pub")
    "$bin" mount "$work/sealed" "$work/mnt" --key "file:$work/k" --foreground "${extra[@]}" 2>/dev/null &
    pid=$!
    for _ in $(seq 100); do mountpoint -q "$work/mnt" && break; sleep 0.05; done
    start=$(date +%s.%N)
    dd if="$work/mnt/model.bin" of=/dev/null bs=1M status=none
    end=$(date +%s.%N)
    read -r ut st < <(awk '{print $14, $15}' "/proc/$pid/stat")
    fusermount3 -u "$work/mnt"; wait "$pid" || true
    awk -v m="$mode" -v r="$r" -v u="$ut" -v s="$st" -v t="$tick" -v a="$start" -v b="$end" -v g="$size" \
      'BEGIN { cpu=(u+s)/t; printf "%-5s rep %d: daemon CPU %.3f s/GiB, %.0f MB/s\n", m, r, cpu*1024/g, g*1048576/(b-a)/1e6 }'
  done
done
