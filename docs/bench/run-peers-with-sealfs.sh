#!/usr/bin/env bash
# sealfs in the ../shared/bench peer harness: every figure a side-by-side ratio from one run.
# Needs the harness built (`BENCH_SIZES=1G ../shared/bench/setup.sh` covers the default files)
# and `cargo build --release` here. Results go to
# $OUT (default /tmp/sealfs-peers.md + .json), never into shared/.
#   docs/bench/run-peers-with-sealfs.sh                          # sealfs + all peers, 4 groups
#   BENCH_MOUNTS=sealfs BENCH_GROUPS=raw,local,fuse docs/bench/run-peers-with-sealfs.sh   # sealfs rows only
set -euo pipefail
sealfs="$(cd "$(dirname "$0")/../.." && pwd)/target/release/sealfs"
cd "${SHARED_BENCH:-$(dirname "$0")/../../../shared/bench}"
env_s3="env AWS_ENDPOINT_URL_S3={endpoint} AWS_ENDPOINT_URL_KMS={kms}"
export SEALFS_SEAL_CMD="$env_s3 $sealfs seal {file} s3://{bucket}/ --key kms:{kms_key} --force"
export SEALFS_MOUNT_CMD="$env_s3 $sealfs mount --foreground s3://{bucket}/ {mnt} --key kms:{kms_key} --cache-size 256MiB"
export BENCH_FILES="${BENCH_FILES:-rand-1G.bin model-1G.safetensors}"
export BENCH_RAW_FILES="${BENCH_RAW_FILES:-rand-1G.bin}"
export BENCH_RAW_SERVERS="${BENCH_RAW_SERVERS:-s3s-fs-1m}"
export BENCH_RCLONE_SERVERS="${BENCH_RCLONE_SERVERS:-s3s-fs-1m}"
export BENCH_SEED_SERVERS="${BENCH_SEED_SERVERS:-s3s-fs-1m}"
export BENCH_REPS="${BENCH_REPS:-3}"
./peers.sh --groups "${BENCH_GROUPS:-raw,local,fuse,seed}" --out "${OUT:-/tmp/sealfs-peers.md}"
# Mountpoint for Amazon S3 (the harness's bin/mps3) beside sealfs and raw ranged GETs on the
# same server, one run each: a 1 GiB object (cold, warm, CPU, RSS, TTFB), then a model of 8
# shards read shard after shard and by 8 concurrent readers. BENCH_MOUNTPOINT=0 skips both.
if [[ "${BENCH_MOUNTPOINT:-1}" != 0 ]]; then
  out=${OUT:-/tmp/sealfs-peers.md}
  python3 lib/mp_vs_sealfs.py --reps "$BENCH_REPS" --sealfs "$sealfs" --out "${out%.md}-mountpoint"
  python3 "$(dirname "$sealfs")/../../scripts/bench-shards.py" --reps "$BENCH_REPS" --sealfs "$sealfs" \
    --out "${out%.md}-shards"
fi
