//! Names the simulated cluster's parts agree on without depending on each other: the one node's
//! name, the storage provisioner and the claim-protection finalizer.
//!
//! The store seeds the Node and the default StorageClass and adds the finalizer on claim
//! creation (as a real API server's admission does), while the kubelet and the storage
//! controllers act on the same names; keeping them here lets each of those modules name them
//! without importing another.

/// The one node of the simulated cluster.
pub const NODE_NAME: &str = "sim-node";

/// The finalizer that keeps a claim while a pod uses it.
pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";

/// Marks the simulation's dynamically provisioned volumes.
pub const PROVISIONER: &str = "raftkv.dev/host-directory";
