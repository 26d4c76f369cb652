//! Durations (`500ms`, `2s`, `24h`) and sizes (`65536`, `10MiB`, `1.5 KB`) as the config and the
//! command line spell them.

use std::time::Duration;

/// Parses a human duration: `500ms`, `2s`, `10m`, `24h`, `1h 30m` (humantime). A bare number is
/// refused, because nobody can tell whether `30` meant seconds or milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{t}` has no unit: write e.g. `{t}s` or `{t}ms`"));
    }
    humantime::parse_duration(t).map_err(|e| format!("`{t}` is not a duration ({e})"))
}

/// Formats a duration the way [`parse_duration`] reads it back.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Parses a size in bytes: `65536`, `64KiB`, `10MiB`, `1GiB`, `1.5MB`, `512B`. Binary (`KiB`,
/// `MiB`, `GiB`, and the short `K`, `M`, `G`) and decimal (`KB`, `MB`, `GB`) units; case and
/// spaces between number and unit do not matter.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number = number.replace('_', "");
    if number.is_empty() {
        return Err(format!("`{t}` is not a size"));
    }
    let unit = unit.trim().to_ascii_lowercase();
    let factor: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => {
            return Err(format!(
                "`{t}`: unknown size unit `{other}` (use B, KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    if let Ok(n) = number.parse::<u64>() {
        return n
            .checked_mul(factor)
            .ok_or_else(|| format!("`{t}` is too large"));
    }
    let f: f64 = number.parse().map_err(|_| format!("`{t}` is not a size"))?;
    let bytes = f * factor as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{t}` is out of range"));
    }
    Ok(bytes.round() as u64)
}

/// Formats a size with the largest binary unit that divides it exactly.
pub fn format_size(n: u64) -> String {
    for (factor, unit) in [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
        if n >= factor && n.is_multiple_of(factor) {
            return format!("{}{unit}", n / factor);
        }
    }
    n.to_string()
}

/// Parses a boolean as config files, environments and flags spell it.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        other => Err(format!("`{other}` is not a boolean (true/false)")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(
            parse_duration(" 24h ").unwrap(),
            Duration::from_secs(86_400)
        );
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(
            parse_duration("1h 30m").unwrap(),
            Duration::from_secs(5_400)
        );
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        for d in ["500ms", "2s", "24h", "1h 30m"] {
            let parsed = parse_duration(d).unwrap();
            assert_eq!(parse_duration(&format_duration(parsed)).unwrap(), parsed);
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536").unwrap(), 65_536);
        assert_eq!(parse_size("10MiB").unwrap(), 10 * 1024 * 1024);
        assert_eq!(parse_size("10 mib").unwrap(), 10 * 1024 * 1024);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("64K").unwrap(), 65_536);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1_536);
        assert_eq!(parse_size("2MB").unwrap(), 2_000_000);
        assert_eq!(parse_size("512B").unwrap(), 512);
        assert_eq!(parse_size("1_000").unwrap(), 1_000);
        assert!(parse_size("").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("10 parsecs").is_err());
        assert!(parse_size("-5").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
        assert_eq!(format_size(10 * 1024 * 1024), "10MiB");
        assert_eq!(format_size(1000), "1000");
        for n in [0u64, 1, 1024, 65_536, 10 << 20, 123_457] {
            assert_eq!(parse_size(&format_size(n)).unwrap(), n);
        }
    }

    #[test]
    fn bools() {
        for t in ["true", "1", "YES", "on"] {
            assert!(parse_bool(t).unwrap());
        }
        for f in ["false", "0", "no", "Off"] {
            assert!(!parse_bool(f).unwrap());
        }
        assert!(parse_bool("maybe").is_err());
    }
}
