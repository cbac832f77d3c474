//! Object names: the key object sits beside its data object, and its name carries the
//! chunk size, because a LIST returns names and sizes only and the plaintext size of a
//! data object cannot be computed without the chunk size (docs/FORMAT.md, "Why two objects").

use super::{MAX_CHUNK_LOG2, MIN_CHUNK_LOG2};

const KEY_SUFFIX: &str = ".sealfs-c";
/// The directory segment that holds a later generation of the file beside it
/// (`dir/.sealfs-g2/name` is generation 2 of `dir/name`): `sealfs reseal` writes there, so
/// that the version readers hold stays in place until its model's new manifest switches.
pub const GEN_PREFIX: &str = ".sealfs-g";
/// Generations above this are not ones sealfs writes (a name that parses past it is a file).
pub const MAX_GENERATION: u32 = 999_999_999;

/// The object key of generation `g` of the file whose logical key is `logical` (generation
/// 0 is the logical key itself).
pub fn generation_key(logical: &str, g: u32) -> String {
    if g == 0 {
        return logical.to_string();
    }
    match logical.rsplit_once('/') {
        Some((dir, base)) => format!("{dir}/{GEN_PREFIX}{g}/{base}"),
        None => format!("{GEN_PREFIX}{g}/{logical}"),
    }
}

/// The logical key and generation of object key `key`: `dir/.sealfs-gN/name` is generation
/// N of `dir/name`; any other key is generation 0 of itself.
pub fn split_generation(key: &str) -> (String, u32) {
    let (head, base) = match key.rsplit_once('/') {
        Some(x) => x,
        None => return (key.to_string(), 0),
    };
    let (dir, seg) = match head.rsplit_once('/') {
        Some((d, s)) => (Some(d), s),
        None => (None, head),
    };
    match parse_generation(seg) {
        Some(g) => (
            match dir {
                Some(d) => format!("{d}/{base}"),
                None => base.to_string(),
            },
            g,
        ),
        None => (key.to_string(), 0),
    }
}

/// `N` of a `.sealfs-gN` segment (1 ≤ N, no leading zero).
fn parse_generation(seg: &str) -> Option<u32> {
    let digits = seg.strip_prefix(GEN_PREFIX)?;
    if digits.is_empty() || digits.len() > 9 || digits.starts_with('0') {
        return None;
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|g| *g <= MAX_GENERATION)
}

/// Name of the key object of the data object `data_key` sealed with chunk size 2^`log2`.
pub fn key_object_name(data_key: &str, chunk_log2: u8) -> String {
    format!("{data_key}{KEY_SUFFIX}{chunk_log2}")
}

/// The data object `key` belongs to: itself, or for a key object, its data object.
pub fn data_key(key: &str) -> &str {
    parse_key_object_name(key).map_or(key, |(d, _)| d)
}

/// `key` relative to `prefix` (no trailing `/`; "" is the store root), if it lies under it.
pub fn relative_to<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix.is_empty() {
        return Some(key);
    }
    key.strip_prefix(prefix)?.strip_prefix('/')
}

/// The directories above `key`, innermost first, down to the store root "".
pub fn dirs_above(key: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(Some(key), |d| {
        (!d.is_empty()).then(|| d.rsplit_once('/').map_or("", |(up, _)| up))
    })
    .skip(1)
}

/// The innermost directory above `key` for which `is_root` holds (a model root).
pub fn innermost_root(key: &str, is_root: impl Fn(&str) -> bool) -> Option<&str> {
    dirs_above(key).find(|d| is_root(d))
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
    name.contains(KEY_SUFFIX) || name.split('/').any(|s| s.starts_with(GEN_PREFIX))
}

/// Longest object key accepted from a store or written by seal (S3's own limit, in bytes).
pub const MAX_KEY_LEN: usize = 1024;
/// Longest path segment (Linux `NAME_MAX`): a longer one could never be a local file.
pub const MAX_SEGMENT_LEN: usize = 255;

/// Why an object key is not a clean relative path. Keys come from LIST answers and seal
/// destinations; only clean ones become directory entries, local paths or unseal outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    #[error("a path segment is longer than {MAX_SEGMENT_LEN} bytes")]
    SegmentTooLong,
    #[error("starts with '/'")]
    Absolute,
    #[error("has an empty path segment ('//' or a trailing '/')")]
    EmptySegment,
    #[error("has a '.' or '..' path segment")]
    DotSegment,
    #[error("has a control character")]
    Control,
    #[error("has a .sealfs-g segment that is not a generation directory")]
    Reserved,
}

/// Checks that `key` is a clean relative path: non-empty, at most [`MAX_KEY_LEN`] bytes,
/// `/`-separated segments that are neither empty, `.` nor `..`, each at most
/// [`MAX_SEGMENT_LEN`] bytes, and no control character (a newline could forge a log line).
pub fn check_key(key: &str) -> Result<(), NameError> {
    if key.is_empty() {
        return Err(NameError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(NameError::TooLong);
    }
    if key.chars().any(|c| c.is_control() || is_invisible(c)) {
        return Err(NameError::Control);
    }
    if key.starts_with('/') {
        return Err(NameError::Absolute);
    }
    for seg in key.split('/') {
        match seg {
            "" => return Err(NameError::EmptySegment),
            "." | ".." => return Err(NameError::DotSegment),
            s if s.len() > MAX_SEGMENT_LEN => return Err(NameError::SegmentTooLong),
            _ => {}
        }
    }
    Ok(())
}

/// Characters that reorder or break what a terminal shows (bidirectional overrides and
/// isolates, line and paragraph separators, zero-width marks): a name with one could show
/// as another name.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}'
    )
}

/// Store-supplied text (an error message from an S3 or KMS answer) made safe for one log
/// line or terminal line: control and invisible characters escaped, at most `max` bytes.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        if c.is_control() || is_invisible(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() >= max {
            out.push('…');
            break;
        }
    }
    out
}

/// A name as it may appear in a log line or `inspect` output: control characters, quotes
/// and backslashes escaped, so that no name can start a new line or close a field.
pub fn escaped(name: &str) -> String {
    name.escape_debug().to_string()
}

// Model objects: the manifest and its signature under a model root.

/// Name of a model's manifest (a sealed file) under the model root.
pub const MANIFEST_NAME: &str = ".sealfs-manifest";
/// Name of the publisher signature object (clear JSON) under the model root.
pub const SIGNATURE_NAME: &str = ".sealfs-manifest.sig";

/// The key of `name` under model root `root`.
pub fn under(root: &str, name: &str) -> String {
    if root.is_empty() {
        name.to_string()
    } else {
        format!("{root}/{name}")
    }
}

/// If `key` is a model's manifest, that model's root.
pub fn manifest_root(key: &str) -> Option<&str> {
    if key == MANIFEST_NAME {
        return Some("");
    }
    key.strip_suffix(MANIFEST_NAME)?.strip_suffix('/')
}

/// True for the names sealfs keeps for itself under a model root.
pub fn is_reserved(base: &str) -> bool {
    base == MANIFEST_NAME || base == SIGNATURE_NAME
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
        assert!(is_reserved_name("a/.sealfs-g2/x"));
        assert!(is_reserved_name(".sealfs-gx"));
        assert!(!is_reserved_name("model.safetensors"));
    }

    #[test]
    fn paths_above_and_below() {
        assert_eq!(dirs_above("a/b/c").collect::<Vec<_>>(), ["a/b", "a", ""]);
        assert_eq!(dirs_above("a").collect::<Vec<_>>(), [""]);
        assert_eq!(dirs_above("").count(), 0);
        assert_eq!(
            innermost_root("m/sub/x", |d| d == "m" || d.is_empty()),
            Some("m")
        );
        assert_eq!(innermost_root("x", |d| d == "m"), None);
        assert_eq!(relative_to("m/a/b", "m"), Some("a/b"));
        assert_eq!(relative_to("mx/a", "m"), None);
        assert_eq!(relative_to("a", ""), Some("a"));
        assert_eq!(data_key("a/b.sealfs-c20"), "a/b");
        assert_eq!(data_key("a/b"), "a/b");
    }

    #[test]
    fn generations_round_trip() {
        assert_eq!(generation_key("m/a/b.pt", 0), "m/a/b.pt");
        assert_eq!(generation_key("m/a/b.pt", 3), "m/a/.sealfs-g3/b.pt");
        assert_eq!(generation_key("b.pt", 12), ".sealfs-g12/b.pt");
        for (key, g) in [("m/a/b.pt", 7), ("b.pt", 1), ("m/.sealfs-manifest", 2)] {
            assert_eq!(
                split_generation(&generation_key(key, g)),
                (key.to_string(), g)
            );
        }
        for plain in [
            "m/a/b.pt",
            "m/.sealfs-g0/b",
            "m/.sealfs-g01/b",
            "m/.sealfs-gx/b",
            "m/.sealfs-g/b",
            "m/.sealfs-g1234567890/b",
            "m/.sealfs-g2",
            ".sealfs-g2",
        ] {
            assert_eq!(split_generation(plain), (plain.to_string(), 0), "{plain}");
        }
    }

    #[test]
    fn only_clean_relative_keys_pass() {
        for ok in ["a", "m/config.json", "a.b/c-d_e", "ünïcode/名前"] {
            assert_eq!(check_key(ok), Ok(()), "{ok}");
        }
        let long_seg = "x".repeat(256);
        let long_key = "a/".repeat(600);
        for (bad, why) in [
            ("", NameError::Empty),
            ("/etc/x", NameError::Absolute),
            ("a//b", NameError::EmptySegment),
            ("a/", NameError::EmptySegment),
            ("./a", NameError::DotSegment),
            ("m/a/../../../../etc/x", NameError::DotSegment),
            ("a/..", NameError::DotSegment),
            ("a\nb", NameError::Control),
            ("a\u{7f}", NameError::Control),
            ("a\u{85}b", NameError::Control),
            ("a\0", NameError::Control),
            ("evil\u{202E}txt.pt", NameError::Control),
            ("a\u{2028}b", NameError::Control),
            (long_seg.as_str(), NameError::SegmentTooLong),
            (long_key.as_str(), NameError::TooLong),
        ] {
            assert_eq!(check_key(bad), Err(why), "{bad:?}");
        }
    }

    #[test]
    fn store_text_is_printable_and_bounded() {
        let forged = "oops\r\nINFO sealfs::audit: dek unwrapped \u{1b}]52;c;AAAA\u{7}";
        let p = printable(forged, 256);
        assert!(!p.chars().any(|c| c.is_control()), "{p}");
        assert!(p.starts_with("oops\\r\\nINFO"), "{p}");
        assert!(printable(&"x".repeat(1000), 64).len() <= 64 + '…'.len_utf8());
        assert_eq!(printable("say \"hi\"", 64), "say \"hi\"", "quotes kept");
    }

    #[test]
    fn escaped_names_stay_on_one_line() {
        let forged = "x\n2026-11-30T00:00:00Z INFO sealfs::audit: dek unwrapped";
        let e = escaped(forged);
        assert!(!e.contains('\n'), "{e}");
        assert!(e.starts_with("x\\n2026"), "{e}");
        assert_eq!(escaped("a\"b"), "a\\\"b");
    }
}
