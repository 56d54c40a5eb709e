//! Moving snapshots into and out of a destination, streaming and checked.
//!
//! An upload is one multipart upload under the backup's final name. Parts go out as the
//! snapshot streams in (at most [`PART_SIZE`] times [`PARTS_IN_FLIGHT`] plus one part is held
//! in memory, whatever the snapshot's size), and the upload is completed only once the whole
//! stream has passed [`SnapshotCheck`]. Stores make a multipart object visible only at
//! completion, so a stream that breaks, is truncated or fails its checksum leaves no object
//! under a backup's name: the upload is aborted and its parts discarded. (A process killed in
//! the middle cannot abort; its parts stay invisible until the bucket's lifecycle rule for
//! incomplete uploads removes them, and a local directory keeps a staging file whose name is
//! not a backup's.)

use std::path::Path;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, WriteMultipart};
use tokio::io::AsyncWriteExt;

use crate::check::SnapshotCheck;
use crate::{Destination, Error, Result};

/// Size of one uploaded part. S3 wants at least 5 MiB for every part but the last.
pub const PART_SIZE: usize = 8 << 20;
/// Parts uploaded concurrently before the source is read further (back pressure).
pub const PARTS_IN_FLIGHT: usize = 2;

/// What an upload stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uploaded {
    /// The object's name in its destination.
    pub name: String,
    /// Its size in bytes, as the store reports it after completion.
    pub size: u64,
}

/// Streams a snapshot from `source` into `dest` as the object `name`, completing the upload
/// only for a whole, checked snapshot of `expected_size` bytes (when the source announced
/// one). On any error the upload is aborted.
pub async fn upload_snapshot<S, E>(
    dest: &Destination,
    name: &str,
    source: S,
    expected_size: Option<u64>,
) -> Result<Uploaded>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let path = dest.path_of(name);
    let upload = dest.store().put_multipart(&path).await?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let streamed = stream_parts(&mut writer, source)
        .await
        .and_then(|size| match expected_size {
            Some(expected) if expected != size => Err(Error::Damaged(format!(
                "the source announced {expected} bytes and sent {size}"
            ))),
            _ => Ok(size),
        });
    match streamed {
        Ok(size) => {
            writer.finish().await?;
            // The store's own view of the completed object must match what was checked.
            let stored = dest.store().head(&path).await?;
            if stored.size != size {
                dest.store().delete(&path).await?;
                return Err(Error::Damaged(format!(
                    "stored object has {} bytes, {size} were uploaded; deleted it",
                    stored.size
                )));
            }
            tracing::info!(object = %dest.object_url(name), size, "uploaded backup");
            Ok(Uploaded {
                name: name.to_string(),
                size,
            })
        }
        Err(e) => {
            tracing::warn!(object = %dest.object_url(name), error = %e, "backup upload failed; aborting it");
            if let Err(abort) = writer.abort().await {
                tracing::warn!(object = %dest.object_url(name), error = %abort, "aborting the upload failed");
            }
            Err(e)
        }
    }
}

async fn stream_parts<S, E>(writer: &mut WriteMultipart, source: S) -> Result<u64>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut check = SnapshotCheck::new();
    let mut source = std::pin::pin!(source);
    while let Some(chunk) = source.next().await {
        let chunk = chunk.map_err(|e| Error::Source(Box::new(e)))?;
        check.update(&chunk)?;
        writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
        writer.put(chunk);
    }
    check.finish()
}

/// Downloads the object `name` of `dest` into a new file at `file`, checking it as it streams,
/// and fsyncs it. On any error the file is removed. Returns the snapshot's size.
pub async fn download_snapshot(dest: &Destination, name: &str, file: &Path) -> Result<u64> {
    let io = |context: &str, source| Error::Io {
        context: format!("{context} {}", file.display()),
        source,
    };
    let mut out = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
        .await
        .map_err(|e| io("creating", e))?;
    let result = async {
        let mut stream = dest.store().get(&dest.path_of(name)).await?.into_stream();
        let mut check = SnapshotCheck::new();
        while let Some(chunk) = stream.try_next().await? {
            check.update(&chunk)?;
            out.write_all(&chunk).await.map_err(|e| io("writing", e))?;
        }
        let size = check.finish()?;
        // The file is restored from only after this returns; it must be on disk first.
        out.sync_all().await.map_err(|e| io("fsyncing", e))?;
        Ok(size)
    }
    .await;
    if result.is_err() {
        drop(out);
        let _ = tokio::fs::remove_file(file).await;
    }
    result
}
