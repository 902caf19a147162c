//! Model references as users type them: `name[:tag]` or `sha256:<hex>` (a unique prefix of
//! at least 12 hex digits is accepted and resolved by the store).

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, validate_hex};

/// The tag used when a reference names no tag.
pub const DEFAULT_TAG: &str = "latest";

/// Shortest digest prefix accepted in a reference.
pub const MIN_DIGEST_PREFIX: usize = 12;

/// A validated `name:tag` pair.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TagRef {
    name: String,
    tag: String,
}

/// What a user can write where a model is expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    /// A tag, resolved through the index.
    Tag(TagRef),
    /// A full digest.
    Digest(Digest),
    /// A digest prefix (12 to 63 hex digits); must match exactly one model.
    DigestPrefix(String),
}

/// Why a string is not a reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid model reference {input:?}: {reason}")]
pub struct ReferenceError {
    /// The rejected input (truncated).
    pub input: String,
    /// What is wrong and what is allowed.
    pub reason: String,
}

fn ref_err(input: &str, reason: impl Into<String>) -> ReferenceError {
    ReferenceError {
        input: input.chars().take(100).collect(),
        reason: reason.into(),
    }
}

impl TagRef {
    /// Build from a name and a tag, validating both.
    pub fn new(name: &str, tag: &str) -> Result<Self, ReferenceError> {
        let input = format!("{name}:{tag}");
        validate_name(&input, name)?;
        validate_tag(&input, tag)?;
        Ok(TagRef {
            name: name.to_string(),
            tag: tag.to_string(),
        })
    }

    /// The repository-like name, e.g. `minilm`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tag, e.g. `latest`.
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

impl fmt::Display for TagRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

impl FromStr for TagRef {
    type Err = ReferenceError;

    /// Parse `name[:tag]`; the tag defaults to [`DEFAULT_TAG`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, tag) = match s.rsplit_once(':') {
            Some((n, t)) => (n, t),
            None => (s, DEFAULT_TAG),
        };
        if name.starts_with("sha256") {
            return Err(ref_err(
                s,
                "a name cannot start with 'sha256' (that is a digest)",
            ));
        }
        validate_name(s, name)?;
        validate_tag(s, tag)?;
        Ok(TagRef {
            name: name.to_string(),
            tag: tag.to_string(),
        })
    }
}

/// Names: lowercase components of `[a-z0-9]` joined by one of `.`, `_`, `-` (or `__`),
/// components separated by `/`; at most 128 characters. This is the OCI repository grammar,
/// so every tag is also a valid `org.opencontainers.image.ref.name`.
fn validate_name(input: &str, name: &str) -> Result<(), ReferenceError> {
    const HOW: &str = "names use lowercase letters, digits and single '.', '_' or '-' between them, \
                       with '/' between parts (e.g. 'minilm' or 'team/minilm-l6')";
    if name.is_empty() || name.len() > 128 {
        return Err(ref_err(
            input,
            format!("the name must be 1 to 128 characters; {HOW}"),
        ));
    }
    for component in name.split('/') {
        let bytes = component.as_bytes();
        let ok = !bytes.is_empty()
            && bytes[0].is_ascii_lowercase() | bytes[0].is_ascii_digit()
            && bytes[bytes.len() - 1].is_ascii_lowercase()
                | bytes[bytes.len() - 1].is_ascii_digit()
            && bytes.iter().all(|&b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
            && !component.contains("..")
            && !component.contains("___");
        if !ok {
            return Err(ref_err(
                input,
                format!("bad name part {component:?}; {HOW}"),
            ));
        }
    }
    Ok(())
}

/// Tags: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}` (the OCI distribution tag grammar).
fn validate_tag(input: &str, tag: &str) -> Result<(), ReferenceError> {
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ref_err(
            input,
            "a tag is 1 to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'",
        ))
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(hex) = s.strip_prefix(Digest::PREFIX) {
            if hex.len() == 64 {
                return validate_hex(s, hex)
                    .map(|b| Reference::Digest(Digest::from_bytes(b)))
                    .map_err(|e| ref_err(s, e.reason));
            }
            if hex.len() < MIN_DIGEST_PREFIX || hex.len() > 64 {
                return Err(ref_err(
                    s,
                    format!(
                        "a digest reference needs {MIN_DIGEST_PREFIX} to 64 hex digits after 'sha256:'"
                    ),
                ));
            }
            if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(ref_err(s, "digests use only the characters 0-9 and a-f"));
            }
            return Ok(Reference::DigestPrefix(hex.to_string()));
        }
        s.parse().map(Reference::Tag)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
            Reference::DigestPrefix(p) => write!(f, "sha256:{p}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_forms() {
        let t: TagRef = "minilm".parse().unwrap();
        assert_eq!(t.to_string(), "minilm:latest");
        let t: TagRef = "team/mini-lm.v2:v1.0".parse().unwrap();
        assert_eq!((t.name(), t.tag()), ("team/mini-lm.v2", "v1.0"));
        assert!(matches!(
            "sha256:0123456789ab".parse::<Reference>().unwrap(),
            Reference::DigestPrefix(_)
        ));
    }

    #[test]
    fn rejects_bad_forms() {
        for bad in [
            "",
            "Upper",
            "a/../b",
            "../x",
            "a:",
            "a:.x",
            "a b",
            "sha256:abc",
            "sha256:../../../../etc/passwd",
            "sha256:0123456789abZZ",
            "/abs",
            "a//b",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad:?} was accepted");
        }
    }

    proptest! {
        #[test]
        fn never_panics_and_never_yields_a_path_escape(s in ".{0,80}") {
            if let Ok(Reference::Tag(t)) = s.parse::<Reference>() {
                prop_assert!(!t.name().contains(".."));
                prop_assert!(!t.name().starts_with('/'));
            }
        }
    }
}
