//! Offset math: spans tile the requested range exactly, and object size inverts.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sealfs::format::Layout;

fuzz_target!(|input: (u8, u64, u64, u32)| {
    let (log2, size, offset, len) = input;
    let Ok(l) = Layout::new(14 + log2 % 13, size % (1 << 40)) else {
        return;
    };
    assert_eq!(
        Layout::from_object_size(l.chunk_log2(), l.object_size()),
        Some(l)
    );
    let spans = l.spans(offset, len as u64);
    let end = offset.saturating_add(len as u64).min(l.plaintext_size());
    let total: u64 = spans.iter().map(|s| s.len as u64).sum();
    assert_eq!(total, end.saturating_sub(offset.min(end)));
    for s in spans {
        assert!(s.skip + s.len <= l.chunk_plain_len(s.index));
    }
});
