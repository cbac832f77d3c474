//! Every tampering row of the bad-input table (design §5) against a local store: each case
//! flips, truncates, extends, swaps or withholds something, then checks the exact error and
//! exit code of `unseal` and `verify`, and that no plaintext file (or temporary) was left.

mod common;

use std::path::{Path, PathBuf};

use common::*;

const C: usize = 16 * 1024;
const SIZE: usize = 3 * C + 100; // four chunks, the last one short

struct Sealed {
    dir: tempfile::TempDir,
}

impl Sealed {
    /// Files `a` and `b` (same size, different bytes) and `c` sealed under key files k1 + k2.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("a"), pattern(SIZE, 1)).unwrap();
        std::fs::write(src.join("b"), pattern(SIZE, 2)).unwrap();
        std::fs::write(src.join("c"), pattern(100, 3)).unwrap();
        let s = Self { dir };
        for k in ["k1", "k2", "other"] {
            expect_code(&sealfs(&["keygen", &s.p(k)], &[]), 0);
        }
        let args = [
            "seal",
            &s.p("src"),
            &s.p("sealed"),
            "--key",
            &s.key("k1"),
            "--key",
            &s.key("k2"),
            "--context",
            "env=test",
            "--chunk-size",
            "16KiB",
        ];
        expect_code(&sealfs(&args, &[]), 0);
        s
    }
    fn p(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }
    fn key(&self, name: &str) -> String {
        format!("file:{}", self.p(name))
    }
    fn obj(&self, rel: &str) -> PathBuf {
        self.dir.path().join("sealed").join(rel)
    }
    fn edit(&self, rel: &str, f: impl FnOnce(&mut Vec<u8>)) {
        let mut b = std::fs::read(self.obj(rel)).unwrap();
        f(&mut b);
        std::fs::write(self.obj(rel), b).unwrap();
    }

    /// Unseals `a` with `key`: asserts the exit code, the error text, and that the output
    /// directory holds nothing at all afterwards.
    /// `sealfs unseal` of file `a` with key file `key` to `out`.
    fn unseal_a(&self, key: &str, out: &str) -> std::process::Output {
        let a = self.obj("a").display().to_string();
        sealfs(&["unseal", &a, out, "--key", &self.key(key)], &[])
    }

    fn refuses(&self, key: &str, code: i32, msg: &str) {
        let out_dir = self.dir.path().join("out");
        std::fs::create_dir_all(&out_dir).unwrap();
        let t = expect_code(&self.unseal_a(key, &self.p("out/a")), code);
        assert!(t.contains(msg), "expected {msg:?} in: {t}");
        assert_eq!(
            t.lines()
                .filter(|l| l.starts_with("sealfs: error:"))
                .count(),
            1,
            "{t}"
        );
        let left: Vec<_> = std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "no plaintext may be left behind: {left:?}");
    }

    fn verify_says(&self, code: i32, msg: &str) {
        let t = expect_code(
            &sealfs(
                &["verify", &self.p("sealed"), "--key", &self.key("k1")],
                &[],
            ),
            code,
        );
        assert!(t.contains(msg), "expected {msg:?} in: {t}");
        assert!(
            t.contains("ok    ") && t.contains("/c ("),
            "other files still verify: {t}"
        );
    }
}

fn cipher_off(i: usize) -> usize {
    32 + i * (C + 16)
}

#[test]
fn untouched_files_open() {
    let s = Sealed::new();
    let out = s.p("a.out");
    expect_code(&s.unseal_a("k2", &out), 0);
    assert_eq!(std::fs::read(out).unwrap(), pattern(SIZE, 1));
}

#[test]
fn body_bit_flip_names_the_chunk() {
    let s = Sealed::new();
    s.edit("a", |b| b[cipher_off(1) + 5] ^= 0x01);
    // The model manifest's chunk digest notices first (then the AEAD tag would).
    s.refuses("k1", 3, "chunk 1 differs from the model manifest");
    s.verify_says(3, "chunks failed authentication: 1");
}

#[test]
fn tag_bit_flip_in_the_last_chunk() {
    let s = Sealed::new();
    s.edit("a", |b| *b.last_mut().unwrap() ^= 0x80);
    // The model manifest's chunk digest notices first (then the AEAD tag would).
    s.refuses("k1", 3, "chunk 3 differs from the model manifest");
}

#[test]
fn truncation_by_one_byte() {
    let s = Sealed::new();
    s.edit("a", |b| {
        b.pop();
    });
    s.refuses("k1", 3, "truncated or extended");
    s.verify_says(3, "truncated or extended");
}

#[test]
fn truncation_at_a_chunk_boundary() {
    let s = Sealed::new();
    s.edit("a", |b| b.truncate(cipher_off(3)));
    s.refuses("k1", 3, "truncated or extended");
}

#[test]
fn extension_by_a_byte_and_by_a_chunk() {
    let s = Sealed::new();
    s.edit("a", |b| b.push(0));
    s.refuses("k1", 3, "truncated or extended");
    let s = Sealed::new();
    s.edit("a", |b| {
        let chunk = b[cipher_off(0)..cipher_off(1)].to_vec();
        b.extend_from_slice(&chunk);
    });
    s.refuses("k1", 3, "truncated or extended");
}

#[test]
fn chunk_reorder() {
    let s = Sealed::new();
    s.edit("a", |b| {
        let (c0, c1) = (
            b[cipher_off(0)..cipher_off(1)].to_vec(),
            b[cipher_off(1)..cipher_off(2)].to_vec(),
        );
        b[cipher_off(0)..cipher_off(1)].copy_from_slice(&c1);
        b[cipher_off(1)..cipher_off(2)].copy_from_slice(&c0);
    });
    // The model manifest's chunk digest notices first (then the AEAD tag would).
    s.refuses("k1", 3, "chunk 0 differs from the model manifest");
    s.verify_says(3, "chunks failed authentication: 0, 1");
}

#[test]
fn chunk_spliced_from_another_file() {
    let s = Sealed::new();
    let other = std::fs::read(s.obj("b")).unwrap();
    s.edit("a", |b| {
        b[cipher_off(2)..cipher_off(3)].copy_from_slice(&other[cipher_off(2)..cipher_off(3)])
    });
    // The model manifest's chunk digest notices first (then the AEAD tag would).
    s.refuses("k1", 3, "chunk 2 differs from the model manifest");
}

#[test]
fn data_object_swapped_under_its_key_object() {
    let s = Sealed::new();
    std::fs::copy(s.obj("b"), s.obj("a")).unwrap();
    s.refuses("k1", 3, "data object belongs to another file");
}

#[test]
fn whole_file_copied_over_another_path() {
    let s = Sealed::new();
    std::fs::copy(s.obj("b"), s.obj("a")).unwrap();
    std::fs::copy(s.obj("b.sealfs-c14"), s.obj("a.sealfs-c14")).unwrap();
    s.refuses("k1", 3, "sealed for path \"b\"");
}

#[test]
fn prelude_bit_flip() {
    let s = Sealed::new();
    s.edit("a", |b| b[3] ^= 0x20);
    s.refuses("k1", 3, "not a sealfs data object (bad magic)");
}

#[test]
fn header_bit_flip_in_the_context() {
    let s = Sealed::new();
    // "env" = "test": flip a byte of the value; the header still parses.
    s.edit("a.sealfs-c14", |b| {
        let at = b.windows(4).position(|w| w == b"test").unwrap();
        b[at] ^= 0x01;
    });
    // The manifest's header digest notices first (then the header MAC would).
    s.refuses("k1", 3, "not the version the manifest lists");
}

#[test]
fn header_bit_flip_in_the_file_id_and_size() {
    let s = Sealed::new();
    s.edit("a.sealfs-c14", |b| b[12 + 4] ^= 0x01); // first byte of the file id
    s.refuses("k1", 3, "sealfs:file-id does not match the file id");
    let s = Sealed::new();
    s.edit("a.sealfs-c14", |b| b[12 + 4 + 16 + 7] ^= 0x01); // low byte of the plaintext size
    s.refuses("k1", 3, "truncated or extended");
}

#[test]
fn key_object_unknown_version_garbage_and_truncation() {
    let s = Sealed::new();
    s.edit("a.sealfs-c14", |b| b[9] = 2);
    s.refuses("k1", 3, "unsupported format version 2");
    let s = Sealed::new();
    std::fs::write(s.obj("a.sealfs-c14"), pattern(300, 9)).unwrap();
    s.refuses("k1", 3, "not a sealfs key object (bad magic)");
    let s = Sealed::new();
    s.edit("a.sealfs-c14", |b| b.truncate(b.len() - 3));
    s.refuses("k1", 3, "truncated wrapped key");
}

#[test]
fn key_object_name_lies_about_the_chunk_size() {
    let s = Sealed::new();
    std::fs::rename(s.obj("a.sealfs-c14"), s.obj("a.sealfs-c15")).unwrap();
    s.refuses(
        "k1",
        3,
        "key object name says chunk size 2^15, header says 2^14",
    );
}

#[test]
fn wrong_key_is_refused_before_any_unwrap() {
    let s = Sealed::new();
    s.refuses("other", 4, "no trusted key can open it");
}

#[test]
fn wrapped_key_bit_flip() {
    let s = Sealed::new();
    s.edit("a.sealfs-c14", |b| {
        let n = b.len();
        b[n - 30] ^= 0x01; // inside the last slot (k2)
    });
    s.refuses("k2", 3, "did not authenticate");
}

/// Key commitment: a malicious sealer puts a different DEK in the second slot, so that
/// holders of k2 would read other plaintext than holders of k1. The header MAC, keyed from
/// the DEK, refuses that DEK.
#[test]
fn slots_wrapping_different_deks_fail_the_header_mac() {
    use sealfs::format::KeyObject;
    use sealfs::keys::file::FileKek;
    let s = Sealed::new();
    let k2 = FileKek::load(Path::new(&s.p("k2"))).unwrap();
    s.edit("a.sealfs-c14", |b| {
        let mut ko = KeyObject::parse(b).unwrap();
        let other = sealfs::crypto::Dek::random().unwrap();
        let slot = ko.slots.iter_mut().find(|sl| sl.key_id == k2.id()).unwrap();
        slot.wrapped = k2.wrap(&other, &ko.header.context);
        *b = ko.to_bytes();
    });
    s.refuses("k2", 3, "header authentication failed");
    let out = s.p("a.k1");
    expect_code(&s.unseal_a("k1", &out), 0);
}

#[test]
fn missing_key_object_hides_the_file() {
    let s = Sealed::new();
    std::fs::remove_file(s.obj("a.sealfs-c14")).unwrap();
    let t = expect_code(&sealfs(&["inspect", &s.p("sealed")], &[]), 0);
    assert!(t.contains("not sealed: a"), "{t}");
    let t = expect_code(
        &sealfs(
            &[
                "unseal",
                &s.obj("a").display().to_string(),
                &s.p("x"),
                "--key",
                &s.key("k1"),
            ],
            &[],
        ),
        2,
    );
    assert!(t.contains("nothing sealed found"), "{t}");
}
