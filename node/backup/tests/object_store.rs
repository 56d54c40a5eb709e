//! Backups against a real S3-protocol server and a local directory.
//!
//! The S3 server is `s3s-fs` (an S3 implementation over a directory) on 127.0.0.1:0, checking
//! SigV4 signatures against one access key, so every request object_store makes is signed and
//! verified as on a real S3-compatible service.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures::stream;
use jiff::Timestamp;
use raftkv_backup::catalog::{list_backups, object_name, prune};
use raftkv_backup::transfer::{download_snapshot, upload_snapshot, PART_SIZE};
use raftkv_backup::{Destination, Error, Retention, StoreOptions};

const ACCESS_KEY: &str = "raftkv-test-access";
const SECRET_KEY: &str = "raftkv-test-secret-key-0123456789";
const BUCKET: &str = "backups";

/// An S3 server on loopback, stopped when dropped.
struct S3Server {
    endpoint: String,
    root: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl S3Server {
    async fn start() -> anyhow::Result<Self> {
        let root = tempfile::tempdir()?;
        std::fs::create_dir(root.path().join(BUCKET))?;
        let fs = s3s_fs::FileSystem::new(root.path()).map_err(|e| anyhow::anyhow!("s3s-fs: {e:?}"))?;
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Ok(Self { endpoint, root, task })
    }

    fn options(&self) -> StoreOptions {
        StoreOptions {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            allow_http: true,
        }
    }

    fn destination(&self, secret: &str) -> Destination {
        let credentials = BTreeMap::from([
            ("AWS_ACCESS_KEY_ID".to_string(), ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), secret.to_string()),
        ]);
        Destination::open(&format!("s3://{BUCKET}/prod/demo"), &credentials, &self.options()).unwrap()
    }

    /// Every file under the bucket's directory, as the server stores them.
    fn files(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(&self.root.path().join(BUCKET), &mut out);
        out
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn walk(dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            walk(&e.path(), out);
        } else {
            out.push(e.path().display().to_string());
        }
    }
}

/// Snapshot-shaped bytes of `len` body bytes: the node's magic, the body, the crc32c trailer.
fn snapshot(len: usize, seed: u8) -> Vec<u8> {
    let mut v = raftkv_backup::check::SNAPSHOT_MAGIC.to_vec();
    v.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// The bytes as a stream of 64 KiB chunks, as an HTTP body arrives.
fn chunks(bytes: &[u8]) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + use<> {
    let parts: Vec<_> = bytes.chunks(64 << 10).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    stream::iter(parts)
}

/// The bytes up to `cut`, then the connection breaks.
fn broken_after(bytes: &[u8], cut: usize) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + use<> {
    let mut parts: Vec<_> = bytes[..cut]
        .chunks(64 << 10)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    parts.push(Err(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "member went away",
    )));
    stream::iter(parts)
}

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

async fn with_deadline<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("test deadline")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backups_upload_list_download_and_prune() {
    with_deadline(async {
        let server = S3Server::start().await.unwrap();
        let dest = server.destination(SECRET_KEY);
        // Three parts and a bit: the multipart path, not a single put.
        let big = snapshot(3 * PART_SIZE + 12345, 1);
        let small = snapshot(1000, 2);
        let names = [
            object_name("demo", t("2026-12-01T00:00:00Z"), 10),
            object_name("demo", t("2026-12-02T00:00:00Z"), 20),
            object_name("demo", t("2026-12-03T00:00:00Z"), 30),
        ];
        for (name, bytes) in names.iter().zip([&small, &small, &big]) {
            let up = upload_snapshot(&dest, name, chunks(bytes), None).await.unwrap();
            assert_eq!(up.size, bytes.len() as u64);
        }
        // Another cluster's backup in the same folder is listed for it only.
        let other = object_name("demo-2", t("2026-12-03T00:00:00Z"), 5);
        upload_snapshot(&dest, &other, chunks(&small), None).await.unwrap();

        let listed = list_backups(&dest, "demo").await.unwrap();
        assert_eq!(listed.iter().map(|b| b.revision).collect::<Vec<_>>(), vec![30, 20, 10]);
        assert_eq!(listed[0].size, Some(big.len() as u64));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("restore.snap");
        let size = download_snapshot(&dest, &names[2], &file).await.unwrap();
        assert_eq!(size, big.len() as u64);
        assert!(std::fs::read(&file).unwrap() == big, "downloaded bytes differ");

        let retention = Retention {
            keep_last: Some(1),
            keep_days: None,
        };
        let deleted = prune(&dest, "demo", retention, t("2026-12-04T00:00:00Z"))
            .await
            .unwrap();
        assert_eq!(deleted, vec![names[0].clone(), names[1].clone()]);
        let left = list_backups(&dest, "demo").await.unwrap();
        assert_eq!(left.iter().map(|b| b.revision).collect::<Vec<_>>(), vec![30]);
        assert_eq!(
            list_backups(&dest, "demo-2").await.unwrap().len(),
            1,
            "other cluster's backup pruned"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_key_is_refused_by_the_server() {
    with_deadline(async {
        let server = S3Server::start().await.unwrap();
        let dest = server.destination("not-the-secret");
        let name = object_name("demo", t("2026-12-01T00:00:00Z"), 1);
        let err = upload_snapshot(&dest, &name, chunks(&snapshot(100, 0)), None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Store(_)), "{err}");
        assert!(list_backups(&server.destination(SECRET_KEY), "demo")
            .await
            .unwrap()
            .is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_source_breaks_mid_way_leaves_no_object() {
    with_deadline(async {
        let server = S3Server::start().await.unwrap();
        let dest = server.destination(SECRET_KEY);
        let bytes = snapshot(3 * PART_SIZE, 3);
        let name = object_name("demo", t("2026-12-01T00:00:00Z"), 1);
        // Two whole parts have been sent when the member goes away.
        let err = upload_snapshot(&dest, &name, broken_after(&bytes, 2 * PART_SIZE + 100), None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Source(_)), "{err}");
        assert!(list_backups(&dest, "demo").await.unwrap().is_empty());
        let dir = tempfile::tempdir().unwrap();
        assert!(download_snapshot(&dest, &name, &dir.path().join("x")).await.is_err());
        let stored: Vec<_> = server.files().into_iter().filter(|f| f.ends_with(".rkvsnap")).collect();
        assert!(stored.is_empty(), "server holds {stored:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_closes_early_or_is_damaged_is_aborted_not_completed() {
    with_deadline(async {
        let server = S3Server::start().await.unwrap();
        let dest = server.destination(SECRET_KEY);
        let bytes = snapshot(PART_SIZE + 5000, 4);
        let name = object_name("demo", t("2026-12-01T00:00:00Z"), 1);
        // The stream ends cleanly but short: only the trailer check can tell.
        let err = upload_snapshot(&dest, &name, chunks(&bytes[..bytes.len() - 10]), None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Damaged(_)), "{err}");
        let mut flipped = bytes.clone();
        flipped[PART_SIZE / 2] ^= 1;
        let err = upload_snapshot(&dest, &name, chunks(&flipped), None).await.unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        // A whole snapshot, but not the size its source announced: not kept either.
        let err = upload_snapshot(&dest, &name, chunks(&bytes), Some(bytes.len() as u64 + 1))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("announced"), "{err}");
        assert!(list_backups(&dest, "demo").await.unwrap().is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_path_backups_round_trip_and_an_interrupted_one_leaves_no_backup() {
    with_deadline(async {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/raftkv", dir.path().display());
        let dest = Destination::open(&url, &BTreeMap::new(), &StoreOptions::default()).unwrap();
        assert!(
            list_backups(&dest, "demo").await.unwrap().is_empty(),
            "a missing folder lists nothing"
        );
        let bytes = snapshot(PART_SIZE + 7, 5);
        let good = object_name("demo", t("2026-12-02T00:00:00Z"), 7);
        upload_snapshot(&dest, &good, chunks(&bytes), None).await.unwrap();
        assert!(std::fs::read(dir.path().join("raftkv").join(&good)).unwrap() == bytes);

        let broken = object_name("demo", t("2026-12-03T00:00:00Z"), 8);
        upload_snapshot(&dest, &broken, broken_after(&bytes, PART_SIZE + 1), None)
            .await
            .unwrap_err();
        let listed = list_backups(&dest, "demo").await.unwrap();
        assert_eq!(listed.iter().map(|b| b.revision).collect::<Vec<_>>(), vec![7]);
        assert!(!dir.path().join("raftkv").join(&broken).exists());

        // A damaged object is refused on download and leaves no file to restore from.
        let damaged = object_name("demo", t("2026-12-04T00:00:00Z"), 9);
        let mut bad = bytes.clone();
        bad.truncate(bytes.len() - 1);
        std::fs::write(dir.path().join("raftkv").join(&damaged), &bad).unwrap();
        let target = dir.path().join("restore.snap");
        let err = download_snapshot(&dest, &damaged, &target).await.unwrap_err();
        assert!(matches!(err, Error::Damaged(_)), "{err}");
        assert!(!target.exists(), "a refused download left its file");
        download_snapshot(&dest, &good, &target).await.unwrap();
        assert!(std::fs::read(&target).unwrap() == bytes);
    })
    .await
}
