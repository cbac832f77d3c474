#!/usr/bin/env bash
# Seal throughput vs a raw multipart upload of the same bytes to the same S3 server, in one
# run: `scripts/bench-seal.sh [SIZE_MIB] [REPS]`. Uses the peer harness's built tools
# (../shared/bench: s3s-fs-1m, s3bench; build them with its setup.sh). Data and server
# root live under $BENCH_TMP (default /tmp/sealfs-bench), never in the project.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
reps=${2:-3}
bench=${SHARED_BENCH:-../shared/bench}
bin="$bench/bin"
[ -x "$bin/s3s-fs-1m" ] && [ -x "$bin/s3bench" ] || { echo "build $bench first (its setup.sh)" >&2; exit 1; }
tmp=${BENCH_TMP:-/tmp/sealfs-bench}
mkdir -p "$tmp/root" "$tmp/src"
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
port=${PORT:-9199}
endpoint="http://127.0.0.1:$port"
export AWS_ENDPOINT_URL="$endpoint"
"$bin/s3s-fs-1m" --host 127.0.0.1 --port "$port" --access-key test --secret-key test "$tmp/root" >"$tmp/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$tmp/root"' EXIT
for _ in $(seq 100); do curl -s -o /dev/null "$endpoint/" && break; sleep 0.1; done
"$bin/s3bench" mb --endpoint "$endpoint" --bucket bench >/dev/null 2>&1 || true
file="$tmp/src/rand-${size_mib}M.bin"
[ -f "$file" ] || head -c $((size_mib << 20)) /dev/urandom > "$file"
cargo build --release --quiet --bin sealfs
[ -f "$tmp/kek" ] || target/release/sealfs keygen "$tmp/kek" >/dev/null
bytes=$((size_mib << 20))

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
run() { # prints "seconds peak_kib"
  local t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -f "%M" -o "$tmp/rss" "$@" >/dev/null
  t1=$(date +%s.%N)
  echo "$(echo "$t1 - $t0" | bc) $(cat "$tmp/rss")"
}
raw=(); seal=(); raw_rss=(); seal_rss=()
for i in $(seq "$reps"); do
  sync
  read -r s r < <(run "$bin/s3bench" put --endpoint "$endpoint" --bucket bench --key "raw/$i" --file "$file" --part-mib 16 --conc 8)
  raw+=("$s"); raw_rss+=("$r")
  sync
  read -r s r < <(run target/release/sealfs seal "$file" "s3://bench/sealed/$i" --key "file:$tmp/kek" --part-size 16MiB --jobs 8)
  seal+=("$s"); seal_rss+=("$r")
done
raw_s=$(printf '%s\n' "${raw[@]}" | median); seal_s=$(printf '%s\n' "${seal[@]}" | median)
raw_mbs=$(echo "$bytes / $raw_s / 1000000" | bc -l); seal_mbs=$(echo "$bytes / $seal_s / 1000000" | bc -l)
printf '| file | raw multipart upload (s3bench put 16MiB x8) | sealfs seal (16MiB parts x8) | ratio | peak RSS raw / seal |\n|---|---:|---:|---:|---:|\n'
printf '| %s MiB random | %.0f MB/s | %.0f MB/s | %.2f | %s / %s MiB |\n' "$size_mib" "$raw_mbs" "$seal_mbs" "$(echo "$seal_mbs / $raw_mbs" | bc -l)" \
  "$(( $(printf '%s\n' "${raw_rss[@]}" | median) / 1024 ))" "$(( $(printf '%s\n' "${seal_rss[@]}" | median) / 1024 ))"
echo "(median of $reps; every run: raw ${raw[*]} s, seal ${seal[*]} s)"
