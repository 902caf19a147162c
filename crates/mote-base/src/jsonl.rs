//! The one JSON-lines reader: one JSON value per line, blank lines skipped, each value
//! with its 1-based line number so errors can name the line.

use serde_json::Value;

/// A line that is not valid JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// What serde_json said.
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for LineError {}

/// One non-blank line: its 1-based number, and its text with the value, or why not.
pub type Line<'a> = (usize, Result<(&'a str, Value), LineError>);

/// Every non-blank line of `bytes` parsed, in order (lazily), with its line number and
/// raw text (for callers that hash or keep it). A line that is not UTF-8 or not JSON is an
/// error naming the line; callers decide whether to stop or skip.
pub fn lines(bytes: &[u8]) -> impl Iterator<Item = Line<'_>> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
        .map(|(n, l)| {
            let err = |message: String| LineError {
                line: n + 1,
                message,
            };
            let line = match std::str::from_utf8(l) {
                Ok(s) => s.trim_end_matches('\r'),
                Err(e) => {
                    return (
                        n + 1,
                        Err(err(format!(
                            "not valid UTF-8 (byte {} of the line)",
                            e.valid_up_to()
                        ))),
                    );
                }
            };
            let v = serde_json::from_str(line)
                .map(|v| (line, v))
                .map_err(|e| err(e.to_string()));
            (n + 1, v)
        })
}

/// Every non-blank line of `bytes` as a value with its line number; the first bad line
/// is the error.
pub fn values(bytes: &[u8]) -> Result<Vec<(usize, Value)>, LineError> {
    lines(bytes).map(|(n, r)| r.map(|(_, v)| (n, v))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_lines_are_skipped_and_errors_name_the_line() {
        let v = values(b"{\"a\":1}\r\n\n  \n\"x\"\n").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].0, 1);
        assert_eq!(v[1], (4, Value::String("x".into())));
        let e = values(b"1\n{oops\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.to_string().starts_with("line 2: "));
        let e = values(b"1\n\"\xff\"\n").unwrap_err();
        assert!(e.to_string().contains("UTF-8"), "{e}");
        let tolerant: Vec<_> = lines(b"1\nbad\n3").filter_map(|(_, v)| v.ok()).collect();
        assert_eq!(tolerant.len(), 2);
        assert_eq!(tolerant[1].0, "3");
    }
}
