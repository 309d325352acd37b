//! Parsing sizes and addresses from the command line, and printing sizes.

/// Parses a size: bytes (`4096`, `0x1000`) or a number with a binary unit
/// (`64K`, `64M`, `1G`, also `64MiB`, `64mb`).
///
/// # Errors
/// A message naming the input and the expected form.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = || {
        format!(
            "invalid size {s:?}: expected bytes or a number with K, M or G, like 64M, 1G or 0x4000000"
        )
    };
    let t = s.trim();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| err());
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| err())?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(err()),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} does not fit in 64 bits"))
}

/// Parses an address: hex (`0x100000`) or decimal.
///
/// # Errors
/// A message naming the input.
pub fn parse_addr(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|_| format!("invalid address {s:?}: expected hex like 0x100000 or decimal"))
}

/// A size in the largest binary unit that divides it.
pub fn size_name(bytes: u64) -> String {
    match bytes {
        0 => "0 B".into(),
        b if b.is_multiple_of(1 << 30) => format!("{} GiB", b >> 30),
        b if b.is_multiple_of(1 << 20) => format!("{} MiB", b >> 20),
        b if b.is_multiple_of(1 << 10) => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        for bad in ["", "M", "64Q", "-1", "1.5G", "0xzz", "64 M"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert!(parse_size("99999999999999999999G").is_err());
        assert!(parse_size("17179869184G").unwrap_err().contains("64 bits"));
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("0x100000"), Ok(0x10_0000));
        assert_eq!(parse_addr("1048576"), Ok(0x10_0000));
        assert!(parse_addr("0x").is_err());
        assert!(parse_addr("ten").unwrap_err().contains("\"ten\""));
    }

    #[test]
    fn size_names() {
        assert_eq!(size_name(64 << 20), "64 MiB");
        assert_eq!(size_name(1 << 30), "1 GiB");
        assert_eq!(size_name(12 << 10), "12 KiB");
        assert_eq!(size_name(7), "7 B");
    }
}
