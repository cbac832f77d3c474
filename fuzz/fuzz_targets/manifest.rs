//! Model manifests: the plaintext of `ROOT/.sealfs-manifest` is whatever its sealer wrote (a
//! publisher, or a bucket writer holding a key). `Manifest::parse` never panics, what it
//! accepts names its root and each path once, and it re-encodes to a manifest that parses to
//! the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealfs::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    // `ROOT\0JSON`, or JSON alone for the corpus's model root.
    let (root, json) = match data.iter().position(|&b| b == 0) {
        Some(i) => match std::str::from_utf8(&data[..i]) {
            Ok(root) => (root, &data[i + 1..]),
            Err(_) => return,
        },
        None => ("models/llama3", data),
    };
    let Ok(m) = Manifest::parse(json, root) else {
        return;
    };
    assert_eq!(m.model, root);
    assert_eq!(
        Manifest::parse(&m.to_bytes(), root).as_ref(),
        Ok(&m),
        "the re-encoded manifest differs"
    );
    for f in &m.files {
        assert!(
            std::ptr::eq(m.file(&f.path).unwrap(), f),
            "a path listed twice"
        );
        assert_eq!(f.chunk_digests().len(), f.chunks.len());
    }
});
