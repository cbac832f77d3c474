//! Offset math between plaintext and the data object (gocryptfs `offsets.go` style).
//!
//! Data object: `prelude (32) || chunk_0 || … || chunk_{n-1}`, each chunk
//! `ciphertext(len_i) || tag(16)`; every chunk but the last holds exactly `C` plaintext
//! bytes, the last holds `1..=C` (or 0 for an empty file, which still has one chunk so that
//! its length is authenticated).

use super::{invalid, FormatError, MAX_CHUNK_LOG2, MIN_CHUNK_LOG2, TAG_LEN, VERSION};

/// Length of the data object prelude.
pub const PRELUDE_LEN: u64 = 32;
const DATA_MAGIC: &[u8; 8] = b"sealfs\0D";

/// The geometry of one sealed file: chunk size and plaintext size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    chunk_log2: u8,
    plaintext_size: u64,
}

/// One chunk's share of a plaintext range: read `len` bytes starting `skip` bytes into
/// chunk `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    pub index: u64,
    pub skip: usize,
    pub len: usize,
}

impl Layout {
    pub fn new(chunk_log2: u8, plaintext_size: u64) -> Result<Self, FormatError> {
        check_chunk_log2(chunk_log2)?;
        // Keeps every offset below u64::MAX; 2^62 bytes is far beyond any model file.
        if plaintext_size > (1 << 62) {
            return Err(invalid(
                "plaintext size",
                format!("{plaintext_size} exceeds 2^62"),
            ));
        }
        Ok(Self {
            chunk_log2,
            plaintext_size,
        })
    }

    /// The layout that a data object of `object_size` bytes must have: this is how a LIST
    /// alone gives the plaintext size. `None` if no plaintext size maps to that object size.
    pub fn from_object_size(chunk_log2: u8, object_size: u64) -> Option<Self> {
        check_chunk_log2(chunk_log2).ok()?;
        let body = object_size.checked_sub(PRELUDE_LEN)?;
        let c = 1u64 << chunk_log2;
        let full = body / (c + TAG_LEN);
        let rem = body % (c + TAG_LEN);
        let plaintext_size = match (full, rem) {
            (0, r) if r == TAG_LEN => 0,
            (f, 0) if f > 0 => f * c,
            (f, r) if r > TAG_LEN => f * c + (r - TAG_LEN),
            _ => return None,
        };
        Self::new(chunk_log2, plaintext_size).ok()
    }

    pub fn chunk_log2(&self) -> u8 {
        self.chunk_log2
    }

    pub fn chunk_size(&self) -> u64 {
        1 << self.chunk_log2
    }

    pub fn plaintext_size(&self) -> u64 {
        self.plaintext_size
    }

    /// Number of chunks: at least one, so that an empty file has an authenticated end.
    pub fn chunk_count(&self) -> u64 {
        self.plaintext_size.div_ceil(self.chunk_size()).max(1)
    }

    pub fn last_index(&self) -> u64 {
        self.chunk_count() - 1
    }

    pub fn is_last(&self, index: u64) -> bool {
        index == self.last_index()
    }

    /// Plaintext bytes in chunk `index` (which must exist).
    pub fn chunk_plain_len(&self, index: u64) -> usize {
        assert!(
            index < self.chunk_count(),
            "BUG: chunk {index} beyond the last"
        );
        let start = index << self.chunk_log2;
        (self.plaintext_size - start).min(self.chunk_size()) as usize
    }

    /// Ciphertext bytes (plaintext + tag) of chunk `index`.
    pub fn chunk_cipher_len(&self, index: u64) -> u64 {
        self.chunk_plain_len(index) as u64 + TAG_LEN
    }

    /// Offset of chunk `index` in the data object.
    pub fn chunk_cipher_offset(&self, index: u64) -> u64 {
        PRELUDE_LEN + index * (self.chunk_size() + TAG_LEN)
    }

    /// Data object byte range `[start, end)` holding chunks `first..=last`.
    pub fn cipher_range(&self, first: u64, last: u64) -> (u64, u64) {
        let start = self.chunk_cipher_offset(first);
        (
            start,
            self.chunk_cipher_offset(last) + self.chunk_cipher_len(last),
        )
    }

    /// Total size of the data object.
    pub fn object_size(&self) -> u64 {
        PRELUDE_LEN + self.plaintext_size + TAG_LEN * self.chunk_count()
    }

    /// Splits the plaintext range `[offset, offset+len)`, clipped to the file, into chunk
    /// spans. Empty when the range starts at or past the end.
    pub fn spans(&self, offset: u64, len: u64) -> Vec<ChunkSpan> {
        let end = offset.saturating_add(len).min(self.plaintext_size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let index = pos >> self.chunk_log2;
            let skip = (pos - (index << self.chunk_log2)) as usize;
            let take = (self.chunk_plain_len(index) - skip).min((end - pos) as usize);
            out.push(ChunkSpan {
                index,
                skip,
                len: take,
            });
            pos += take as u64;
        }
        out
    }
}

fn check_chunk_log2(log2: u8) -> Result<(), FormatError> {
    if (MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&log2) {
        Ok(())
    } else {
        Err(invalid(
            "chunk size",
            format!("2^{log2} is outside 2^{MIN_CHUNK_LOG2}..=2^{MAX_CHUNK_LOG2}"),
        ))
    }
}

/// The data object's first 32 bytes: identifies the object and ties it to its header.
/// Not authenticated by itself; every field is compared with the authenticated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prelude {
    pub version: u16,
    pub chunk_log2: u8,
    pub file_id: [u8; 16],
}

impl Prelude {
    pub fn to_bytes(&self) -> [u8; PRELUDE_LEN as usize] {
        let mut b = [0u8; PRELUDE_LEN as usize];
        b[..8].copy_from_slice(DATA_MAGIC);
        b[8..10].copy_from_slice(&self.version.to_be_bytes());
        b[10] = self.chunk_log2;
        b[16..32].copy_from_slice(&self.file_id);
        b
    }

    pub fn parse(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < PRELUDE_LEN as usize {
            return Err(FormatError::Truncated("data object prelude"));
        }
        if &b[..8] != DATA_MAGIC {
            return Err(FormatError::BadMagic("data object"));
        }
        let version = u16::from_be_bytes([b[8], b[9]]);
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if b[11..16].iter().any(|&x| x != 0) {
            return Err(invalid("prelude", "reserved bytes are not zero"));
        }
        check_chunk_log2(b[10])?;
        let mut file_id = [0u8; 16];
        file_id.copy_from_slice(&b[16..32]);
        Ok(Self {
            version,
            chunk_log2: b[10],
            file_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const C: u64 = 1 << 14;

    fn l(p: u64) -> Layout {
        Layout::new(14, p).unwrap()
    }

    #[test]
    fn sizes_at_chunk_edges() {
        // (plaintext, chunks, object size)
        let table = [
            (0, 1, 32 + 16),
            (1, 1, 32 + 1 + 16),
            (C - 1, 1, 32 + C - 1 + 16),
            (C, 1, 32 + C + 16),
            (C + 1, 2, 32 + C + 1 + 32),
            (3 * C, 3, 32 + 3 * C + 48),
            (3 * C + 7, 4, 32 + 3 * C + 7 + 64),
        ];
        for (p, n, s) in table {
            let lay = l(p);
            assert_eq!(lay.chunk_count(), n, "chunks of {p}");
            assert_eq!(lay.object_size(), s, "object size of {p}");
            assert_eq!(Layout::from_object_size(14, s), Some(lay), "inverse of {p}");
        }
    }

    #[test]
    fn impossible_object_sizes_are_rejected() {
        for s in [0, 31, 32, 33, 47, 32 + C + 16 + 1, 32 + C + 16 + 16] {
            assert_eq!(Layout::from_object_size(14, s), None, "size {s}");
        }
        assert_eq!(Layout::from_object_size(13, 48), None);
        assert_eq!(Layout::from_object_size(27, 48), None);
    }

    #[test]
    fn last_chunk_lengths() {
        assert_eq!(l(0).chunk_plain_len(0), 0);
        assert_eq!(l(C + 1).chunk_plain_len(0), C as usize);
        assert_eq!(l(C + 1).chunk_plain_len(1), 1);
        assert_eq!(l(2 * C).chunk_plain_len(1), C as usize);
        assert!(l(2 * C).is_last(1) && !l(2 * C).is_last(0));
    }

    #[test]
    fn span_table() {
        let lay = l(3 * C + 100);
        assert_eq!(
            lay.spans(0, 10),
            vec![ChunkSpan {
                index: 0,
                skip: 0,
                len: 10
            }]
        );
        assert_eq!(
            lay.spans(C - 5, 10),
            vec![
                ChunkSpan {
                    index: 0,
                    skip: (C - 5) as usize,
                    len: 5
                },
                ChunkSpan {
                    index: 1,
                    skip: 0,
                    len: 5
                }
            ]
        );
        assert_eq!(
            lay.spans(3 * C + 90, 1000),
            vec![ChunkSpan {
                index: 3,
                skip: 90,
                len: 10
            }],
            "clipped at end of file"
        );
        assert!(lay.spans(3 * C + 100, 10).is_empty());
        assert!(lay.spans(u64::MAX - 1, 10).is_empty());
        assert_eq!(lay.cipher_range(1, 2), (32 + C + 16, 32 + 3 * (C + 16)));
    }

    #[test]
    fn prelude_round_trip_and_strictness() {
        let p = Prelude {
            version: 1,
            chunk_log2: 20,
            file_id: [7; 16],
        };
        let b = p.to_bytes();
        assert_eq!(Prelude::parse(&b), Ok(p));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(
            Prelude::parse(&bad),
            Err(FormatError::BadMagic("data object"))
        );
        let mut bad = b;
        bad[9] = 2;
        assert_eq!(
            Prelude::parse(&bad),
            Err(FormatError::UnsupportedVersion(2))
        );
        let mut bad = b;
        bad[12] = 1;
        assert!(matches!(
            Prelude::parse(&bad),
            Err(FormatError::Invalid { .. })
        ));
        assert_eq!(
            Prelude::parse(&b[..31]),
            Err(FormatError::Truncated("data object prelude"))
        );
    }

    proptest! {
        #[test]
        fn object_size_inverts(log2 in MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2, p in 0u64..(1 << 40)) {
            let lay = Layout::new(log2, p).unwrap();
            prop_assert_eq!(Layout::from_object_size(log2, lay.object_size()), Some(lay));
        }

        #[test]
        fn spans_tile_the_range(p in 0u64..200_000, off in 0u64..210_000, len in 0u64..100_000) {
            let lay = l(p);
            let spans = lay.spans(off, len);
            let want = off.saturating_add(len).min(p).saturating_sub(off.min(p));
            prop_assert_eq!(spans.iter().map(|s| s.len as u64).sum::<u64>(), want);
            let mut pos = off;
            for s in &spans {
                prop_assert_eq!((s.index << 14) + s.skip as u64, pos);
                prop_assert!(s.len > 0 && s.skip + s.len <= lay.chunk_plain_len(s.index));
                pos += s.len as u64;
            }
        }
    }
}
