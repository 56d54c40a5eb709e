//! The HTTP front of the simulated control plane: Kubernetes REST paths mapped onto the [`Store`].
//!
//! One fallback handler parses every path itself, because the URL space is generic over
//! resources that appear at run time (CRDs): `/api/v1/...`, `/apis/<group>/<version>/...`,
//! optionally `namespaces/<ns>/`, then `<plural>[/<name>[/<subresource>]]`. Responses are JSON;
//! errors are `Status` objects; `kubectl get` receives a `Table` when it asks for one; watches
//! stream newline-delimited JSON events until `timeoutSeconds`, the client leaving, or shutdown.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::discovery;
use crate::error::ApiError;
use crate::jsonpath;
use crate::logs;
use crate::patch::{self, PatchType};
use crate::protobuf;
use crate::rbac;
use crate::resources::ResourceDef;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{self, EventType, Store, Target, WatchEvent, WatchStart};
use crate::table;

/// How often watches that allow bookmarks receive one.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(5);
/// The watch timeout when the client sets none (real servers pick 30 to 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// Shared state of the HTTP handlers.
pub struct ApiServer {
    /// All objects.
    pub store: Arc<Store>,
    /// Where the kubelet writes pod logs, for `pods/log`.
    pub log_root: PathBuf,
    /// The address clients reach the server at, for `/api`'s `serverAddressByClientCIDRs`.
    pub address: SocketAddr,
    /// Ends open watches on shutdown.
    pub shutdown: CancellationToken,
}

/// Serves the API on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: tokio::net::TcpListener, server: Arc<ApiServer>) -> std::io::Result<()> {
    let shutdown = server.shutdown.clone();
    let app = Router::new().fallback(handle).with_state(server);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

type Query = BTreeMap<String, String>;

fn json_response(code: StatusCode, body: &Value) -> Response {
    let mut response = (code, body.to_string()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(err: &ApiError) -> Response {
    let code = StatusCode::from_u16(err.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &err.to_status())
}

/// A parsed resource URL.
#[derive(Debug)]
struct ResourcePath {
    group: String,
    version: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_resource_path(store: &Store, group: &str, version: &str, rest: &[&str]) -> Option<ResourcePath> {
    let build = |namespace: Option<&str>, plural: &str, name: Option<&&str>, sub: Option<&&str>| {
        Some(ResourcePath {
            group: group.to_string(),
            version: version.to_string(),
            namespace: namespace.map(str::to_string),
            plural: plural.to_string(),
            name: name.map(|n| n.to_string()),
            subresource: sub.map(|s| s.to_string()),
        })
    };
    match rest {
        ["namespaces", ns, plural, tail @ ..]
            if tail.len() <= 2 && store.resolve(group, version, plural).is_some_and(|r| r.namespaced) =>
        {
            build(Some(ns), plural, tail.first(), tail.get(1))
        }
        [plural, tail @ ..] if tail.len() <= 2 => build(None, plural, tail.first(), tail.get(1)),
        _ => None,
    }
}

async fn handle(
    State(server): State<Arc<ApiServer>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_end_matches('/').to_string();
    let query: Query = serde_urlencoded::from_str::<Vec<(String, String)>>(uri.query().unwrap_or(""))
        .map(|pairs| pairs.into_iter().collect())
        .unwrap_or_default();
    let response = route(&server, &method, &path, &query, &headers, body).await;
    tracing::debug!(%method, %uri, status = response.status().as_u16(), "api request");
    response
}

async fn route(
    server: &Arc<ApiServer>,
    method: &Method,
    path: &str,
    query: &Query,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let registry = server.store.registry();
    let ok = |v: Value| json_response(StatusCode::OK, &v);
    match segments.as_slice() {
        ["version"] => ok(discovery::version()),
        ["healthz"] | ["livez"] | ["readyz"] => (StatusCode::OK, "ok").into_response(),
        ["api"] => ok(discovery::core_versions(&server.address.to_string())),
        ["apis"] => ok(discovery::group_list(&registry)),
        ["openapi", "v3"] => ok(discovery::openapi_v3_index(&registry, registry_generation(&registry))),
        ["openapi", "v3", rest @ ..] => match discovery::openapi_v3_group_version(&registry, &rest.join("/")) {
            Some(doc) => ok(doc),
            None => error_response(&ApiError::no_route(path)),
        },
        ["api", version] => match discovery::resource_list(&registry, "", version) {
            Some(doc) => ok(doc),
            None => error_response(&ApiError::no_route(path)),
        },
        ["apis", group] => match discovery::group(&registry, group) {
            Some(doc) => ok(doc),
            None => error_response(&ApiError::no_route(path)),
        },
        ["apis", group, version] => match discovery::resource_list(&registry, group, version) {
            Some(doc) => ok(doc),
            None => error_response(&ApiError::no_route(path)),
        },
        ["api", version, rest @ ..] => {
            resource_request(
                server,
                method,
                parse_resource_path(&server.store, "", version, rest),
                path,
                query,
                headers,
                body,
            )
            .await
        }
        ["apis", group, version, rest @ ..] => {
            resource_request(
                server,
                method,
                parse_resource_path(&server.store, group, version, rest),
                path,
                query,
                headers,
                body,
            )
            .await
        }
        _ => error_response(&ApiError::no_route(path)),
    }
}

/// A number that changes whenever the set of served resources does.
fn registry_generation(registry: &crate::resources::Registry) -> u64 {
    registry.all().fold(0xcbf2_9ce4_8422_2325u64, |h, r| {
        r.storage_key()
            .bytes()
            .chain(r.version.bytes())
            .fold(h, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
    })
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

fn is_dry_run(query: &Query) -> bool {
    query.get("dryRun").is_some_and(|d| d == "All")
}

fn selectors(query: &Query) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = match query.get("labelSelector") {
        Some(s) => LabelSelector::parse(s)?,
        None => LabelSelector::default(),
    };
    let fields = match query.get("fieldSelector") {
        Some(s) => FieldSelector::parse(s)?,
        None => FieldSelector::default(),
    };
    Ok((labels, fields))
}

#[allow(clippy::too_many_arguments)]
async fn resource_request(
    server: &Arc<ApiServer>,
    method: &Method,
    parsed: Option<ResourcePath>,
    path: &str,
    query: &Query,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let Some(p) = parsed else {
        return error_response(&ApiError::no_route(path));
    };
    let Some(res) = server.store.resolve(&p.group, &p.version, &p.plural) else {
        return error_response(&ApiError::no_route(path));
    };
    if !res.namespaced && p.namespace.is_some() {
        return error_response(&ApiError::no_route(path));
    }
    let ns = p.namespace.clone().unwrap_or_default();
    let ct = content_type(headers);
    if let Err(err) = authorize(server, method, &p, query, &ct, headers) {
        return error_response(&err);
    }
    if !body.is_empty() && ct.starts_with("application/cbor") {
        return error_response(&ApiError::unsupported_media_type(&ct));
    }
    let body = if !body.is_empty() && ct.starts_with(protobuf::CONTENT_TYPE) {
        match protobuf::decode(&body) {
            Ok(object) => Bytes::from(object.to_string()),
            Err(err) => return error_response(&err),
        }
    } else {
        body
    };
    let result = match (&p.name, &p.subresource) {
        (None, _) => {
            if method == Method::GET && query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                return watch(server, res, p.namespace.clone(), query, headers).await;
            }
            collection(server, &res, p.namespace.as_deref(), method, query, headers, &body)
        }
        (Some(name), None) => object(server, &res, &ns, name, method, query, headers, &body),
        (Some(name), Some(sub)) => subresource(server, &res, &ns, name, sub, method, query, headers, &body),
    };
    match result {
        Ok(response) => response,
        Err(err) => error_response(&err),
    }
}

/// Checks a request made with a pod's service-account token against RBAC; requests with other
/// credentials (the administrator's kubeconfig) pass.
fn authorize(
    server: &ApiServer,
    method: &Method,
    p: &ResourcePath,
    query: &Query,
    content_type: &str,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let Some(account) = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(rbac::ServiceAccount::from_authorization)
    else {
        return Ok(());
    };
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (method.as_str(), p.name.is_some()) {
        ("GET", true) => "get",
        ("GET", false) if watching => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return Ok(()),
    };
    let mut request = rbac::Attributes {
        verb: verb.to_string(),
        group: p.group.clone(),
        resource: p.plural.clone(),
        subresource: p.subresource.clone(),
        namespace: p.namespace.clone(),
        name: p.name.clone(),
    };
    rbac::authorize(&server.store, &account, &request).map_err(ApiError::forbidden)?;
    // A server-side apply of an object that does not exist creates it, and needs `create` too.
    let applies = verb == "patch" && PatchType::from_content_type(content_type) == Some(PatchType::Apply);
    if applies && p.subresource.is_none() {
        let exists = server
            .store
            .resolve(&p.group, &p.version, &p.plural)
            .is_some_and(|res| {
                let name = p.name.as_deref().unwrap_or_default();
                server
                    .store
                    .get(&res, p.namespace.as_deref().unwrap_or_default(), name)
                    .is_ok()
            });
        if !exists {
            request.verb = "create".into();
            rbac::authorize(&server.store, &account, &request).map_err(ApiError::forbidden)?;
        }
    }
    Ok(())
}

fn decode(body: &[u8]) -> Result<Value, ApiError> {
    patch::decode_body(body)
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .unwrap_or("application/json")
        .to_string()
}

#[allow(clippy::too_many_arguments)]
fn collection(
    server: &ApiServer,
    res: &ResourceDef,
    ns: Option<&str>,
    method: &Method,
    query: &Query,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let store = &server.store;
    match *method {
        Method::GET => {
            let (labels, fields) = selectors(query)?;
            let (items, rv) = store.list(res, ns, &labels, &fields);
            let (items, metadata) = paginate(items, rv, query)?;
            if wants_table(headers) {
                let include = query.get("includeObject").map(String::as_str).unwrap_or("Metadata");
                return Ok(json_response(
                    StatusCode::OK,
                    &table::table(res, &items, metadata, include),
                ));
            }
            Ok(json_response(
                StatusCode::OK,
                &json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version(),
                        "metadata": metadata, "items": items}),
            ))
        }
        Method::POST => {
            let ns = ns.unwrap_or_default();
            if res.namespaced && ns.is_empty() {
                return Err(ApiError::bad_request("a namespace is required to create this resource"));
            }
            let created = store.create(res, ns, decode(body)?, is_dry_run(query))?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        Method::DELETE => {
            let (labels, fields) = selectors(query)?;
            let options = store::delete_options(query, body)?;
            let (items, rv) = store.list(res, ns, &labels, &fields);
            let mut deleted = Vec::new();
            for item in items {
                let item_ns = item["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
                let name = item["metadata"]["name"].as_str().unwrap_or_default().to_string();
                deleted.push(store.delete(res, &item_ns, &name, &options, is_dry_run(query))?);
            }
            Ok(json_response(
                StatusCode::OK,
                &json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()}, "items": deleted}),
            ))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on a collection"
        ))),
    }
}

/// Applies `limit` and `continue`; the token encodes the last (namespace, name) returned.
fn paginate(items: Vec<Value>, rv: u64, query: &Query) -> Result<(Vec<Value>, Value), ApiError> {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let position = |o: &Value| {
        (
            o["metadata"]["namespace"].as_str().unwrap_or_default().to_string(),
            o["metadata"]["name"].as_str().unwrap_or_default().to_string(),
        )
    };
    let mut items = items;
    if let Some(token) = query.get("continue").filter(|t| !t.is_empty()) {
        let decoded = engine
            .decode(token)
            .ok()
            .and_then(|b| serde_json::from_slice::<(String, String)>(&b).ok())
            .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
        items.retain(|o| position(o) > decoded);
    }
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(limit) = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
    {
        if items.len() > limit {
            let remaining = items.len() - limit;
            items.truncate(limit);
            let last = position(items.last().expect("limit is positive"));
            let token = engine.encode(serde_json::to_vec(&last).unwrap_or_default());
            metadata["continue"] = json!(token);
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    Ok((items, metadata))
}

fn single(res: &ResourceDef, object: Value, headers: &HeaderMap, query: &Query) -> Response {
    if wants_table(headers) {
        let include = query.get("includeObject").map(String::as_str).unwrap_or("Metadata");
        let rv = object["metadata"]["resourceVersion"].clone();
        return json_response(
            StatusCode::OK,
            &table::table(res, &[object], json!({"resourceVersion": rv}), include),
        );
    }
    json_response(StatusCode::OK, &object)
}

#[allow(clippy::too_many_arguments)]
fn object(
    server: &ApiServer,
    res: &ResourceDef,
    ns: &str,
    name: &str,
    method: &Method,
    query: &Query,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let store = &server.store;
    let dry_run = is_dry_run(query);
    match *method {
        Method::GET => Ok(single(res, store.get(res, ns, name)?, headers, query)),
        Method::PUT => {
            let updated = store.update(res, ns, name, decode(body)?, Target::Main, dry_run)?;
            Ok(json_response(StatusCode::OK, &updated))
        }
        Method::PATCH => {
            let ct = content_type(headers);
            let patch_type = PatchType::from_content_type(&ct).ok_or_else(|| ApiError::unsupported_media_type(&ct))?;
            let patched = store.patch(res, ns, name, patch_type, &decode(body)?, Target::Main, dry_run)?;
            Ok(json_response(StatusCode::OK, &patched))
        }
        Method::DELETE => {
            let options = store::delete_options(query, body)?;
            let deleted = store.delete(res, ns, name, &options, dry_run)?;
            Ok(json_response(StatusCode::OK, &deleted))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on an object"
        ))),
    }
}

#[allow(clippy::too_many_arguments)]
fn subresource(
    server: &ApiServer,
    res: &ResourceDef,
    ns: &str,
    name: &str,
    sub: &str,
    method: &Method,
    query: &Query,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let store = &server.store;
    let dry_run = is_dry_run(query);
    match (sub, method.clone()) {
        ("status", Method::GET) if res.status_subresource => Ok(single(res, store.get(res, ns, name)?, headers, query)),
        ("status", Method::PUT) if res.status_subresource => {
            let updated = store.update(res, ns, name, decode(body)?, Target::Status, dry_run)?;
            Ok(json_response(StatusCode::OK, &updated))
        }
        ("status", Method::PATCH) if res.status_subresource => {
            let ct = content_type(headers);
            let patch_type = PatchType::from_content_type(&ct).ok_or_else(|| ApiError::unsupported_media_type(&ct))?;
            let patched = store.patch(res, ns, name, patch_type, &decode(body)?, Target::Status, dry_run)?;
            Ok(json_response(StatusCode::OK, &patched))
        }
        ("scale", _) if res.scale.is_some() => scale(server, res, ns, name, method, headers, body, dry_run),
        ("log", Method::GET) if res.storage_key() == store::PODS => {
            let pod = store.get(res, ns, name)?;
            let container = query
                .get("container")
                .cloned()
                .or_else(|| pod["spec"]["containers"][0]["name"].as_str().map(str::to_string))
                .unwrap_or_default();
            let path = logs::log_path(&server.log_root, ns, name, &container);
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let text = match query.get("tailLines").and_then(|t| t.parse::<usize>().ok()) {
                Some(n) => {
                    let lines: Vec<&str> = text.lines().collect();
                    let mut tail = lines[lines.len().saturating_sub(n)..].join("\n");
                    tail.push('\n');
                    tail
                }
                None => text,
            };
            Ok((StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], text).into_response())
        }
        ("eviction", Method::POST) if res.storage_key() == store::PODS => {
            let eviction = decode(body)?;
            let options = store::delete_options(&Query::new(), eviction["deleteOptions"].to_string().as_bytes())?;
            store.delete(res, ns, name, &options, dry_run)?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        _ => Err(ApiError::no_route(&format!("{}/{name}/{sub}", res.plural))),
    }
}

/// The `autoscaling/v1 Scale` view of an object.
fn scale_of(res: &ResourceDef, object: &Value) -> Value {
    let paths = res.scale.as_ref().expect("callers check for a scale subresource");
    let replicas = |path: &str| jsonpath::get(object, path).and_then(Value::as_i64).unwrap_or(0);
    let selector = paths
        .label_selector
        .as_deref()
        .and_then(|p| jsonpath::get(object, p))
        .map(|s| match s {
            Value::String(s) => s.clone(),
            Value::Object(_) => LabelSelector::from_object(s).to_string(),
            _ => String::new(),
        });
    let m = &object["metadata"];
    let mut scale = json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "uid": m["uid"], "resourceVersion": m["resourceVersion"],
                     "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": replicas(&paths.spec_replicas)},
        "status": {"replicas": replicas(&paths.status_replicas)},
    });
    if !m["namespace"].is_null() {
        scale["metadata"]["namespace"] = m["namespace"].clone();
    }
    if let Some(selector) = selector {
        scale["status"]["selector"] = json!(selector);
    }
    scale
}

#[allow(clippy::too_many_arguments)]
fn scale(
    server: &ApiServer,
    res: &ResourceDef,
    ns: &str,
    name: &str,
    method: &Method,
    headers: &HeaderMap,
    body: &[u8],
    dry_run: bool,
) -> Result<Response, ApiError> {
    let store = &server.store;
    let paths = res.scale.as_ref().expect("callers check for a scale subresource");
    let current = store.get(res, ns, name)?;
    let desired = match *method {
        Method::GET => return Ok(json_response(StatusCode::OK, &scale_of(res, &current))),
        Method::PUT => decode(body)?,
        Method::PATCH => {
            let ct = content_type(headers);
            let patch_type = PatchType::from_content_type(&ct).ok_or_else(|| ApiError::unsupported_media_type(&ct))?;
            let mut scale = scale_of(res, &current);
            patch::apply(&mut scale, patch_type, &decode(body)?, false)?;
            scale
        }
        _ => return Err(ApiError::method_not_allowed("scale supports get, update and patch")),
    };
    let Some(replicas) = desired["spec"]["replicas"].as_i64() else {
        return Err(ApiError::invalid(
            "autoscaling",
            "scale",
            name,
            "spec.replicas: Required value",
        ));
    };
    let mut updated = current.clone();
    updated["metadata"]["resourceVersion"] = desired["metadata"]["resourceVersion"].clone();
    if !jsonpath::set(&mut updated, &paths.spec_replicas, json!(replicas)) {
        return Err(ApiError::invalid(
            "autoscaling",
            "scale",
            name,
            "the scale path is not a field path",
        ));
    }
    let stored = store.update(res, ns, name, updated, Target::Main, dry_run)?;
    Ok(json_response(StatusCode::OK, &scale_of(res, &stored)))
}

fn event_line(event_type: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event_type, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// The event a selector-filtered watcher should see for a change, if any.
fn filtered(event: &WatchEvent, labels: &LabelSelector, fields: &FieldSelector) -> Option<EventType> {
    let matches = |o: &Value| labels.matches(o) && fields.matches(o);
    let now = matches(&event.object);
    match event.event_type {
        EventType::Added | EventType::Deleted => now.then_some(event.event_type),
        EventType::Modified => {
            let before = event.previous.as_ref().is_none_or(matches);
            match (before, now) {
                (true, true) => Some(EventType::Modified),
                (true, false) => Some(EventType::Deleted),
                (false, true) => Some(EventType::Added),
                (false, false) => None,
            }
        }
    }
}

async fn watch(
    server: &Arc<ApiServer>,
    res: Arc<ResourceDef>,
    ns: Option<String>,
    query: &Query,
    headers: &HeaderMap,
) -> Response {
    let (labels, fields) = match selectors(query) {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let initial_events = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let start = match query.get("resourceVersion").map(String::as_str) {
        _ if initial_events => WatchStart::Now,
        None | Some("") | Some("0") => WatchStart::Now,
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => WatchStart::After(rv),
            Err(_) => return error_response(&ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))),
        },
    };
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_WATCH_TIMEOUT);
    let as_table = wants_table(headers);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    }));
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));

    let stream = match server.store.watch(&res, ns.as_deref(), start) {
        Ok(stream) => stream,
        Err(err) => {
            let _ = tx.try_send(event_line("ERROR", &err.to_status()));
            return response;
        }
    };
    let shutdown = server.shutdown.clone();
    let storage = res.storage_key();
    tokio::spawn(async move {
        let render = |o: &Value| {
            let mut o = o.clone();
            o["apiVersion"] = json!(res.api_version());
            o["kind"] = json!(res.kind);
            if as_table {
                let rv = o["metadata"]["resourceVersion"].clone();
                table::table(&res, &[o], json!({"resourceVersion": rv}), "Metadata")
            } else {
                o
            }
        };
        let bookmark = |rv: u64, initial_end: bool| {
            let mut metadata = json!({"resourceVersion": rv.to_string()});
            if initial_end {
                metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            event_line(
                "BOOKMARK",
                &json!({"kind": res.kind, "apiVersion": res.api_version(), "metadata": metadata}),
            )
        };
        for event in &stream.initial {
            if let Some(t) = filtered(event, &labels, &fields) {
                if tx.send(event_line(t.as_str(), &render(&event.object))).await.is_err() {
                    return;
                }
            }
        }
        if initial_events && tx.send(bookmark(stream.start_rv, true)).await.is_err() {
            return;
        }
        let mut live = stream.live;
        let mut last_rv = stream.start_rv;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(BOOKMARK_INTERVAL);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                _ = ticker.tick(), if bookmarks => {
                    if tx.send(bookmark(last_rv, false)).await.is_err() {
                        return;
                    }
                }
                received = live.recv() => match received {
                    Ok(event) => {
                        if event.rv <= last_rv {
                            continue;
                        }
                        last_rv = event.rv;
                        if event.storage_key != storage || ns.as_ref().is_some_and(|ns| *ns != event.namespace) {
                            continue;
                        }
                        if let Some(t) = filtered(&event, &labels, &fields) {
                            if tx.send(event_line(t.as_str(), &render(&event.object))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(RecvError::Lagged(skipped)) => {
                        tracing::warn!(skipped, "watch fell behind; closing it so the client resumes");
                        return;
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    });
    response
}
