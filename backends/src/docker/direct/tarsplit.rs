//! The tar-split format: how an engine remembers a layer's tar exactly while it keeps only
//! the unpacked files. A gzip'd stream of JSON lines, in archive order: `type` 2 is a raw
//! segment (tar headers and padding, `payload` in base64), `type` 1 a file's content (`name`,
//! or `name_raw` in base64 when not UTF-8, and `size`; the bytes are the file's, read from
//! the layer's directory). Concatenated, they give back the tar byte for byte — what
//! `docker save` sends as the layer, hashing to its diff ID.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;

use ferry_core::{Error, Result};

/// Raw lines longer than this are refused (a segment is a few headers; a file line a name).
const MAX_LINE: usize = 4 * 1024 * 1024;

/// One piece of the tar.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Bytes of the tar itself: headers, padding, the end-of-archive blocks.
    Raw(Vec<u8>),
    /// `size` bytes of the file at `path` (relative to the layer's root, as in the tar).
    File {
        /// The entry's path, as bytes (not necessarily UTF-8).
        path: Vec<u8>,
        /// Bytes of content.
        size: u64,
    },
}

impl Piece {
    /// Bytes this piece adds to the tar.
    pub fn len(&self) -> u64 {
        match self {
            Piece::Raw(b) => b.len() as u64,
            Piece::File { size, .. } => *size,
        }
    }
}

#[derive(Deserialize)]
struct Line {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    name_raw: Option<String>,
    #[serde(default)]
    size: i64,
    #[serde(default)]
    payload: Option<String>,
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Internal(format!("tar-split: {what}"))
}

/// The pieces of a tar-split stream, in order.
pub struct Pieces<R> {
    lines: R,
    line: Vec<u8>,
}

/// A tar-split being decompressed, as [`open`] reads it.
pub type Opened = Pieces<BufReader<flate2::bufread::GzDecoder<BufReader<std::fs::File>>>>;

/// Buffer of each of the two readers around the decompressor. Every layer served by direct
/// reads keeps a tar-split open for as long as it is streamed, so its buffers count once per
/// client (`flate2::read`'s own is 32 KiB).
const TAR_SPLIT_BUFFER: usize = 8 * 1024;

/// Opens a `tar-split.json.gz` (Docker) or `<id>.tar-split.gz` (containers/storage).
pub fn open(path: &Path) -> Result<Opened> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let compressed = BufReader::with_capacity(TAR_SPLIT_BUFFER, file);
    Ok(Pieces::new(BufReader::with_capacity(
        TAR_SPLIT_BUFFER,
        flate2::bufread::GzDecoder::new(compressed),
    )))
}

impl<R: BufRead> Pieces<R> {
    /// Pieces of the uncompressed JSON lines `lines`.
    pub fn new(lines: R) -> Self {
        Pieces {
            lines,
            line: Vec::new(),
        }
    }

    fn next_piece(&mut self) -> Result<Option<Piece>> {
        loop {
            self.line.clear();
            let n = (&mut self.lines)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut self.line)
                .map_err(|e| bad(format!("reading: {e}")))?;
            if n == 0 {
                return Ok(None);
            }
            if self.line.len() > MAX_LINE {
                return Err(bad("a line longer than 4 MiB"));
            }
            if self.line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let line: Line = serde_json::from_slice(&self.line).map_err(|e| bad(format!("a line is not JSON: {e}")))?;
            let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s).map_err(bad);
            return match line.kind {
                2 => Ok(Some(Piece::Raw(match line.payload.as_deref() {
                    Some(p) => b64(p)?,
                    None => Vec::new(),
                }))),
                1 => {
                    let path = match (line.name_raw.as_deref(), line.name) {
                        (Some(raw), _) if !raw.is_empty() => b64(raw)?,
                        (_, Some(name)) => name.into_bytes(),
                        _ => return Err(bad("a file entry without a name")),
                    };
                    let size = u64::try_from(line.size).map_err(|_| bad("a negative file size"))?;
                    Ok(Some(Piece::File { path, size }))
                }
                other => Err(bad(format!("unknown entry type {other}"))),
            };
        }
    }
}

impl<R: BufRead> Iterator for Pieces<R> {
    type Item = Result<Piece>;

    fn next(&mut self) -> Option<Result<Piece>> {
        self.next_piece().transpose()
    }
}

/// The length of the tar a tar-split stream describes.
pub fn tar_size(pieces: impl Iterator<Item = Result<Piece>>) -> Result<u64> {
    let mut total = 0u64;
    for p in pieces {
        total = total.checked_add(p?.len()).ok_or_else(|| bad("size overflows"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_segments_and_files_in_order() {
        let lines = concat!(
            r#"{"type":2,"payload":"aGVhZGVy","position":0}"#,
            "\n",
            r#"{"type":1,"name":"etc/hosts","size":5,"payload":"AAAAAAAAAAA=","position":1}"#,
            "\n",
            r#"{"type":1,"name_raw":"/w==","size":0,"position":2}"#,
            "\n",
            "\n",
            r#"{"type":2,"payload":"AAA=","position":3}"#,
            "\n",
        );
        let pieces: Vec<Piece> = Pieces::new(lines.as_bytes()).collect::<Result<_>>().unwrap();
        assert_eq!(
            pieces,
            vec![
                Piece::Raw(b"header".to_vec()),
                Piece::File {
                    path: b"etc/hosts".to_vec(),
                    size: 5
                },
                Piece::File {
                    path: vec![0xff],
                    size: 0
                },
                Piece::Raw(vec![0, 0]),
            ]
        );
        assert_eq!(tar_size(Pieces::new(lines.as_bytes())).unwrap(), 6 + 5 + 2);
    }

    #[test]
    fn refuses_what_is_not_tar_split() {
        for bad in [
            "{\"type\":3}\n",
            "not json\n",
            "{\"type\":1,\"size\":-1,\"name\":\"x\"}\n",
            "{\"type\":1}\n",
        ] {
            assert!(Pieces::new(bad.as_bytes()).next().unwrap().is_err(), "{bad}");
        }
    }
}
