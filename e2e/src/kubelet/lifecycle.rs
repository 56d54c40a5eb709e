//! Process lifecycle: the pod worker (waiting for volumes, init containers in order, then the
//! containers side by side), each container's run loop with its probes, restarts with the
//! kubelet's crash back-off, and termination (SIGTERM to the process group, SIGKILL after the
//! grace period).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use super::environment::expand;
use super::mounts::{prepare_volumes, rewrite_mounts, sync_projected_volumes, unmountable_claim};
use super::probes::{check, Probe};
use super::status::{container_state, publish_waiting_for_volumes};
use super::{log_path, ns_name, uid, PodRuntime, Shared};
use crate::error::{Error, Result};
use crate::object::name_of;
use crate::store::{now_rfc3339, DeleteOptions, Store};

/// A crashed container's first restart delay, doubled on every crash (the kubelet's own).
const CRASH_BACKOFF_START: Duration = Duration::from_secs(10);
/// The longest restart delay.
const CRASH_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Running this long resets the restart delay.
const CRASH_BACKOFF_RESET: Duration = Duration::from_secs(600);

/// Waits until every claim of the pod can be mounted; `false` when the pod is stopped first.
async fn wait_for_volumes(
    shared: &Shared,
    pod: &Value,
    ns: &str,
    stop: &mut watch::Receiver<Option<Duration>>,
) -> bool {
    let store = &shared.config.store;
    let mut events = store.subscribe();
    loop {
        if stop.borrow().is_some() {
            return false;
        }
        let Some(why) = unmountable_claim(store, pod, ns) else {
            return true;
        };
        tracing::debug!(pod = name_of(pod), %why, "waiting for volumes");
        publish_waiting_for_volumes(store, pod, &why);
        tokio::select! {
            _ = stopped(stop) => return false,
            _ = events.recv() => {
                while events.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

pub(super) async fn run_pod(shared: Arc<Shared>, pod: Value, mut stop: watch::Receiver<Option<Duration>>) {
    let (ns, name) = ns_name(&pod);
    if !wait_for_volumes(&shared, &pod, &ns, &mut stop).await {
        remove_if_deleting(&shared.config.store, &pod);
        tracing::info!(pod = %name, namespace = %ns, "pod stopped before its volumes were ready");
        return;
    }
    let ip = shared.addresses.address_of(&ns, &name);
    let root = shared.config.root.clone();
    let scratch = root.join("pods").join(&ns).join(uid(&pod));
    let volumes = match prepare_volumes(&shared, &pod, &ns, &scratch) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(pod = %name, error = %e, "preparing volumes");
            BTreeMap::new()
        }
    };
    let list = |field: &str| -> Vec<Value> { pod["spec"][field].as_array().cloned().unwrap_or_default() };
    let init_specs = list("initContainers");
    let specs = list("containers");
    let runtime = Arc::new(PodRuntime {
        shared: shared.clone(),
        ns: ns.clone(),
        name: name.clone(),
        ip,
        start_time: now_rfc3339(),
        init: Mutex::new(init_specs.iter().map(container_state).collect()),
        containers: Mutex::new(specs.iter().map(container_state).collect()),
        conditions: Mutex::new(BTreeMap::new()),
        volumes,
        scratch,
        pod,
    });
    tracing::info!(pod = %name, namespace = %ns, %ip, "starting pod");
    runtime.publish();
    let sync = tokio::spawn(sync_volumes(runtime.clone(), stop.clone()));
    let mut initialized = true;
    for (index, spec) in init_specs.iter().enumerate() {
        let outcome = run_container(runtime.clone(), spec.clone(), index, true, stop.clone()).await;
        if outcome != Outcome::Completed {
            initialized = false;
            break;
        }
    }
    if initialized && stop.borrow().is_none() {
        let tasks: Vec<_> = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| tokio::spawn(run_container(runtime.clone(), spec.clone(), i, false, stop.clone())))
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }
    runtime.publish();
    sync.abort();
    if stop.borrow().is_none() {
        // Every container finished under restartPolicy Never/OnFailure: the pod stays, completed.
        stopped(&mut stop).await;
    }
    remove_if_deleting(&shared.config.store, &runtime.pod);
    tracing::info!(pod = %name, namespace = %ns, "pod stopped");
}

/// How often a running pod's `configMap` and `secret` volumes are compared with the store. A
/// real kubelet syncs them within about a minute; a shorter period keeps rotation tests short.
const VOLUME_SYNC_PERIOD: Duration = Duration::from_secs(2);

/// Keeps the pod's `configMap` and `secret` volumes up to date until the pod stops, as a
/// kubelet's periodic sync does (files swapped atomically through `..data`).
async fn sync_volumes(runtime: Arc<PodRuntime>, mut stop: watch::Receiver<Option<Duration>>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(VOLUME_SYNC_PERIOD) => {}
            changed = stop.changed() => if changed.is_err() { return },
        }
        if stop.borrow().is_some() {
            return;
        }
        let worker = runtime.clone();
        // File writes stay off the async worker threads.
        let changed = tokio::task::spawn_blocking(move || {
            sync_projected_volumes(&worker.shared.config.store, &worker.pod, &worker.ns, &worker.volumes)
        })
        .await
        .unwrap_or_default();
        if !changed.is_empty() {
            tracing::info!(pod = %runtime.name, volumes = ?changed, "projected volumes updated");
        }
    }
}

/// Removes the pod from the store once its processes are gone, if it is being deleted.
fn remove_if_deleting(store: &Store, pod: &Value) {
    let (ns, name) = ns_name(pod);
    let pods_res = store.builtin("", "pods");
    if let Ok(current) = store.get(&pods_res, &ns, &name) {
        if uid(&current) == uid(pod) && !current["metadata"]["deletionTimestamp"].is_null() {
            let force = DeleteOptions {
                grace_period_seconds: Some(0),
                ..Default::default()
            };
            let _ = store.delete(&pods_res, &ns, &name, &force, false);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Exited successfully and is not to be restarted (init containers, restartPolicy Never/OnFailure).
    Completed,
    /// Failed for good (restartPolicy Never).
    Failed,
    /// The pod is being stopped.
    Stopped,
}

impl PodRuntime {
    fn spawn_process(&self, container: &Value) -> Result<tokio::process::Child> {
        let image = container["image"].as_str().unwrap_or_default();
        let mapping = self
            .shared
            .config
            .images
            .resolve(image)
            .ok_or_else(|| Error::UnmappedImage(image.to_string()))?;
        let env = self.environment(container, mapping);
        let mounts = self.mounts(container);
        let strings = |v: &Value| -> Option<Vec<String>> {
            v.as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap_or_default().to_string()).collect())
        };
        let (program, mut args) = match strings(&container["command"]).filter(|c| !c.is_empty()) {
            Some(command) => (
                mapping.resolve_command(&expand(&command[0], &env)),
                command[1..]
                    .iter()
                    .cloned()
                    .chain(strings(&container["args"]).unwrap_or_default())
                    .collect::<Vec<_>>(),
            ),
            None => (
                mapping.program.clone(),
                mapping
                    .entrypoint_args
                    .iter()
                    .cloned()
                    .chain(strings(&container["args"]).unwrap_or_else(|| mapping.default_args.clone()))
                    .collect(),
            ),
        };
        for arg in &mut args {
            *arg = rewrite_mounts(&expand(arg, &env), &mounts);
        }
        let env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k, rewrite_mounts(&v, &mounts))).collect();
        let workdir = container["workingDir"]
            .as_str()
            .map(|w| PathBuf::from(rewrite_mounts(w, &mounts)))
            .unwrap_or_else(|| self.scratch.clone());
        let name = container["name"].as_str().unwrap_or_default();
        let log = log_path(&self.shared.config.root, &self.ns, &self.name, name);
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let stdout = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| Error::io(format!("opening {}", log.display()), e))?;
        let stderr = stdout
            .try_clone()
            .map_err(|e| Error::io("duplicating the log file", e))?;
        tracing::info!(pod = %self.name, container = name, program = %program.display(), ?args, "starting container");
        let mut command = tokio::process::Command::new(&program);
        command
            .args(&args)
            .env_clear()
            .envs(env)
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(true);
        command
            .spawn()
            .map_err(|e| Error::io(format!("starting {} for pod {}", program.display(), self.name), e))
    }
}

/// Resolves once the pod is asked to stop (or the kubelet is gone).
async fn stopped(stop: &mut watch::Receiver<Option<Duration>>) {
    let _ = stop.wait_for(|s| s.is_some()).await;
}

/// Stops a process group: SIGTERM, then SIGKILL once `grace` has passed.
async fn terminate(child: &mut tokio::process::Child, grace: Duration) -> Option<i32> {
    if let Some(pid) = child.id() {
        let group = Pid::from_raw(pid as i32);
        let _ = killpg(group, Signal::SIGTERM);
        if let Ok(Ok(status)) = tokio::time::timeout(grace, child.wait()).await {
            let _ = killpg(group, Signal::SIGKILL);
            return status.code().or(Some(143));
        }
        let _ = killpg(group, Signal::SIGKILL);
    }
    child.wait().await.ok().map(|s| s.code().unwrap_or(137))
}

async fn run_container(
    runtime: Arc<PodRuntime>,
    container: Value,
    index: usize,
    init: bool,
    mut stop: watch::Receiver<Option<Duration>>,
) -> Outcome {
    let restart_policy = runtime.pod["spec"]["restartPolicy"]
        .as_str()
        .unwrap_or("Always")
        .to_string();
    let termination_grace = Duration::from_secs(
        runtime.pod["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30),
    );
    let mut backoff = CRASH_BACKOFF_START;
    loop {
        if stop.borrow().is_some() {
            return Outcome::Stopped;
        }
        let mapping_env = runtime
            .shared
            .config
            .images
            .resolve(container["image"].as_str().unwrap_or_default())
            .map(|m| runtime.environment(&container, m))
            .unwrap_or_default();
        runtime.reset_termination_log(&container);
        let (exit_code, reason) = match runtime.spawn_process(&container) {
            Err(e) => {
                tracing::warn!(pod = %runtime.name, error = %e, "container failed to start");
                let reason = if matches!(e, Error::UnmappedImage(_)) {
                    "ErrImagePull"
                } else {
                    "RunContainerError"
                };
                runtime.update_container(init, index, |s| {
                    s.state = json!({"waiting": {"reason": reason, "message": e.to_string()}});
                });
                (None, reason)
            }
            Ok(mut child) => {
                let started_at = now_rfc3339();
                let pid = child.id();
                let started = Instant::now();
                let mut startup = Probe::new(&container["startupProbe"], started);
                let mut readiness = Probe::new(&container["readinessProbe"], started);
                let mut liveness = Probe::new(&container["livenessProbe"], started);
                let has_startup = startup.is_some();
                let has_readiness = readiness.is_some();
                runtime.update_container(init, index, |s| {
                    s.state = json!({"running": {"startedAt": started_at}});
                    s.pid = pid;
                    s.started = !has_startup;
                    s.ready = !init && !has_startup && !has_readiness;
                });
                let mut stop_requested = stop.clone();
                let mut started_ok = !has_startup;
                let mut ready = !has_startup && !has_readiness;
                let outcome = loop {
                    let due = [&startup, &readiness, &liveness]
                        .into_iter()
                        .flatten()
                        .map(|p| p.next_at)
                        .min()
                        .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                    tokio::select! {
                        status = child.wait() => {
                            break (status.ok().and_then(|s| s.code()).or(Some(1)), "Error");
                        }
                        _ = stopped(&mut stop_requested) => {
                            let grace = stop.borrow().unwrap_or(termination_grace);
                            let code = terminate(&mut child, grace).await;
                            runtime.update_container(init, index, |s| {
                                s.ready = false;
                                let code = code.unwrap_or(137);
                                s.state = json!({"terminated": {"exitCode": code,
                                    "reason": if code == 0 { "Completed" } else { "Error" },
                                    "startedAt": started_at, "finishedAt": now_rfc3339()}});
                            });
                            return Outcome::Stopped;
                        }
                        _ = tokio::time::sleep_until(due), if !init => {
                            let now = Instant::now();
                            if !started_ok {
                                if let Some(p) = startup.as_mut().filter(|p| p.next_at <= now) {
                                    let ok = check(&p.spec, runtime.ip, &container, &runtime, &mapping_env).await;
                                    match p.record(ok) {
                                        Some(true) => {
                                            started_ok = true;
                                            startup = None;
                                            let now = Instant::now();
                                            if let Some(r) = readiness.as_mut() { r.next_at = r.next_at.max(now); }
                                            if let Some(l) = liveness.as_mut() { l.next_at = l.next_at.max(now); }
                                            if !has_readiness { ready = true; }
                                            runtime.update_container(init, index, |s| { s.started = true; s.ready = ready; });
                                        }
                                        Some(false) => {
                                            let code = terminate(&mut child, termination_grace).await;
                                            break (code, "StartupProbeFailed");
                                        }
                                        None => {}
                                    }
                                }
                                continue;
                            }
                            if let Some(p) = readiness.as_mut().filter(|p| p.next_at <= now) {
                                let ok = check(&p.spec, runtime.ip, &container, &runtime, &mapping_env).await;
                                if let Some(decided) = p.record(ok) {
                                    if decided != ready {
                                        ready = decided;
                                        tracing::info!(pod = %runtime.name, ready, "readiness changed");
                                        runtime.update_container(init, index, |s| s.ready = ready);
                                    }
                                }
                            }
                            if let Some(p) = liveness.as_mut().filter(|p| p.next_at <= now) {
                                let ok = check(&p.spec, runtime.ip, &container, &runtime, &mapping_env).await;
                                if p.record(ok) == Some(false) {
                                    tracing::info!(pod = %runtime.name, "liveness probe failed; restarting container");
                                    let code = terminate(&mut child, termination_grace).await;
                                    break (code, "LivenessProbeFailed");
                                }
                            }
                        }
                    }
                };
                let (code, reason) = outcome;
                let mut finished = json!({"terminated": {"exitCode": code.unwrap_or(1),
                    "reason": if code == Some(0) { "Completed" } else { reason },
                    "startedAt": started_at, "finishedAt": now_rfc3339()}});
                if let Some(message) = runtime.termination_message(&container, code) {
                    finished["terminated"]["message"] = json!(message);
                }
                runtime.update_container(init, index, |s| {
                    s.ready = false;
                    s.pid = None;
                    s.state = finished.clone();
                });
                if started.elapsed() > CRASH_BACKOFF_RESET {
                    backoff = CRASH_BACKOFF_START;
                }
                (code, reason)
            }
        };
        let succeeded = exit_code == Some(0);
        let restart = match (init, restart_policy.as_str()) {
            (true, _) => !succeeded && restart_policy != "Never",
            (false, "Never") => false,
            (false, "OnFailure") => !succeeded,
            _ => true,
        };
        if !restart {
            return if succeeded { Outcome::Completed } else { Outcome::Failed };
        }
        runtime.update_container(init, index, |s| {
            if s.state.get("terminated").is_some() {
                s.last_state = s.state.clone();
            }
            s.restart_count += 1;
            s.state = json!({"waiting": {"reason": if exit_code.is_some() { "CrashLoopBackOff" } else { reason },
                "message": format!("back-off {}s restarting failed container", backoff.as_secs())}});
        });
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut stop) => return Outcome::Stopped,
        }
        backoff = (backoff * 2).min(CRASH_BACKOFF_MAX);
    }
}
