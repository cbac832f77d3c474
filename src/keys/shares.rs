//! `shares:<path>,<path>,…`: a 256-bit KEK that no single file holds (a k-of-n key ceremony).
//!
//! `sealfs keygen --shares K-of-N DIR` draws the KEK from the OS CSPRNG into locked memory,
//! splits it with Shamir's scheme over GF(2^8) (one polynomial of degree K−1 per key byte,
//! share `i` is the values at `x = i`), writes the N share files and drops the key: the
//! whole key is never written anywhere. At use time any K shares (or more, up to N) are
//! combined (through the crate's buffers, zeroized at once) into locked memory, checked
//! against the key check value, and the result
//! wraps DEKs exactly as a key file does (`file.rs`), under its own HKDF label.
//!
//! The arithmetic is the `vsss-rs` crate's (6.x, `Gf256`): constant-time field operations
//! without lookup tables, coefficients uniform over the whole field, its Lagrange `combine`.
//! Its `split_bytes` leaves the last byte's polynomial (the secret byte included) in freed
//! heap memory, so [`split`] drives the same `Polynomial::fill` and `evaluate_in_place` over
//! a coefficient vector that is zeroized on drop.
//!
//! A share file (text, mode 0600, at most [`MAX_SHARE_FILE`] bytes):
//!
//! ```text
//! sealfs-share-v1
//! ceremony=<32 hex: random id of this keygen run>
//! index=<i: 1..=N, the x coordinate>
//! threshold=<K>
//! shares=<N>
//! key-check=<32 hex: HMAC-SHA256(KEK, "sealfs v1 shares key check"), first 16 bytes>
//! share=<64 hex: the 32 values f_b(i)>
//! check=<32 hex: SHA-256("sealfs v1 share check" || every byte above), first 16 bytes>
//! ```
//!
//! `check` names a file with a changed byte before anything is combined. `key-check` catches
//! what `check` cannot (a share altered on purpose with its check recomputed, shares that
//! do not belong together): a combined key is used only when it matches, so a bad share
//! never yields a wrong key. The key check is a PRF output under the key and tells nothing
//! about it; it is also the slot id, `shares:<K>-of-<N>:<key check>`, so that `inspect`
//! output and share files can be matched by eye.

use std::fmt::Write as _;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vsss_rs::{DefaultShare, Gf256, IdentifierGf256, Polynomial};
use zeroize::{Zeroize, Zeroizing};

use super::file::FileKek;
use super::KeyError;
use crate::crypto::locked::Locked;
use crate::crypto::{random_bytes, secret::DEK_LEN};

const MAGIC: &str = "sealfs-share-v1";
const KEY_CHECK_LABEL: &[u8] = b"sealfs v1 shares key check";
const SHARE_CHECK_LABEL: &[u8] = b"sealfs v1 share check";
const WRAP_INFO: &[u8] = b"sealfs v1 shares wrap";
/// The most a share file may hold (one is about 250 bytes).
pub const MAX_SHARE_FILE: usize = 1024;
const CEREMONY_LEN: usize = 16;
const CHECK_LEN: usize = 16;

/// `K-of-N`: any K of the N shares open the key. 2 ≤ K ≤ N ≤ 255 (GF(2^8) has 255 non-zero
/// x coordinates; K = 1 would put the whole key in every file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    pub k: u8,
    pub n: u8,
}

impl std::str::FromStr for Threshold {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected K-of-N with 2 <= K <= N <= 255, e.g. 2-of-3");
        let (k, n) = s.split_once("-of-").ok_or_else(bad)?;
        let num = |v: &str| -> Option<u8> {
            (v.bytes().all(|b| b.is_ascii_digit()) && !v.starts_with('0'))
                .then(|| v.parse().ok())
                .flatten()
        };
        match (num(k), num(n)) {
            (Some(k), Some(n)) if 2 <= k && k <= n => Ok(Self { k, n }),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Threshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-of-{}", self.k, self.n)
    }
}

/// What `keygen --shares` made: nothing secret.
#[derive(Debug)]
pub struct Ceremony {
    /// Hex of the random ceremony id written into every share.
    pub id: String,
    /// The slot id DEKs wrapped under this key carry (`shares:K-of-N:<key check>`).
    pub key_id: String,
    /// The share files, share 1 first.
    pub files: Vec<PathBuf>,
}

/// The file name of share `i` of `n`.
pub fn share_name(i: u8, n: u8) -> String {
    format!("share-{i}-of-{n}")
}

/// The whole key: only ever here, in a locked page, zeroized when dropped.
type WholeKey = Locked<[u8; DEK_LEN]>;

/// The OS CSPRNG (ring's, as everywhere in sealfs) in the `rand_core` form vsss-rs takes.
struct OsRng;

impl rand_core::TryRng for OsRng {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        random_bytes(&mut b);
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        random_bytes(&mut b);
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        random_bytes(dst);
        Ok(())
    }
}

impl rand_core::TryCryptoRng for OsRng {}

type GfShare = DefaultShare<IdentifierGf256, IdentifierGf256>;

/// A polynomial's coefficients (coefficient 0 is a key byte), zeroized on drop.
struct Coefficients(Vec<GfShare>);

impl Drop for Coefficients {
    fn drop(&mut self) {
        for c in &mut self.0 {
            c.identifier.0.zeroize();
            c.value.0.zeroize();
        }
    }
}

/// Share values: `out[i][b]` = f_b(i + 1), for i < n, where f_b is a fresh random polynomial
/// of degree k − 1 with f_b(0) = key byte b.
fn split(key: &[u8; DEK_LEN], t: Threshold) -> Result<Zeroizing<Vec<[u8; DEK_LEN]>>, KeyError> {
    let k = usize::from(t.k);
    let mut poly = Coefficients(<Vec<GfShare> as Polynomial<GfShare>>::create(k));
    let mut out = Zeroizing::new(vec![[0u8; DEK_LEN]; usize::from(t.n)]);
    for (b, &byte) in key.iter().enumerate() {
        let mut secret = IdentifierGf256(Gf256(byte));
        let filled = poly.0.fill(&secret, OsRng, k);
        secret.0.zeroize();
        filled.map_err(|e| KeyError::Shares(format!("splitting the key failed: {e}")))?;
        for (i, share) in out.iter_mut().enumerate() {
            let x = IdentifierGf256(Gf256(i as u8 + 1));
            let mut y = IdentifierGf256::default();
            poly.0.evaluate_in_place(&x, k, &mut y);
            share[b] = y.0 .0;
            y.0.zeroize();
        }
    }
    Ok(out)
}

/// The Lagrange combination of `(x, values)` points at x = 0, byte by byte, into `key`.
fn combine(points: &[(u8, &[u8; DEK_LEN])], key: &mut [u8; DEK_LEN]) -> Result<(), KeyError> {
    let mut input: Zeroizing<Vec<Vec<u8>>> = Zeroizing::new(Vec::with_capacity(points.len()));
    for (x, y) in points {
        let mut v = Vec::with_capacity(1 + DEK_LEN);
        v.push(*x);
        v.extend_from_slice(&y[..]);
        input.push(v);
    }
    let secret = Zeroizing::new(
        Gf256::combine_bytes(&*input)
            .map_err(|e| KeyError::Shares(format!("combining the shares failed: {e}")))?,
    );
    if secret.len() != DEK_LEN {
        return Err(KeyError::Shares(format!(
            "combining the shares gave {} bytes, not {DEK_LEN}",
            secret.len()
        )));
    }
    key.copy_from_slice(&secret);
    Ok(())
}

fn key_check(key: &[u8; DEK_LEN]) -> [u8; CHECK_LEN] {
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
        KEY_CHECK_LABEL,
    );
    let mut out = [0u8; CHECK_LEN];
    out.copy_from_slice(&mac.as_ref()[..CHECK_LEN]);
    out
}

fn share_check(body: &[u8]) -> [u8; CHECK_LEN] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(SHARE_CHECK_LABEL);
    ctx.update(body);
    let mut out = [0u8; CHECK_LEN];
    out.copy_from_slice(&ctx.finish().as_ref()[..CHECK_LEN]);
    out
}

fn key_id(t: Threshold, check: &[u8; CHECK_LEN]) -> String {
    format!("shares:{t}:{}", hex::encode(check))
}

/// Appends the hex of `bytes` without a temporary string (share values pass through here).
fn push_hex(s: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
}

/// The text of one share file.
fn share_text(
    ceremony: &[u8; CEREMONY_LEN],
    index: u8,
    t: Threshold,
    check: &[u8; CHECK_LEN],
    y: &[u8; DEK_LEN],
) -> Zeroizing<String> {
    // Sized once: a growing String would leave copies of the share in freed memory.
    let mut s = Zeroizing::new(String::with_capacity(MAX_SHARE_FILE));
    s.push_str(MAGIC);
    s.push_str("\nceremony=");
    push_hex(&mut s, ceremony);
    let _ = write!(
        s,
        "\nindex={index}\nthreshold={}\nshares={}\nkey-check=",
        t.k, t.n
    );
    push_hex(&mut s, check);
    s.push_str("\nshare=");
    push_hex(&mut s, y);
    s.push('\n');
    let c = share_check(s.as_bytes());
    s.push_str("check=");
    push_hex(&mut s, &c);
    s.push('\n');
    debug_assert!(s.len() <= MAX_SHARE_FILE);
    s
}

/// `keygen --shares K-of-N DIR`: a new random KEK, split into N share files in `dir`
/// (created with mode 0700 if absent), each created new with mode 0600. If any share file
/// exists already, nothing is written (and the files this call created are removed); the
/// whole key exists only in locked memory, never in a file.
pub fn keygen(t: Threshold, dir: &Path) -> Result<Ceremony, KeyError> {
    let derr = |reason: String| KeyError::ShareFile {
        path: dir.display().to_string(),
        reason,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| derr(format!("cannot create the share directory: {e}")))?;
    // The key and its shares first: a failure there (locked memory refused) leaves no
    // empty share file behind to block the next run.
    let mut key: WholeKey = Locked::new([0u8; DEK_LEN])?;
    random_bytes(&mut key[..]);
    let mut ceremony = [0u8; CEREMONY_LEN];
    random_bytes(&mut ceremony);
    let check = key_check(&key);
    let ys = split(&key, t)?;
    drop(key);
    let mut files: Vec<(PathBuf, std::fs::File)> = Vec::with_capacity(usize::from(t.n));
    let remove_all = |files: &[(PathBuf, std::fs::File)]| {
        for (p, _) in files {
            let _ = std::fs::remove_file(p);
        }
    };
    for i in 1..=t.n {
        let p = dir.join(share_name(i, t.n));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&p)
        {
            Ok(f) => files.push((p, f)),
            Err(e) => {
                remove_all(&files);
                return Err(KeyError::ShareFile {
                    path: p.display().to_string(),
                    reason: match e.kind() {
                        std::io::ErrorKind::AlreadyExists => {
                            "already exists; refusing to overwrite it".into()
                        }
                        _ => e.to_string(),
                    },
                });
            }
        }
    }
    for (i, (p, f)) in files.iter_mut().enumerate() {
        let text = share_text(&ceremony, i as u8 + 1, t, &check, &ys[i]);
        if let Err(e) = f.write_all(text.as_bytes()).and_then(|_| f.sync_all()) {
            let path = p.display().to_string();
            remove_all(&files);
            return Err(KeyError::ShareFile {
                path,
                reason: e.to_string(),
            });
        }
    }
    // The new names are durable too (best effort: some filesystems refuse a directory fsync).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(Ceremony {
        id: hex::encode(ceremony),
        key_id: key_id(t, &check),
        files: files.into_iter().map(|(p, _)| p).collect(),
    })
}

/// One parsed share file.
struct Share {
    path: String,
    ceremony: [u8; CEREMONY_LEN],
    index: u8,
    t: Threshold,
    key_check: [u8; CHECK_LEN],
    y: Zeroizing<[u8; DEK_LEN]>,
}

/// Parses a share file's bytes; the error is the reason only (the caller names the file).
fn parse_share(buf: &[u8]) -> Result<Share, String> {
    let not_share = || format!("not a sealfs share file (the first line is not {MAGIC})");
    let text = std::str::from_utf8(buf).map_err(|_| not_share())?;
    if !text.starts_with(&format!("{MAGIC}\n")) {
        return Err(not_share());
    }
    // The check line comes first: a changed byte anywhere above it is reported as such,
    // whatever else it broke.
    let body_len = text
        .strip_suffix('\n')
        .and_then(|t| t.rfind('\n'))
        .map(|i| i + 1)
        .ok_or("malformed: no check line")?;
    let check_hex = text[body_len..]
        .strip_prefix("check=")
        .and_then(|c| c.strip_suffix('\n'))
        .ok_or("malformed: the last line is not check=<hex>")?;
    let mut check = [0u8; CHECK_LEN];
    hex_lower(check_hex, &mut check).map_err(|_| "malformed: the check line".to_string())?;
    if share_check(&text.as_bytes()[..body_len]) != check {
        return Err(
            "corrupted: its check value does not match its contents (a changed byte); \
             use another share or the holder's backup copy"
                .into(),
        );
    }
    let lines: Vec<&str> = text[..body_len - 1].split('\n').collect();
    let names = [
        "ceremony",
        "index",
        "threshold",
        "shares",
        "key-check",
        "share",
    ];
    if lines.len() != 1 + names.len() {
        return Err(format!(
            "malformed: {} lines, expected {}",
            lines.len() + 1,
            names.len() + 2
        ));
    }
    let field = |i: usize| -> Result<&str, String> {
        lines[i + 1]
            .strip_prefix(names[i])
            .and_then(|v| v.strip_prefix('='))
            .ok_or_else(|| format!("malformed: line {} is not {}=…", i + 2, names[i]))
    };
    let number = |i: usize| -> Result<u8, String> {
        let v = field(i)?;
        (v.bytes().all(|b| b.is_ascii_digit()) && !v.starts_with('0'))
            .then(|| v.parse::<u8>().ok())
            .flatten()
            .ok_or_else(|| format!("malformed: {} is not a number in 1..=255", names[i]))
    };
    let mut ceremony = [0u8; CEREMONY_LEN];
    hex_lower(field(0)?, &mut ceremony).map_err(|_| "malformed: ceremony".to_string())?;
    let (index, k, n) = (number(1)?, number(2)?, number(3)?);
    if !(2 <= k && k <= n) {
        return Err(format!("malformed: threshold {k} of {n} shares"));
    }
    if index > n {
        return Err(format!("malformed: share {index} of only {n}"));
    }
    let mut key_check = [0u8; CHECK_LEN];
    hex_lower(field(4)?, &mut key_check).map_err(|_| "malformed: key-check".to_string())?;
    let mut y = Zeroizing::new([0u8; DEK_LEN]);
    hex_lower(field(5)?, &mut y[..]).map_err(|_| "malformed: share value".to_string())?;
    Ok(Share {
        path: String::new(),
        ceremony,
        index,
        t: Threshold { k, n },
        key_check,
        y,
    })
}

/// Lower-case hex of exactly `out.len()` bytes (one spelling per value: the check covers
/// the text, and the text is what was written).
fn hex_lower(s: &str, out: &mut [u8]) -> Result<(), ()> {
    if s.len() != 2 * out.len() || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(());
    }
    hex::decode_to_slice(s, out).map_err(|_| ())
}

/// Reads one share file as key files are read (`FileKek::load`): one open without
/// following a symlink or blocking, a regular file of this user or root, mode 0600 or
/// tighter, at most [`MAX_SHARE_FILE`] bytes into a zeroized buffer.
fn read_share(path: &Path) -> Result<Share, KeyError> {
    let err = |reason: String| KeyError::ShareFile {
        path: path.display().to_string(),
        reason,
    };
    let buf =
        crate::localfile::read_private(path, MAX_SHARE_FILE, "a sealfs share file").map_err(err)?;
    let mut s = parse_share(&buf).map_err(err)?;
    s.path = path.display().to_string();
    Ok(s)
}

/// Checks that the shares belong to one ceremony, once each, and are enough.
fn check_set(shares: &[Share]) -> Result<Threshold, KeyError> {
    let first = shares
        .first()
        .ok_or_else(|| KeyError::Shares("no share files given".into()))?;
    let cid = hex::encode(first.ceremony);
    for s in &shares[1..] {
        if s.ceremony != first.ceremony {
            return Err(KeyError::Shares(format!(
                "{} and {} are shares of two different key ceremonies ({cid} and {}); \
                 shares of different ceremonies never combine",
                first.path,
                s.path,
                hex::encode(s.ceremony)
            )));
        }
        if s.t != first.t || s.key_check != first.key_check {
            return Err(KeyError::Shares(format!(
                "{} and {} disagree on the threshold or key check of ceremony {cid}: \
                 one of them was altered",
                first.path, s.path
            )));
        }
    }
    let t = first.t;
    if shares.len() > usize::from(t.n) {
        return Err(KeyError::Shares(format!(
            "{} share files given, but ceremony {cid} made only {}",
            shares.len(),
            t.n
        )));
    }
    for (i, a) in shares.iter().enumerate() {
        if let Some(b) = shares[i + 1..].iter().find(|b| b.index == a.index) {
            return Err(KeyError::Shares(format!(
                "{} and {} are both share {} of ceremony {cid}: give each share once",
                a.path, b.path, a.index
            )));
        }
    }
    if shares.len() < usize::from(t.k) {
        return Err(KeyError::Shares(format!(
            "{} of the {} shares of ceremony {cid} given; {} are needed ({t})",
            shares.len(),
            t.n,
            t.k
        )));
    }
    Ok(t)
}

/// Combines the shares at `paths` into the KEK they split and returns its wrapping key (in
/// locked memory). All given shares are used (more than K must agree with each other); the
/// result is used only when it matches the ceremony's key check.
pub fn load(paths: &[PathBuf]) -> Result<FileKek, KeyError> {
    let shares = paths
        .iter()
        .map(|p| read_share(p))
        .collect::<Result<Vec<_>, _>>()?;
    let t = check_set(&shares)?;
    let mut key: WholeKey = Locked::new([0u8; DEK_LEN])?;
    let points: Vec<(u8, &[u8; DEK_LEN])> = shares.iter().map(|s| (s.index, &*s.y)).collect();
    combine(&points, &mut key)?;
    let expected = shares[0].key_check;
    if key_check(&key) != expected {
        return Err(KeyError::Shares(format!(
            "the shares {} combine to a key that fails ceremony {}'s key check: one of them \
             was altered (with its own check recomputed); no key was used",
            shares
                .iter()
                .map(|s| s.path.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            hex::encode(shares[0].ceremony)
        )));
    }
    Ok(FileKek::derive(&key, WRAP_INFO, key_id(t, &expected))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(k: u8, n: u8) -> Threshold {
        Threshold { k, n }
    }

    fn combined(points: &[(u8, &[u8; 32])]) -> [u8; 32] {
        let mut out = [0u8; 32];
        combine(points, &mut out).unwrap();
        out
    }

    #[test]
    fn thresholds_parse_strictly() {
        assert_eq!("2-of-3".parse::<Threshold>(), Ok(t(2, 3)));
        assert_eq!("255-of-255".parse::<Threshold>(), Ok(t(255, 255)));
        for bad in [
            "1-of-3", "3-of-2", "0-of-0", "2-of-256", "02-of-3", "2of3", "2-of-", "-of-3",
            "+2-of-3", "2-of-3 ",
        ] {
            assert!(bad.parse::<Threshold>().is_err(), "{bad} accepted");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any K of the N shares, in any order, give the key back; so do more than K.
        #[test]
        fn any_k_shares_in_any_order_rebuild_the_key(
            key in any::<[u8; 32]>(),
            (k, n) in (2u8..=8).prop_flat_map(|n| (2..=n, Just(n))),
            seed in any::<u64>(),
            extra in 0usize..8,
        ) {
            let ys = split(&key, t(k, n)).unwrap();
            // A pseudo-random order of all indices from `seed`.
            let mut order: Vec<u8> = (1..=n).collect();
            let mut s = seed;
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            let m = (usize::from(k) + extra).min(usize::from(n));
            let points: Vec<(u8, &[u8; 32])> =
                order[..m].iter().map(|&x| (x, &ys[usize::from(x) - 1])).collect();
            prop_assert_eq!(combined(&points), key);
        }

        /// K − 1 shares leave every key byte open: whatever the guess, exactly one value of
        /// a K-th share makes it the secret (Shamir's secrecy, checked on the first byte).
        #[test]
        fn k_minus_one_shares_do_not_fix_a_byte(
            key in any::<[u8; 32]>(),
            (k, n) in (2u8..=6).prop_flat_map(|n| (2..=n, Just(n))),
            guess in any::<u8>(),
        ) {
            let ys = split(&key, t(k, n)).unwrap();
            let known: Vec<Vec<u8>> = (1..k).map(|x| vec![x, ys[usize::from(x) - 1][0]]).collect();
            let completing = (0..=255u8)
                .filter(|&yk| {
                    let mut all = known.clone();
                    all.push(vec![k, yk]);
                    Gf256::combine_bytes(&all).unwrap()[0] == guess
                })
                .count();
            prop_assert_eq!(completing, 1);
        }
    }

    #[test]
    fn split_refills_every_byte_and_shares_differ() {
        let key = [7u8; 32];
        let a = split(&key, t(2, 3)).unwrap();
        let b = split(&key, t(2, 3)).unwrap();
        assert_ne!(a[0], b[0], "fresh coefficients each time");
        assert!(a.iter().all(|y| y != &key), "no share is the key");
    }

    fn ceremony_files(k: u8, n: u8) -> (tempfile::TempDir, Ceremony) {
        let dir = tempfile::tempdir().unwrap();
        let c = keygen(t(k, n), &dir.path().join("shares")).unwrap();
        (dir, c)
    }

    #[test]
    fn keygen_writes_n_private_files_and_any_k_open_the_same_key() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, c) = ceremony_files(2, 3);
        let sdir = dir.path().join("shares");
        assert_eq!(
            std::fs::metadata(&sdir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let mut names: Vec<_> = std::fs::read_dir(&sdir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["share-1-of-3", "share-2-of-3", "share-3-of-3"]);
        for f in &c.files {
            assert_eq!(
                std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let f = &c.files;
        let ids: Vec<String> = [
            vec![f[0].clone(), f[1].clone()],
            vec![f[2].clone(), f[0].clone()],
            vec![f[1].clone(), f[2].clone()],
            vec![f[2].clone(), f[1].clone(), f[0].clone()],
        ]
        .iter()
        .map(|set| load(set).unwrap().id().to_string())
        .collect();
        assert!(
            ids.iter().all(|i| i == &c.key_id),
            "{ids:?} vs {}",
            c.key_id
        );
        assert!(c.key_id.starts_with("shares:2-of-3:"));
        // And they really are the same key: a wrap under one subset opens under another.
        let mut ctx = crate::format::EncryptionContext::new();
        ctx.insert("a".into(), "b".into());
        let dek = crate::crypto::Dek::random().unwrap();
        let w = load(&f[..2]).unwrap().wrap(&dek, &ctx);
        assert_eq!(
            load(&f[1..]).unwrap().unwrap(&w, &ctx).unwrap().expose(),
            dek.expose()
        );
    }

    fn err_of(paths: &[PathBuf]) -> String {
        match load(paths) {
            Ok(_) => panic!("{paths:?} accepted"),
            Err(e) => {
                let s = e.to_string();
                assert_eq!(s.lines().count(), 1, "one line: {s:?}");
                s
            }
        }
    }

    #[test]
    fn every_single_changed_byte_is_caught_and_names_the_file() {
        let (_dir, c) = ceremony_files(2, 3);
        let good = std::fs::read(&c.files[0]).unwrap();
        for i in 0..good.len() {
            for flip in [0x01u8, 0x20, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= flip;
                std::fs::write(&c.files[0], &bad).unwrap();
                let e = err_of(&c.files[..2]);
                let name = c.files[0].display().to_string();
                assert!(
                    e.starts_with(&format!("share file {name}: ")),
                    "byte {i} ^ {flip:#x}: {e}"
                );
            }
        }
        std::fs::write(&c.files[0], &good).unwrap();
        assert!(load(&c.files[..2]).is_ok());
    }

    #[test]
    fn a_share_altered_with_its_check_recomputed_never_gives_a_wrong_key() {
        let (_dir, c) = ceremony_files(2, 3);
        let text = std::fs::read_to_string(&c.files[0]).unwrap();
        let mut s = parse_share(text.as_bytes()).unwrap();
        s.y[0] ^= 1;
        let forged = share_text(&s.ceremony, s.index, s.t, &s.key_check, &s.y);
        std::fs::write(&c.files[0], forged.as_bytes()).unwrap();
        let e = err_of(&c.files[..2]);
        assert!(
            e.contains("fails ceremony") && e.contains("key check"),
            "{e}"
        );
        // With all three the two good ones disagree with it: still refused, not a wrong key.
        let e = err_of(&c.files);
        assert!(e.contains("key check"), "{e}");
    }

    #[test]
    fn set_errors_are_one_clear_line() {
        let (_d1, a) = ceremony_files(3, 5);
        let (_d2, b) = ceremony_files(3, 5);
        let e = err_of(&a.files[..2]);
        assert!(
            e.ends_with(&format!(
                "2 of the 5 shares of ceremony {} given; 3 are needed (3-of-5)",
                a.id
            )),
            "{e}"
        );
        let e = err_of(&[a.files[0].clone(), a.files[1].clone(), b.files[2].clone()]);
        assert!(e.contains("two different key ceremonies"), "{e}");
        let e = err_of(&[a.files[0].clone(), a.files[1].clone(), a.files[0].clone()]);
        assert!(e.contains("are both share 1 of ceremony"), "{e}");
        let mut six = a.files.clone();
        six.push(a.files[4].clone());
        let e = err_of(&six);
        assert!(e.contains("6 share files given, but ceremony"), "{e}");
        assert!(err_of(&[]).contains("no share files given"));
    }

    #[test]
    fn keygen_refuses_any_existing_share_file_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("share-2-of-3"), b"keep me").unwrap();
        let e = keygen(t(2, 3), d).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("share-2-of-3: already exists; refusing to overwrite it"),
            "{e}"
        );
        assert!(!d.join("share-1-of-3").exists(), "share 1 removed again");
        assert_eq!(std::fs::read(d.join("share-2-of-3")).unwrap(), b"keep me");
        // A symlink in the way is not followed either.
        std::fs::remove_file(d.join("share-2-of-3")).unwrap();
        std::os::unix::fs::symlink(d.join("elsewhere"), d.join("share-3-of-3")).unwrap();
        assert!(keygen(t(2, 3), d).is_err());
        assert!(!d.join("elsewhere").exists());
    }

    #[test]
    fn loose_mode_is_refused_as_for_key_files() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, c) = ceremony_files(2, 2);
        std::fs::set_permissions(&c.files[1], std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = err_of(&c.files);
        assert!(e.contains("mode 0640 gives group or others access"), "{e}");
        assert!(e.contains(&c.files[1].display().to_string()), "{e}");
    }

    #[test]
    fn shares_and_key_file_of_the_same_bytes_do_not_open_each_other() {
        let key = [9u8; 32];
        let file = FileKek::from_bytes(&key).unwrap();
        let shares = FileKek::derive(&key, WRAP_INFO, key_id(t(2, 3), &key_check(&key))).unwrap();
        let ctx = crate::format::EncryptionContext::new();
        let dek = crate::crypto::Dek::random().unwrap();
        assert!(shares.unwrap(&file.wrap(&dek, &ctx), &ctx).is_err());
        assert!(file.unwrap(&shares.wrap(&dek, &ctx), &ctx).is_err());
    }
}
