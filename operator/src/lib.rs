//! `raftkv-operator`: reconciles `RaftCluster` objects into a StatefulSet, Services and a
//! PodDisruptionBudget, and turns replica changes into Raft membership changes, one safe step at
//! a time.
//!
//! # Layout
//!
//! - [`crd`]: the `RaftCluster` resource, its schema, and its status.
//! - [`backup`]: scheduled and on-demand backups streamed from a member into object storage,
//!   and where a restore stands.
//! - [`config`]: operator-wide settings from the command line, and how a pod's node is dialled.
//! - [`names`]: names and labels of a cluster's objects.
//! - [`quantity`]: the one parser of Kubernetes quantities such as `1Gi`.
//! - [`certs`]: the certificates the operator issues (CAs, server, peer and client
//!   certificates) and when they are due for renewal.
//! - [`tls`]: the TLS Secrets of a cluster: which generation the pods mount, and what the
//!   operator's node client needs.
//! - [`build`]: validation and the pure builders of the Kubernetes objects.
//! - [`node_client`]: the [`node_client::NodeApi`] trait and its HTTP client for the nodes'
//!   admin API.
//! - [`failure`]: why a pod's node stopped, from its container status and fatal line.
//! - [`observe`]: pods, claims and node answers turned into the planner's view, and
//!   [`observe::observe_and_plan`], the one pipeline from what was read to the next step.
//! - [`plan`]: the pure planner: membership one step at a time, and the size of a recreated
//!   StatefulSet.
//! - [`execute`]: carrying out a step through `NodeApi` and [`execute::ClusterEffects`].
//! - [`status`]: the pure status computation (phase, conditions, members).
//! - [`reconcile`]: the controller: the pipeline, the Kubernetes side effects, error backoff.
//! - [`leader`]: Lease-based leader election between operator replicas.
//! - [`metrics`]: Prometheus metrics and the `/metrics` and `/healthz` server.
//! - [`error`]: the crate's error type.

pub mod backup;
pub mod build;
pub mod certs;
pub mod config;
pub mod crd;
pub mod error;
pub mod execute;
pub mod failure;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod node_client;
pub mod observe;
pub mod plan;
pub mod quantity;
pub mod reconcile;
pub mod status;
pub mod tls;

#[cfg(test)]
mod convergence_tests;
#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod model;

pub use error::{Error, Result};
