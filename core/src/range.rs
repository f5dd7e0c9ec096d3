//! HTTP byte ranges for blob reads (`Range: bytes=...`).

use crate::error::{Error, Result};

/// One byte range as a client asks for it; resolved against a blob's size by [`ByteRange::resolve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=start-`
    From(u64),
    /// `bytes=start-end`, end inclusive.
    FromTo(u64, u64),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

impl ByteRange {
    /// Parses a `Range` header. Syntax ferry does not serve (other units, several ranges,
    /// garbage) gives `None`: RFC 9110 says such a header is ignored and the whole blob sent.
    pub fn parse(header: &str) -> Option<ByteRange> {
        let spec = header.trim().strip_prefix("bytes=")?.trim();
        if spec.contains(',') {
            return None;
        }
        let (start, end) = spec.split_once('-')?;
        let num = |s: &str| s.trim().parse::<u64>().ok();
        match (start.trim().is_empty(), end.trim().is_empty()) {
            (true, false) => Some(ByteRange::Suffix(num(end)?)),
            (false, true) => Some(ByteRange::From(num(start)?)),
            (false, false) => {
                let (s, e) = (num(start)?, num(end)?);
                (s <= e).then_some(ByteRange::FromTo(s, e))
            }
            (true, true) => None,
        }
    }

    /// Parses an upload chunk's `Content-Range: <first>-<last>` (the distribution spec's
    /// form; a `bytes ` prefix tolerated): the first and last byte, or `None` when unusable.
    pub fn parse_content_range(header: &str) -> Option<(u64, u64)> {
        let v = header.trim().trim_start_matches("bytes").trim();
        let (s, e) = v.split_once('-')?;
        let (s, e) = (s.trim().parse::<u64>().ok()?, e.trim().parse::<u64>().ok()?);
        (s <= e).then_some((s, e))
    }

    /// The `(offset, length)` this range selects in a blob of `size` bytes, or
    /// [`Error::RangeNotSatisfiable`] when it lies outside.
    pub fn resolve(self, size: u64) -> Result<(u64, u64)> {
        let unsatisfiable = || Error::RangeNotSatisfiable {
            range: self.to_string(),
            size,
        };
        match self {
            ByteRange::From(s) if s < size => Ok((s, size - s)),
            ByteRange::FromTo(s, e) if s < size => Ok((s, e.min(size - 1) - s + 1)),
            ByteRange::Suffix(n) if n > 0 && size > 0 => {
                let n = n.min(size);
                Ok((size - n, n))
            }
            _ => Err(unsatisfiable()),
        }
    }
}

impl std::fmt::Display for ByteRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ByteRange::From(s) => write!(f, "bytes={s}-"),
            ByteRange::FromTo(s, e) => write!(f, "bytes={s}-{e}"),
            ByteRange::Suffix(n) => write!(f, "bytes=-{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_resolve() {
        assert_eq!(ByteRange::parse("bytes=0-9").unwrap().resolve(100).unwrap(), (0, 10));
        assert_eq!(ByteRange::parse("bytes=90-").unwrap().resolve(100).unwrap(), (90, 10));
        assert_eq!(ByteRange::parse("bytes=-5").unwrap().resolve(100).unwrap(), (95, 5));
        assert_eq!(
            ByteRange::parse("bytes=50-500").unwrap().resolve(100).unwrap(),
            (50, 50)
        );
        assert!(ByteRange::parse("bytes=100-").unwrap().resolve(100).is_err());
        assert!(ByteRange::parse("bytes=0-1,3-4").is_none());
        assert!(ByteRange::parse("items=0-1").is_none());
        assert!(ByteRange::parse("bytes=5-1").is_none());
    }
}
