//! Sizes in the config: `"512MiB"`, `"20GiB"`, `"1.5TiB"`, or a number of bytes. Checked
//! while the file is read, so a mistake is an error naming the key and its source before
//! anything starts. Units are binary and spelled so: `"20GB"` or `"20G"` could mean 20·10⁹ or
//! 20·2³⁰ bytes, and is refused with the spelling that says which.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes, as the config wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Size {
    bytes: u64,
    text: String,
}

impl Size {
    /// 16 GiB: the default largest blob of the push store and the upstream cache.
    pub fn sixteen_gib() -> Size {
        Size {
            bytes: 16 << 30,
            text: "16GiB".into(),
        }
    }

    /// `n` KiB.
    pub fn kib(n: u64) -> Size {
        Size {
            bytes: n << 10,
            text: format!("{n}KiB"),
        }
    }

    /// `n` MiB.
    pub fn mib(n: u64) -> Size {
        Size {
            bytes: n << 20,
            text: format!("{n}MiB"),
        }
    }

    /// The size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Parses `"20GiB"`, `"512 MiB"`, `"1000"`.
    pub fn parse(s: &str) -> Result<Size, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: f64 = num
            .parse()
            .ok()
            .filter(|n: &f64| n.is_finite())
            .ok_or_else(|| format!("{s:?} is not a size like \"20GiB\""))?;
        let unit = unit.trim();
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            u @ ("k" | "kb" | "m" | "mb" | "g" | "gb" | "t" | "tb") => {
                let binary = format!("{}iB", u[..1].to_ascii_uppercase());
                return Err(format!(
                    "{s:?} is ambiguous: write \"{num}{binary}\" (binary units), or the number of bytes"
                ));
            }
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (B, KiB, MiB, GiB, TiB)")),
        };
        let bytes = num * mult as f64;
        if bytes > u64::MAX as f64 {
            return Err(format!("{s:?} is too large"));
        }
        Ok(Size {
            bytes: bytes as u64,
            text: t.to_string(),
        })
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Size {
                bytes: n,
                text: n.to_string(),
            }),
            Raw::Text(t) => Size::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(Size::parse("20GiB").unwrap().bytes(), 20 << 30);
        assert_eq!(Size::parse("512 MiB").unwrap().bytes(), 512 << 20);
        assert_eq!(Size::parse("1.5KiB").unwrap().bytes(), 1536);
        assert_eq!(Size::parse("1000").unwrap().bytes(), 1000);
        assert!(Size::parse("lots").is_err());
        assert!(Size::parse("5 parsecs").is_err());
        let e = Size::parse("20GB").unwrap_err();
        assert!(e.contains("ambiguous") && e.contains("\"20GiB\""), "{e}");
        assert!(Size::parse("20g").unwrap_err().contains("20GiB"));
    }

    #[test]
    fn read_from_toml_as_a_string_or_a_number() {
        #[derive(Deserialize)]
        struct T {
            a: Size,
            b: Size,
        }
        let t: T = serde_json::from_str(r#"{"a": "4MiB", "b": 4096}"#).unwrap();
        assert_eq!((t.a.bytes(), t.b.bytes()), (4 << 20, 4096));
        assert!(serde_json::from_str::<T>(r#"{"a": "4MB", "b": 1}"#).is_err());
    }
}
