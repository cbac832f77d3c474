//! Object names: the key object sits beside its data object, and its name carries the
//! chunk size, because a LIST returns names and sizes only and the plaintext size of a
//! data object cannot be computed without the chunk size (docs/FORMAT.md, "Why two objects").

use super::{MAX_CHUNK_LOG2, MIN_CHUNK_LOG2};

const KEY_SUFFIX: &str = ".sealfs-c";

/// Name of the key object of the data object `data_key` sealed with chunk size 2^`log2`.
pub fn key_object_name(data_key: &str, chunk_log2: u8) -> String {
    format!("{data_key}{KEY_SUFFIX}{chunk_log2}")
}

/// If `name` is a key object's name, its data object's name and chunk size exponent.
pub fn parse_key_object_name(name: &str) -> Option<(&str, u8)> {
    let at = name.rfind(KEY_SUFFIX)?;
    let digits = &name[at + KEY_SUFFIX.len()..];
    if digits.is_empty() || digits.len() > 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let log2: u8 = digits.parse().ok()?;
    let data = &name[..at];
    let base = data.rsplit('/').next().unwrap_or(data);
    if base.is_empty() || !(MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&log2) {
        return None;
    }
    Some((data, log2))
}

/// True if a plaintext file with this name could not be sealed without its data object
/// being mistaken for a key object.
pub fn is_reserved_name(name: &str) -> bool {
    name.contains(KEY_SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(key_object_name("a/b.pt", 20), "a/b.pt.sealfs-c20");
        assert_eq!(
            parse_key_object_name("a/b.pt.sealfs-c20"),
            Some(("a/b.pt", 20))
        );
        assert_eq!(parse_key_object_name("b.sealfs-c14"), Some(("b", 14)));
    }

    #[test]
    fn non_key_names_are_not_parsed() {
        for n in [
            "a/b.pt",
            "b.sealfs-c",
            "b.sealfs-c9",
            "b.sealfs-c30",
            "b.sealfs-c2x",
            "a/.sealfs-c20",
            ".sealfs-c20",
            "b.sealfs-c020",
        ] {
            assert_eq!(parse_key_object_name(n), None, "{n}");
        }
        assert!(is_reserved_name("x.sealfs-c20"));
        assert!(!is_reserved_name("model.safetensors"));
    }
}
