//! raftkv's end-to-end suite: a simulated Kubernetes control plane that real clients drive.
//!
//! These machines have no cluster, no container engine and no network beyond package
//! registries, so the suite brings its own control plane: an in-memory API server that the real
//! `kubectl` and kube-rs talk to over HTTP, workload controllers, and a kubelet that runs every
//! pod as real host processes. See `e2e/README.md` for what it does and every way it differs
//! from a real cluster.
//!
//! ```no_run
//! # async fn demo() -> raftkv_e2e::Result<()> {
//! use raftkv_e2e::{ImageMapping, SimCluster};
//! let cluster = SimCluster::builder()
//!     .image("raftkv/node:*", ImageMapping::new("target/debug/raftkv-node"))
//!     .start()
//!     .await?;
//! let client = cluster.kube_client().await?;
//! let status = cluster.kubectl().args(["get", "pods"]).status();
//! let endpoints = cluster.service_endpoints("default", "demo")?;
//! println!("{}", cluster.report());
//! cluster.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`cluster`]: [`SimCluster`], starting and stopping everything, kubectl and kube-rs
//!   clients, pod logs, Service endpoints, failure reports.
//! - [`apiserver`]: HTTP routing of Kubernetes REST paths, watches, subresources.
//! - [`store`]: objects, resourceVersions and the reads and writes; its files `admission`
//!   (seeded objects, per-kind defaults, CRD validation), `deletion` (finalizers, graceful
//!   pod deletion, namespaces, garbage collection) and `watch` (events, history, watch starts).
//! - [`resources`]: the served kinds, built-in and from CRDs.
//! - [`discovery`] and [`table`]: discovery and OpenAPI documents, `kubectl get` tables.
//! - [`protobuf`]: request bodies in Kubernetes protobuf, as kubectl's typed clients send.
//! - [`patch`], [`selector`], [`jsonpath`]: patch flavours, selectors, printer-column paths.
//! - [`controllers`]: StatefulSet, Deployment and ReplicaSet controllers.
//! - [`volumes`]: PersistentVolume provisioning, binding and reclaiming; claim protection.
//! - [`kubelet`]: pods as host processes; its files `images`, `environment`, `mounts`,
//!   `probes`, `status` and `lifecycle` (pod worker, container run loop, restarts, termination).
//! - [`object`]: reading stored objects' metadata, for the controllers.
//! - [`rbac`]: the RBAC authorizer for pods' service-account tokens.
//! - [`s3`]: an S3-protocol object store on loopback, with SigV4, for backups.
//! - [`kubeconfig`]: kubeconfig files, the administrator's and each service account's.
//! - [`logs`]: where containers' logs live on the host.
//! - [`wellknown`]: names several parts share: the node, the provisioner, the claim finalizer.
//! - [`error`]: [`Error`] and [`ApiError`].
//!
//! Modules depend on each other in one direction only: `cluster` on everything it starts; the
//! API server, controllers and kubelet on the store; the store only on `resources`, `patch`,
//! `selector`, `wellknown` and `error`. No module imports one that imports it back.

pub mod apiserver;
pub mod cluster;
pub mod controllers;
pub mod discovery;
pub mod error;
pub mod jsonpath;
pub mod kubeconfig;
pub mod kubelet;
pub mod logs;
pub mod object;
pub mod patch;
pub mod protobuf;
pub mod rbac;
pub mod resources;
pub mod s3;
pub mod selector;
pub mod store;
pub mod table;
pub mod volumes;
pub mod wellknown;

pub use cluster::{eventually, ServiceEndpoint, SimCluster, SimClusterBuilder};
pub use error::{ApiError, Error, Result};
pub use kubelet::{ImageMapping, ImageTable};
