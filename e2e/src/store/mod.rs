//! The object store: every object of the simulated cluster, its resourceVersions and watch history.
//!
//! One mutex guards all objects, a single cluster-wide `resourceVersion` counter (as etcd's
//! revision) and a bounded history of watch events. Every write is decided and published under
//! that lock, so resourceVersions, the history and the broadcast to live watchers agree on one
//! order. The store owns the API semantics that do not depend on HTTP:
//! - metadata stamping (`uid`, `creationTimestamp`, `generation` bumped only when something
//!   outside `metadata` and `status` changed) and per-kind defaults (Service cluster IPs, pod
//!   phase, CRD conditions);
//! - no-op detection: a write that changes nothing keeps the resourceVersion and emits no event;
//! - optimistic concurrency (`409 Conflict` on a stale `resourceVersion`);
//! - deletion: finalizers and graceful pod deletion hold objects with `deletionTimestamp`,
//!   namespaces delete their contents, and owner references cascade (background or orphan);
//! - watch start points, with `410 Gone` once a resourceVersion has left the history.
//!
//! # Files
//! - `admission`: the seeded objects, per-kind defaults and CRD validation.
//! - `deletion`: DELETE options, finalizers, graceful pod deletion, namespace deletion and
//!   owner-reference garbage collection.
//! - `watch`: watch events, the history and watch start points.
//!
//! This file holds the objects, the resourceVersion counter and the reads and writes.

mod admission;
mod deletion;
mod watch;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::patch::{self, PatchType};
use crate::resources::{Registry, ResourceDef};
use crate::selector::{FieldSelector, LabelSelector};

use admission::{apply_defaults, validate_crd};
use deletion::awaits_kubelet;
pub use deletion::{delete_options, DeleteOptions, Propagation};
pub use watch::{EventType, WatchEvent, WatchStart, WatchStream};

/// Storage key of pods, which the store deletes gracefully.
pub const PODS: &str = "/pods";
/// Storage key of namespaces.
pub const NAMESPACES: &str = "/namespaces";
/// Storage key of CustomResourceDefinitions, whose writes change the registry.
pub const CRDS: &str = "apiextensions.k8s.io/customresourcedefinitions";

/// Which part of an object a write targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The object itself; `status` is kept when the resource has a status subresource.
    Main,
    /// The `/status` subresource: only `status` changes.
    Status,
}

type ObjectKey = (String, String, String);

/// The state behind the store's lock.
struct Inner {
    /// The latest cluster-wide resourceVersion, as etcd's revision.
    rv: u64,
    /// The served resources: built-in kinds and those CRDs define.
    registry: Registry,
    /// Every object, by (storage key, namespace, name).
    objects: BTreeMap<ObjectKey, Value>,
    /// The latest watch events, oldest first, for watches that start from a resourceVersion.
    history: VecDeque<Arc<WatchEvent>>,
    /// How many events `history` keeps.
    history_capacity: usize,
    /// Every event with an rv above this one is still in `history`.
    compacted_rv: u64,
    /// The next Service cluster IP to hand out.
    next_cluster_ip: u32,
}

/// The simulated cluster's state. Cheap to share behind an [`Arc`].
pub struct Store {
    /// Everything a write decides on, under one lock.
    inner: Mutex<Inner>,
    /// Every committed change, to live watches and in-process controllers.
    events: broadcast::Sender<Arc<WatchEvent>>,
    /// Mixed into uids and generated name suffixes, so stores in one process differ.
    uid_seed: u64,
    /// Counts the uids and name suffixes handed out, so each differs within this store.
    uid_counter: AtomicU64,
}

/// Current time, RFC 3339 with second precision, as Kubernetes timestamps are written.
pub fn now_rfc3339() -> String {
    let seconds = jiff::Timestamp::now().as_second();
    jiff::Timestamp::from_second(seconds)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn meta(object: &Value, field: &str) -> String {
    object["metadata"][field].as_str().unwrap_or_default().to_string()
}

fn meta_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    object["metadata"].as_object_mut().expect("metadata was made an object")
}

fn has_finalizers(object: &Value) -> bool {
    object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
}

fn is_deleting(object: &Value) -> bool {
    !object["metadata"]["deletionTimestamp"].is_null()
}

/// The object without `metadata` and `status`: what a generation bump is about.
fn desired_state(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
        map.remove("apiVersion");
        map.remove("kind");
    }
    copy
}

/// The object ignoring fields every write changes, to detect no-op writes.
fn comparable(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(m) = copy["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("managedFields");
        m.remove("generation");
    }
    if let Some(map) = copy.as_object_mut() {
        map.remove("apiVersion");
    }
    copy
}

const NAME_SUFFIX_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

impl Store {
    /// An empty cluster with the usual namespaces, one node, a default StorageClass, and a
    /// history of `history_capacity` watch events.
    pub fn new(history_capacity: usize) -> Arc<Self> {
        let (events, _) = broadcast::channel(16 * 1024);
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let store = Arc::new(Store {
            inner: Mutex::new(Inner {
                rv: 0,
                registry: Registry::with_builtins(),
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                history_capacity: history_capacity.max(1),
                compacted_rv: 0,
                next_cluster_ip: 1,
            }),
            events,
            uid_seed: seed,
            uid_counter: AtomicU64::new(0),
        });
        store.seed();
        store
    }

    /// A snapshot of the served resources.
    pub fn registry(&self) -> Registry {
        self.inner.lock().registry.clone()
    }

    /// The resource served at `group/version/plural`.
    pub fn resolve(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.inner.lock().registry.find(group, version, plural)
    }

    /// A built-in resource, by group and plural.
    ///
    /// # Panics
    /// When no such built-in exists: callers name kinds from the fixed built-in table.
    pub fn builtin(&self, group: &str, plural: &str) -> Arc<ResourceDef> {
        self.inner
            .lock()
            .registry
            .find_any_version(group, plural)
            .unwrap_or_else(|| panic!("built-in resource {group}/{plural} is registered"))
    }

    /// The latest resourceVersion.
    pub fn current_rv(&self) -> u64 {
        self.inner.lock().rv
    }

    fn new_uid(&self) -> String {
        let n = self.uid_counter.fetch_add(1, Ordering::Relaxed);
        let a = self.uid_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n.rotate_left(17);
        let b = n.wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ self.uid_seed;
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (a >> 32) as u32,
            (a >> 16) as u16,
            a as u16 & 0xfff,
            (b >> 48) as u16 & 0xfff,
            b & 0xffff_ffff_ffff
        )
    }

    fn random_suffix(&self) -> String {
        let mut x = self.uid_counter.fetch_add(1, Ordering::Relaxed) ^ self.uid_seed;
        (0..5)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                NAME_SUFFIX_ALPHABET[(x >> 33) as usize % NAME_SUFFIX_ALPHABET.len()] as char
            })
            .collect()
    }

    /// Reads one object.
    pub fn get(&self, res: &ResourceDef, ns: &str, name: &str) -> Result<Value, ApiError> {
        let inner = self.inner.lock();
        inner.existing(res, ns, name).map(|o| with_version(o.clone(), res))
    }

    /// Lists objects (all namespaces when `ns` is `None`), sorted by namespace and name, with the
    /// resourceVersion of the snapshot.
    pub fn list(
        &self,
        res: &ResourceDef,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> (Vec<Value>, u64) {
        let inner = self.inner.lock();
        let items = inner
            .in_storage(&res.storage_key())
            .filter(|((_, n, _), _)| ns.is_none_or(|ns| ns == n))
            .map(|(_, o)| o)
            .filter(|o| labels.matches(o) && fields.matches(o))
            .map(|o| with_version(o.clone(), res))
            .collect();
        (items, inner.rv)
    }

    /// Creates an object; `ns` is the namespace from the URL (empty for cluster-scoped kinds).
    pub fn create(&self, res: &ResourceDef, ns: &str, object: Value, dry_run: bool) -> Result<Value, ApiError> {
        let mut inner = self.inner.lock();
        self.create_locked(&mut inner, res, ns, object, dry_run)
    }

    fn create_locked(
        &self,
        inner: &mut Inner,
        res: &ResourceDef,
        ns: &str,
        mut object: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if !object.is_object() {
            return Err(ApiError::bad_request("the request body is not a JSON object"));
        }
        let mut name = meta(&object, "name");
        if name.is_empty() {
            let prefix = meta(&object, "generateName");
            if prefix.is_empty() {
                return Err(ApiError::invalid(
                    &res.group,
                    &res.plural,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
            name = format!("{prefix}{}", self.random_suffix());
        }
        let body_ns = meta(&object, "namespace");
        if res.namespaced {
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            match inner
                .objects
                .get(&(NAMESPACES.to_string(), String::new(), ns.to_string()))
            {
                None => return Err(ApiError::not_found("", "namespaces", ns)),
                Some(n) if is_deleting(n) => {
                    return Err(ApiError::forbidden(format!(
                        "unable to create new content in namespace {ns} because it is being terminated"
                    )))
                }
                Some(_) => {}
            }
        }
        let k = key(res, ns, &name);
        if inner.objects.contains_key(&k) {
            return Err(ApiError::already_exists(&res.group, &res.plural, &name));
        }
        if res.storage_key() == CRDS {
            validate_crd(&object, &name)?;
        }
        let uid = self.new_uid();
        {
            let m = meta_mut(&mut object);
            m.insert("name".into(), json!(name));
            if res.namespaced {
                m.insert("namespace".into(), json!(ns));
            } else {
                m.remove("namespace");
            }
            m.insert("uid".into(), json!(uid));
            m.insert("creationTimestamp".into(), json!(now_rfc3339()));
            m.insert("generation".into(), json!(1));
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            m.remove("managedFields");
        }
        object["kind"] = json!(res.kind);
        object["apiVersion"] = json!(res.api_version());
        apply_defaults(inner, res, &mut object, None);
        if dry_run {
            return Ok(object);
        }
        let created = inner.commit(&self.events, res, ns, &name, object, None);
        if res.storage_key() == NAMESPACES {
            let sa = self.builtin_locked(inner, "", "serviceaccounts");
            let _ = self.create_locked(inner, &sa, &name, json!({"metadata": {"name": "default"}}), false);
        }
        Ok(with_version(created, res))
    }

    fn builtin_locked(&self, inner: &Inner, group: &str, plural: &str) -> Arc<ResourceDef> {
        inner
            .registry
            .find_any_version(group, plural)
            .unwrap_or_else(|| panic!("built-in resource {group}/{plural} is registered"))
    }

    /// Replaces an object (PUT) or its status (PUT on `/status`).
    pub fn update(
        &self,
        res: &ResourceDef,
        ns: &str,
        name: &str,
        object: Value,
        target: Target,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let mut inner = self.inner.lock();
        let existing = inner.existing(res, ns, name)?.clone();
        self.replace_locked(&mut inner, res, ns, name, existing, object, target, dry_run)
    }

    /// Patches an object or its status; server-side apply creates the object when missing.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        res: &ResourceDef,
        ns: &str,
        name: &str,
        patch_type: PatchType,
        patch_body: &Value,
        target: Target,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let mut inner = self.inner.lock();
        let Some(existing) = inner.objects.get(&key(res, ns, name)).cloned() else {
            if patch_type == PatchType::Apply && target == Target::Main {
                let mut object = patch_body.clone();
                meta_mut(&mut object).insert("name".into(), json!(name));
                return self.create_locked(&mut inner, res, ns, object, dry_run);
            }
            return Err(ApiError::not_found(&res.group, &res.plural, name));
        };
        let mut patched = existing.clone();
        patch::apply(&mut patched, patch_type, patch_body, res.custom)?;
        if patch_type == PatchType::Apply {
            // Apply configurations rarely carry a resourceVersion; when they do it is a precondition.
            if patch_body["metadata"]["resourceVersion"].is_null() {
                meta_mut(&mut patched).remove("resourceVersion");
            }
        }
        self.replace_locked(&mut inner, res, ns, name, existing, patched, target, dry_run)
    }

    #[allow(clippy::too_many_arguments)]
    fn replace_locked(
        &self,
        inner: &mut Inner,
        res: &ResourceDef,
        ns: &str,
        name: &str,
        existing: Value,
        new: Value,
        target: Target,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if !new.is_object() {
            return Err(ApiError::bad_request("the request body is not a JSON object"));
        }
        let existing_rv = meta(&existing, "resourceVersion");
        let given_rv = meta(&new, "resourceVersion");
        if !given_rv.is_empty() && given_rv != existing_rv {
            return Err(ApiError::conflict(
                &res.group,
                &res.plural,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        let given_name = meta(&new, "name");
        if !given_name.is_empty() && given_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({given_name}) does not match the name on the URL ({name})"
            )));
        }
        let mut candidate = match target {
            Target::Status => {
                let mut c = existing.clone();
                match new.get("status") {
                    Some(status) => c["status"] = status.clone(),
                    None => {
                        c.as_object_mut().map(|m| m.remove("status"));
                    }
                }
                c
            }
            Target::Main => {
                let mut c = new;
                {
                    let old = &existing["metadata"];
                    let m = meta_mut(&mut c);
                    for field in [
                        "name",
                        "namespace",
                        "uid",
                        "creationTimestamp",
                        "deletionTimestamp",
                        "deletionGracePeriodSeconds",
                        "generation",
                    ] {
                        match old.get(field) {
                            Some(v) => m.insert(field.into(), v.clone()),
                            None => m.remove(field),
                        };
                    }
                    m.remove("managedFields");
                }
                if res.status_subresource {
                    match existing.get("status") {
                        Some(status) => c["status"] = status.clone(),
                        None => {
                            c.as_object_mut().map(|m| m.remove("status"));
                        }
                    }
                }
                c["kind"] = json!(res.kind);
                apply_defaults(inner, res, &mut c, Some(&existing));
                c
            }
        };
        meta_mut(&mut candidate).insert("resourceVersion".into(), json!(existing_rv));
        if comparable(&candidate) == comparable(&existing) {
            return Ok(with_version(existing, res));
        }
        let generation = existing["metadata"]["generation"].as_i64().unwrap_or(1);
        let generation = if desired_state(&candidate) != desired_state(&existing) {
            generation + 1
        } else {
            generation
        };
        meta_mut(&mut candidate).insert("generation".into(), json!(generation));
        if res.storage_key() == CRDS && target == Target::Main {
            validate_crd(&candidate, name)?;
        }
        if dry_run {
            return Ok(with_version(candidate, res));
        }
        let stored = inner.commit(&self.events, res, ns, name, candidate, Some(existing));
        if is_deleting(&stored) && !has_finalizers(&stored) && !awaits_kubelet(&stored, res) {
            let removed = inner.remove(&self.events, &res.storage_key(), ns, name);
            return Ok(with_version(removed.unwrap_or(stored), res));
        }
        Ok(with_version(stored, res))
    }

    /// Every object of a storage key across namespaces, for in-process controllers.
    pub fn objects_of(&self, storage_key: &str) -> Vec<Value> {
        self.inner
            .lock()
            .in_storage(storage_key)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Every stored object, for failure reports.
    pub fn all_objects(&self) -> Vec<Value> {
        self.inner.lock().objects.values().cloned().collect()
    }
}

fn key(res: &ResourceDef, ns: &str, name: &str) -> ObjectKey {
    let ns = if res.namespaced { ns } else { "" };
    (res.storage_key(), ns.to_string(), name.to_string())
}

fn with_version(mut object: Value, res: &ResourceDef) -> Value {
    object["apiVersion"] = json!(res.api_version());
    object["kind"] = json!(res.kind);
    object
}

impl Inner {
    /// The stored object, or the API's NotFound.
    fn existing(&self, res: &ResourceDef, ns: &str, name: &str) -> Result<&Value, ApiError> {
        self.objects
            .get(&key(res, ns, name))
            .ok_or_else(|| ApiError::not_found(&res.group, &res.plural, name))
    }

    fn in_storage<'a>(&'a self, storage: &str) -> impl Iterator<Item = (&'a ObjectKey, &'a Value)> {
        let start = (storage.to_string(), String::new(), String::new());
        let storage = storage.to_string();
        self.objects
            .range(start..)
            .take_while(move |((s, _, _), _)| *s == storage)
    }

    /// Stores `object` under a new resourceVersion and publishes the event.
    fn commit(
        &mut self,
        events: &broadcast::Sender<Arc<WatchEvent>>,
        res: &ResourceDef,
        ns: &str,
        name: &str,
        mut object: Value,
        previous: Option<Value>,
    ) -> Value {
        self.rv += 1;
        meta_mut(&mut object).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let k = key(res, ns, name);
        self.objects.insert(k.clone(), object.clone());
        let event_type = if previous.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(
            events,
            WatchEvent {
                rv: self.rv,
                storage_key: k.0,
                namespace: k.1,
                event_type,
                object: object.clone(),
                previous,
            },
        );
        if res.storage_key() == CRDS {
            self.refresh_registry();
        }
        object
    }

    fn refresh_registry(&mut self) {
        let crds: Vec<Value> = self.in_storage(CRDS).map(|(_, o)| o.clone()).collect();
        self.registry.set_custom_resources(crds.iter());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configmaps(store: &Store) -> Arc<ResourceDef> {
        store.builtin("", "configmaps")
    }

    #[test]
    fn identical_update_keeps_resource_version() {
        let store = Store::new(100);
        let cm = configmaps(&store);
        let created = store
            .create(
                &cm,
                "default",
                json!({"metadata": {"name": "a"}, "data": {"k": "v"}}),
                false,
            )
            .unwrap();
        let rv = store.current_rv();
        let same = store
            .update(&cm, "default", "a", created.clone(), Target::Main, false)
            .unwrap();
        assert_eq!(
            same["metadata"]["resourceVersion"],
            created["metadata"]["resourceVersion"]
        );
        assert_eq!(store.current_rv(), rv);
    }

    #[test]
    fn stale_update_conflicts_and_generation_tracks_spec_only() {
        let store = Store::new(100);
        let sts = store.builtin("apps", "statefulsets");
        let created = store
            .create(
                &sts,
                "default",
                json!({"metadata": {"name": "s"}, "spec": {"replicas": 1}}),
                false,
            )
            .unwrap();
        let mut labelled = created.clone();
        labelled["metadata"]["labels"] = json!({"a": "b"});
        let labelled = store
            .update(&sts, "default", "s", labelled, Target::Main, false)
            .unwrap();
        assert_eq!(labelled["metadata"]["generation"], json!(1));
        let err = store
            .update(&sts, "default", "s", created, Target::Main, false)
            .unwrap_err();
        assert_eq!(err.code, 409);
        let scaled = store
            .patch(
                &sts,
                "default",
                "s",
                PatchType::Merge,
                &json!({"spec": {"replicas": 2}}),
                Target::Main,
                false,
            )
            .unwrap();
        assert_eq!(scaled["metadata"]["generation"], json!(2));
    }

    #[test]
    fn finalizers_hold_deletion_until_removed() {
        let store = Store::new(100);
        let cm = configmaps(&store);
        store
            .create(
                &cm,
                "default",
                json!({"metadata": {"name": "f", "finalizers": ["x/y"]}}),
                false,
            )
            .unwrap();
        let held = store
            .delete(&cm, "default", "f", &DeleteOptions::default(), false)
            .unwrap();
        assert!(!held["metadata"]["deletionTimestamp"].is_null());
        store
            .patch(
                &cm,
                "default",
                "f",
                PatchType::Merge,
                &json!({"metadata": {"finalizers": null}}),
                Target::Main,
                false,
            )
            .unwrap();
        assert_eq!(store.get(&cm, "default", "f").unwrap_err().code, 404);
    }

    #[test]
    fn owner_deletion_cascades_to_dependents() {
        let store = Store::new(100);
        let cm = configmaps(&store);
        let owner = store
            .create(&cm, "default", json!({"metadata": {"name": "owner"}}), false)
            .unwrap();
        let owner_ref = json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner["metadata"]["uid"]}]);
        store
            .create(
                &cm,
                "default",
                json!({"metadata": {"name": "dep", "ownerReferences": owner_ref}}),
                false,
            )
            .unwrap();
        store
            .delete(&cm, "default", "owner", &DeleteOptions::default(), false)
            .unwrap();
        assert_eq!(store.get(&cm, "default", "dep").unwrap_err().code, 404);
    }

    #[test]
    fn watch_from_compacted_version_is_gone() {
        let store = Store::new(2);
        let cm = configmaps(&store);
        for i in 0..5 {
            store
                .create(&cm, "default", json!({"metadata": {"name": format!("c{i}")}}), false)
                .unwrap();
        }
        assert_eq!(
            store.watch(&cm, None, WatchStart::After(1)).err().map(|e| e.code),
            Some(410)
        );
        let recent = store
            .watch(&cm, None, WatchStart::After(store.current_rv() - 1))
            .ok()
            .unwrap();
        assert_eq!(recent.initial.len(), 1);
    }
}
