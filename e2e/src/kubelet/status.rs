//! Pod status: each container's observed state and the pod's phase and conditions, written to
//! the store's `/status` as a real kubelet reports them.

use serde_json::{json, Value};

use super::{ns_name, uid, PodRuntime};
use crate::store::{now_rfc3339, Store, Target};

/// The observed state of one container, published into `status.containerStatuses`.
#[derive(Debug, Clone)]
pub(super) struct ContainerState {
    /// The container's name in the pod spec.
    pub(super) name: String,
    /// The image the container was specified with.
    pub(super) image: String,
    /// `state` as Kubernetes writes it (`running`, `waiting` or `terminated`).
    pub(super) state: Value,
    /// The previous instance's `terminated` state, once it has restarted.
    pub(super) last_state: Value,
    /// Whether the readiness probe (or, without one, having started) says the container is ready.
    pub(super) ready: bool,
    /// Whether the startup probe, if any, has passed.
    pub(super) started: bool,
    /// How often the container has been restarted.
    pub(super) restart_count: u32,
    /// The running process, shown as `containerID`.
    pub(super) pid: Option<u32>,
}

pub(super) fn container_state(container: &Value) -> ContainerState {
    ContainerState {
        name: container["name"].as_str().unwrap_or_default().to_string(),
        image: container["image"].as_str().unwrap_or_default().to_string(),
        state: json!({"waiting": {"reason": "ContainerCreating"}}),
        last_state: json!({}),
        ready: false,
        started: false,
        restart_count: 0,
        pid: None,
    }
}

/// Writes the status of a pod whose volumes are not ready: `Pending`, no address yet, every
/// container `ContainerCreating` with the reason, as a real kubelet reports a mount that waits.
pub(super) fn publish_waiting_for_volumes(store: &Store, pod: &Value, why: &str) {
    let pods = store.builtin("", "pods");
    let (ns, name) = ns_name(pod);
    let Ok(mut current) = store.get(&pods, &ns, &name) else {
        return;
    };
    if uid(&current) != uid(pod) {
        return;
    }
    let waiting = |c: &Value| {
        json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": false, "started": false,
            "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating", "message": why}},
            "lastState": {}})
    };
    let list = |field: &str| -> Vec<Value> { pod["spec"][field].as_array().cloned().unwrap_or_default() };
    let previous = &current["status"];
    let since = previous["conditions"][0]["lastTransitionTime"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(now_rfc3339);
    let condition = |kind: &str, value: bool| {
        json!({"type": kind, "status": if value { "True" } else { "False" }, "lastProbeTime": null,
            "lastTransitionTime": since})
    };
    current["status"] = json!({
        "phase": "Pending",
        "conditions": [condition("PodScheduled", true), condition("Initialized", false),
            condition("ContainersReady", false), condition("Ready", false)],
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "qosClass": "BestEffort",
        "initContainerStatuses": list("initContainers").iter().map(waiting).collect::<Vec<_>>(),
        "containerStatuses": list("containers").iter().map(waiting).collect::<Vec<_>>(),
    });
    if let Some(m) = current["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    if let Err(e) = store.update(&pods, &ns, &name, current, Target::Status, false) {
        tracing::debug!(pod = %name, error = %e, "publishing a waiting pod's status");
    }
}

impl PodRuntime {
    pub(super) fn update_container(&self, init: bool, index: usize, change: impl FnOnce(&mut ContainerState)) {
        {
            let mut states = if init { self.init.lock() } else { self.containers.lock() };
            if let Some(state) = states.get_mut(index) {
                change(state);
            }
        }
        self.publish();
    }

    /// Writes the pod status from the containers' states; unchanged status writes are no-ops.
    pub(super) fn publish(&self) {
        let init = self.init.lock().clone();
        let containers = self.containers.lock().clone();
        let render = |c: &ContainerState| {
            let mut status = json!({"name": c.name, "image": c.image, "imageID": "", "ready": c.ready,
                "started": c.started, "restartCount": c.restart_count, "state": c.state,
                "lastState": c.last_state});
            if let Some(pid) = c.pid {
                status["containerID"] = json!(format!("sim://{pid}"));
            }
            status
        };
        let initialized = init
            .iter()
            .all(|c| c.state.get("terminated").is_some_and(|t| t["exitCode"] == json!(0)));
        let all_ready = !containers.is_empty() && containers.iter().all(|c| c.ready);
        let terminated: Vec<i64> = containers
            .iter()
            .filter_map(|c| c.state["terminated"]["exitCode"].as_i64())
            .collect();
        let phase = if terminated.len() == containers.len() && !containers.is_empty() {
            if terminated.iter().all(|c| *c == 0) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if initialized
            && containers
                .iter()
                .any(|c| c.state.get("running").is_some() || c.restart_count > 0)
        {
            "Running"
        } else {
            "Pending"
        };
        let condition = |kind: &'static str, value: bool| {
            let mut conditions = self.conditions.lock();
            let entry = conditions.entry(kind).or_insert_with(|| (value, now_rfc3339()));
            if entry.0 != value {
                *entry = (value, now_rfc3339());
            }
            json!({"type": kind, "status": if value { "True" } else { "False" },
                   "lastProbeTime": null, "lastTransitionTime": entry.1})
        };
        let status = json!({
            "phase": phase,
            "conditions": [
                condition("PodScheduled", true),
                condition("Initialized", initialized),
                condition("ContainersReady", all_ready),
                condition("Ready", all_ready),
            ],
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip.to_string(),
            "podIPs": [{"ip": self.ip.to_string()}],
            "startTime": self.start_time,
            "qosClass": "BestEffort",
            "initContainerStatuses": init.iter().map(render).collect::<Vec<_>>(),
            "containerStatuses": containers.iter().map(render).collect::<Vec<_>>(),
        });
        let store = &self.shared.config.store;
        let pods = store.builtin("", "pods");
        let Ok(mut current) = store.get(&pods, &self.ns, &self.name) else {
            return;
        };
        if uid(&current) != uid(&self.pod) {
            return;
        }
        current["status"] = status;
        if let Some(m) = current["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        if let Err(e) = store.update(&pods, &self.ns, &self.name, current, Target::Status, false) {
            tracing::debug!(pod = %self.name, error = %e, "publishing pod status");
        }
    }
}
