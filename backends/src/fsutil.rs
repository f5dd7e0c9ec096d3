//! Small file helpers shared by the backends' on-disk state.

use std::io;
use std::path::Path;

use ferry_core::{Error, Result};
use tokio::fs;
use tokio::io::AsyncWriteExt;

/// Replaces `path` with `data` so that a reader (or a crash) sees the old content or the new,
/// never a mix: temp file in the same directory, fsync, rename.
pub async fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Internal(format!("{} has no parent directory", path.display())))?;
    fs::create_dir_all(dir)
        .await
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
    let result = async {
        let mut f = fs::File::create(&tmp).await?;
        f.write_all(data).await?;
        f.sync_all().await?;
        fs::rename(&tmp, path).await
    }
    .await;
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp).await;
        return Err(Error::io(format!("writing {}", path.display()), e));
    }
    Ok(())
}

/// Whether this process can create files in `dir`: a temp file written and removed. The
/// reason (permission denied, read-only, full disk) when it cannot.
pub async fn probe_writable(dir: &Path) -> std::result::Result<(), String> {
    let probe = dir.join(format!(".tmp-probe-{}", uuid::Uuid::new_v4()));
    let written = fs::write(&probe, b"").await;
    let _ = fs::remove_file(&probe).await;
    written.map_err(|e| Error::io(format!("writing in {}", dir.display()), e).to_string())
}

/// Reads a file, `None` when it does not exist.
pub async fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path).await {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

/// Removes a file, `false` when it was not there.
pub async fn remove_optional(path: &Path) -> Result<bool> {
    match fs::remove_file(path).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}

/// Names of the entries of a directory that are not temp files; empty when it does not exist.
pub async fn list_names(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut rd = match fs::read_dir(dir).await {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    while let Some(entry) = rd
        .next_entry()
        .await
        .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            out.push(name);
        }
    }
    Ok(out)
}

/// Removes the `.tmp-*` files [`write_atomic`] leaves when a crash cuts it short, anywhere
/// under `dir`; returns how many.
pub async fn sweep_temp_files(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut rd = match fs::read_dir(&d).await {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("listing {}", d.display()), e)),
        };
        while let Some(entry) = rd
            .next_entry()
            .await
            .map_err(|e| Error::io(format!("listing {}", d.display()), e))?
        {
            let path = entry.path();
            let is_dir = entry.file_type().await.map(|t| t.is_dir()).unwrap_or(false);
            if is_dir {
                stack.push(path);
            } else if entry.file_name().to_string_lossy().starts_with(".tmp-") && remove_optional(&path).await? {
                removed += 1;
            }
        }
    }
    Ok(removed)
}
