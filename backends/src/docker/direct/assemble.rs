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
        root: None,
        pieces_read: 0,
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

/// A file at least this large is copied with the tar-split closed: its decompressor (a 32 KiB
/// window and tables) and buffers, some 60 KiB, are the largest part of what a stream read
/// directly holds, and a layer's bytes are mostly in its large files. The tar-split is opened
/// again after the file and the pieces already read are passed.
const SUSPEND_FROM: u64 = 1024 * 1024;
/// ... when passing them again costs little beside copying the file: at most one piece (about
/// 1 KiB of JSON to decompress and parse) for each 64 KiB of the file.
const RESUME_BYTES_PER_PIECE: u64 = 64 * 1024;

/// A layer's tar being assembled.
struct Assembler {
    layer: LayerFiles,
    /// The tar-split being read; opened by the first chunk, and closed while a large file's
    /// content is copied (see [`SUSPEND_FROM`]).
    pieces: Option<TarSplit>,
    /// The layer's directory as the kernel resolves it, once the tar-split is opened.
    root: Option<PathBuf>,
    /// Pieces of the tar-split read so far: where a reopened one picks up.
    pieces_read: u64,
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
                // Only the chunk with the last byte waits for the hash: the tar's end (and
                // its check) comes in this same call, so no chunk stays held between calls.
                Ok(Some(chunk)) if self.hasher.is_none() || self.left > 0 => return Some(Ok(chunk)),
                Ok(Some(chunk)) => self.held = Some(chunk),
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
                    if !self.root.as_ref().is_some_and(|root| real.starts_with(root)) {
                        return Err(io::Error::other(format!(
                            "{} leads out of the layer's directory",
                            file_path.display()
                        )));
                    }
                    self.file = Some((std::fs::File::open(&file_path)?, size, file_path));
                    if size >= SUSPEND_FROM && self.pieces_read <= size / RESUME_BYTES_PER_PIECE {
                        self.pieces = None;
                    }
                }
            }
        }
        Ok((!buf.is_empty()).then(|| Bytes::from(buf)))
    }

    /// The tar-split's next piece; the first call opens it, and so does the first after a
    /// large file (passing the pieces already read).
    fn next_piece(&mut self) -> io::Result<Option<Piece>> {
        let pieces = match &mut self.pieces {
            Some(pieces) => pieces,
            None => {
                let mut pieces = tarsplit::open(&self.layer.tar_split).map_err(io::Error::other)?;
                if self.root.is_none() {
                    self.root = Some(std::fs::canonicalize(&self.layer.dir)?);
                }
                for _ in 0..self.pieces_read {
                    if pieces.next().transpose().map_err(io::Error::other)?.is_none() {
                        return Err(io::Error::other("the layer's tar-split changed while it was read"));
                    }
                }
                self.pieces.insert(pieces)
            }
        };
        let piece = pieces.next().transpose().map_err(io::Error::other)?;
        self.pieces_read += u64::from(piece.is_some());
        Ok(piece)
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

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use futures::StreamExt;
    use std::io::Write;

    /// A layer of three small files around two large ones (so the tar-split is closed and
    /// opened again twice), with headers between them: its files and the tar it stands for.
    fn layer(dir: &std::path::Path) -> (LayerFiles, Vec<u8>) {
        let files: [(&str, usize); 5] = [
            ("a", 10),
            ("big1", 3 << 20),
            ("b", 700),
            ("big2", (1 << 20) + 5),
            ("c", 1),
        ];
        let root = dir.join("diff");
        std::fs::create_dir_all(&root).unwrap();
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let (mut lines, mut tar) = (String::new(), Vec::new());
        for (i, (name, size)) in files.iter().enumerate() {
            let header = vec![b'A' + i as u8; 512];
            lines += &format!(
                "{{\"type\":2,\"payload\":\"{}\",\"position\":{}}}\n",
                b64(&header),
                2 * i
            );
            tar.extend_from_slice(&header);
            let content: Vec<u8> = (0..*size).map(|j| (j * 7 + i) as u8).collect();
            std::fs::write(root.join(name), &content).unwrap();
            lines += &format!(
                "{{\"type\":1,\"name\":\"{name}\",\"size\":{size},\"position\":{}}}\n",
                2 * i + 1
            );
            tar.extend_from_slice(&content);
        }
        let tar_split = dir.join("tar-split.json.gz");
        let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&tar_split).unwrap(), Default::default());
        gz.write_all(lines.as_bytes()).unwrap();
        gz.finish().unwrap();
        (LayerFiles { tar_split, dir: root }, tar)
    }

    async fn read(layer: &LayerFiles, diff_id: &Digest, offset: u64, len: u64, verify: bool) -> Vec<u8> {
        let layer = LayerFiles {
            tar_split: layer.tar_split.clone(),
            dir: layer.dir.clone(),
        };
        let mut s = stream(layer, diff_id.clone(), offset, len, verify, |_| {});
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_layer_reads_whole_and_in_ranges_across_its_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let (layer, tar) = layer(dir.path());
        let diff_id = Digest::from_hasher(Sha256::new_with_prefix(&tar));
        assert!(read(&layer, &diff_id, 0, tar.len() as u64, true).await == tar);
        let big1 = 512 + 10 + 512;
        for (offset, len) in [
            (0, 600),
            (big1 - 3, 10),
            (big1 + (3 << 20) - 2, 1500),
            (big1 + (3 << 20) + 512 + 700 + 100, (1 << 20) + 900),
            (tar.len() - 1, 1),
        ] {
            let got = read(&layer, &diff_id, offset as u64, len as u64, false).await;
            assert!(got == tar[offset..offset + len], "range {offset}+{len}");
        }
        // A wrong diff ID ends the whole read in an error before its last byte.
        let wrong = Digest::from_hasher(Sha256::new_with_prefix(b"other"));
        let mut s = stream(layer, wrong, 0, tar.len() as u64, true, |_| {});
        let mut got = 0;
        let failed = loop {
            match s.next().await {
                Some(Ok(c)) => got += c.len(),
                Some(Err(_)) => break true,
                None => break false,
            }
        };
        assert!(failed && got < tar.len(), "{got} bytes, then no error");
    }
}
