//! Byte strings for health checks, written the way HAProxy's `tcp-check` strings are:
//! `\r`, `\n`, `\t`, `\0`, `\\`, `\"` and `\xNN` escapes; everything else as it stands.

/// Parses `text` into bytes; the error is a short reason suitable after a key name.
pub fn parse_escapes(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        if c != '\\' {
            let mut utf8 = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            continue;
        }
        match chars.next().map(|(_, e)| e) {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            Some('"') => out.push(b'"'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).map(|(_, h)| h).collect();
                let byte = (hex.len() == 2).then(|| u8::from_str_radix(&hex, 16).ok()).flatten();
                match byte {
                    Some(b) => out.push(b),
                    None => return Err(format!("\\x at byte {at} needs two hex digits, e.g. \\x0d")),
                }
            }
            Some(other) => {
                return Err(format!("\\{other} at byte {at} is not an escape; use \\r \\n \\t \\0 \\\\ \\\" or \\xNN"));
            }
            None => return Err("ends with a lone \\; write \\\\ for a backslash".to_string()),
        }
    }
    Ok(out)
}

/// Shows bytes the way [`parse_escapes`] reads them, for logs.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(parse_escapes("PING\\r\\n").unwrap(), b"PING\r\n");
        assert_eq!(parse_escapes("+PONG").unwrap(), b"+PONG");
        assert_eq!(parse_escapes("\\x00\\x1f\\xFF\\0\\t\\\\\\\"").unwrap(), b"\x00\x1f\xff\x00\t\\\"");
        assert_eq!(parse_escapes("é").unwrap(), "é".as_bytes());
    }

    #[test]
    fn bad_escapes() {
        for bad in ["\\q", "\\x1", "\\xzz", "abc\\"] {
            assert!(parse_escapes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn round_trip() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(parse_escapes(&escape_bytes(&bytes)).unwrap(), bytes);
    }
}
