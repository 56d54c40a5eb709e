//! A mocked API server for reconcile tests: a `tower_test` mock behind a real `kube::Client`,
//! wrapped in an [`ApiServerVerifier`] that checks each request's method, URI and body in the
//! order the reconciler must send them, and answers like the API server would. The nodes are
//! the in-memory [`Model`], reached through the same `NodeApi` the operator uses.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle, SendResponse};

use crate::build::{build_statefulset, validate};
use crate::config::OperatorConfig;
use crate::crd::{BootstrapRecord, BootstrapState, RaftCluster, RaftClusterSpec, RaftClusterStatus};
use crate::metrics::Metrics;
use crate::model::{pod_ip, Model};
use crate::names::{ClusterNames, REMOVED_MEMBER_ANNOTATION};
use crate::reconcile::Context;

/// Namespace of every test object.
pub const NS: &str = "testns";
/// Name of the test cluster.
pub const NAME: &str = "demo";
/// The uid of the test cluster.
pub const UID: &str = "0f0e0d0c-0000-4000-8000-000000000001";
/// The StatefulSet revision the mocked controller reports.
pub const REVISION: &str = "demo-rev1";

/// A `RaftCluster` as the API server would hand it to the reconciler.
pub fn raft_cluster(replicas: i32, image: Option<&str>) -> RaftCluster {
    let mut cluster = RaftCluster::new(
        NAME,
        RaftClusterSpec {
            replicas,
            image: image.map(String::from),
            image_pull_policy: None,
            storage: Default::default(),
            resources: None,
            affinity: None,
            tolerations: None,
            node_selector: None,
            raft: Default::default(),
            tls: None,
            network_policy: None,
            backup: None,
            restore: None,
        },
    );
    cluster.metadata.namespace = Some(NS.into());
    cluster.metadata.uid = Some(UID.into());
    cluster.metadata.generation = Some(1);
    cluster
}

/// The same cluster with a completed bootstrap in its status.
pub fn bootstrapped(mut cluster: RaftCluster, member_id: u64) -> RaftCluster {
    cluster.status = Some(RaftClusterStatus {
        bootstrap: Some(BootstrapRecord {
            member_id,
            state: BootstrapState::Done,
            cluster_id: Some(7),
        }),
        ..RaftClusterStatus::default()
    });
    cluster
}

/// A test context: the operator's reconciler state over a mocked client and the model's nodes.
pub fn context(model: Model) -> (Arc<Context<Model>>, ApiServerVerifier) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, NS);
    let config = OperatorConfig {
        default_image: None,
        ..OperatorConfig::default()
    };
    let ctx = Context::new(client, model.clone(), config, Arc::new(Metrics::default()));
    let api = ApiServerVerifier {
        handle,
        model,
        stored_storage_size: "1Gi".into(),
        last_status: None,
    };
    (Arc::new(ctx), api)
}

/// Checks and answers the reconciler's requests.
pub struct ApiServerVerifier {
    /// The server end of the mocked client: each request the reconciler sends, to check and answer.
    handle: Handle<Request<Body>, Response<Body>>,
    /// The modelled cluster whose pods and claims the answers list.
    model: Model,
    /// The size in the stored StatefulSet's claim template.
    pub stored_storage_size: String,
    /// The status last written.
    pub last_status: Option<RaftClusterStatus>,
}

/// The test cluster's claim templates as the API server stores them: built from the default
/// spec, defaulted, with `size` requested.
fn stored_claim_templates(size: &str) -> Value {
    let config = OperatorConfig::default();
    let cluster = validate(&raft_cluster(3, Some("raftkv/node:test")), &config).expect("valid");
    let statefulset = build_statefulset(&cluster, &config, 3);
    let mut templates = serde_json::to_value(statefulset.spec.volume_claim_templates).expect("json");
    templates[0]["spec"]["volumeMode"] = json!("Filesystem");
    templates[0]["spec"]["resources"]["requests"]["storage"] = json!(size);
    templates[0]["status"] = json!({"phase": "Pending"});
    templates
}

fn respond(send: SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    let response = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("json")))
        .expect("response");
    send.send_response(response);
}

/// The owner reference of the objects the test cluster controls.
pub fn owner_reference() -> Value {
    json!({
        "apiVersion": "raftkv.dev/v1alpha1", "kind": "RaftCluster", "name": NAME,
        "uid": UID, "controller": true, "blockOwnerDeletion": true
    })
}

fn not_found(kind: &str, name: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{kind} \"{name}\" not found"), "reason": "NotFound", "code": 404
    })
}

/// The query string kube sends with a forced server-side apply.
pub const APPLY: &str = "?&force=true&fieldManager=raftkv-operator";

impl ApiServerVerifier {
    /// Receives the next request and checks its method and URI; returns its JSON body.
    pub async fn expect(&mut self, method: Method, uri: &str) -> (Value, SendResponse<Response<Body>>) {
        let (request, send) = tokio::time::timeout(Duration::from_secs(5), self.handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request arrived; expected {method} {uri}"))
            .expect("the client was dropped");
        assert_eq!(
            (request.method(), request.uri().to_string().as_str()),
            (&method, uri),
            "unexpected request"
        );
        let bytes = request.into_body().collect().await.expect("request body").to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("json request body")
        };
        (body, send)
    }

    /// Answers a request with `body`.
    pub fn respond(&self, send: SendResponse<Response<Body>>, body: &Value) {
        respond(send, StatusCode::OK, body);
    }

    /// Answers a `GET` with NotFound.
    pub fn respond_not_found(&self, send: SendResponse<Response<Body>>) {
        respond(send, StatusCode::NOT_FOUND, &not_found("object", NAME));
    }

    /// Waits for the next request and describes it, as `METHOD URI`.
    pub async fn next_request_line(&mut self) -> Option<String> {
        let (request, _) = self.handle.next_request().await?;
        Some(format!("{} {}", request.method(), request.uri()))
    }

    /// Asserts that the reconciler sent nothing more.
    pub async fn expect_silence(&mut self) {
        let next = tokio::time::timeout(Duration::from_millis(100), self.handle.next_request()).await;
        if let Ok(Some((request, _))) = next {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }

    /// `GET` of the StatefulSet: absent, or at the model's replica count and revision.
    pub async fn get_statefulset(&mut self, exists: bool) {
        let uri = format!("/apis/apps/v1/namespaces/{NS}/statefulsets/{NAME}");
        let (_, send) = self.expect(Method::GET, &uri).await;
        if !exists {
            return respond(send, StatusCode::NOT_FOUND, &not_found("statefulsets.apps", NAME));
        }
        let replicas = self.model.world().statefulset_replicas;
        let body = json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": NAME, "namespace": NS, "ownerReferences": [owner_reference()]},
            "spec": {
                "replicas": replicas, "selector": {}, "template": {}, "serviceName": "demo-peer",
                "volumeClaimTemplates": stored_claim_templates(&self.stored_storage_size)
            },
            "status": {"replicas": replicas, "updateRevision": REVISION, "currentRevision": REVISION}
        });
        respond(send, StatusCode::OK, &body);
    }

    /// The `GET`s of the Services and the PodDisruptionBudget: absent, or controlled by the test
    /// cluster.
    pub async fn get_children(&mut self, exist: bool) {
        for path in [
            "/api/v1/namespaces/testns/services/demo-peer",
            "/api/v1/namespaces/testns/services/demo",
        ] {
            let (_, send) = self.expect(Method::GET, path).await;
            if exist {
                let service = json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": path.rsplit('/').next(), "namespace": NS, "ownerReferences": [owner_reference()]},
                    "spec": {}
                });
                respond(send, StatusCode::OK, &service);
            } else {
                respond(send, StatusCode::NOT_FOUND, &not_found("services", NAME));
            }
        }
        let uri = format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{NAME}");
        let (_, send) = self.expect(Method::GET, &uri).await;
        if exist {
            let pdb = json!({
                "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": {"name": NAME, "namespace": NS, "ownerReferences": [owner_reference()]},
                "spec": {}
            });
            respond(send, StatusCode::OK, &pdb);
        } else {
            respond(
                send,
                StatusCode::NOT_FOUND,
                &not_found("poddisruptionbudgets.policy", NAME),
            );
        }
    }

    /// The reads every reconcile of a valid cluster starts with: the StatefulSet, the Services
    /// and the PodDisruptionBudget (all absent or all the test cluster's), then the pods and
    /// claims, answered from the model.
    pub async fn read_objects(&mut self, exist: bool) {
        self.get_statefulset(exist).await;
        self.get_children(exist).await;
        self.list_pods_and_claims().await;
    }

    /// A server-side apply of `path` (relative to the namespace); returns the applied object,
    /// echoed back as the API server would store it.
    pub async fn apply(&mut self, api: &str, path: &str) -> Value {
        let uri = format!("{api}/namespaces/{NS}/{path}{APPLY}");
        let (body, send) = self.expect(Method::PATCH, &uri).await;
        respond(send, StatusCode::OK, &body);
        body
    }

    /// The four applies every reconcile of a valid cluster sends; returns the StatefulSet.
    pub async fn apply_objects(&mut self) -> Value {
        let peer = self.apply("/api/v1", "services/demo-peer").await;
        assert_eq!(peer["spec"]["clusterIP"], "None");
        assert_eq!(peer["spec"]["publishNotReadyAddresses"], true);
        let client = self.apply("/api/v1", "services/demo").await;
        assert_eq!(client["spec"]["ports"][0]["name"], "client");
        let statefulset = self.apply("/apis/apps/v1", "statefulsets/demo").await;
        let pdb = self.apply("/apis/policy/v1", "poddisruptionbudgets/demo").await;
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
        statefulset
    }

    /// The pod and claim lists, answered from the model.
    pub async fn list_pods_and_claims(&mut self) {
        let selector = "labelSelector=app.kubernetes.io%2Finstance%3Ddemo%2Capp.kubernetes.io%2Fname%3Draftkv";
        let (_, send) = self
            .expect(Method::GET, &format!("/api/v1/namespaces/{NS}/pods?&{selector}"))
            .await;
        let (pods, claims) = {
            let w = self.model.world();
            let pods: Vec<Value> = w
                .pod_facts()
                .iter()
                .map(|p| {
                    let revision = if p.up_to_date { REVISION } else { "demo-rev0" };
                    json!({
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": p.name, "namespace": NS, "labels": {"controller-revision-hash": revision}},
                        "status": {"podIP": pod_ip(p.ordinal), "conditions": [{"type": "Ready", "status": if p.ready { "True" } else { "False" }}]}
                    })
                })
                .collect();
            let names = ClusterNames::new(NAME, NS);
            let claims: Vec<Value> = w
                .claim_ordinals()
                .iter()
                .map(|o| {
                    let mut claim = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": names.pvc(*o), "namespace": NS}});
                    if let Some(id) = w.claim_marks.get(o) {
                        claim["metadata"]["annotations"] = json!({ REMOVED_MEMBER_ANNOTATION: id.to_string() });
                    }
                    claim
                })
                .collect();
            (pods, claims)
        };
        respond(
            send,
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods}),
        );
        let (_, send) = self
            .expect(
                Method::GET,
                &format!("/api/v1/namespaces/{NS}/persistentvolumeclaims?&{selector}"),
            )
            .await;
        respond(
            send,
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "PersistentVolumeClaimList", "metadata": {}, "items": claims}),
        );
    }

    /// An Event about the cluster; returns it.
    pub async fn event(&mut self, reason: &str) -> Value {
        let uri = format!("/apis/events.k8s.io/v1/namespaces/{NS}/events?");
        let (body, send) = self.expect(Method::POST, &uri).await;
        assert_eq!(body["reason"], reason, "{body}");
        assert_eq!(body["regarding"]["kind"], "RaftCluster");
        assert_eq!(body["regarding"]["name"], NAME);
        respond(send, StatusCode::CREATED, &body);
        body
    }

    /// A Warning Event about the cluster; returns it.
    pub async fn warning(&mut self, reason: &str) -> Value {
        let event = self.event(reason).await;
        assert_eq!(event["type"], "Warning", "{event}");
        event
    }

    /// The status apply; returns the status sent.
    pub async fn status(&mut self) -> RaftClusterStatus {
        let uri = format!("/apis/raftkv.dev/v1alpha1/namespaces/{NS}/raftclusters/{NAME}/status{APPLY}");
        let (body, send) = self.expect(Method::PATCH, &uri).await;
        assert_eq!(body["apiVersion"], "raftkv.dev/v1alpha1");
        assert_eq!(body["kind"], "RaftCluster");
        let status: RaftClusterStatus = serde_json::from_value(body["status"].clone()).expect("a valid status");
        self.last_status = Some(status.clone());
        let mut echoed = serde_json::to_value(raft_cluster(3, None)).expect("json");
        echoed["status"] = body["status"].clone();
        respond(send, StatusCode::OK, &echoed);
        status
    }

    /// The merge patch that marks the claim of `ordinal` with the member about to be removed;
    /// stored in the model as the API server would store it. Returns the member id.
    pub async fn mark_claim(&mut self, ordinal: u32) -> u64 {
        let uri = format!("/api/v1/namespaces/{NS}/persistentvolumeclaims/data-{NAME}-{ordinal}?");
        let (body, send) = self.expect(Method::PATCH, &uri).await;
        let id: u64 = body["metadata"]["annotations"][REMOVED_MEMBER_ANNOTATION]
            .as_str()
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("no member id in {body}"));
        self.model.world().claim_marks.insert(ordinal, id);
        let claim = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": format!("data-{NAME}-{ordinal}"), "namespace": NS}});
        respond(send, StatusCode::OK, &claim);
        id
    }

    /// A `DELETE` of `path` (relative to the core API's namespace).
    pub async fn delete(&mut self, path: &str) {
        let uri = format!("/api/v1/namespaces/{NS}/{path}?");
        let (_, send) = self.expect(Method::DELETE, &uri).await;
        respond(
            send,
            StatusCode::OK,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}),
        );
    }
}
