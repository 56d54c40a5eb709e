//! Prints the `RaftCluster` CustomResourceDefinition as YAML.
//!
//! `crds/raftclusters.raftkv.dev.yaml` is this program's output; CI regenerates it and fails on
//! any difference, so the committed CRD never drifts from the Rust types.

fn main() -> anyhow::Result<()> {
    print!("{}", raftkv_operator::crd::crd_yaml()?);
    Ok(())
}
