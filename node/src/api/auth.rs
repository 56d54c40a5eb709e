//! Authentication and roles: who the caller is (a verified client certificate, or a bearer token
//! from the token file) and whether its role allows the call.
//!
//! Authentication is on when the node has a client CA or a token file. Roles are ordered:
//! `read` (get, list, watch, status) < `write` (read plus put and delete) < `admin` (everything:
//! membership, leadership, bootstrap, backups). A client certificate's role is its subject
//! organization (O), its name the common name (CN); a token's role and name are on its line of
//! the token file. A request with an `Authorization` header is judged by its token even when the
//! connection also carries a certificate, so a wrong token is never saved by a certificate.
//!
//! The policy ([`required_role`]) is a pure function of the route and method, and denies by
//! default: a route it does not name needs `admin`, so a new admin route is never open by
//! omission. `/healthz`, `/readyz` and `/metrics` stay open unless `--auth-probes`.
//!
//! On the peer port the admin routes (where followers forward admin calls) are open to a
//! connection whose peer certificate the port verified (the forwarding member checked the
//! caller already); without peer TLS they check the forwarded token like the client port.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use raftkv_api::codes;

use super::error::ApiError;
use crate::error::{Error, Result};
use crate::tls::{Reloading, VerifiedCert};

/// What a caller may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Get, list, watch, status.
    Read,
    /// Read, plus put and delete.
    Write,
    /// Everything: membership, leadership, bootstrap, backups.
    Admin,
}

impl Role {
    /// The role a token file line or a certificate organization names.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

/// An authenticated caller: a request extension for the handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The certificate's CN or the token's name.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

/// The token file, keyed by the SHA-256 of each token: a lookup by digest takes no time that
/// depends on how many leading bytes of a guess are right, and the tokens are not kept in memory.
#[derive(Debug, Default)]
pub struct TokenTable {
    by_digest: HashMap<[u8; 32], Caller>,
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl TokenTable {
    /// Parses `<token> <role> [<name>]` lines; `#` starts a comment. A bad line refuses the whole
    /// file (at start-up an error, on reload the previous table stays): half a token file would
    /// lock out whoever is on the bad line's side.
    pub fn parse(text: &str) -> Result<TokenTable, String> {
        let mut by_digest = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(token), Some(role)) = (words.next(), words.next()) else {
                return Err(format!("line {}: expected `<token> <role> [<name>]`", n + 1));
            };
            let role = Role::parse(role)
                .ok_or_else(|| format!("line {}: role {role:?} is not read, write or admin", n + 1))?;
            let name = words.next().unwrap_or("token").to_string();
            if words.next().is_some() {
                return Err(format!("line {}: expected `<token> <role> [<name>]`", n + 1));
            }
            if by_digest.insert(digest(token), Caller { name, role }).is_some() {
                return Err(format!("line {}: the token appears twice", n + 1));
            }
        }
        Ok(TokenTable { by_digest })
    }

    /// The caller a token belongs to.
    pub fn lookup(&self, token: &str) -> Option<&Caller> {
        self.by_digest.get(&digest(token))
    }
}

/// The token file, reloaded when it changes.
pub type Tokens = Arc<Reloading<TokenTable>>;

/// Loads the token file. Blocking.
pub fn load_tokens(path: PathBuf) -> Result<Tokens> {
    let shown = path.clone();
    Reloading::load("token file", vec![path], move |contents| {
        let text = std::str::from_utf8(&contents[0])
            .map_err(|_| Error::Config(format!("token file {} is not UTF-8", shown.display())))?;
        TokenTable::parse(text).map_err(|e| Error::Config(format!("token file {}: {e}", shown.display())))
    })
}

/// How a port authenticates.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// Whether credentials are required at all (a client CA or a token file is configured).
    pub enabled: bool,
    /// The token file, when there is one.
    pub tokens: Option<Tokens>,
    /// Whether `/healthz`, `/readyz` and `/metrics` need credentials too.
    pub protect_probes: bool,
}

/// The role a call needs, or `None` when it is open. `route` is the matched route template
/// (`None` when no route matched: such a request answers 404 to a caller who may read).
pub fn required_role(method: &Method, route: Option<&str>, protect_probes: bool) -> Option<Role> {
    let reads = matches!(*method, Method::GET | Method::HEAD);
    match route {
        Some("/healthz" | "/readyz" | "/metrics") => protect_probes.then_some(Role::Read),
        Some("/v1/kv" | "/v1/kv/" | "/v1/kv/{*key}") => Some(if reads { Role::Read } else { Role::Write }),
        Some("/v1/watch" | "/v1/watch/{*key}" | "/v1/status") if reads => Some(Role::Read),
        None => Some(Role::Read),
        // Deny by default: membership, leadership, bootstrap, backups and any route added later.
        Some(_) => Some(Role::Admin),
    }
}

/// A refusal: 401 with a `WWW-Authenticate` challenge, or 403.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    challenge: Option<&'static str>,
}

fn refuse(status: StatusCode, code: &'static str, message: String, challenge: Option<&'static str>) -> Refusal {
    Refusal {
        status,
        code,
        message,
        challenge,
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut resp = ApiError::new(self.status, self.code, self.message).into_response();
        if let Some(challenge) = self.challenge {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        resp
    }
}

/// Who the request is from, or the refusal to send.
fn authenticate(auth: &Auth, req: &Request) -> Result<Caller, Refusal> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let invalid = |message: &str| {
            refuse(
                StatusCode::UNAUTHORIZED,
                codes::INVALID_TOKEN,
                message.to_string(),
                Some(r#"Bearer realm="raftkv", error="invalid_token""#),
            )
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| invalid("the Authorization header must be `Bearer <token>`"))?;
        let tokens = auth.tokens.as_ref().map(|t| t.get());
        return tokens
            .as_ref()
            .and_then(|t| t.lookup(token).cloned())
            .ok_or_else(|| invalid("the token is not valid"));
    }
    if let Some(VerifiedCert(subject)) = req.extensions().get::<VerifiedCert>() {
        let role = subject.organizations.iter().filter_map(|o| Role::parse(o)).max();
        let name = subject.common_names.first().cloned().unwrap_or_default();
        return role
            .map(|role| Caller {
                name: name.clone(),
                role,
            })
            .ok_or_else(|| {
                refuse(
                    StatusCode::FORBIDDEN,
                    codes::FORBIDDEN,
                    format!(
                        "the client certificate of {name:?} names no role: its subject organization (O) \
                     must be read, write or admin"
                    ),
                    None,
                )
            });
    }
    Err(refuse(
        StatusCode::UNAUTHORIZED,
        codes::UNAUTHENTICATED,
        "this call needs credentials: a client certificate or an `Authorization: Bearer <token>` header".into(),
        Some(r#"Bearer realm="raftkv""#),
    ))
}

/// Checks the caller against [`required_role`] before the handler runs.
fn check(auth: &Auth, req: &Request) -> Result<Option<Caller>, Refusal> {
    if !auth.enabled {
        return Ok(None);
    }
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str());
    let Some(needed) = required_role(req.method(), route, auth.protect_probes) else {
        return Ok(None);
    };
    let caller = authenticate(auth, req)?;
    if caller.role < needed {
        tracing::info!(
            caller = %caller.name,
            role = caller.role.as_str(),
            needed = needed.as_str(),
            method = %req.method(),
            path = req.uri().path(),
            "refused a call the caller's role does not allow"
        );
        return Err(refuse(
            StatusCode::FORBIDDEN,
            codes::FORBIDDEN,
            format!(
                "{:?} has the role {}; {} {} needs {}",
                caller.name,
                caller.role.as_str(),
                req.method(),
                req.uri().path(),
                needed.as_str()
            ),
            None,
        ));
    }
    Ok(Some(caller))
}

/// The client port's middleware.
pub async fn authorize(State(auth): State<Auth>, mut req: Request, next: Next) -> Response {
    match check(&auth, &req) {
        Ok(caller) => {
            if let Some(caller) = caller {
                req.extensions_mut().insert(caller);
            }
            next.run(req).await
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// The peer port's middleware on the admin routes: a verified peer certificate is a member of
/// this cluster (the handshake checked the peer CA and cluster name) forwarding a call it has
/// authorized; anything else is checked as on the client port.
pub async fn authorize_peer(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    if req.extensions().get::<VerifiedCert>().is_some() {
        return next.run(req).await;
    }
    authorize(State(auth), req, next).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_lines_map_tokens_to_roles_and_bad_lines_refuse_the_file() {
        let table = TokenTable::parse("# operators\nsecret-a admin alice\n\nsecret-r read  # dashboards\n").unwrap();
        assert_eq!(
            table.lookup("secret-a"),
            Some(&Caller {
                name: "alice".into(),
                role: Role::Admin
            })
        );
        assert_eq!(table.lookup("secret-r").map(|c| c.role), Some(Role::Read));
        assert_eq!(table.lookup("secret-r").map(|c| c.name.as_str()), Some("token"));
        assert_eq!(table.lookup("secret-x"), None);
        assert_eq!(table.lookup("secret-"), None);
        for bad in ["lonely", "t1 root", "t1 read a b", "t1 read\nt1 write"] {
            assert!(TokenTable::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_policy_denies_by_default_and_leaves_probes_open_unless_asked() {
        let get = Method::GET;
        let put = Method::PUT;
        assert_eq!(required_role(&get, Some("/v1/kv/{*key}"), false), Some(Role::Read));
        assert_eq!(required_role(&get, Some("/v1/kv"), false), Some(Role::Read));
        assert_eq!(required_role(&put, Some("/v1/kv/{*key}"), false), Some(Role::Write));
        assert_eq!(
            required_role(&Method::DELETE, Some("/v1/kv/{*key}"), false),
            Some(Role::Write)
        );
        assert_eq!(required_role(&get, Some("/v1/status"), false), Some(Role::Read));
        assert_eq!(
            required_role(&Method::DELETE, Some("/v1/members/{id}"), false),
            Some(Role::Admin)
        );
        assert_eq!(required_role(&get, Some("/v1/members"), false), Some(Role::Admin));
        assert_eq!(
            required_role(&Method::POST, Some("/v1/bootstrap"), false),
            Some(Role::Admin)
        );
        assert_eq!(
            required_role(&get, Some("/v1/backup/snapshot"), false),
            Some(Role::Admin)
        );
        assert_eq!(required_role(&get, None, false), Some(Role::Read));
        for probe in ["/healthz", "/readyz", "/metrics"] {
            assert_eq!(required_role(&get, Some(probe), false), None);
            assert_eq!(required_role(&get, Some(probe), true), Some(Role::Read));
        }
        assert!(Role::Read < Role::Write && Role::Write < Role::Admin);
    }
}
