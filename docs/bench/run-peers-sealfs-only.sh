#!/usr/bin/env bash
cd /work/shared/bench
export SEALFS_SEAL_CMD='env AWS_ENDPOINT_URL_S3={endpoint} AWS_ENDPOINT_URL_KMS={kms} /work/main/target/release/sealfs seal {file} s3://{bucket}/ --key kms:{kms_key} --force'
export SEALFS_MOUNT_CMD='env AWS_ENDPOINT_URL_S3={endpoint} AWS_ENDPOINT_URL_KMS={kms} /work/main/target/release/sealfs mount --foreground s3://{bucket}/ {mnt} --key kms:{kms_key} --cache-size 256MiB'
export BENCH_FILES="rand-1G.bin model-1G.safetensors"
export BENCH_RAW_FILES="rand-1G.bin"
export BENCH_RAW_SERVERS="s3s-fs-1m"
export BENCH_RCLONE_SERVERS="s3s-fs-1m"
export BENCH_SEED_SERVERS="s3s-fs-1m"
export BENCH_REPS=3
export BENCH_MOUNTS=sealfs
./peers.sh --groups raw,local,fuse --out /tmp/sealfs-peers2.md
