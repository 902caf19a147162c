//! Parsing the large parts of untrusted request bodies without building a tree first:
//! lists of texts and KServe `data` arrays are read straight into flat vectors, counting
//! as they go, and stop with an error at the first element past the limit. A 16 MiB body
//! of tiny strings is refused after reading `limit + 1` of them, not after allocating a
//! `serde_json::Value` for each.

use std::fmt;

use serde::Deserializer as _;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Why a limited parse stopped.
#[derive(Debug, PartialEq)]
pub enum Limited {
    /// More elements than allowed (the count read so far, at least `limit + 1`).
    TooMany(usize),
    /// Malformed or of the wrong type.
    Invalid(String),
}

/// What to collect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// JSON strings.
    Strings,
    /// Numbers, as f64.
    Floats,
    /// Integers, as i64.
    Ints,
    /// Booleans.
    Bools,
}

/// Flat values of one kind.
#[derive(Debug, PartialEq)]
pub enum Flat {
    /// Strings.
    Strings(Vec<String>),
    /// Numbers.
    Floats(Vec<f64>),
    /// Integers.
    Ints(Vec<i64>),
    /// Booleans.
    Bools(Vec<bool>),
}

impl Flat {
    fn len(&self) -> usize {
        match self {
            Flat::Strings(v) => v.len(),
            Flat::Floats(v) => v.len(),
            Flat::Ints(v) => v.len(),
            Flat::Bools(v) => v.len(),
        }
    }
}

const TOO_MANY: &str = "\u{1}too many elements";

struct Collect<'a> {
    out: &'a mut Flat,
    limit: usize,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Collect<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Collect<'_> {
    fn push<E: de::Error>(&mut self, f: impl FnOnce(&mut Flat) -> bool) -> Result<(), E> {
        if self.out.len() >= self.limit {
            return Err(E::custom(TOO_MANY));
        }
        if f(self.out) {
            Ok(())
        } else {
            Err(E::custom(format!("expected {}", self.expected())))
        }
    }

    fn expected(&self) -> &'static str {
        match self.out {
            Flat::Strings(_) => "strings",
            Flat::Floats(_) => "numbers",
            Flat::Ints(_) => "integers",
            Flat::Bools(_) => "booleans",
        }
    }
}

impl<'de> Visitor<'de> for Collect<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} or nested lists of them", self.expected())
    }

    fn visit_str<E: de::Error>(mut self, v: &str) -> Result<(), E> {
        self.push(|o| match o {
            Flat::Strings(s) => {
                s.push(v.to_string());
                true
            }
            _ => false,
        })
    }

    fn visit_string<E: de::Error>(mut self, v: String) -> Result<(), E> {
        self.push(|o| match o {
            Flat::Strings(s) => {
                s.push(v);
                true
            }
            _ => false,
        })
    }

    fn visit_bool<E: de::Error>(mut self, v: bool) -> Result<(), E> {
        self.push(|o| match o {
            Flat::Bools(b) => {
                b.push(v);
                true
            }
            _ => false,
        })
    }

    fn visit_i64<E: de::Error>(mut self, v: i64) -> Result<(), E> {
        self.push(|o| match o {
            Flat::Ints(i) => {
                i.push(v);
                true
            }
            Flat::Floats(f) => {
                f.push(v as f64);
                true
            }
            _ => false,
        })
    }

    fn visit_u64<E: de::Error>(mut self, v: u64) -> Result<(), E> {
        self.push(|o| match o {
            Flat::Ints(i) => match i64::try_from(v) {
                Ok(v) => {
                    i.push(v);
                    true
                }
                Err(_) => false,
            },
            Flat::Floats(f) => {
                f.push(v as f64);
                true
            }
            _ => false,
        })
    }

    fn visit_f64<E: de::Error>(mut self, v: f64) -> Result<(), E> {
        self.push(|o| match o {
            Flat::Floats(f) => {
                f.push(v);
                true
            }
            _ => false,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= 32 {
            return Err(de::Error::custom("lists nested more than 32 deep"));
        }
        loop {
            let next = Collect {
                out: &mut *self.out,
                limit: self.limit,
                depth: self.depth + 1,
            };
            if seq.next_element_seed(next)?.is_none() {
                return Ok(());
            }
        }
    }
}

/// Read `raw` (a value or nested lists of values) into a flat list of `kind`, refusing at
/// the first element past `limit`.
pub fn flat(raw: &RawValue, kind: Kind, limit: usize) -> Result<Flat, Limited> {
    let mut out = match kind {
        Kind::Strings => Flat::Strings(Vec::new()),
        Kind::Floats => Flat::Floats(Vec::new()),
        Kind::Ints => Flat::Ints(Vec::new()),
        Kind::Bools => Flat::Bools(Vec::new()),
    };
    let mut d = serde_json::Deserializer::from_str(raw.get());
    let r = d.deserialize_any(Collect {
        out: &mut out,
        limit,
        depth: 0,
    });
    match r {
        Ok(()) => Ok(out),
        Err(e) if e.to_string().starts_with(TOO_MANY) => Err(Limited::TooMany(limit + 1)),
        Err(e) => Err(Limited::Invalid(e.to_string())),
    }
}

/// A string, or a list of strings, as texts: at most `limit` of them.
pub fn texts(raw: &RawValue, limit: usize) -> Result<Vec<String>, Limited> {
    if raw.get().trim_start().starts_with('"') {
        let s: String =
            serde_json::from_str(raw.get()).map_err(|e| Limited::Invalid(e.to_string()))?;
        return Ok(vec![s]);
    }
    match flat(raw, Kind::Strings, limit)? {
        Flat::Strings(v) => Ok(v),
        _ => Err(Limited::Invalid("expected strings".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn lists_are_flattened_and_cut_off_at_their_limit() {
        assert_eq!(texts(&raw(r#""one""#), 1), Ok(vec!["one".to_string()]));
        assert_eq!(
            texts(&raw(r#"["a","b"]"#), 2),
            Ok(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(texts(&raw(r#"["a","b","c"]"#), 2), Err(Limited::TooMany(3)));
        assert!(matches!(texts(&raw("[1]"), 2), Err(Limited::Invalid(_))));
        assert_eq!(
            flat(&raw("[[1,2],[3,4.5]]"), Kind::Floats, 4),
            Ok(Flat::Floats(vec![1.0, 2.0, 3.0, 4.5]))
        );
        assert_eq!(
            flat(&raw("[[1,2],[3,4]]"), Kind::Ints, 3),
            Err(Limited::TooMany(4))
        );
        assert!(matches!(
            flat(&raw("[1.5]"), Kind::Ints, 3),
            Err(Limited::Invalid(_))
        ));
        assert_eq!(
            flat(&raw("[true,[false]]"), Kind::Bools, 3),
            Ok(Flat::Bools(vec![true, false]))
        );
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        assert!(matches!(
            flat(&raw(&deep), Kind::Floats, 3),
            Err(Limited::Invalid(_))
        ));
        // A million tiny strings stop after the limit, without reading the rest.
        let many = format!("[{}\"x\"]", "\"x\",".repeat(1_000_000));
        assert_eq!(texts(&raw(&many), 256), Err(Limited::TooMany(257)));
    }
}
