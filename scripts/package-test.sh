#!/usr/bin/env bash
# Installs sealfs the way users do and proves the installed copy works, then removes it:
#   .deb:  dpkg -i; the INSTALLED /usr/bin/sealfs through keygen, seal, `mount -t fuse.sealfs`
#          and an /etc/fstab-style line (mount -T), sha256 read-back, umount; man pages,
#          completions, the unit (systemd-analyze verify), the conffile; dpkg -r, dpkg --purge
#          and nothing left behind.
#   wheel: pip install into a fresh venv under target/; `sealfs` from the venv's PATH through
#          --version, keygen, seal, verify and unseal (sha256 equal); pip uninstall.
# Builds both with scripts/package.sh first (one release build). Root only (dpkg, mount);
# fails loudly on any step; every mount, daemon and the package are gone on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

fail() { echo "package-test.sh: FAIL: $*" >&2; exit 1; }
say() { echo "package-test.sh: $*"; }
[ "$(id -u)" = 0 ] || fail "must run as root (dpkg -i, mount)"
for c in dpkg dpkg-query mount umount sha256sum man systemd-analyze bash; do
  command -v "$c" >/dev/null || fail "$c missing: run scripts/install-test-deps.sh"
done
[ -e /sbin/mount.fuse ] || [ -e /usr/sbin/mount.fuse ] || fail "mount.fuse (fuse3) missing: run scripts/install-test-deps.sh"
[ -e /dev/fuse ] || fail "/dev/fuse missing: this machine cannot mount FUSE"
# Never clobber a real install: this test installs and purges the package. A package that
# a killed earlier run of this script left (its stamp is there) is purged first.
stamp=/var/tmp/sealfs-package-test.installed
if [ -e "$stamp" ] && dpkg-query -W sealfs >/dev/null 2>&1; then
  say "purging the sealfs package an interrupted earlier run left ($stamp)"
  dpkg --purge sealfs >/dev/null || fail "dpkg --purge sealfs (left by an earlier run)"
fi
rm -f "$stamp"
if dpkg-query -W sealfs >/dev/null 2>&1; then
  fail "dpkg knows a sealfs package here ($(dpkg-query -W -f='${Status}' sealfs)): purge it first (dpkg --purge sealfs)"
fi
[ ! -e /usr/bin/sealfs ] || fail "/usr/bin/sealfs exists but no package owns it: remove it first"
[ ! -e /etc/sealfs/example.conf ] || fail "/etc/sealfs/example.conf exists: remove it first"

work=$(mktemp -d /tmp/sealfs-pkgtest.XXXXXX)
installed=0
daemons_for() { # PIDs of sealfs processes whose command line names $1
  local p
  for p in $(pgrep -x sealfs || true); do
    tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- " $1 " && echo "$p"
  done
  return 0
}
cleanup() {
  local rc=$? m p
  set +e
  for m in "$work/mnt"; do
    if grep -qF " $m " /proc/mounts; then
      umount "$m" 2>/dev/null || fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m"
      [ "$rc" != 0 ] || rc=1
    fi
    for p in $(daemons_for "$m"); do kill -9 "$p"; [ "$rc" != 0 ] || rc=1; done
  done
  # Installed or removed with its conffile left ("config-files"): purge either way.
  if [ "$installed" = 1 ] && dpkg-query -W sealfs >/dev/null 2>&1; then
    dpkg --purge sealfs >/dev/null && rm -f "$stamp"
  fi
  rm -rf "$work" "$repo/target/wheel-venv"
  [ "$rc" = 0 ] || echo "package-test.sh: cleaned up after a failure (exit $rc)" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t0=$SECONDS
scripts/package.sh
t_build=$((SECONDS - t0))
deb=$(ls target/debian/sealfs_*.deb)
wheel=$(ls target/wheels/sealfs-*.whl)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
[ -n "$version" ] || fail "no version in Cargo.toml"

# A model: a few MiB of random bytes, a text file, a nested file.
mkdir -p "$work/src/sub" "$work/mnt"
head -c $((5 << 20)) /dev/urandom >"$work/src/weights.bin"
echo '{"architectures": ["Test"]}' >"$work/src/config.json"
head -c 70000 /dev/urandom >"$work/src/sub/shard.bin"
files="weights.bin config.json sub/shard.bin"
same_files() { # same_files DIR: every file of the model byte-identical under DIR
  local f a b
  for f in $files; do
    a=$(sha256sum <"$work/src/$f" | cut -d' ' -f1)
    b=$(sha256sum <"$1/$f" | cut -d' ' -f1) || fail "cannot read $1/$f"
    [ "$a" = "$b" ] || fail "$1/$f: sha256 $b, expected $a"
  done
}
wait_unmounted() { # the mount gone and its daemon exited, within 20 s
  local i
  for i in $(seq 200); do
    if ! grep -qF " $1 " /proc/mounts && [ -z "$(daemons_for "$1")" ]; then return 0; fi
    sleep 0.1
  done
  fail "mount or daemon still there 20 s after umount of $1"
}

# ---- the Debian package ----
t1=$SECONDS
touch "$stamp"
dpkg -i "$deb" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log" >&2; fail "dpkg -i $deb"; }
installed=1
say "installed $deb"
[ -x /usr/bin/sealfs ] || fail "/usr/bin/sealfs not installed"
listing=$(dpkg -L sealfs)
for f in /usr/bin/sealfs /usr/lib/systemd/system/sealfs@.service /etc/sealfs/example.conf \
  /usr/share/man/man1/sealfs.1.gz /usr/share/man/man1/sealfs-mount.1.gz \
  /usr/share/bash-completion/completions/sealfs /usr/share/zsh/vendor-completions/_sealfs \
  /usr/share/fish/vendor_completions.d/sealfs.fish /usr/share/doc/sealfs/copyright \
  /usr/share/doc/sealfs/systemd.md /usr/share/doc/sealfs/examples/fstab.example; do
  grep -qx -- "$f" <<<"$listing" || fail "the package does not ship $f"
  [ -e "$f" ] || fail "$f listed but not on disk (a dpkg path-exclude in /etc/dpkg/dpkg.cfg.d?)"
done
dpkg-query -W -f='${Depends}' sealfs | grep -q 'fuse3' || fail "Depends lacks fuse3"
# The upgrade step reloads (SIGHUP re-exec) instead of restarting; a configure with no
# systemd running (here) does nothing and succeeds.
postinst=/var/lib/dpkg/info/sealfs.postinst
grep -q 'systemctl reload "$unit"' "$postinst" || fail "the package's postinst does not reload running units"
if [ ! -d /run/systemd/system ]; then
  sh "$postinst" configure 0.0.1 || fail "postinst configure (an upgrade) failed without systemd"
fi
dpkg-query -W -f='${Conffiles}' sealfs | grep -q '/etc/sealfs/example.conf' \
  || fail "/etc/sealfs/example.conf is not a conffile"
[ "$(stat -c %a /etc/sealfs/example.conf)" = 600 ] || fail "/etc/sealfs/example.conf is not mode 0600"

# --version of the installed binary: version, formats, the backend this CPU chose.
v=$(/usr/bin/sealfs --version)
head -1 <<<"$v" | grep -qx "sealfs $version" || fail "--version: $v"
grep -q 'sealfs-manifest-v1' <<<"$v" || fail "--version names no manifest format: $v"
grep -Eq '^aead: (ring|aws-lc-rs) ' <<<"$v" || fail "--version names no AEAD backend: $v"
[ "$(SEALFS_AEAD=ring /usr/bin/sealfs --version | tail -1 | cut -d' ' -f2)" = ring ] \
  || fail "--version does not report the backend in use (SEALFS_AEAD=ring)"

# Man pages through man(1), completions through bash itself.
[ "$(man -w sealfs)" = /usr/share/man/man1/sealfs.1.gz ] || fail "man -w sealfs: $(man -w sealfs 2>&1)"
MANPAGER=cat MANWIDTH=100 man sealfs-mount 2>/dev/null | grep -q -- '--cache-size' \
  || fail "man sealfs-mount does not render the mount flags"
got=$(bash -c 'source /usr/share/bash-completion/completions/sealfs
  COMP_WORDS=(sealfs mo); COMP_CWORD=1; _sealfs sealfs mo sealfs; printf "%s\n" "${COMPREPLY[@]}"')
[ "$got" = mount ] || fail "bash completion of 'sealfs mo' gave: $got"
got=$(bash -c 'source /usr/share/bash-completion/completions/sealfs
  COMP_WORDS=(sealfs mount --cache-s); COMP_CWORD=2; _sealfs sealfs --cache-s mount; printf "%s\n" "${COMPREPLY[@]}"')
[ "$got" = --cache-size ] || fail "bash completion of 'sealfs mount --cache-s' gave: $got"
head -1 /usr/share/zsh/vendor-completions/_sealfs | grep -qx '#compdef sealfs' || fail "zsh completion"
grep -q '^complete -c sealfs ' /usr/share/fish/vendor_completions.d/sealfs.fish || fail "fish completion"

# The installed unit against the installed binary and man page (man: in Documentation=).
grep -q '^ExecStart=/usr/bin/sealfs mount ' /usr/lib/systemd/system/sealfs@.service || fail "unit ExecStart="
out=$(systemd-analyze verify sealfs@example.service 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify sealfs@example.service: $out"

# The round trip with the installed binary only: the default PATH, nothing from target/.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
[ "$(command -v sealfs)" = /usr/bin/sealfs ] || fail "sealfs on the default PATH is $(command -v sealfs)"
sealfs keygen "$work/k" >/dev/null || fail "installed sealfs keygen"
sealfs seal "$work/src" "$work/sealed" --key "file:$work/k" >"$work/seal.log" 2>&1 \
  || { cat "$work/seal.log" >&2; fail "installed sealfs seal"; }
mount_check() { # mount_check HOW: the mount is live, served by /usr/bin/sealfs, reads back
  local pids
  grep -qF " $work/mnt " /proc/mounts || fail "$1: nothing mounted at $work/mnt"
  pids=$(daemons_for "$work/mnt")
  [ "$(wc -w <<<"$pids")" = 1 ] || fail "$1: expected one daemon, found: $pids"
  [ "$(readlink "/proc/$pids/exe")" = /usr/bin/sealfs ] \
    || fail "$1: the daemon is $(readlink "/proc/$pids/exe"), not the installed /usr/bin/sealfs"
  same_files "$work/mnt"
  umount "$work/mnt" || fail "$1: umount"
  wait_unmounted "$work/mnt"
  say "$1: mounted by /usr/bin/sealfs, read back (sha256 equal), unmounted"
}
# mount(8) -> /sbin/mount.fuse (fuse3) -> sh -c 'sealfs SRC DIR -o ...' from the PATH.
# (The daemon keeps mount's stderr: its audit lines go to mount.log, shown on failure.)
env -i PATH="$PATH" mount -t fuse.sealfs "$work/sealed" "$work/mnt" \
  -o "_netdev,key=file:$work/k,cache_size=64MiB" >>"$work/mount.log" 2>&1 \
  || { cat "$work/mount.log" >&2; fail "mount -t fuse.sealfs"; }
mount_check "mount -t fuse.sealfs"
# The same through an fstab line (mount -T reads it as /etc/fstab is read).
echo "$work/sealed $work/mnt fuse.sealfs _netdev,nofail,key=file:$work/k,allow_other 0 0" >"$work/fstab"
env -i PATH="$PATH" mount -T "$work/fstab" "$work/mnt" >>"$work/mount.log" 2>&1 \
  || { cat "$work/mount.log" >&2; fail "mount of an fstab line"; }
mount_check "fstab line"

dpkg -r sealfs >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log" >&2; fail "dpkg -r sealfs"; }
for f in /usr/bin/sealfs /usr/lib/systemd/system/sealfs@.service /usr/share/man/man1/sealfs.1.gz \
  /usr/share/bash-completion/completions/sealfs; do
  [ ! -e "$f" ] || fail "$f left after dpkg -r"
done
[ -e /etc/sealfs/example.conf ] || fail "dpkg -r removed the conffile (only purge may)"
hash -r
! command -v sealfs >/dev/null || fail "sealfs still on PATH after dpkg -r: $(command -v sealfs)"
dpkg --purge sealfs >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log" >&2; fail "dpkg --purge sealfs"; }
installed=0
rm -f "$stamp"
[ ! -e /etc/sealfs/example.conf ] || fail "/etc/sealfs/example.conf left after purge"
[ ! -e /etc/sealfs ] || fail "/etc/sealfs left after purge: $(ls -A /etc/sealfs)"
! dpkg-query -W sealfs >/dev/null 2>&1 || fail "dpkg still knows sealfs after purge"
t_deb=$((SECONDS - t1))
say "deb: installed, round trip, removed and purged cleanly"

# ---- the wheel ----
t2=$SECONDS
venv=$repo/target/wheel-venv
rm -rf "$venv"
python3 -m venv "$venv" || fail "python3 -m venv"
"$venv/bin/pip" install -q --disable-pip-version-check --no-index "$repo/$wheel" \
  || fail "pip install $wheel"
got=$(bash -c ". '$venv/bin/activate' && command -v sealfs")
[ "$got" = "$venv/bin/sealfs" ] || fail "in the venv, sealfs is '$got', not $venv/bin/sealfs"
v=$("$venv/bin/sealfs" --version) || fail "venv sealfs --version"
head -1 <<<"$v" | grep -qx "sealfs $version" || fail "venv sealfs --version: $v"
grep -Eq '^aead: (ring|aws-lc-rs) ' <<<"$v" || fail "venv sealfs --version: $v"
bash -c ". '$venv/bin/activate'
  set -e
  sealfs keygen '$work/k2' >/dev/null
  sealfs seal '$work/src' '$work/sealed2' --key 'file:$work/k2' >/dev/null 2>&1
  sealfs verify '$work/sealed2' --key 'file:$work/k2' >/dev/null 2>&1
  sealfs unseal '$work/sealed2' '$work/out2' --key 'file:$work/k2' >/dev/null 2>&1
" || fail "the wheel's sealfs: keygen, seal, verify, unseal"
same_files "$work/out2"
"$venv/bin/pip" uninstall -q -y sealfs || fail "pip uninstall sealfs"
[ ! -e "$venv/bin/sealfs" ] || fail "pip uninstall left $venv/bin/sealfs"
t_wheel=$((SECONDS - t2))
say "wheel: installed in a fresh venv, sealfs on its PATH, seal/verify/unseal round trip, uninstalled"

say "seconds: build ${t_build} (see package.sh lines above), deb test ${t_deb}, wheel test ${t_wheel}"
say "all checks passed"
