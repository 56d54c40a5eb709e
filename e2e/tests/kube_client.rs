//! kube-rs 5 against the simulated control plane: server-side apply, watcher and reflector,
//! optimistic concurrency, expired resourceVersions, selectors, finalizers and garbage collection.

use std::time::Duration;

use anyhow::{bail, ensure, Context};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use raftkv_e2e::{eventually, SimCluster};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(30);

async fn scenario<F, Fut>(body: F) -> anyhow::Result<()>
where
    F: FnOnce(std::sync::Arc<SimCluster>, Api<ConfigMap>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let cluster = std::sync::Arc::new(SimCluster::builder().start().await?);
    let api = Api::namespaced(cluster.kube_client().await?, "default");
    let outcome = tokio::time::timeout(LIMIT, body(cluster.clone(), api))
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("scenario exceeded {LIMIT:?}")));
    if outcome.is_err() {
        eprintln!("{}", cluster.report());
    }
    outcome
}

fn config_map(name: &str, labels: serde_json::Value, data: serde_json::Value) -> anyhow::Result<ConfigMap> {
    Ok(serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels}, "data": data}))?)
}

async fn next(events: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>) -> anyhow::Result<(String, String)> {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .ok()
        .flatten()
        .context("no watch event in time")
}

fn rv(cm: &ConfigMap) -> String {
    cm.metadata.resource_version.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_apply_creates_merges_and_ignores_identical_applies() -> anyhow::Result<()> {
    scenario(|_cluster, api| async move {
        let params = PatchParams::apply("e2e-test").force();
        let first = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"a": "1"}});
        let created = api.patch("ssa", &params, &Patch::Apply(&first)).await?;
        ensure!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
        let second = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"b": "2"}});
        let merged = api
            .patch("ssa", &PatchParams::apply("other"), &Patch::Apply(&second))
            .await?;
        let data = merged.data.clone().unwrap_or_default();
        ensure!(
            data.get("a").map(String::as_str) == Some("1") && data.get("b").map(String::as_str) == Some("2"),
            "{data:?}"
        );
        let again = api
            .patch("ssa", &PatchParams::apply("other"), &Patch::Apply(&second))
            .await?;
        ensure!(
            rv(&again) == rv(&merged),
            "an identical apply bumped the resourceVersion"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_follows_changes_and_no_op_writes_stay_silent() -> anyhow::Result<()> {
    scenario(|_cluster, api| async move {
        let (reader, writer) = reflector::store::<ConfigMap>();
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
        let stream = reflector(writer, watcher(api.clone(), watcher::Config::default().labels("suite=e2e")));
        let follower = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream.default_backoff());
            while let Some(event) = stream.next().await {
                let described = match event {
                    Ok(watcher::Event::Apply(cm)) => ("apply".to_string(), cm.metadata.name.unwrap_or_default()),
                    Ok(watcher::Event::Delete(cm)) => ("delete".to_string(), cm.metadata.name.unwrap_or_default()),
                    Ok(watcher::Event::InitDone) => ("init-done".to_string(), String::new()),
                    Ok(_) => continue,
                    Err(e) => ("error".to_string(), e.to_string()),
                };
                if events_tx.send(described).is_err() {
                    return;
                }
            }
        });
        ensure!(next(&mut events).await? == ("init-done".into(), String::new()));
        let labels = json!({"suite": "e2e"});
        let created = api.create(&PostParams::default(), &config_map("watched", labels.clone(), json!({"k": "1"}))?).await?;
        ensure!(next(&mut events).await? == ("apply".into(), "watched".into()));
        eventually(WAIT, "the reflector to hold the object", || {
            let found = reader.get(&reflector::ObjectRef::new("watched").within("default")).is_some();
            async move { found.then_some(()) }
        })
        .await?;

        let mut changed = created.clone();
        changed.data = Some([("k".to_string(), "2".to_string())].into());
        let modified = api.replace("watched", &PostParams::default(), &changed).await?;
        ensure!(next(&mut events).await? == ("apply".into(), "watched".into()));

        // The same content again: nothing may change, and no event may reach the watcher.
        let same = api.replace("watched", &PostParams::default(), &modified).await?;
        ensure!(rv(&same) == rv(&modified), "a no-op replace bumped the resourceVersion");
        let ssa = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "watched", "labels": labels}, "data": {"k": "2"}});
        let applied = api.patch("watched", &PatchParams::apply("e2e").force(), &Patch::Apply(&ssa)).await?;
        ensure!(rv(&applied) == rv(&modified), "a no-op apply bumped the resourceVersion");
        // A later real change to another object proves the watcher saw nothing in between.
        api.create(&PostParams::default(), &config_map("marker", labels.clone(), json!({}))?).await?;
        let after_no_ops = next(&mut events).await?;
        ensure!(after_no_ops == ("apply".into(), "marker".into()), "unexpected event after no-op writes: {after_no_ops:?}");

        api.delete("watched", &DeleteParams::default()).await?;
        ensure!(next(&mut events).await? == ("delete".into(), "watched".into()));
        follower.abort();
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_with_a_stale_resource_version_conflicts() -> anyhow::Result<()> {
    scenario(|_cluster, api| async move {
        let created = api
            .create(
                &PostParams::default(),
                &config_map("cas", json!({}), json!({"k": "1"}))?,
            )
            .await?;
        let mut first = created.clone();
        first.data = Some([("k".to_string(), "2".to_string())].into());
        api.replace("cas", &PostParams::default(), &first).await?;
        let mut stale = created.clone();
        stale.data = Some([("k".to_string(), "3".to_string())].into());
        match api.replace("cas", &PostParams::default(), &stale).await {
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            other => bail!("expected 409 Conflict, got {other:?}"),
        }
        match api.create(&PostParams::default(), &created).await {
            Err(kube::Error::Api(status)) if status.code == 409 && status.reason == "AlreadyExists" => Ok(()),
            other => bail!("expected 409 AlreadyExists, got {other:?}"),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_from_a_compacted_resource_version_is_gone() -> anyhow::Result<()> {
    scenario(|cluster, api| async move {
        let created = api
            .create(&PostParams::default(), &config_map("old", json!({}), json!({}))?)
            .await?;
        api.patch(
            "old",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "v"}})),
        )
        .await?;
        let recent = api.watch(&WatchParams::default().timeout(5), &rv(&created)).await?;
        let replayed = std::pin::pin!(recent)
            .try_next()
            .await?
            .context("an event after the old version")?;
        ensure!(matches!(replayed, WatchEvent::Modified(_)), "{replayed:?}");
        cluster.compact_watch_history();
        let expired = api.watch(&WatchParams::default().timeout(5), &rv(&created)).await?;
        match std::pin::pin!(expired).next().await {
            Some(Ok(WatchEvent::Error(status))) if status.code == 410 => Ok(()),
            Some(Err(kube::Error::Api(status))) if status.code == 410 => Ok(()),
            other => bail!("expected 410 Gone, got {other:?}"),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_list_watchers_finish_their_initial_events() -> anyhow::Result<()> {
    scenario(|_cluster, api| async move {
        for name in ["s1", "s2"] {
            api.create(&PostParams::default(), &config_map(name, json!({}), json!({}))?)
                .await?;
        }
        let stream = watcher(api.clone(), watcher::Config::default().streaming_lists());
        let mut stream = std::pin::pin!(stream);
        let mut initial = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, stream.try_next()).await?? {
                Some(watcher::Event::InitApply(cm)) => initial.push(cm.metadata.name.unwrap_or_default()),
                Some(watcher::Event::InitDone) => break,
                Some(_) => {}
                None => bail!("the watch ended before its initial events did"),
            }
        }
        initial.sort();
        ensure!(
            initial.iter().filter(|n| n.starts_with('s')).count() == 2,
            "{initial:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_selectors_filter_lists() -> anyhow::Result<()> {
    scenario(|_cluster, api| async move {
        for (name, env, tier) in [
            ("x1", "prod", Some("db")),
            ("x2", "dev", Some("db")),
            ("x3", "prod", None),
        ] {
            let mut labels = json!({"env": env});
            if let Some(tier) = tier {
                labels["tier"] = json!(tier);
            }
            api.create(&PostParams::default(), &config_map(name, labels, json!({}))?)
                .await?;
        }
        let names = |list: kube::core::ObjectList<ConfigMap>| {
            let mut v: Vec<String> = list.items.into_iter().filter_map(|c| c.metadata.name).collect();
            v.sort();
            v
        };
        for (selector, expected) in [
            ("env=prod", vec!["x1", "x3"]),
            ("env==prod,tier", vec!["x1"]),
            ("env!=prod", vec!["x2"]),
            ("env in (prod,dev),!tier", vec!["x3"]),
            ("env notin (prod)", vec!["x2"]),
        ] {
            let got = names(api.list(&ListParams::default().labels(selector)).await?);
            ensure!(got == expected, "{selector}: {got:?}");
        }
        let page = api.list(&ListParams::default().labels("env").limit(2)).await?;
        ensure!(page.items.len() == 2 && page.metadata.continue_.is_some());
        let rest = api
            .list(
                &ListParams::default()
                    .labels("env")
                    .limit(2)
                    .continue_token(page.metadata.continue_.as_deref().unwrap_or_default()),
            )
            .await?;
        ensure!(names(rest) == ["x3"]);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalizers_hold_deletion_and_owner_deletion_cascades() -> anyhow::Result<()> {
    scenario(|_cluster, api| async move {
        let owner = api
            .create(&PostParams::default(), &config_map("owner", json!({}), json!({}))?)
            .await?;
        let owner_ref = json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner.metadata.uid, "controller": true}]);
        for name in ["child", "kept"] {
            let mut cm = config_map(name, json!({}), json!({}))?;
            cm.metadata.owner_references = Some(serde_json::from_value(owner_ref.clone())?);
            if name == "kept" {
                cm.metadata.finalizers = Some(vec!["e2e.raftkv.dev/hold".into()]);
            }
            api.create(&PostParams::default(), &cm).await?;
        }
        api.delete("owner", &DeleteParams::background()).await?;
        eventually(WAIT, "the dependent to be collected", || {
            let api = api.clone();
            async move { api.get_opt("child").await.ok().flatten().is_none().then_some(()) }
        })
        .await?;
        let held = api.get("kept").await?;
        ensure!(
            held.metadata.deletion_timestamp.is_some(),
            "a dependent with a finalizer must be held, not removed"
        );
        api.patch(
            "kept",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await?;
        ensure!(
            api.get_opt("kept").await?.is_none(),
            "removing the last finalizer must delete the object"
        );

        let orphan_owner = api
            .create(&PostParams::default(), &config_map("orphaner", json!({}), json!({}))?)
            .await?;
        let mut orphan = config_map("orphan", json!({}), json!({}))?;
        orphan.metadata.owner_references = Some(serde_json::from_value(json!([{"apiVersion": "v1",
            "kind": "ConfigMap", "name": "orphaner", "uid": orphan_owner.metadata.uid}]))?);
        api.create(&PostParams::default(), &orphan).await?;
        api.delete("orphaner", &DeleteParams::orphan()).await?;
        let survivor = api.get("orphan").await?;
        ensure!(survivor.metadata.owner_references.unwrap_or_default().is_empty());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_may_do_only_what_its_role_bindings_allow() -> anyhow::Result<()> {
    scenario(|cluster, admin| async move {
        admin
            .create(
                &PostParams::default(),
                &config_map("visible", json!({}), json!({"a": "1"}))?,
            )
            .await?;
        let rbac = json!([
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": "cm-reader", "namespace": "default"},
             "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "patch"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "reader", "namespace": "default"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
             "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "default"}]}
        ]);
        let client = cluster.kube_client().await?;
        for object in rbac.as_array().into_iter().flatten() {
            let (plural, name) = match object["kind"].as_str() {
                Some("Role") => ("roles", "cm-reader"),
                _ => ("rolebindings", "reader"),
            };
            let resource = kube::discovery::ApiResource {
                group: "rbac.authorization.k8s.io".into(),
                version: "v1".into(),
                api_version: "rbac.authorization.k8s.io/v1".into(),
                kind: object["kind"].as_str().unwrap_or_default().into(),
                plural: plural.into(),
            };
            let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
            api.patch(name, &PatchParams::apply("e2e-test"), &Patch::Apply(object))
                .await?;
        }

        let as_account = |name: &str| -> anyhow::Result<Api<ConfigMap>> {
            let mut config = kube::Config::new(cluster.url().parse()?);
            config.headers.push((
                http::header::AUTHORIZATION,
                format!("Bearer serviceaccount:default:{name}").parse()?,
            ));
            Ok(Api::namespaced(kube::Client::try_from(config)?, "default"))
        };
        let reader = as_account("reader")?;
        ensure!(
            reader
                .get("visible")
                .await?
                .data
                .unwrap_or_default()
                .get("a")
                .map(String::as_str)
                == Some("1")
        );
        ensure!(reader.list(&ListParams::default()).await?.items.len() == 1);
        let forbidden = |result: kube::Result<ConfigMap>| match result {
            Err(kube::Error::Api(status)) => status.code == 403,
            _ => false,
        };
        // Not in the role: delete; and server-side apply of a missing object, which needs `create`.
        let deleted = reader.delete("visible", &DeleteParams::default()).await;
        ensure!(
            matches!(deleted, Err(kube::Error::Api(ref s)) if s.code == 403),
            "{deleted:?}"
        );
        let apply = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "new"}, "data": {}});
        let created = reader
            .patch("new", &PatchParams::apply("reader"), &Patch::Apply(&apply))
            .await;
        ensure!(forbidden(created), "apply created an object without create");
        // Patching an existing object needs only `patch`.
        let update =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "visible"}, "data": {"b": "2"}});
        reader
            .patch("visible", &PatchParams::apply("reader"), &Patch::Apply(&update))
            .await?;
        // Another account of the namespace, with no binding, may do nothing.
        ensure!(forbidden(as_account("stranger")?.get("visible").await));
        ensure!(
            admin.get_opt("new").await?.is_none(),
            "a denied request changed nothing"
        );
        Ok(())
    })
    .await
}
