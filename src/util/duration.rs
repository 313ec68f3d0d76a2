//! Durations in flags and env vars (`--coalesce 50ms`, `--lease-ttl 15s`).

use std::time::Duration;

/// Parses a duration with `humantime` (`250ms`, `5s`, `2m`, `1h`, `1m 30s`);
/// a bare number means seconds, as it always did for these flags.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Duration::from_secs)
            .map_err(|e| format!("invalid duration {s:?}: {e}"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (e.g. 50ms, 5s, 2m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_reject_garbage() {
        let ok: &[(&str, Duration)] = &[
            ("50ms", Duration::from_millis(50)),
            ("5", Duration::from_secs(5)),
            ("5s", Duration::from_secs(5)),
            (" 10s ", Duration::from_secs(10)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("0", Duration::ZERO),
            ("1m 30s", Duration::from_secs(90)),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(*want), "{text}");
        }
        for bad in ["5 parsecs", "ms", "", "-1s", "soon"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
