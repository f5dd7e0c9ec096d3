//! A layer's tar assembled from its tar-split and its files in the engine's storage, a chunk
//! at a time, checked against the layer's diff ID before its last byte.

use std::io::{self, Read};
use std::path::PathBuf;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use ferry_core::{ByteStream, Digest};

use super::graph::{inside, LayerFiles};
use super::tarsplit::{self, Piece};

/// The tar's bytes `[offset, offset + len)`, assembled from the tar-split and the layer's
/// files on blocking threads, a chunk at a time (see [`ferry_core::chunks`]). When the whole
/// tar is read (`verify`), every byte is hashed and the last chunk is held back until the
/// hash is `diff_id`: a layer that changed under the engine (removed, rebuilt) ends in an
/// error instead of its last byte, so no client takes a corrupt blob whole. `verified` is
/// told whether the hash matched.
pub fn stream(
    layer: LayerFiles,
    diff_id: Digest,
    offset: u64,
    len: u64,
    verify: bool,
    verified: impl FnOnce(bool) + Send + 'static,
) -> ByteStream {
    ferry_core::chunks::stream(Assembler {
        layer,
        pieces: None,
        file: None,
        skip: offset,
        left: len,
        hasher: verify.then(Sha256::new),
        diff_id,
        held: None,
        verified: Some(Box::new(verified)),
        ended: false,
    })
}

type TarSplit = tarsplit::Opened;

/// A layer's tar being assembled.
struct Assembler {
    layer: LayerFiles,
    /// The tar-split, and the layer's directory as the kernel resolves it; opened by the
    /// first chunk.
    pieces: Option<(TarSplit, PathBuf)>,
    /// The file whose content comes next, and how much of it is still to read.
    file: Option<(std::fs::File, u64, PathBuf)>,
    /// Bytes of the tar before the range, still to pass.
    skip: u64,
    /// Bytes of the range still to send.
    left: u64,
    hasher: Option<Sha256>,
    diff_id: Digest,
    /// The last chunk, sent only once the whole tar has hashed right.
    held: Option<Bytes>,
    verified: Option<Box<dyn FnOnce(bool) + Send>>,
    ended: bool,
}

impl ferry_core::chunks::ChunkSource for Assembler {
    fn next_chunk(&mut self, max: usize) -> Option<io::Result<Bytes>> {
        loop {
            if self.ended {
                return None;
            }
            match self.assemble(max) {
                Ok(Some(chunk)) => {
                    if self.hasher.is_none() {
                        return Some(Ok(chunk));
                    }
                    if let Some(previous) = self.held.replace(chunk) {
                        return Some(Ok(previous));
                    }
                }
                Ok(None) => return self.finish(),
                Err(e) => {
                    // Files gone or shorter: the image changed under the engine.
                    self.end(Some(false));
                    return Some(Err(e));
                }
            }
        }
    }
}

impl Assembler {
    /// The tar ended: the held chunk once the hash matched, else why not.
    fn finish(&mut self) -> Option<io::Result<Bytes>> {
        if self.left > 0 {
            self.end(Some(false));
            return Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the layer is shorter than its size",
            )));
        }
        let Some(hasher) = self.hasher.take() else {
            self.end(None);
            return None;
        };
        let actual = Digest::from_hasher(hasher);
        if actual == self.diff_id {
            self.end(Some(true));
            return self.held.take().map(Ok);
        }
        tracing::warn!(layer = %self.diff_id, %actual, dir = %self.layer.dir.display(),
            "layer files no longer hash to the diff id (the image changed under the engine): response cut short");
        self.end(Some(false));
        Some(Err(io::Error::other(format!("layer {} changed on disk", self.diff_id))))
    }

    /// No more chunks. `verdict`: whether the layer proved whole and right (none for a read
    /// that did not hash it and met no error).
    fn end(&mut self, verdict: Option<bool>) {
        self.ended = true;
        if verdict == Some(false) {
            self.held = None;
        }
        if let (Some(ok), Some(verified)) = (verdict, self.verified.take()) {
            verified(ok);
        }
    }

    /// The next chunk of the range (up to `cap` bytes, small pieces gathered), or
    /// `None` at the end of the tar.
    fn assemble(&mut self, cap: usize) -> io::Result<Option<Bytes>> {
        let mut buf = Vec::with_capacity(cap);
        while buf.len() < cap && (self.left > 0 || self.hasher.is_some()) {
            if let Some((file, remaining, path)) = &mut self.file {
                let start = buf.len();
                let want = (*remaining).min((cap - start) as u64);
                // read_to_end fills spare capacity without zeroing it first.
                let n = file.take(want).read_to_end(&mut buf)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} is shorter than the layer says", path.display()),
                    ));
                }
                *remaining -= n as u64;
                if *remaining == 0 {
                    self.file = None;
                }
                self.keep_in_range(&mut buf, start);
                continue;
            }
            let Some(piece) = self.next_piece()? else { break };
            match piece {
                Piece::Raw(bytes) => {
                    let start = buf.len();
                    buf.extend_from_slice(&bytes);
                    self.keep_in_range(&mut buf, start);
                }
                Piece::File { path, size } => {
                    if size == 0 {
                        continue;
                    }
                    let file_path = inside(&self.layer.dir, &path)
                        .ok_or_else(|| io::Error::other("a tar-split name leaves the layer's directory"))?;
                    // Whole files that lie before the range are passed without reading.
                    if self.hasher.is_none() && self.skip >= size {
                        self.skip -= size;
                        continue;
                    }
                    // A symlink on the way (planted in the layer) must not lead out of it.
                    let real = std::fs::canonicalize(&file_path)?;
                    if !self.pieces.as_ref().is_some_and(|(_, root)| real.starts_with(root)) {
                        return Err(io::Error::other(format!(
                            "{} leads out of the layer's directory",
                            file_path.display()
                        )));
                    }
                    self.file = Some((std::fs::File::open(&file_path)?, size, file_path));
                }
            }
        }
        Ok((!buf.is_empty()).then(|| Bytes::from(buf)))
    }

    /// The tar-split's next piece; the first call opens it.
    fn next_piece(&mut self) -> io::Result<Option<Piece>> {
        if self.pieces.is_none() {
            let pieces = tarsplit::open(&self.layer.tar_split).map_err(io::Error::other)?;
            let root = std::fs::canonicalize(&self.layer.dir)?;
            self.pieces = Some((pieces, root));
        }
        match self.pieces.as_mut().and_then(|(pieces, _)| pieces.next()) {
            Some(piece) => piece.map(Some).map_err(io::Error::other),
            None => Ok(None),
        }
    }

    /// Hashes the tar's bytes `buf[start..]`, just added, and keeps of them only those
    /// inside the range.
    fn keep_in_range(&mut self, buf: &mut Vec<u8>, start: usize) {
        if let Some(h) = &mut self.hasher {
            h.update(&buf[start..]);
        }
        let skipped = self.skip.min((buf.len() - start) as u64) as usize;
        if skipped > 0 {
            buf.drain(start..start + skipped);
            self.skip -= skipped as u64;
        }
        let kept = self.left.min((buf.len() - start) as u64) as usize;
        buf.truncate(start + kept);
        self.left -= kept as u64;
    }
}
