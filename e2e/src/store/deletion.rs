//! Deletion and garbage collection: DELETE options, graceful pod deletion, finalizers holding
//! objects with a `deletionTimestamp`, namespaces deleting their contents, and owner references
//! cascading (background) or being dropped (orphan).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::{
    has_finalizers, is_deleting, meta, meta_mut, now_rfc3339, with_version, EventType, Inner, ObjectKey, Store,
    WatchEvent, CRDS, NAMESPACES, PODS,
};
use crate::error::ApiError;
use crate::patch;
use crate::resources::ResourceDef;

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

/// Pods on a node stay until the kubelet has stopped their processes.
pub(super) fn awaits_kubelet(object: &Value, res: &ResourceDef) -> bool {
    res.storage_key() == PODS
        && object["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty())
        && object["metadata"]["deletionGracePeriodSeconds"].as_i64().unwrap_or(0) > 0
}

impl Store {
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
}

impl Inner {
    /// Removes an object for good, then collects its garbage.
    pub(super) fn remove(
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

    pub(super) fn dependents_of(&self, uid: &str) -> Vec<ObjectKey> {
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

    pub(super) fn resource_of(&self, storage: &str) -> Option<Arc<ResourceDef>> {
        let (group, plural) = storage.split_once('/')?;
        self.registry.find_any_version(group, plural)
    }

    /// Deletes the dependents of a removed owner whose owners are all gone (background cascade).
    pub(super) fn collect_garbage(&mut self, events: &broadcast::Sender<Arc<WatchEvent>>, uid: &str) {
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
    pub(super) fn delete_background(
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

    pub(super) fn orphan_dependents(&mut self, events: &broadcast::Sender<Arc<WatchEvent>>, uid: &str) {
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

    pub(super) fn delete_namespace_contents(&mut self, events: &broadcast::Sender<Arc<WatchEvent>>, ns: &str) {
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
    pub(super) fn finalize_namespace(
        &mut self,
        events: &broadcast::Sender<Arc<WatchEvent>>,
        ns: &str,
    ) -> Option<Value> {
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
