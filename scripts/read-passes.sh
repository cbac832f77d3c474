#!/usr/bin/env bash
# Cold and repeated warm sequential reads of one sealed file through a fresh mount, with the
# CPU each side spent on the cold pass; then the same passes on a tmpfs copy for reference.
#   scripts/read-passes.sh URI FILE KEY SRC [REPS]      (root: drops the page cache)
#   e.g. AWS_ENDPOINT_URL_S3=http://127.0.0.1:9102 AWS_ENDPOINT_URL_KMS=http://127.0.0.1:9100 \
#        scripts/read-passes.sh s3://ratest/ rand-1G.bin kms:<key-id> ../shared/bench/data/rand-1G.bin 5
# SERVER_PID=<pid> adds the S3 server's CPU. Extra mount flags: MOUNT_ARGS="--cache-size 512MiB".
# Per rep: cold MB/s, idle share of both cores, daemon and server CPU (ticks of 10 ms),
# resident pages right after the cold pass, then two warm passes (dd bs=1M).
set -euo pipefail
uri=$1 file=$2 key=$3 src=$4 reps=${5:-3}
bin="$(cd "$(dirname "$0")/.." && pwd)/target/release/sealfs"
mnt=$(mktemp -d /tmp/sealfs-passes.XXXXXX)
trap 'fusermount3 -u "$mnt" 2>/dev/null || true; rmdir "$mnt"; rm -f /dev/shm/sealfs-passes.bin' EXIT
dd_rate() { dd if="$1" of=/dev/null bs=1M 2>&1 | tail -1 | awk '{print $(NF-1) $NF}'; }
ticks() { [[ -n "$1" ]] && awk '{print $14 + $15}' "/proc/$1/stat" || echo 0; }
cpu() { awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6}' /proc/stat; }
for rep in $(seq "$reps"); do
  # shellcheck disable=SC2086
  "$bin" mount --foreground "$uri" "$mnt" --key "$key" ${MOUNT_ARGS:-} 2>/dev/null &
  daemon=$!
  for _ in $(seq 100); do mountpoint -q "$mnt" && break; sleep 0.05; done
  sync; echo 3 > /proc/sys/vm/drop_caches
  read -r t0 i0 < <(cpu); d0=$(ticks $daemon); s0=$(ticks "${SERVER_PID:-}")
  cold=$(dd_rate "$mnt/$file")
  read -r t1 i1 < <(cpu); d1=$(ticks $daemon); s1=$(ticks "${SERVER_PID:-}")
  resident=$(fincore -n -b -o PAGES "$mnt/$file")
  echo "rep $rep: cold $cold (idle $(( (i1 - i0) * 100 / (t1 - t0) ))%, daemon $((d1 - d0)), server $((s1 - s0)) ticks)," \
       "resident $resident pages, warm $(dd_rate "$mnt/$file"), again $(dd_rate "$mnt/$file")"
  fusermount3 -u "$mnt"; wait $daemon || true
done
cp "$src" /dev/shm/sealfs-passes.bin
echo "tmpfs copy: first read $(dd_rate /dev/shm/sealfs-passes.bin), again $(dd_rate /dev/shm/sealfs-passes.bin), again $(dd_rate /dev/shm/sealfs-passes.bin)"
