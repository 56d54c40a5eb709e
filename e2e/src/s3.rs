//! An S3-protocol object store on loopback, for backups: `s3s-fs` (S3 over a directory)
//! checking SigV4 signatures against one access key, as an S3-compatible service in a real
//! cluster would. Pods run as host processes, so the operator and the nodes reach it at
//! `127.0.0.1`.

use std::path::Path;

use crate::{Error, Result};

/// The access key the server accepts.
pub const ACCESS_KEY: &str = "raftkv-e2e-access";
/// The secret key the server accepts.
pub const SECRET_KEY: &str = "raftkv-e2e-secret-key-0123456789";

/// A running S3 server, stopped when dropped.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    endpoint: String,
    /// The directory behind the buckets.
    root: tempfile::TempDir,
    /// The accept loop.
    task: tokio::task::JoinHandle<()>,
}

impl S3Server {
    /// Starts a server on `127.0.0.1:0` with the given buckets.
    pub async fn start(buckets: &[&str]) -> Result<S3Server> {
        let root = tempfile::tempdir().map_err(|e| Error::io("creating the S3 server's directory", e))?;
        for bucket in buckets {
            std::fs::create_dir(root.path().join(bucket))
                .map_err(|e| Error::io(format!("creating bucket {bucket}"), e))?;
        }
        let fs = s3s_fs::FileSystem::new(root.path())
            .map_err(|e| Error::io("starting s3s-fs", std::io::Error::other(format!("{e:?}"))))?;
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::io("binding the S3 server", e))?;
        let endpoint = format!(
            "http://{}",
            listener.local_addr().map_err(|e| Error::io("S3 server address", e))?
        );
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
        Ok(S3Server { endpoint, root, task })
    }

    /// The endpoint URL clients are configured with.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The directory holding the buckets' objects.
    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}
