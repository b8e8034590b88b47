//! Durations as operators write them: `"500ms"`, `"3s"`, `"2m"`, `"1h"`, `"0s"`.
//!
//! One number and one unit, the way HAProxy and nginx spell timeouts; fractions and compound
//! forms ("1h30m") are rejected so that a typo cannot silently become a different time.

use std::time::Duration;

/// The units accepted, longest suffix first so that "ms" is not read as "m".
const UNITS: [(&str, u64); 5] = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000)];

/// What a duration string may look like, for error messages.
pub const DURATION_HINT: &str = "a whole number followed by ms, s, m, h or d, e.g. \"500ms\", \"3s\", \"1h\"";

/// Parses `"500ms"`-style durations; the error is a short reason suitable after a key name.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    if number.is_empty() {
        return Err(format!("{text:?} is not a duration; use {DURATION_HINT}"));
    }
    let Some(&(_, millis_per_unit)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(format!("{text:?} has no known unit; use {DURATION_HINT}"));
    };
    let value: u64 = number.parse().map_err(|_| format!("{text:?} is too large"))?;
    let millis = value.checked_mul(millis_per_unit).ok_or_else(|| format!("{text:?} is too large"))?;
    Ok(Duration::from_millis(millis))
}

/// Formats a duration the way the config spells it: the largest unit that divides it.
pub fn format_duration(d: Duration) -> String {
    let millis = d.as_millis() as u64;
    if millis == 0 {
        return "0s".to_string();
    }
    let (name, size) = UNITS.iter().rev().find(|(_, size)| millis.is_multiple_of(*size)).copied().unwrap_or(("ms", 1));
    format!("{}{name}", millis / size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_back_to_what_parses() {
        for text in ["500ms", "3s", "2m", "1h", "1d", "0s", "1500ms", "90s"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }

    #[test]
    fn accepts_each_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration(" 7s "), Ok(Duration::from_secs(7)));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "s",
            "3",
            "3 s",
            "1.5s",
            "-1s",
            "1h30m",
            "3sec",
            "ms",
            "18446744073709551616s",
            "18446744073709551615h",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains('"'), "error for {bad:?} should quote it: {err}");
        }
    }
}
