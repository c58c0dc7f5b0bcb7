//! A linear pre-scan of a signed body, before any JSON parser sees it.
//!
//! simd-json builds its value tree recursively (one stack frame per nesting
//! level), so a body nested a few thousand levels deep would overflow a
//! worker's stack and abort the process. This scan walks the bytes once,
//! without recursion, and refuses:
//! - nesting deeper than a limit no real webhook comes near;
//! - unpaired UTF-16 surrogate escapes (`\ud800` alone): no UTF-8 record can
//!   carry them, and a parser would silently turn them into other text.
//!
//! Everything else (including invalid JSON) is left to the parser. The scan
//! costs about as much as a `memchr` over the body: inside strings it jumps
//! from one `"` or `\` to the next.

/// Why a body was refused before parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("body nests deeper than {0} levels")]
    TooDeep(usize),
    #[error("body has an unpaired UTF-16 surrogate escape at byte {0}")]
    LoneSurrogate(usize),
}

/// Scans `body` for nesting deeper than `max_depth` and for unpaired
/// surrogate escapes inside strings.
pub fn scan(body: &[u8], max_depth: usize) -> Result<(), ScanError> {
    let mut depth = 0usize;
    let mut i = 0usize;
    let n = body.len();
    while i < n {
        match body[i] {
            b'"' => {
                i = skip_string(body, i + 1)?;
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(ScanError::TooDeep(max_depth));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// From just after an opening quote, returns the index just after the closing
/// one (or the end of the body for an unterminated string: the parser will
/// refuse it).
fn skip_string(b: &[u8], mut i: usize) -> Result<usize, ScanError> {
    loop {
        let Some(j) = memchr::memchr2(b'"', b'\\', &b[i..]) else {
            return Ok(b.len());
        };
        i += j;
        if b[i] == b'"' {
            return Ok(i + 1);
        }
        // A backslash: `\uXXXX` needs a look; any other escape is two bytes.
        if b.get(i + 1) == Some(&b'u') {
            match hex4(b, i + 2) {
                Some(cu) if (0xD800..=0xDBFF).contains(&cu) => {
                    // A high surrogate must be followed by `\u` + a low one.
                    let low = (b.get(i + 6) == Some(&b'\\') && b.get(i + 7) == Some(&b'u'))
                        .then(|| hex4(b, i + 8))
                        .flatten();
                    match low {
                        Some(l) if (0xDC00..=0xDFFF).contains(&l) => i += 12,
                        _ => return Err(ScanError::LoneSurrogate(i)),
                    }
                }
                Some(cu) if (0xDC00..=0xDFFF).contains(&cu) => {
                    return Err(ScanError::LoneSurrogate(i));
                }
                Some(_) => i += 6,
                // Not four hex digits: invalid JSON, for the parser to refuse.
                None => i += 2,
            }
        } else {
            i += 2;
        }
        if i >= b.len() {
            return Ok(b.len());
        }
    }
}

fn hex4(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    let mut v = 0u32;
    for &c in s {
        let d = (c as char).to_digit(16)?;
        v = v * 16 + d;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn depth_is_counted_outside_strings_only() {
        assert_eq!(scan(b"[[[]]]", 3), Ok(()));
        assert_eq!(scan(b"[[[[]]]]", 3), Err(ScanError::TooDeep(3)));
        assert_eq!(scan(br#"{"a":"[[[[[[[[{{{{"}"#, 2), Ok(()));
        // An escaped quote does not end the string.
        assert_eq!(scan(br#"{"a":"\"[[[[[[["}"#, 2), Ok(()));
        assert_eq!(scan(br#"{"a":"\\"}"#, 1), Ok(()));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(scan(deep.as_bytes(), 64), Err(ScanError::TooDeep(64)));
        // Siblings do not add up.
        assert_eq!(scan(b"[[],[],[],[[]]]", 3), Ok(()));
    }

    #[test]
    fn surrogates_must_be_paired() {
        assert_eq!(scan(br#"{"t":"\ud83d\ude00"}"#, 8), Ok(()));
        assert_eq!(scan(br#"{"t":"\uD83D\uDE00 ok \u00e9"}"#, 8), Ok(()));
        assert!(matches!(
            scan(br#"{"t":"\ud800"}"#, 8),
            Err(ScanError::LoneSurrogate(_))
        ));
        assert!(matches!(
            scan(br#"{"t":"\ud800\u0041"}"#, 8),
            Err(ScanError::LoneSurrogate(_))
        ));
        assert!(matches!(
            scan(br#"{"t":"x\udc00"}"#, 8),
            Err(ScanError::LoneSurrogate(_))
        ));
        // An escaped backslash followed by `ud800` is text, not an escape.
        assert_eq!(scan(br#"{"t":"\\ud800"}"#, 8), Ok(()));
        // Truncated input is the parser's to refuse.
        assert_eq!(scan(br#"{"t":"\ud8"#, 8), Ok(()));
        assert_eq!(scan(br#"{"t":"abc"#, 8), Ok(()));
    }

    /// Every other JSON parser in wagate is serde_json, whose recursion limit
    /// (128) bounds the stack: this fails if a dependency ever turns on its
    /// `unbounded_depth` feature.
    #[test]
    fn serde_json_keeps_its_recursion_limit() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(serde_json::from_str::<serde_json::Value>(&deep).is_err());
        // Fields skipped by a struct are skipped without recursion.
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Small {
            v: Option<u8>,
        }
        let skipped = format!(r#"{{"x":{deep},"v":1}}"#);
        let _ = serde_json::from_str::<Small>(&skipped);
    }

    /// The scan's depth agrees with serde_json's view of the same document.
    fn depth_of(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Array(a) => 1 + a.iter().map(depth_of).max().unwrap_or(0),
            serde_json::Value::Object(o) => 1 + o.values().map(depth_of).max().unwrap_or(0),
            _ => 0,
        }
    }

    fn nested() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<i64>().prop_map(serde_json::Value::from),
            "[\\[\\]{}\"\\\\a-z\u{e9}\u{1f600}]{0,8}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(24, 256, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map("[a-z\\[{\"]{1,4}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn depth_limit_matches_the_document(v in nested()) {
            let bytes = serde_json::to_vec(&v).unwrap();
            let d = depth_of(&v);
            prop_assert_eq!(scan(&bytes, d.max(1)), Ok(()));
            if d > 1 {
                prop_assert_eq!(scan(&bytes, d - 1), Err(ScanError::TooDeep(d - 1)));
            }
        }
    }
}
