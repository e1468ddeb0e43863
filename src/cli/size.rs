//! Human-readable byte sizes: `4096`, `64KiB`, `1GiB`, `2G` (binary), `500MB` (decimal).

/// Parses a size. Binary suffixes K/M/G/T and KiB/MiB/GiB/TiB; SI suffixes kB/KB/MB/GB/TB; B or none for bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("invalid size {s:?}: expected a number with an optional unit, like 64KiB or 1GiB"));
    }
    let n: u64 = digits.parse().map_err(|_| format!("invalid size {s:?}: number too large"))?;
    let mult: u64 = match suffix.trim() {
        "" | "B" | "b" => 1,
        "K" | "k" | "KiB" | "kiB" => 1 << 10,
        "M" | "m" | "MiB" => 1 << 20,
        "G" | "g" | "GiB" => 1 << 30,
        "T" | "t" | "TiB" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => return Err(format!("invalid size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Formats a byte count with the largest binary unit that divides it, e.g. `64 KiB`, `1.5 GiB`.
pub fn format_size(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (name, unit) in UNITS {
        if n >= unit {
            let v = n as f64 / unit as f64;
            return if n.is_multiple_of(unit) { format!("{} {name}", n / unit) } else { format!("{v:.2} {name}") };
        }
    }
    format!("{n} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size(" 1 MiB "), Ok(1 << 20));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "KiB", "-1", "1.5GiB", "12XB", "99999999999999999999", "16777216TiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(65536), "64 KiB");
        assert_eq!(format_size(3 << 30), "3 GiB");
        assert_eq!(format_size(1536 << 20), "1.50 GiB");
        assert_eq!(format_size(100), "100 B");
    }
}
