//! Content digests. Only sha256 is accepted: it is what every engine and client here produces.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::error::Error;

/// A validated `sha256:<64 lowercase hex>` digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest::from_hasher(Sha256::new_with_prefix(data))
    }

    /// Finishes a running hash into a digest.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Digest {
            hex: hex::encode(hasher.finalize()),
        }
    }

    /// The 64 hex characters, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// True when `s` has a digest's shape (`algo:encoded`), valid or not; used to tell
    /// a digest reference from a tag.
    pub fn looks_like(s: &str) -> bool {
        s.contains(':')
    }
}

impl FromStr for Digest {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let (algo, encoded) = s
            .split_once(':')
            .ok_or_else(|| Error::DigestInvalid(format!("{s:?} is not of the form algorithm:hex")))?;
        if algo.is_empty()
            || !algo
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b))
        {
            return Err(Error::DigestInvalid(format!("{s:?}: bad algorithm")));
        }
        if algo != "sha256" {
            return Err(Error::DigestUnsupported(algo.to_string()));
        }
        if encoded.len() != 64 || !encoded.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::DigestInvalid(format!(
                "{s:?}: sha256 needs 64 lowercase hex characters"
            )));
        }
        Ok(Digest {
            hex: encoded.to_string(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_sha256() {
        let d = Digest::of(b"hello");
        let s = d.to_string();
        assert_eq!(
            s,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(s.parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn rejects_bad_digests() {
        for bad in [
            "sha256:abc",
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
            "sha256",
            ":abc",
            "sha256:zzf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        ] {
            assert!(matches!(bad.parse::<Digest>(), Err(Error::DigestInvalid(_))), "{bad}");
        }
        assert!(matches!(
            "sha512:abcd".parse::<Digest>(),
            Err(Error::DigestUnsupported(a)) if a == "sha512"
        ));
    }
}
