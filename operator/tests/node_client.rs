//! `HttpNodeClient` against a small HTTP server speaking the node's admin API contract: request
//! paths and bodies, response decoding, and how refusals surface.

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use raftkv_operator::node_client::{codes, HttpNodeClient, MemberKind, NodeApi, NodeClientTimeouts, NodeMembership};
use raftkv_operator::Error;
use serde_json::{json, Value};

type Calls = Arc<Mutex<Vec<String>>>;

async fn start() -> anyhow::Result<(String, Calls)> {
    let calls: Calls = Arc::default();
    let app = Router::new()
        .route(
            "/v1/status",
            get(|| async {
                Json(json!({
                    "id": 11, "cluster_id": 0, "role": "uninitialized", "term": 0, "leader_id": 0,
                    "commit_index": 0, "applied_index": 0, "snapshot_index": 0,
                    "membership": "none", "peer_url": "http://demo-1.demo-peer.ns.svc:8081",
                    "ready": false
                }))
            }),
        )
        .route(
            "/v1/members",
            get(|| async {
                Json(json!({"cluster_id": 7, "leader_id": 10, "members": [
                    {"id": 10, "peer_url": "http://a:8081", "role": "voter", "match_index": 42, "healthy": true},
                    {"id": 12, "peer_url": "http://c:8081", "role": "learner", "match_index": null, "healthy": null}
                ]}))
            })
            .post(|State(calls): State<Calls>, Json(body): Json<Value>| async move {
                calls.lock().unwrap().push(format!("add {body}"));
                Json(json!({"cluster_id": 7, "leader_id": 10, "members": []}))
            }),
        )
        .route(
            "/v1/members/{id}/promote",
            post(|Path(id): Path<u64>| async move {
                (
                    StatusCode::CONFLICT,
                    Json(json!({"error": "learner_lagging", "message": format!("{id} is 500 entries behind")})),
                )
            }),
        )
        .route(
            "/v1/members/{id}",
            delete(|State(calls): State<Calls>, Path(id): Path<u64>| async move {
                calls.lock().unwrap().push(format!("remove {id}"));
                StatusCode::OK
            }),
        )
        .route(
            "/v1/leader",
            post(|Json(body): Json<Value>| async move { Json(json!({"leader_id": body["id"]})) }),
        )
        .route(
            "/v1/bootstrap",
            post(|| async {
                let mut headers = HeaderMap::new();
                headers.insert("retry-after", "3".parse().unwrap());
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    headers,
                    Json(json!({"error": "no_leader", "message": "try again"})),
                )
            }),
        )
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, calls))
}

fn client() -> HttpNodeClient {
    HttpNodeClient::new(NodeClientTimeouts::default()).expect("client")
}

#[tokio::test]
async fn status_and_members_decode_the_contract() -> anyhow::Result<()> {
    let (url, _) = start().await?;
    let status = client().status(&url).await?;
    assert_eq!((status.id, status.membership), (11, NodeMembership::None));
    let members = client().members(&url).await?;
    assert_eq!(members.leader_id, 10);
    assert_eq!(members.members[0].match_index, Some(42));
    assert_eq!(members.members[1].role, MemberKind::Learner);
    assert_eq!(members.members[1].healthy, None);
    Ok(())
}

#[tokio::test]
async fn membership_calls_send_the_documented_requests() -> anyhow::Result<()> {
    let (url, calls) = start().await?;
    client().add_learner(&url, 12, "http://c:8081").await?;
    client().remove_member(&url, 12).await?;
    assert_eq!(client().transfer_leader(&url, 13).await?, 13);
    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        [
            r#"add {"id":12,"learner":true,"peer_url":"http://c:8081"}"#,
            "remove 12"
        ]
    );
    Ok(())
}

#[tokio::test]
async fn refusals_carry_the_nodes_error_code_and_retry_after() -> anyhow::Result<()> {
    let (url, _) = start().await?;
    let error = client().promote(&url, 12).await.unwrap_err();
    assert_eq!(error.node_code(), Some(codes::LEARNER_LAGGING));
    let error = client().bootstrap(&url).await.unwrap_err();
    match error {
        Error::NodeRejected {
            status, retry_after, ..
        } => {
            assert_eq!(status, 503);
            assert_eq!(retry_after, Some(std::time::Duration::from_secs(3)));
        }
        other => panic!("expected a refusal, got {other}"),
    }
    Ok(())
}

#[tokio::test]
async fn an_unreachable_node_is_a_transport_error() {
    // Port 9 on loopback (discard) has no listener on these machines.
    let error = client().status("http://127.0.0.1:9").await.unwrap_err();
    assert!(matches!(error, Error::NodeTransport { .. }), "{error}");
}
