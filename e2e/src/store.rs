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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::patch::{self, PatchType};
use crate::resources::{Registry, ResourceDef};
use crate::selector::{FieldSelector, LabelSelector};
use crate::wellknown;

/// Storage key of pods, which the store deletes gracefully.
pub const PODS: &str = "/pods";
/// Storage key of namespaces.
pub const NAMESPACES: &str = "/namespaces";
/// Storage key of CustomResourceDefinitions, whose writes change the registry.
pub const CRDS: &str = "apiextensions.k8s.io/customresourcedefinitions";

/// The type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// The object was created (or, for a selector-filtered watch, started to match).
    Added,
    /// The object changed.
    Modified,
    /// The object was removed.
    Deleted,
}

impl EventType {
    /// The wire name (`ADDED`, `MODIFIED`, `DELETED`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as recorded in the history and broadcast to watchers.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    /// The cluster resourceVersion this change produced.
    pub rv: u64,
    /// [`ResourceDef::storage_key`] of the object.
    pub storage_key: String,
    /// Namespace of the object, empty for cluster-scoped objects.
    pub namespace: String,
    /// What happened.
    pub event_type: EventType,
    /// The object after the change (for deletions, its last state).
    pub object: Value,
    /// The object before a modification, so selector-filtered watches can tell when it stopped matching.
    pub previous: Option<Value>,
}

/// Which part of an object a write targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The object itself; `status` is kept when the resource has a status subresource.
    Main,
    /// The `/status` subresource: only `status` changes.
    Status,
}

/// How dependents are treated when their owner is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagation {
    /// Dependents are deleted once the owner is gone (the default).
    #[default]
    Background,
    /// Treated as background: the owner does not wait for its dependents.
    Foreground,
    /// Dependents lose their owner reference and stay.
    Orphan,
}

/// Options of a DELETE.
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    /// Dependent handling.
    pub propagation: Propagation,
    /// Grace period for pods; `Some(0)` removes the pod at once.
    pub grace_period_seconds: Option<i64>,
    /// Precondition on the object's uid.
    pub precondition_uid: Option<String>,
    /// Precondition on the object's resourceVersion.
    pub precondition_rv: Option<String>,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStart {
    /// Synthetic `ADDED` events for every current object, then live changes
    /// (resourceVersion unset or `"0"`, or `sendInitialEvents=true`).
    Now,
    /// Every change after this resourceVersion.
    After(u64),
}

/// A watch, ready to stream.
pub struct WatchStream {
    /// Events to send first: synthetic `ADDED` events or replayed history.
    pub initial: Vec<Arc<WatchEvent>>,
    /// Live events; only those with `rv` above [`WatchStream::start_rv`] are new.
    pub live: broadcast::Receiver<Arc<WatchEvent>>,
    /// The cluster resourceVersion when the watch started.
    pub start_rv: u64,
}

type ObjectKey = (String, String, String);

struct Inner {
    rv: u64,
    registry: Registry,
    objects: BTreeMap<ObjectKey, Value>,
    history: VecDeque<Arc<WatchEvent>>,
    history_capacity: usize,
    /// Every event with an rv above this one is still in `history`.
    compacted_rv: u64,
    next_cluster_ip: u32,
}

/// The simulated cluster's state. Cheap to share behind an [`Arc`].
pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<WatchEvent>>,
    uid_seed: u64,
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

    fn seed(&self) {
        let namespaces = self.builtin("", "namespaces");
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            self.create(&namespaces, "", json!({"metadata": {"name": ns}}), false)
                .expect("seeding a namespace into an empty store");
        }
        let node = json!({"metadata": {"name": wellknown::NODE_NAME,
                "labels": {"kubernetes.io/hostname": wellknown::NODE_NAME}},
            "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}});
        self.create(&self.builtin("", "nodes"), "", node, false)
            .expect("seeding the node");
        let class = json!({"metadata": {"name": "standard",
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": wellknown::PROVISIONER, "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate"});
        self.create(&self.builtin("storage.k8s.io", "storageclasses"), "", class, false)
            .expect("seeding the storage class");
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

    /// A receiver of every future change, for in-process controllers.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<WatchEvent>> {
        self.events.subscribe()
    }

    /// Drops the whole watch history, so any watch from an older resourceVersion gets `410 Gone`.
    pub fn compact(&self) {
        let mut inner = self.inner.lock();
        inner.history.clear();
        inner.compacted_rv = inner.rv;
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

    /// Deletes an object, honouring finalizers, graceful pod deletion and propagation.
    pub fn delete(
        &self,
        res: &ResourceDef,
        ns: &str,
        name: &str,
        options: &DeleteOptions,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let mut inner = self.inner.lock();
        let existing = inner.existing(res, ns, name)?.clone();
        if let Some(uid) = &options.precondition_uid {
            if *uid != meta(&existing, "uid") {
                return Err(ApiError::conflict(
                    &res.group,
                    &res.plural,
                    name,
                    "Precondition failed: UID in precondition does not match the UID in the object",
                ));
            }
        }
        if let Some(rv) = &options.precondition_rv {
            if *rv != meta(&existing, "resourceVersion") {
                return Err(ApiError::conflict(
                    &res.group,
                    &res.plural,
                    name,
                    "Precondition failed: resourceVersion in precondition does not match the object",
                ));
            }
        }
        if dry_run {
            return Ok(with_version(existing, res));
        }
        let storage = res.storage_key();
        let is_pod = storage == PODS;
        let force = options.grace_period_seconds == Some(0);
        if is_deleting(&existing) {
            if is_pod && force && !has_finalizers(&existing) {
                let removed = inner.remove(&self.events, &storage, ns, name);
                return Ok(with_version(removed.unwrap_or(existing), res));
            }
            return Ok(with_version(existing, res));
        }
        if options.propagation == Propagation::Orphan {
            inner.orphan_dependents(&self.events, &meta(&existing, "uid"));
        }
        let graceful_pod = is_pod && !force && existing["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty());
        let is_namespace = storage == NAMESPACES;
        if graceful_pod || has_finalizers(&existing) || is_namespace {
            let mut marked = existing.clone();
            let grace = if graceful_pod {
                options
                    .grace_period_seconds
                    .or_else(|| existing["spec"]["terminationGracePeriodSeconds"].as_i64())
                    .unwrap_or(30)
            } else {
                0
            };
            {
                let m = meta_mut(&mut marked);
                m.insert("deletionTimestamp".into(), json!(now_rfc3339()));
                m.insert("deletionGracePeriodSeconds".into(), json!(grace));
            }
            if is_namespace {
                marked["status"]["phase"] = json!("Terminating");
            }
            let stored = inner.commit(&self.events, res, ns, name, marked, Some(existing));
            if is_namespace {
                inner.delete_namespace_contents(&self.events, name);
                if let Some(removed) = inner.finalize_namespace(&self.events, name) {
                    return Ok(with_version(removed, res));
                }
            }
            return Ok(with_version(stored, res));
        }
        let removed = inner.remove(&self.events, &storage, ns, name);
        Ok(with_version(removed.unwrap_or(existing), res))
    }

    /// Starts a watch on one resource (`ns` = `None` for all namespaces).
    pub fn watch(&self, res: &ResourceDef, ns: Option<&str>, start: WatchStart) -> Result<WatchStream, ApiError> {
        let inner = self.inner.lock();
        let storage = res.storage_key();
        let live = self.events.subscribe();
        let initial = match start {
            WatchStart::Now => inner
                .in_storage(&storage)
                .filter(|((_, n, _), _)| ns.is_none_or(|ns| ns == n))
                .map(|((_, n, _), o)| {
                    Arc::new(WatchEvent {
                        rv: inner.rv,
                        storage_key: storage.clone(),
                        namespace: n.clone(),
                        event_type: EventType::Added,
                        object: o.clone(),
                        previous: None,
                    })
                })
                .collect(),
            WatchStart::After(rv) => {
                if rv < inner.compacted_rv {
                    return Err(ApiError::gone(rv, inner.compacted_rv));
                }
                inner
                    .history
                    .iter()
                    .filter(|e| e.rv > rv && e.storage_key == storage)
                    .filter(|e| ns.is_none_or(|ns| ns == e.namespace))
                    .cloned()
                    .collect()
            }
        };
        Ok(WatchStream {
            initial,
            live,
            start_rv: inner.rv,
        })
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

/// Pods on a node stay until the kubelet has stopped their processes.
fn awaits_kubelet(object: &Value, res: &ResourceDef) -> bool {
    res.storage_key() == PODS
        && object["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty())
        && object["metadata"]["deletionGracePeriodSeconds"].as_i64().unwrap_or(0) > 0
}

fn validate_crd(crd: &Value, name: &str) -> Result<(), ApiError> {
    let spec = &crd["spec"];
    let plural = spec["names"]["plural"].as_str().unwrap_or_default();
    let group = spec["group"].as_str().unwrap_or_default();
    let invalid = |why: String| {
        Err(ApiError::invalid(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            name,
            &why,
        ))
    };
    if plural.is_empty() || group.is_empty() || spec["names"]["kind"].as_str().is_none() {
        return invalid("spec.group, spec.names.plural and spec.names.kind are required".into());
    }
    if name != format!("{plural}.{group}") {
        return invalid(format!(
            "metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
        ));
    }
    let versions = spec["versions"].as_array().map(Vec::len).unwrap_or(0);
    let storage = spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["storage"] == json!(true))
        .count();
    if versions == 0 || storage != 1 {
        return invalid("spec.versions: must have exactly one version marked as storage version".into());
    }
    Ok(())
}

fn apply_defaults(inner: &mut Inner, res: &ResourceDef, object: &mut Value, existing: Option<&Value>) {
    fn default(object: &mut Value, path: &[&str], value: Value) {
        let mut current = object;
        for (i, field) in path.iter().enumerate() {
            if !current.is_object() {
                *current = json!({});
            }
            let map = current.as_object_mut().expect("made an object");
            if i + 1 == path.len() {
                if map.get(*field).is_none_or(Value::is_null) {
                    map.insert(field.to_string(), value);
                }
                return;
            }
            current = map.entry(field.to_string()).or_insert(json!({}));
        }
    }
    match res.storage_key().as_str() {
        NAMESPACES => {
            let name = meta(object, "name");
            default(object, &["status", "phase"], json!("Active"));
            default(
                object,
                &["metadata", "labels", "kubernetes.io/metadata.name"],
                json!(name),
            );
        }
        PODS => {
            default(object, &["spec", "restartPolicy"], json!("Always"));
            default(object, &["spec", "terminationGracePeriodSeconds"], json!(30));
            default(object, &["spec", "serviceAccountName"], json!("default"));
            default(object, &["spec", "schedulerName"], json!("default-scheduler"));
            default(object, &["status", "phase"], json!("Pending"));
        }
        "/services" => {
            default(object, &["spec", "type"], json!("ClusterIP"));
            default(object, &["spec", "sessionAffinity"], json!("None"));
            if let Some(ip) = existing.and_then(|e| e["spec"].get("clusterIP")) {
                default(object, &["spec", "clusterIP"], ip.clone());
            }
            if object["spec"]["clusterIP"].as_str().is_none_or(str::is_empty) {
                let n = inner.next_cluster_ip;
                inner.next_cluster_ip += 1;
                object["spec"]["clusterIP"] = json!(format!("10.96.{}.{}", n / 250, n % 250 + 1));
            }
            let ip = object["spec"]["clusterIP"].clone();
            default(object, &["spec", "clusterIPs"], json!([ip]));
            if let Some(ports) = object["spec"]["ports"].as_array_mut() {
                for port in ports {
                    default(port, &["protocol"], json!("TCP"));
                    let number = port["port"].clone();
                    default(port, &["targetPort"], number);
                }
            }
        }
        "/persistentvolumeclaims" => {
            default(object, &["spec", "volumeMode"], json!("Filesystem"));
            default(object, &["status", "phase"], json!("Pending"));
            if existing.is_none() {
                // The DefaultStorageClass admission plugin.
                default(object, &["spec", "storageClassName"], json!("standard"));
                // The admission plugin of the same name: a claim in use is not removed until
                // no pod uses it (see `volumes`).
                let finalizers = meta_mut(object).entry("finalizers").or_insert_with(|| json!([]));
                if let Some(list) = finalizers.as_array_mut() {
                    if !list.iter().any(|f| f == wellknown::PVC_PROTECTION) {
                        list.push(json!(wellknown::PVC_PROTECTION));
                    }
                }
            }
        }
        "apps/statefulsets" => {
            default(object, &["spec", "replicas"], json!(1));
            default(object, &["spec", "podManagementPolicy"], json!("OrderedReady"));
            default(object, &["spec", "updateStrategy", "type"], json!("RollingUpdate"));
            if object["spec"]["updateStrategy"]["type"] == json!("RollingUpdate") {
                default(
                    object,
                    &["spec", "updateStrategy", "rollingUpdate", "partition"],
                    json!(0),
                );
            }
            default(object, &["spec", "revisionHistoryLimit"], json!(10));
            default(
                object,
                &["spec", "persistentVolumeClaimRetentionPolicy", "whenDeleted"],
                json!("Retain"),
            );
            default(
                object,
                &["spec", "persistentVolumeClaimRetentionPolicy", "whenScaled"],
                json!("Retain"),
            );
        }
        "apps/deployments" => {
            default(object, &["spec", "replicas"], json!(1));
            default(object, &["spec", "strategy", "type"], json!("RollingUpdate"));
            default(object, &["spec", "revisionHistoryLimit"], json!(10));
            default(object, &["spec", "progressDeadlineSeconds"], json!(600));
        }
        "apps/replicasets" => default(object, &["spec", "replicas"], json!(1)),
        CRDS if existing.is_none() => {
            let names = object["spec"]["names"].clone();
            let mut accepted = names.clone();
            let kind = names["kind"].as_str().unwrap_or_default().to_string();
            default(&mut accepted, &["singular"], json!(kind.to_lowercase()));
            default(&mut accepted, &["listKind"], json!(format!("{kind}List")));
            let stored: Vec<Value> = object["spec"]["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| v["storage"] == json!(true))
                .map(|v| v["name"].clone())
                .collect();
            let now = now_rfc3339();
            object["status"] = json!({
                "acceptedNames": accepted,
                "storedVersions": stored,
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                     "message": "no conflicts found", "lastTransitionTime": now},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                     "message": "the initial names have been accepted", "lastTransitionTime": now},
                ],
            });
        }
        _ => {}
    }
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

    fn record(&mut self, events: &broadcast::Sender<Arc<WatchEvent>>, event: WatchEvent) {
        let event = Arc::new(event);
        self.history.push_back(event.clone());
        while self.history.len() > self.history_capacity {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted_rv = dropped.rv;
            }
        }
        tracing::trace!(rv = event.rv, storage = %event.storage_key, kind = event.event_type.as_str(), "store event");
        let _ = events.send(event);
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

    /// Removes an object for good, then collects its garbage.
    fn remove(
        &mut self,
        events: &broadcast::Sender<Arc<WatchEvent>>,
        storage: &str,
        ns: &str,
        name: &str,
    ) -> Option<Value> {
        let k = (storage.to_string(), ns.to_string(), name.to_string());
        let mut object = self.objects.remove(&k)?;
        self.rv += 1;
        meta_mut(&mut object).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.record(
            events,
            WatchEvent {
                rv: self.rv,
                storage_key: storage.to_string(),
                namespace: ns.to_string(),
                event_type: EventType::Deleted,
                object: object.clone(),
                previous: None,
            },
        );
        if storage == CRDS {
            let group = object["spec"]["group"].as_str().unwrap_or_default();
            let plural = object["spec"]["names"]["plural"].as_str().unwrap_or_default();
            let instances = format!("{group}/{plural}");
            let keys: Vec<ObjectKey> = self.in_storage(&instances).map(|(k, _)| k.clone()).collect();
            for (s, n, name) in keys {
                self.remove(events, &s, &n, &name);
            }
            self.refresh_registry();
        }
        self.collect_garbage(events, &meta(&object, "uid"));
        if !ns.is_empty() {
            self.finalize_namespace(events, ns);
        }
        Some(object)
    }

    fn dependents_of(&self, uid: &str) -> Vec<ObjectKey> {
        self.objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == json!(uid)))
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn resource_of(&self, storage: &str) -> Option<Arc<ResourceDef>> {
        let (group, plural) = storage.split_once('/')?;
        self.registry.find_any_version(group, plural)
    }

    /// Deletes the dependents of a removed owner whose owners are all gone (background cascade).
    fn collect_garbage(&mut self, events: &broadcast::Sender<Arc<WatchEvent>>, uid: &str) {
        if uid.is_empty() {
            return;
        }
        let dependents = self.dependents_of(uid);
        if dependents.is_empty() {
            return;
        }
        let live_uids: BTreeSet<String> = self.objects.values().map(|o| meta(o, "uid")).collect();
        for k in dependents {
            let Some(dependent) = self.objects.get(&k).cloned() else {
                continue;
            };
            let owners_alive = dependent["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["uid"].as_str().is_some_and(|u| live_uids.contains(u)));
            if owners_alive || is_deleting(&dependent) {
                continue;
            }
            let Some(res) = self.resource_of(&k.0) else {
                continue;
            };
            tracing::debug!(storage = %k.0, namespace = %k.1, name = %k.2, "garbage collecting dependent");
            self.delete_background(events, &res, &k.1, &k.2, dependent);
        }
    }

    /// Deletion on behalf of the system: graceful for running pods, held by finalizers.
    fn delete_background(
        &mut self,
        events: &broadcast::Sender<Arc<WatchEvent>>,
        res: &ResourceDef,
        ns: &str,
        name: &str,
        existing: Value,
    ) {
        let running_pod =
            res.storage_key() == PODS && existing["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty());
        if running_pod || has_finalizers(&existing) {
            let mut marked = existing.clone();
            let grace = if running_pod {
                existing["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap_or(30)
            } else {
                0
            };
            let m = meta_mut(&mut marked);
            m.insert("deletionTimestamp".into(), json!(now_rfc3339()));
            m.insert("deletionGracePeriodSeconds".into(), json!(grace));
            self.commit(events, res, ns, name, marked, Some(existing));
        } else {
            self.remove(events, &res.storage_key(), ns, name);
        }
    }

    fn orphan_dependents(&mut self, events: &broadcast::Sender<Arc<WatchEvent>>, uid: &str) {
        for k in self.dependents_of(uid) {
            let Some(existing) = self.objects.get(&k).cloned() else {
                continue;
            };
            let Some(res) = self.resource_of(&k.0) else {
                continue;
            };
            let mut updated = existing.clone();
            if let Some(refs) = updated["metadata"]["ownerReferences"].as_array_mut() {
                refs.retain(|r| r["uid"] != json!(uid));
            }
            self.commit(events, &res, &k.1, &k.2, updated, Some(existing));
        }
    }

    fn delete_namespace_contents(&mut self, events: &broadcast::Sender<Arc<WatchEvent>>, ns: &str) {
        let keys: Vec<ObjectKey> = self.objects.keys().filter(|(_, n, _)| n == ns).cloned().collect();
        for k in keys {
            let Some(existing) = self.objects.get(&k).cloned() else {
                continue;
            };
            if is_deleting(&existing) {
                continue;
            }
            if let Some(res) = self.resource_of(&k.0) {
                self.delete_background(events, &res, &k.1, &k.2, existing);
            }
        }
    }

    /// Removes a terminating namespace once it is empty.
    fn finalize_namespace(&mut self, events: &broadcast::Sender<Arc<WatchEvent>>, ns: &str) -> Option<Value> {
        let ns_key = (NAMESPACES.to_string(), String::new(), ns.to_string());
        let terminating = self.objects.get(&ns_key).is_some_and(is_deleting);
        if !terminating || self.objects.keys().any(|(_, n, _)| n == ns) {
            return None;
        }
        self.remove(events, NAMESPACES, "", ns)
    }
}

/// Decodes the options of a DELETE from its query and body.
pub fn delete_options(query: &BTreeMap<String, String>, body: &[u8]) -> Result<DeleteOptions, ApiError> {
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        patch::decode_body(body)?
    };
    let propagation = body["propagationPolicy"]
        .as_str()
        .or(query.get("propagationPolicy").map(String::as_str))
        .or(
            match body["orphanDependents"]
                .as_bool()
                .or(query.get("orphanDependents").map(|v| v == "true"))
            {
                Some(true) => Some("Orphan"),
                _ => None,
            },
        );
    let propagation = match propagation {
        Some("Orphan") => Propagation::Orphan,
        Some("Foreground") => Propagation::Foreground,
        _ => Propagation::Background,
    };
    let grace_period_seconds = body["gracePeriodSeconds"]
        .as_i64()
        .or_else(|| query.get("gracePeriodSeconds").and_then(|g| g.parse().ok()));
    let precondition = |field: &str| body["preconditions"][field].as_str().map(str::to_string);
    Ok(DeleteOptions {
        propagation,
        grace_period_seconds,
        precondition_uid: precondition("uid"),
        precondition_rv: precondition("resourceVersion"),
    })
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
