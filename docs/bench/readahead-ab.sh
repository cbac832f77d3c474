#!/bin/bash
# read-ahead A/B: cold sequential read of a 1 GiB sealed file (local store) through a fresh mount.
# Usage: WORK=DIR SEALFS=$PWD/target/release/sealfs REPS=6 docs/bench/readahead-ab.sh (root: sysfs, drop_caches)
B=${SEALFS:-target/release/sealfs}
cd "${WORK:?a directory with src/big.bin (1 GiB), its key file k and store/ sealed from it}"
for rep in $(seq ${REPS:-3}); do
 for ra in 128 1024; do
  mkdir -p mnt
  $B mount --foreground store mnt --key file:k 2>/dev/null &
  pid=$!
  for _ in $(seq 100); do mountpoint -q mnt && break; sleep 0.05; done
  dev=$(stat -c %d mnt); maj=$((dev>>8)); min=$((dev & 255))
  echo $ra > /sys/class/bdi/$maj:$min/read_ahead_kb
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(awk '{print $14+$15}' /proc/$pid/stat); c0=$(awk '/ctxt/{print $2}' /proc/stat)
  v0=$(cat /proc/$pid/task/*/status | awk '/voluntary_ctxt_switches/{s+=$2} END{print s}')
  rate=$(dd if=mnt/big.bin of=/dev/null bs=1M 2>&1 | tail -1 | awk '{print $(NF-1), $NF}')
  t1=$(awk '{print $14+$15}' /proc/$pid/stat)
  v1=$(cat /proc/$pid/task/*/status | awk '/voluntary_ctxt_switches/{s+=$2} END{print s}')
  echo "rep $rep read_ahead_kb $ra: $rate, daemon CPU $(( (t1-t0) ))0 ms/GiB, daemon ctx switches $((v1-v0))"
  fusermount3 -u mnt; wait $pid
 done
done
