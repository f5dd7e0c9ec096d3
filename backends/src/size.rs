//! Sizes in the config: "512MiB", "20GiB", "1G", "1000000".

use ferry_core::{Error, Result};

/// Parses a size into bytes; `key` names the option in the error.
pub fn parse(s: &str, key: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| Error::Internal(format!("{key} {s:?}: not a size like 20GiB")))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(Error::Internal(format!("{key} {s:?}: unknown unit"))),
    };
    Ok((num * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse("20GiB", "k").unwrap(), 20 << 30);
        assert_eq!(parse("512 MiB", "k").unwrap(), 512 << 20);
        assert_eq!(parse("1000", "k").unwrap(), 1000);
        assert!(parse("lots", "k").is_err());
    }
}
