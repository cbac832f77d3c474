//! The key object: authenticated header, header MAC, wrapped DEK slots.
//!
//! ```text
//! magic "sealfs\0K" (8) | version u16 | header_len u16 |
//! header body (header_len bytes):
//!   suite u16 | chunk_log2 u8 | reserved u8 = 0 | file_id [16] | plaintext_size u64 |
//!   ctx_count u16 | ctx_count × (key_len u16, key, value_len u16, value), keys ascending |
//! header_mac [32] = HMAC-SHA256(mac_key, magic..end of body) |
//! slot_count u16 | slot_count × (kind u8, id_len u16, id, wrapped_len u16, wrapped)
//! ```
//! All integers big-endian. The MAC and the chunk AAD cover `magic..end of body` only, so a
//! rewrap replaces the slots without touching anything the chunks are bound to.

use std::collections::BTreeMap;

use super::{
    invalid, layout::Layout, FormatError, MAX_CHUNK_LOG2, MIN_CHUNK_LOG2,
    SUITE_AES256GCM_HKDF_SHA256, VERSION,
};

const KEY_MAGIC: &[u8; 8] = b"sealfs\0K";
const FIXED_LEN: usize = 12; // magic + version + header_len
pub const MAC_LEN: usize = 32;
const MAX_HEADER_LEN: usize = 16 * 1024;
const MAX_CONTEXT_PAIRS: usize = 64;
const MAX_CONTEXT_FIELD: usize = 1024;
const MAX_SLOTS: usize = 16;
const MAX_KEY_ID: usize = 2048;
const MAX_WRAPPED: usize = 4096;
/// Largest key object the parser can accept: the longest header, its MAC, and the most
/// slots at their longest. A store's GET of a key object is cut off past this.
pub const MAX_KEY_OBJECT_LEN: usize =
    FIXED_LEN + MAX_HEADER_LEN + MAC_LEN + 2 + MAX_SLOTS * (1 + 2 + MAX_KEY_ID + 2 + MAX_WRAPPED);

/// Reserved encryption context keys that sealfs sets itself.
pub const CTX_VERSION: &str = "sealfs:version";
pub const CTX_FILE_ID: &str = "sealfs:file-id";
pub const CTX_PATH: &str = "sealfs:path";
/// The model root a file was sealed as part of (docs/FORMAT.md, "Models"); absent on files
/// sealed before models existed, which are served as loose files.
pub const CTX_MODEL: &str = "sealfs:model";

/// The KMS encryption context: string pairs, ordered so that the encoding is canonical.
pub type EncryptionContext = BTreeMap<String, String>;

/// The authenticated part of the key object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub chunk_log2: u8,
    pub file_id: [u8; 16],
    pub plaintext_size: u64,
    pub context: EncryptionContext,
}

/// How a DEK copy is wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// An AWS KMS ciphertext blob; the id is the key ARN KMS reported.
    Kms = 1,
    /// AES-256-GCM under a local key file; the id is the KEK fingerprint.
    File = 2,
    /// Wrapped inside a PKCS#11 token (AES-GCM or RSA-OAEP); the id is the key's RFC 7512
    /// token and object attributes.
    Pkcs11 = 3,
    /// A Vault / OpenBao Transit ciphertext `vault:v<N>:<base64>`; the id is
    /// `transit:[NAMESPACE/]MOUNT/NAME`.
    Transit = 4,
    /// AES-256-GCM under a KEK split k-of-n into share files (`keys/shares.rs`); the id is
    /// `shares:<K>-of-<N>:<key check>`.
    Shares = 5,
}

/// One wrapped copy of the DEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    pub kind: SlotKind,
    pub key_id: String,
    pub wrapped: Vec<u8>,
}

/// A parsed key object. `authenticated` holds the exact bytes the MAC and the chunk AAD
/// cover; nothing here is trusted until the MAC verifies under the unwrapped DEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyObject {
    pub header: Header,
    pub authenticated: Vec<u8>,
    pub mac: [u8; MAC_LEN],
    pub slots: Vec<KeySlot>,
}

impl Header {
    /// The file's geometry.
    pub fn layout(&self) -> Layout {
        // parse() and the sealer both validated chunk_log2 and the size.
        Layout::new(self.chunk_log2, self.plaintext_size).expect("validated header")
    }

    /// The data object path this header was sealed for.
    pub fn path(&self) -> &str {
        self.context.get(CTX_PATH).map(String::as_str).unwrap_or("")
    }

    /// Encodes the authenticated bytes (magic through the end of the body).
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        validate_context(&self.context, &self.file_id)?;
        Layout::new(self.chunk_log2, self.plaintext_size)?;
        let mut body = Vec::with_capacity(64);
        body.extend_from_slice(&SUITE_AES256GCM_HKDF_SHA256.to_be_bytes());
        body.push(self.chunk_log2);
        body.push(0);
        body.extend_from_slice(&self.file_id);
        body.extend_from_slice(&self.plaintext_size.to_be_bytes());
        encode_context(&self.context, &mut body);
        if body.len() > MAX_HEADER_LEN {
            return Err(invalid(
                "header",
                format!("{} bytes exceeds {MAX_HEADER_LEN}", body.len()),
            ));
        }
        let mut out = Vec::with_capacity(FIXED_LEN + body.len());
        out.extend_from_slice(KEY_MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }
}

/// Canonical encoding of a context (also the AAD of local key-file wraps).
pub fn encode_context(ctx: &EncryptionContext, out: &mut Vec<u8>) {
    out.extend_from_slice(&(ctx.len() as u16).to_be_bytes());
    for (k, v) in ctx {
        for s in [k, v] {
            out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

fn validate_context(ctx: &EncryptionContext, file_id: &[u8; 16]) -> Result<(), FormatError> {
    if ctx.len() > MAX_CONTEXT_PAIRS {
        return Err(invalid(
            "encryption context",
            format!("more than {MAX_CONTEXT_PAIRS} pairs"),
        ));
    }
    for (k, v) in ctx {
        if k.is_empty() || k.len() > MAX_CONTEXT_FIELD || v.len() > MAX_CONTEXT_FIELD {
            return Err(invalid(
                "encryption context",
                format!("bad length for key {k:?}"),
            ));
        }
    }
    if ctx.get(CTX_VERSION).map(String::as_str) != Some("1") {
        return Err(invalid(
            "encryption context",
            format!("{CTX_VERSION} must be \"1\""),
        ));
    }
    if ctx.get(CTX_FILE_ID) != Some(&hex::encode(file_id)) {
        return Err(invalid(
            "encryption context",
            format!("{CTX_FILE_ID} does not match the file id"),
        ));
    }
    match ctx.get(CTX_PATH) {
        Some(p) if !p.is_empty() => Ok(()),
        _ => Err(invalid(
            "encryption context",
            format!("{CTX_PATH} is missing"),
        )),
    }
}

impl KeyObject {
    /// The key ids of its slots (for audit lines).
    pub fn key_ids(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.key_id.as_str()).collect()
    }

    /// Serializes the whole key object.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.authenticated.clone();
        out.extend_from_slice(&self.mac);
        out.extend_from_slice(&(self.slots.len() as u16).to_be_bytes());
        for s in &self.slots {
            out.push(s.kind as u8);
            out.extend_from_slice(&(s.key_id.len() as u16).to_be_bytes());
            out.extend_from_slice(s.key_id.as_bytes());
            out.extend_from_slice(&(s.wrapped.len() as u16).to_be_bytes());
            out.extend_from_slice(&s.wrapped);
        }
        out
    }

    /// Checks slot counts and sizes before writing (the parser enforces the same).
    pub fn validate_slots(slots: &[KeySlot]) -> Result<(), FormatError> {
        if slots.is_empty() || slots.len() > MAX_SLOTS {
            return Err(invalid(
                "key slots",
                format!("{} slots, need 1..={MAX_SLOTS}", slots.len()),
            ));
        }
        for s in slots {
            if s.key_id.is_empty() || s.key_id.len() > MAX_KEY_ID {
                return Err(invalid("key slot id", "empty or too long"));
            }
            if s.wrapped.is_empty() || s.wrapped.len() > MAX_WRAPPED {
                return Err(invalid("wrapped key", "empty or too long"));
            }
        }
        Ok(())
    }

    /// Strict parse: every length bounded, every reserved field zero, no trailing bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader { b: bytes, pos: 0 };
        if r.take(8, "key object magic")? != KEY_MAGIC {
            return Err(FormatError::BadMagic("key object"));
        }
        let version = r.u16("version")?;
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let header_len = r.u16("header length")? as usize;
        if header_len > MAX_HEADER_LEN {
            return Err(invalid(
                "header length",
                format!("{header_len} exceeds {MAX_HEADER_LEN}"),
            ));
        }
        let body_end = FIXED_LEN + header_len;
        if bytes.len() < body_end {
            return Err(FormatError::Truncated("header"));
        }
        let mut h = Reader {
            b: &bytes[..body_end],
            pos: FIXED_LEN,
        };
        let suite = h.u16("suite")?;
        if suite != SUITE_AES256GCM_HKDF_SHA256 {
            return Err(FormatError::UnsupportedSuite(suite));
        }
        let chunk_log2 = h.u8("chunk size")?;
        if !(MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&chunk_log2) {
            return Err(invalid(
                "chunk size",
                format!("2^{chunk_log2} out of range"),
            ));
        }
        if h.u8("reserved")? != 0 {
            return Err(invalid("header", "reserved byte is not zero"));
        }
        let mut file_id = [0u8; 16];
        file_id.copy_from_slice(h.take(16, "file id")?);
        let plaintext_size = h.u64("plaintext size")?;
        let pairs = h.u16("context count")? as usize;
        if pairs > MAX_CONTEXT_PAIRS {
            return Err(invalid("encryption context", format!("{pairs} pairs")));
        }
        let mut context = EncryptionContext::new();
        let mut prev: Option<String> = None;
        for _ in 0..pairs {
            let k = h.string("context key", MAX_CONTEXT_FIELD)?;
            let v = h.string("context value", MAX_CONTEXT_FIELD)?;
            if prev.as_ref().is_some_and(|p| *p >= k) {
                return Err(invalid("encryption context", "keys not strictly ascending"));
            }
            prev = Some(k.clone());
            context.insert(k, v);
        }
        if h.pos != body_end {
            return Err(invalid("header length", "does not match the header fields"));
        }
        let header = Header {
            chunk_log2,
            file_id,
            plaintext_size,
            context,
        };
        validate_context(&header.context, &header.file_id)?;
        Layout::new(chunk_log2, plaintext_size)?;

        r.pos = body_end;
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(r.take(MAC_LEN, "header MAC")?);
        let count = r.u16("slot count")? as usize;
        if count == 0 || count > MAX_SLOTS {
            return Err(invalid(
                "key slots",
                format!("{count} slots, need 1..={MAX_SLOTS}"),
            ));
        }
        let mut slots = Vec::with_capacity(count);
        for _ in 0..count {
            let kind = match r.u8("slot kind")? {
                1 => SlotKind::Kms,
                2 => SlotKind::File,
                3 => SlotKind::Pkcs11,
                4 => SlotKind::Transit,
                5 => SlotKind::Shares,
                k => return Err(invalid("slot kind", format!("unknown kind {k}"))),
            };
            let key_id = r.string("slot key id", MAX_KEY_ID)?;
            if key_id.is_empty() {
                return Err(invalid("slot key id", "empty"));
            }
            let n = r.u16("wrapped key length")? as usize;
            if n == 0 || n > MAX_WRAPPED {
                return Err(invalid("wrapped key", format!("length {n}")));
            }
            let wrapped = r.take(n, "wrapped key")?.to_vec();
            slots.push(KeySlot {
                kind,
                key_id,
                wrapped,
            });
        }
        if r.pos != bytes.len() {
            return Err(FormatError::TrailingBytes(bytes.len() - r.pos));
        }
        Ok(Self {
            header,
            authenticated: bytes[..body_end].to_vec(),
            mac,
            slots,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or(FormatError::Truncated(what))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, FormatError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, FormatError> {
        let s = self.take(2, what)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, FormatError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_be_bytes(a))
    }
    fn string(&mut self, what: &'static str, max: usize) -> Result<String, FormatError> {
        let n = self.u16(what)? as usize;
        if n > max {
            return Err(invalid(what, format!("length {n} exceeds {max}")));
        }
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| invalid(what, "not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> KeyObject {
        let file_id = [9u8; 16];
        let mut context = EncryptionContext::new();
        context.insert(CTX_VERSION.into(), "1".into());
        context.insert(CTX_FILE_ID.into(), hex::encode(file_id));
        context.insert(CTX_PATH.into(), "m/model.pt".into());
        context.insert("env".into(), "prod".into());
        let header = Header {
            chunk_log2: 20,
            file_id,
            plaintext_size: 12345,
            context,
        };
        KeyObject {
            authenticated: header.encode().unwrap(),
            header,
            mac: [1; 32],
            slots: vec![
                KeySlot {
                    kind: SlotKind::Kms,
                    key_id: "arn:aws:kms:x".into(),
                    wrapped: vec![5; 184],
                },
                KeySlot {
                    kind: SlotKind::File,
                    key_id: "file:abcd".into(),
                    wrapped: vec![6; 60],
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let k = sample();
        assert_eq!(KeyObject::parse(&k.to_bytes()), Ok(k));
    }

    #[test]
    fn shares_slot_is_kind_5() {
        let mut k = sample();
        k.slots.push(KeySlot {
            kind: SlotKind::Shares,
            key_id: "shares:2-of-3:00112233445566778899aabbccddeeff".into(),
            wrapped: vec![7; 60],
        });
        let mut b = k.to_bytes();
        // The last slot's kind byte: 1 + 2 + id + 2 + 60 bytes from the end.
        let at = b.len() - (1 + 2 + k.slots[2].key_id.len() + 2 + 60);
        assert_eq!(KeyObject::parse(&b), Ok(k));
        assert_eq!(b[at], 5);
        b[at] = 6;
        assert!(KeyObject::parse(&b).is_err(), "unknown kinds stay refused");
    }

    #[test]
    fn transit_slot_round_trips_as_kind_4() {
        let mut k = sample();
        k.slots = vec![KeySlot {
            kind: SlotKind::Transit,
            key_id: "transit:transit/models".into(),
            wrapped: b"vault:v2:AAAA".to_vec(),
        }];
        let b = k.to_bytes();
        assert_eq!(b[k.authenticated.len() + MAC_LEN + 2], 4);
        assert_eq!(KeyObject::parse(&b), Ok(k));
    }

    #[test]
    fn strictness() {
        let b = sample().to_bytes();
        let mut v = b.clone();
        v[9] = 2;
        assert_eq!(
            KeyObject::parse(&v),
            Err(FormatError::UnsupportedVersion(2))
        );
        let mut v = b.clone();
        v[13] = 9;
        assert_eq!(KeyObject::parse(&v), Err(FormatError::UnsupportedSuite(9)));
        let mut v = b.clone();
        v.push(0);
        assert_eq!(KeyObject::parse(&v), Err(FormatError::TrailingBytes(1)));
        assert_eq!(
            KeyObject::parse(&b[..b.len() - 1]),
            Err(FormatError::Truncated("wrapped key"))
        );
        assert_eq!(
            KeyObject::parse(&b[..5]),
            Err(FormatError::Truncated("key object magic"))
        );
        let mut v = b.clone();
        v[10] = 0xff; // header_len beyond the bound
        assert!(matches!(
            KeyObject::parse(&v),
            Err(FormatError::Invalid {
                field: "header length",
                ..
            })
        ));
        let mut v = b.clone();
        v[0] = b'X';
        assert_eq!(
            KeyObject::parse(&v),
            Err(FormatError::BadMagic("key object"))
        );
    }

    #[test]
    fn context_must_carry_the_reserved_pairs() {
        let mut k = sample();
        k.header.context.remove(CTX_PATH);
        assert!(k.header.encode().is_err());
        let mut k = sample();
        k.header.context.insert(CTX_FILE_ID.into(), "00".into());
        assert!(k.header.encode().is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = KeyObject::parse(&b);
        }

        #[test]
        fn mutated_objects_never_panic(pos in 0usize..400, val in any::<u8>(), cut in 0usize..400) {
            let mut b = sample().to_bytes();
            let p = pos % b.len();
            b[p] = val;
            b.truncate(b.len() - (cut % b.len()));
            let _ = KeyObject::parse(&b);
        }
    }
}
