//! JSON API v1 (axum), served by every node on loopback by default.
//!
//! Every request carries `Authorization: Bearer <token>` (checked against
//! `operators.json` through the node's one [`OperatorsFile`], re-read
//! when it changes and shared with the card flow; tokens expire) or the
//! browser's session cookie from [`crate::web`]. A cookie request must
//! name an accepted `Host` (an IP literal, `localhost` or a configured
//! `[http] hosts` name: a DNS-rebinding page cannot use the session), and
//! a state-changing one must come from this origin and carry the
//! session's CSRF token in `X-CSRF-Token`. Handlers turn requests into
//! engine [`Query`]s and [`Command`]s
//! through the [`DriverHandle`]; a command's `201` is sent only after the
//! engine has committed it. Every error is `{"error":{"code","message"}}`
//! with a status from [`status_for`]. Request bodies are limited to
//! [`MAX_BODY_BYTES`] before parsing; unknown JSON fields, malformed JSON
//! and wrong content types are refused (I-15, I-30). The endpoints are
//! documented in `docs/api.md`.

use crate::auth::{Operators, OperatorsFile, Sessions, TokenRefusal, Via};
use crate::card::flow::{CardHub, SessionRefusal, STAFF_TAP_WINDOW};
use crate::driver::{DriverError, DriverHandle};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use crdt::api::{Command, CommandError, Operator, Query, QueryReply, Reply};
use crdt::store::{LocationRow, PersonRow, StoreError};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub const MAX_BODY_BYTES: usize = 1 << 20;
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;
pub const SEARCH_LIMIT: usize = 50;
/// Every response, HTML included, carries this policy: scripts and styles
/// only from this node's embedded files, no `unsafe-inline`.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// Shared state of the HTTP server.
#[derive(Clone)]
pub struct ApiState {
    pub driver: DriverHandle,
    pub data_dir: PathBuf,
    /// The card reader's events, status and staff sessions; `None` when
    /// the node has no `[card]` configured.
    pub card: Option<Arc<CardHub>>,
    /// This node's role (decides the screen and the second factor);
    /// `None` until [`ApiState::with_identity`].
    pub role: Option<crdt::Role>,
    pub node_id: Option<String>,
    /// The shelter a shelter node checks people into.
    pub shelter_id: Option<String>,
    /// Browser and staff-card sessions.
    pub sessions: Arc<Sessions>,
    /// Host names accepted besides IP literals and `localhost`.
    pub hosts: Arc<Vec<String>>,
    /// The mesh transport, for revocation lists loaded at runtime
    /// (`/api/v1/crl`); `None` on an API without one (tests).
    pub transport: Option<Arc<crate::net::Transport>>,
    operators: Arc<OperatorsFile>,
    /// Failed PIN attempts since the last staff tap (the tap is void after
    /// [`MAX_PIN_ATTEMPTS`]) and last used TOTP step per operator.
    pub(crate) login_guard: Arc<Mutex<LoginGuard>>,
}

/// Wrong PINs allowed per staff tap.
pub const MAX_PIN_ATTEMPTS: u32 = 3;

#[derive(Default)]
pub(crate) struct LoginGuard {
    pub pin_failures: u32,
    /// operator → the TOTP code last used and when (a code works once).
    pub totp_used: std::collections::HashMap<String, (String, u64)>,
}

impl ApiState {
    pub fn new(driver: DriverHandle, data_dir: PathBuf) -> ApiState {
        ApiState {
            driver,
            card: None,
            role: None,
            node_id: None,
            shelter_id: None,
            sessions: Arc::new(Sessions::default()),
            hosts: Arc::new(Vec::new()),
            transport: None,
            operators: OperatorsFile::new(&data_dir),
            login_guard: Arc::new(Mutex::new(LoginGuard::default())),
            data_dir,
        }
    }

    /// The node's id and role (for the screens and the second factor).
    pub fn with_identity(mut self, node_id: &str, role: crdt::Role) -> ApiState {
        self.node_id = Some(node_id.to_string());
        self.role = Some(role);
        self
    }

    /// The shelter this node checks people into (shelter nodes).
    pub fn with_shelter(mut self, shelter_id: Option<String>) -> ApiState {
        self.shelter_id = shelter_id;
        self
    }

    /// Host names the browser may use besides IP literals and `localhost`.
    pub fn with_hosts(mut self, hosts: Vec<String>) -> ApiState {
        self.hosts = Arc::new(hosts);
        self
    }

    /// With a card reader: card events on `/api/v1/events`, `card_reader`
    /// in `/api/v1/status`, `POST /api/v1/sessions/card`.
    pub fn with_card(mut self, hub: Arc<CardHub>) -> ApiState {
        self.card = Some(hub);
        self
    }

    /// With the mesh transport: `GET`/`POST /api/v1/crl`, `revocation` in
    /// `/api/v1/status`.
    pub fn with_transport(mut self, t: Arc<crate::net::Transport>) -> ApiState {
        self.transport = Some(t);
        self
    }

    /// The operators file this API checks tokens against (shared with the
    /// card flow).
    pub fn operators_file(&self) -> &Arc<OperatorsFile> {
        &self.operators
    }

    /// The current operators, re-read when the file's mtime changes.
    pub(crate) fn operators(&self) -> Result<Arc<Operators>, ApiError> {
        self.operators.current().map_err(|e| {
            tracing::error!(error = %e, "operators file unreadable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "operators_unavailable",
                "operator list unreadable",
            )
        })
    }
}

/// An error response: `{"error":{"code","message"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// HTTP status for an engine error.
pub fn status_for(e: &CommandError) -> StatusCode {
    match e {
        CommandError::Invalid(_) => StatusCode::BAD_REQUEST,
        CommandError::Forbidden { .. } => StatusCode::FORBIDDEN,
        CommandError::NotFound { .. } => StatusCode::NOT_FOUND,
        CommandError::Rejected(_) => StatusCode::CONFLICT,
        CommandError::Storage(StoreError::Full) => StatusCode::INSUFFICIENT_STORAGE,
        CommandError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> ApiError {
        ApiError::new(status_for(&e), e.code(), e.to_string())
    }
}

impl From<DriverError> for ApiError {
    fn from(e: DriverError) -> ApiError {
        match e {
            DriverError::Query(c) => c.into(),
            other => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                other.to_string(),
            ),
        }
    }
}

/// `Json` with our error body: 415 wrong content type, 413 too large,
/// 400 malformed JSON or unknown/missing fields.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let Json(v) = Json::<Value>::from_request(req, state)
            .await
            .map_err(json_rejection)?;
        // The Individual-Number guard over every string of the body comes
        // first: a typed error below ("invalid type: string …") would
        // echo the value.
        if let Some(field) = crdt::text::json_individual_number(&v) {
            return Err(
                CommandError::Invalid(crdt::text::TextError::IndividualNumber { field }).into(),
            );
        }
        serde_json::from_value(v)
            .map(ApiJson)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("{e}")))
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    let text = r.body_text();
    match status {
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            status,
            "unsupported_media_type",
            "expected Content-Type: application/json",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            status,
            "payload_too_large",
            format!("request body larger than {MAX_BODY_BYTES} bytes"),
        ),
        s if s.is_client_error() => ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", text),
        _ => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", text),
    }
}

/// Query string with our error body.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|r: QueryRejection| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", r.body_text())
            })
    }
}

/// The authenticated operator, set by the auth middleware.
#[derive(Clone, Debug)]
pub struct AuthOperator(pub String);

/// The session cookie's name prefix; the node id follows, because
/// browsers scope cookies by host, not port, and several nodes may share
/// one host (the demo: every node on 127.0.0.1).
pub const SESSION_COOKIE: &str = "kz_session";

impl ApiState {
    /// This node's session cookie name.
    pub fn session_cookie(&self) -> String {
        match &self.node_id {
            Some(n) => format!("{SESSION_COOKIE}_{n}"),
            None => SESSION_COOKIE.to_string(),
        }
    }

    /// This node's pre-session (sign-in form) cookie name.
    pub fn pre_cookie(&self) -> String {
        match &self.node_id {
            Some(n) => format!("kz_pre_{n}"),
            None => "kz_pre".to_string(),
        }
    }
}

/// The value of cookie `name`, if the request has it.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether the `Host` header names this node in a way a DNS-rebinding
/// page cannot: an IP literal, `localhost`, or a configured host name.
pub fn host_allowed(headers: &HeaderMap, extra: &[String]) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        match rest.split_once(']') {
            Some((ip, _)) => return ip.parse::<std::net::Ipv6Addr>().is_ok(),
            None => return false,
        }
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.parse::<std::net::Ipv4Addr>().is_ok()
        || extra.iter().any(|h| *h == name)
}

/// Whether a state-changing browser request comes from this node's own
/// pages: `Origin` is `http(s)://` + the request's `Host`; or, where a
/// browser sends `Origin: null` (a form navigation under a strict
/// referrer policy), its own `Sec-Fetch-Site: same-origin` (a header no
/// page can set).
pub fn same_origin(headers: &HeaderMap) -> bool {
    let get = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    let Some(host) = get("host") else {
        return false;
    };
    match get("origin") {
        Some(o) if o != "null" => o == format!("http://{host}") || o == format!("https://{host}"),
        _ => get("sec-fetch-site") == Some("same-origin"),
    }
}

fn refuse(status: StatusCode, code: &'static str, msg: &str) -> Response {
    ApiError::new(status, code, msg).into_response()
}

async fn auth(State(st): State<ApiState>, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ops = match st.operators() {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let name = match token {
        Some(token) => match ops.verify_at(token, crate::auth::now_ms()) {
            Ok(n) => n.to_string(),
            // A staff-card session token used as a bearer token.
            Err(TokenRefusal::Unknown) => match st.sessions.get(token, &ops) {
                Some(s) if s.via == Via::Card => s.operator,
                _ => return refuse(StatusCode::UNAUTHORIZED, "unauthorized", "invalid token"),
            },
            Err(TokenRefusal::Expired) => {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "token_expired",
                    "token expired: rotate it with `kizuna operator token`",
                )
            }
        },
        None => {
            let Some(cookie) = cookie(req.headers(), &st.session_cookie()).map(str::to_string)
            else {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing bearer token",
                );
            };
            if !host_allowed(req.headers(), &st.hosts) {
                return refuse(StatusCode::FORBIDDEN, "bad_host", "Host not accepted");
            }
            let Some(s) = st.sessions.get(&cookie, &ops) else {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "session_expired",
                    "session ended: sign in again",
                );
            };
            let safe = matches!(
                *req.method(),
                axum::http::Method::GET | axum::http::Method::HEAD
            );
            if !safe {
                if !same_origin(req.headers()) {
                    return refuse(
                        StatusCode::FORBIDDEN,
                        "bad_origin",
                        "request from another origin",
                    );
                }
                let csrf = req
                    .headers()
                    .get("x-csrf-token")
                    .and_then(|v| v.to_str().ok());
                let ok = csrf
                    .is_some_and(|c| blake3::hash(c.as_bytes()) == blake3::hash(s.csrf.as_bytes()));
                if !ok {
                    return refuse(StatusCode::FORBIDDEN, "csrf", "missing or wrong CSRF token");
                }
            }
            s.operator
        }
    };
    req.extensions_mut().insert(AuthOperator(name));
    next.run(req).await
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        // Same-origin: no URL (a sign-in link) leaves the node, and the
        // browser still names the origin of a form it posts here.
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    r
}

/// Adds `Server-Timing: app;dur=MS` to every API answer: the time from the
/// request reaching the router to its answer being ready (the browser's
/// resource timing shows it beside the network and the page's own time).
async fn server_timing(req: Request, next: Next) -> Response {
    let t = std::time::Instant::now();
    let mut r = next.run(req).await;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if let Ok(v) = HeaderValue::from_str(&format!("app;dur={ms:.1}")) {
        r.headers_mut().insert("server-timing", v);
    }
    r
}

/// The API router; serve it with `axum::serve`.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/persons", get(persons).post(register_person))
        .route("/api/v1/search", get(search))
        .route(
            "/api/v1/households/by-card/{card_user_id}",
            get(household_by_card),
        )
        .route("/api/v1/persons/{person_id}", get(person))
        .route("/api/v1/persons/{person_id}/history", get(history))
        .route(
            "/api/v1/persons/{person_id}/medical",
            get(medical).post(put_medical),
        )
        .route("/api/v1/persons/{person_id}/break-glass", post(break_glass))
        .route("/api/v1/medical/reasons", get(medical_reasons))
        .route("/api/v1/checkins", post(checkins))
        .route("/api/v1/checkouts", post(checkouts))
        .route(
            "/api/v1/shelters",
            get(shelters).post(crate::data_api::put_shelter),
        )
        .route("/api/v1/transfers", post(transfers))
        .route("/api/v1/roster", get(roster))
        .route("/api/v1/districts", get(districts))
        .route("/api/v1/unaccounted", get(unaccounted))
        .route("/api/v1/arrivals", get(arrivals))
        .route("/api/v1/conflicts", get(conflicts))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/events", get(events))
        .route("/api/v1/crl", get(crl_status).post(load_crl))
        .merge(crate::data_api::routes())
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn(server_timing))
        .with_state(state.clone());
    // The one endpoint without a bearer token: the token comes from the
    // staff card tapped on this node's reader.
    let open = Router::new()
        .route("/api/v1/sessions/card", post(card_session))
        .with_state(state.clone());
    open.merge(crate::web::router(state))
        .merge(api)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(security_headers))
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// `201 {"event_ids", "already"}` for a presence command (check-in,
/// check-out, transfer).
fn presence_reply(r: Reply) -> Result<Response, ApiError> {
    match r {
        Reply::Presence { event_ids, already } => Ok((
            StatusCode::CREATED,
            Json(json!({"event_ids": event_ids, "already": already})),
        )
            .into_response()),
        _ => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "unexpected engine reply",
        )),
    }
}

fn unexpected(r: QueryReply) -> ApiError {
    tracing::error!(reply = ?std::mem::discriminant(&r), "unexpected query reply");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "unexpected engine reply",
    )
}

fn person_json(p: &PersonRow) -> Value {
    json!({"person_id": p.person_id, "household_id": p.household_id, "name": p.name, "kana": p.kana, "birth_date": p.birth_date, "district": p.district})
}

fn location_json(l: &Option<LocationRow>) -> Value {
    match l {
        None => Value::Null,
        Some(l) => {
            json!({"shelter_id": l.shelter_id, "status": l.status, "since": l.since_ms, "conflict": l.conflict})
        }
    }
}

async fn status(State(st): State<ApiState>) -> Result<Json<Value>, ApiError> {
    match st.driver.query(Query::Status).await? {
        QueryReply::Status(s) => {
            let mut v = serde_json::to_value(s).expect("serialisable");
            v["card_reader"] = match &st.card {
                Some(c) => c.status_json(),
                None => Value::Null,
            };
            let problem = st.driver.clock_problem();
            v["clock"] = serde_json::json!({ "trusted": problem.is_none(), "problem": problem });
            v["revocation"] = match &st.transport {
                Some(t) => crl_json(t),
                None => Value::Null,
            };
            Ok(Json(v))
        }
        other => Err(unexpected(other)),
    }
}

/// The revocation list in force: its number and dates.
fn crl_json(t: &crate::net::Transport) -> Value {
    match t.revocation().current() {
        Some(l) => json!({
            "crl_number": l.number(),
            "revoked": l.revoked_serials().len(),
            "this_update": l.this_update().unix_timestamp(),
            "next_update": l.next_update().map(|t| t.unix_timestamp()),
        }),
        None => json!({ "crl_number": null, "revoked": 0 }),
    }
}

fn no_transport() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_mesh",
        "this API has no mesh transport / メッシュ通信がありません",
    )
}

/// `GET /api/v1/crl`: the revocation list in force.
async fn crl_status(State(st): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let t = st.transport.as_ref().ok_or_else(no_transport)?;
    Ok(Json(crl_json(t)))
}

/// `POST /api/v1/crl` (`application/pkix-crl`, the DER `kizuna certs
/// revoke` writes): loads a CA-signed revocation list into the running
/// node. A newer list is applied at once (sessions with newly revoked
/// peers closed, the list saved and gossiped); an older or equal one is
/// `stale`; a damaged or foreign one is refused with the list in force
/// kept (and named). The CA signature is the authority, so any operator
/// may load one.
async fn load_crl(
    State(st): State<ApiState>,
    axum::Extension(AuthOperator(operator)): axum::Extension<AuthOperator>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let t = st.transport.as_ref().ok_or_else(no_transport)?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !matches!(ct, "application/pkix-crl" | "application/octet-stream") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the DER revocation list as application/pkix-crl",
        ));
    }
    match t.offer_crl(body.to_vec()) {
        Ok(certs::crl::OfferOutcome::Applied {
            number,
            newly_revoked,
        }) => {
            tracing::warn!(operator = %operator, crl_number = number, newly_revoked = newly_revoked.len(), "revocation list loaded by an operator");
            Ok((
                StatusCode::OK,
                Json(json!({
                    "applied": true,
                    "crl_number": number,
                    "newly_revoked": newly_revoked.iter().map(hex).collect::<Vec<_>>(),
                })),
            ))
        }
        Ok(certs::crl::OfferOutcome::Stale { held, offered }) => Ok((
            StatusCode::OK,
            Json(
                json!({ "applied": false, "stale": true, "crl_number": held, "offered": offered }),
            ),
        )),
        Err(e) => {
            let kept = t.revocation().current_number();
            tracing::warn!(operator = %operator, error = %e, kept = ?kept, "revocation list refused");
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "crl_rejected",
                certs::crlstore::rejected_message(&e, kept),
            ))
        }
    }
}

fn hex(b: &Vec<u8>) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    limit: Option<usize>,
    offset: Option<usize>,
}

async fn persons(
    State(st): State<ApiState>,
    ApiQuery(p): ApiQuery<Page>,
) -> Result<Json<Value>, ApiError> {
    let limit = p.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("limit: 1..={MAX_PAGE}"),
        ));
    }
    let q = Query::Persons {
        limit,
        offset: p.offset.unwrap_or(0),
    };
    match st.driver.query(q).await? {
        QueryReply::Persons(v) => Ok(Json(Value::Array(v.iter().map(person_json).collect()))),
        other => Err(unexpected(other)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchQ {
    q: String,
    #[serde(default)]
    birth_date: Option<String>,
}

/// How many name matches are fetched before the birth-date filter.
pub const SEARCH_SCAN_WITH_BIRTH_DATE: usize = 200;

/// `YYYY-MM-DD` with a real month and day.
fn valid_iso_date(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |r: std::ops::Range<usize>| s[r].parse::<u32>().ok();
    let digits = b
        .iter()
        .enumerate()
        .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    match (digits, num(0..4), num(5..7), num(8..10)) {
        (true, Some(_), Some(m), Some(d)) => (1..=12).contains(&m) && (1..=31).contains(&d),
        _ => false,
    }
}

async fn search(
    State(st): State<ApiState>,
    ApiQuery(s): ApiQuery<SearchQ>,
) -> Result<Json<Value>, ApiError> {
    if let Some(b) = &s.birth_date {
        if !valid_iso_date(b) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "birth_date: YYYY-MM-DD",
            ));
        }
    }
    let limit = if s.birth_date.is_some() {
        SEARCH_SCAN_WITH_BIRTH_DATE
    } else {
        SEARCH_LIMIT
    };
    match st.driver.query(Query::Search { q: s.q, limit }).await? {
        QueryReply::Persons(v) => Ok(Json(Value::Array(
            v.iter()
                .filter(|p| match &s.birth_date {
                    None => true,
                    Some(b) => p.birth_date.as_deref() == Some(b.as_str()),
                })
                .take(SEARCH_LIMIT)
                .map(person_json)
                .collect(),
        ))),
        other => Err(unexpected(other)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    pub name: String,
    pub kana: String,
    #[serde(default)]
    pub birth_date: Option<String>,
    #[serde(default)]
    pub note: String,
    #[serde(default)]
    pub op_id: Option<String>,
}

/// Cardless registration: `Command::RegisterPerson`.
async fn register_person(
    State(st): State<ApiState>,
    axum::Extension(op): axum::Extension<AuthOperator>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RegisterBody>,
) -> Result<Response, ApiError> {
    let op_id = match body.op_id {
        Some(o) => o,
        None => idempotency_key(&headers)?.unwrap_or_else(new_op_id),
    };
    let cmd = Command::RegisterPerson {
        name: body.name,
        kana: body.kana,
        birth_date: body.birth_date,
        note: body.note,
    };
    match st.driver.command(op_id, Operator(op.0), cmd).await? {
        Reply::Registered { person_id } => {
            Ok((StatusCode::CREATED, Json(json!({ "person_id": person_id }))).into_response())
        }
        _ => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "unexpected engine reply",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardSessionBody {
    pub pin: String,
}

/// Why a staff-card sign-in failed.
pub enum CardLoginError {
    NoReader,
    NoRecentTap,
    NotStaff,
    NoPin,
    BadPin { left: u32 },
    Unavailable(ApiError),
}

impl From<CardLoginError> for ApiError {
    fn from(e: CardLoginError) -> ApiError {
        let forbidden = |code, m: &str| ApiError::new(StatusCode::FORBIDDEN, code, m);
        match e {
            CardLoginError::NoReader => forbidden("forbidden", "this node has no card reader configured / このノードにはカードリーダーが設定されていません"),
            CardLoginError::NoRecentTap => forbidden("no_staff_tap", "no staff card was tapped on this node in the last 60 s / 60秒以内に職員カードがタッチされていません"),
            CardLoginError::NotStaff => forbidden("not_staff", "the last card tapped is not a registered staff card / 最後にタッチされたカードは職員カードではありません"),
            CardLoginError::NoPin => forbidden("no_pin", "this staff card has no PIN set (kizuna operator pin) / この職員カードにはPINが設定されていません"),
            CardLoginError::BadPin { left } => forbidden("bad_pin", &format!("wrong PIN ({left} attempts left for this tap) / PINが違います（このタッチであと{left}回）")),
            CardLoginError::Unavailable(e) => e,
        }
    }
}

/// A staff-card sign-in: the staff card tapped on this node's reader in
/// the last [`STAFF_TAP_WINDOW`] plus that operator's PIN. The tap is used
/// once; [`MAX_PIN_ATTEMPTS`] wrong PINs void it. Nothing here logs the
/// card's ID (the tap event never carries it).
pub fn card_login(st: &ApiState, pin: &str) -> Result<(String, crate::auth::Via), CardLoginError> {
    let hub = st.card.as_ref().ok_or(CardLoginError::NoReader)?;
    let operator = hub.peek_staff_tap(STAFF_TAP_WINDOW).map_err(|r| match r {
        SessionRefusal::NoRecentTap => CardLoginError::NoRecentTap,
        SessionRefusal::NotStaff => CardLoginError::NotStaff,
    })?;
    let ops = st.operators().map_err(CardLoginError::Unavailable)?;
    let entry = ops.get(&operator).ok_or(CardLoginError::NotStaff)?;
    let pin_hash = entry.pin.as_ref().ok_or(CardLoginError::NoPin)?;
    if !pin_hash.verify(pin) {
        let mut g = st.login_guard.lock().expect("login guard");
        g.pin_failures += 1;
        let left = MAX_PIN_ATTEMPTS.saturating_sub(g.pin_failures);
        if left == 0 {
            g.pin_failures = 0;
            let _ = hub.take_staff_tap(STAFF_TAP_WINDOW);
        }
        tracing::warn!(operator = %operator, "staff card sign-in: wrong PIN");
        return Err(CardLoginError::BadPin { left });
    }
    st.login_guard.lock().expect("login guard").pin_failures = 0;
    // Taken only now, so a wrong PIN can be retyped within the window.
    hub.take_staff_tap(STAFF_TAP_WINDOW)
        .map_err(|_| CardLoginError::NoRecentTap)?;
    let token = st
        .sessions
        .issue(entry, Via::Card, crate::auth::CARD_SESSION_TTL);
    tracing::info!(operator = %operator, "session opened with a staff card and PIN");
    Ok((token, Via::Card))
}

/// `POST /api/v1/sessions/card` with `{"pin":"…"}`: a session token for
/// the staff card just tapped on this node (see [`card_login`]). Refused
/// for a foreign `Host` or `Origin`.
async fn card_session(
    State(st): State<ApiState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CardSessionBody>,
) -> Result<Response, ApiError> {
    if !host_allowed(&headers, &st.hosts) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "bad_host",
            "Host not accepted",
        ));
    }
    if headers.contains_key(header::ORIGIN) && !same_origin(&headers) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "bad_origin",
            "request from another origin",
        ));
    }
    let (token, _) = card_login(&st, &body.pin)?;
    let ops = st.operators()?;
    let operator = st
        .sessions
        .get(&token, &ops)
        .map(|s| s.operator)
        .unwrap_or_default();
    let ttl = crate::auth::CARD_SESSION_TTL;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": token, "operator": operator,
            "expires_at": crate::auth::now_ms() + ttl.as_millis() as u64,
        })),
    )
        .into_response())
}

async fn household_by_card(
    State(st): State<ApiState>,
    Path(card_user_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match st
        .driver
        .query(Query::HouseholdByCard { card_user_id })
        .await?
    {
        QueryReply::Household(Some(h)) => Ok(Json(json!({
            "household_id": h.household_id,
            "members": h.members.iter().map(|(p, l)| json!({
                "person_id": p.person_id, "name": p.name, "kana": p.kana, "location": location_json(l)
            })).collect::<Vec<_>>(),
        }))),
        QueryReply::Household(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no household for this card",
        )),
        other => Err(unexpected(other)),
    }
}

async fn person(
    State(st): State<ApiState>,
    Path(person_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match st.driver.query(Query::Person { person_id }).await? {
        QueryReply::Person(Some(d)) => {
            let mut v = person_json(&d.person);
            v["location"] = location_json(&d.location);
            v["conflicts"] = serde_json::to_value(&d.conflicts).expect("serialisable");
            Ok(Json(v))
        }
        QueryReply::Person(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such person",
        )),
        other => Err(unexpected(other)),
    }
}

/// A person's presence history on this node: every arrival, departure and
/// transfer it holds, oldest first, concurrent ones included. Lets a desk
/// or headquarters see where someone has been, and lets operators compare
/// what two nodes hold while they converge.
async fn history(
    State(st): State<ApiState>,
    Path(person_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match st
        .driver
        .query(Query::PresenceHistory { person_id })
        .await?
    {
        QueryReply::PresenceHistory(Some(evs)) => Ok(Json(json!({ "events": evs }))),
        QueryReply::PresenceHistory(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such person",
        )),
        other => Err(unexpected(other)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MedicalQ {
    reason: String,
    #[serde(default)]
    break_glass: bool,
}

/// `GET /api/v1/persons/{person_id}/medical?reason=CODE&break_glass=false`:
/// an audited read (see [`crdt::access`]); refusals are audited too.
async fn medical(
    State(st): State<ApiState>,
    axum::Extension(op): axum::Extension<AuthOperator>,
    Path(person_id): Path<String>,
    ApiQuery(q): ApiQuery<MedicalQ>,
) -> Result<Json<Value>, ApiError> {
    // Every read is its own audited command, so a fresh op id each time.
    let op_id = new_op_id();
    let r = st
        .driver
        .command(
            op_id,
            Operator(op.0),
            Command::ReadMedical {
                person_id,
                reason: q.reason,
                break_glass: q.break_glass,
            },
        )
        .await?;
    match r {
        Reply::Medical {
            person_id,
            view,
            audit_seq,
        } => Ok(Json(
            json!({"person_id": person_id, "medical": view, "audit_seq": audit_seq}),
        )),
        _ => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "unexpected engine reply",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakGlassBody {
    reason: String,
    justification: String,
}

/// `POST /api/v1/persons/{person_id}/break-glass`: a time-boxed grant to
/// read this profile without recorded consent (audited, flagged).
async fn break_glass(
    State(st): State<ApiState>,
    axum::Extension(op): axum::Extension<AuthOperator>,
    Path(person_id): Path<String>,
    ApiJson(b): ApiJson<BreakGlassBody>,
) -> Result<Response, ApiError> {
    let cmd = Command::BreakGlass {
        person_id,
        reason: b.reason,
        justification: b.justification,
    };
    match st.driver.command(new_op_id(), Operator(op.0), cmd).await? {
        Reply::Granted {
            person_id,
            expires_wall_ms,
            audit_seq,
        } => Ok((
            StatusCode::CREATED,
            Json(json!({"person_id": person_id, "expires_at": expires_wall_ms, "audit_seq": audit_seq})),
        )
            .into_response()),
        _ => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "unexpected engine reply",
        )),
    }
}

/// `GET /api/v1/medical/reasons`: the closed list of read purposes.
async fn medical_reasons() -> Json<Value> {
    Json(Value::Array(
        crdt::access::AccessReason::ALL
            .iter()
            .map(|r| json!({"code": r.code(), "ja": r.ja(), "en": r.en()}))
            .collect(),
    ))
}

async fn query(st: &ApiState, q: Query) -> Result<QueryReply, ApiError> {
    Ok(st.driver.query(q).await?)
}

/// `GET /api/v1/districts`: registry residents per address district and
/// how many are accounted for.
async fn districts(State(st): State<ApiState>) -> Result<Json<Value>, ApiError> {
    match query(&st, Query::Districts).await? {
        QueryReply::Districts(v) => Ok(Json(serde_json::to_value(v).expect("serialisable"))),
        other => Err(unexpected(other)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnaccountedQ {
    district: String,
    #[serde(default)]
    after: String,
    limit: Option<usize>,
}

/// `GET /api/v1/unaccounted?district=…&after=…&limit=…`.
async fn unaccounted(
    State(st): State<ApiState>,
    ApiQuery(q): ApiQuery<UnaccountedQ>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let qq = Query::Unaccounted {
        district: q.district,
        after: q.after,
        limit,
    };
    match query(&st, qq).await? {
        QueryReply::Persons(v) => Ok(Json(Value::Array(v.iter().map(person_json).collect()))),
        other => Err(unexpected(other)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ArrivalsQ {
    bucket_ms: Option<u64>,
}

/// `GET /api/v1/arrivals?bucket_ms=3600000`: persons checked in now, by
/// the hour they arrived: `[[bucket_start_ms, count], …]`.
async fn arrivals(
    State(st): State<ApiState>,
    ApiQuery(q): ApiQuery<ArrivalsQ>,
) -> Result<Json<Value>, ApiError> {
    let bucket_ms = q.bucket_ms.unwrap_or(3_600_000);
    match query(&st, Query::Arrivals { bucket_ms }).await? {
        QueryReply::Arrivals(v) => Ok(Json(serde_json::to_value(v).expect("serialisable"))),
        other => Err(unexpected(other)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RosterQ {
    shelter_id: Option<String>,
}

/// `GET /api/v1/roster?shelter_id=…`: who is in (or pending in) a shelter
/// (default: this shelter node's own).
async fn roster(
    State(st): State<ApiState>,
    ApiQuery(q): ApiQuery<RosterQ>,
) -> Result<Json<Value>, ApiError> {
    match query(
        &st,
        Query::Roster {
            shelter_id: q.shelter_id,
        },
    )
    .await?
    {
        QueryReply::Roster(v) => Ok(Json(Value::Array(
            v.iter()
                .map(|(p, l)| {
                    let mut j = person_json(p);
                    j["location"] = location_json(&Some(l.clone()));
                    j
                })
                .collect(),
        ))),
        other => Err(unexpected(other)),
    }
}

/// `GET /api/v1/conflicts`: persons whose location is in conflict.
async fn conflicts(State(st): State<ApiState>) -> Result<Json<Value>, ApiError> {
    match query(&st, Query::Conflicts).await? {
        QueryReply::Conflicts(v) => Ok(Json(Value::Array(
            v.iter()
                .map(|l| json!({"person_id": l.person_id, "location": location_json(&Some(l.clone()))}))
                .collect(),
        ))),
        other => Err(unexpected(other)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQ {
    #[serde(default)]
    break_glass_only: bool,
    limit: Option<usize>,
}

/// `GET /api/v1/audit?break_glass_only=true` (hq): audit entries of every
/// node, newest first.
async fn audit(
    State(st): State<ApiState>,
    ApiQuery(q): ApiQuery<AuditQ>,
) -> Result<Json<Value>, ApiError> {
    let qq = Query::Audit {
        break_glass_only: q.break_glass_only,
        limit: q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE),
    };
    match query(&st, qq).await? {
        QueryReply::Audit(v) => Ok(Json(Value::Array(
            v.iter()
                .map(|e| {
                    json!({
                        "node": e.node, "seq": e.seq, "operator": e.operator, "action": e.action,
                        "record": e.record, "at": e.wall_ms, "clock_trusted": e.clock_trusted,
                        "reason": e.reason, "break_glass": e.break_glass,
                    })
                })
                .collect(),
        ))),
        other => Err(unexpected(other)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferBody {
    pub person_ids: Vec<String>,
    #[serde(default)]
    pub from_shelter: Option<String>,
    pub to_shelter: String,
    #[serde(default)]
    pub op_id: Option<String>,
}

/// `POST /api/v1/transfers`: persons leave one shelter for another.
async fn transfers(
    State(st): State<ApiState>,
    axum::Extension(op): axum::Extension<AuthOperator>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<TransferBody>,
) -> Result<Response, ApiError> {
    let header_key = idempotency_key(&headers)?;
    let op_id = body.op_id.or(header_key).unwrap_or_else(new_op_id);
    let cmd = Command::Transfer {
        person_ids: body.person_ids,
        from_shelter: body.from_shelter,
        to_shelter: body.to_shelter,
    };
    presence_reply(st.driver.command(op_id, Operator(op.0), cmd).await?)
}

/// `POST /api/v1/persons/{person_id}/medical`: a `crdt::api::MedicalUpdate`
/// (roles that may write medical profiles: clinic, ambulance, hq).
async fn put_medical(
    State(st): State<ApiState>,
    axum::Extension(op): axum::Extension<AuthOperator>,
    headers: HeaderMap,
    Path(person_id): Path<String>,
    ApiJson(update): ApiJson<crdt::api::MedicalUpdate>,
) -> Result<Response, ApiError> {
    let op_id = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => new_op_id(),
        Some(Ok(k)) => k.to_string(),
        Some(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                "Idempotency-Key must be ASCII",
            ))
        }
    };
    let cmd = Command::PutMedical {
        person_id: person_id.clone(),
        update,
    };
    match st.driver.command(op_id, Operator(op.0), cmd).await? {
        Reply::Done => {
            Ok((StatusCode::CREATED, Json(json!({"person_id": person_id}))).into_response())
        }
        _ => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "unexpected engine reply",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceBody {
    pub person_ids: Vec<String>,
    #[serde(default)]
    pub shelter_id: Option<String>,
    #[serde(default)]
    pub op_id: Option<String>,
}

pub fn new_op_id() -> String {
    op_id_from(&mut rand_core::OsRng)
}

/// A random operation id, redrawn when its hex happens to spell a checked
/// twelve-digit number (about 1 draw in 200): the engine's
/// Individual-Number guard covers the op id too and would refuse the
/// request.
fn op_id_from(rng: &mut impl rand_core::RngCore) -> String {
    crdt::text::random_id("api-", 2, rng)
}

#[cfg(test)]
mod op_id_tests {
    use super::op_id_from;
    use rand_core::{impls, RngCore};

    /// Replays the given values.
    struct Replay(Vec<u64>);
    impl RngCore for Replay {
        fn next_u32(&mut self) -> u32 {
            self.next_u64() as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0.remove(0)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            impls::fill_bytes_via_next(self, dest)
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    #[test]
    fn a_generated_op_id_never_spells_an_individual_number() {
        // "abcd271828182840ffff…": 271828182840 passes the check digit.
        let id = op_id_from(&mut Replay(vec![0xabcd_2718_2818_2840, u64::MAX, 2, 3]));
        assert_eq!(id, format!("api-{:016x}{:016x}", 2, 3));
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => Ok(Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_input",
                        "Idempotency-Key must be ASCII",
                    )
                })?
                .to_string(),
        )),
    }
}

async fn presence(
    st: ApiState,
    op: AuthOperator,
    headers: HeaderMap,
    body: PresenceBody,
    check_in: bool,
) -> Result<Response, ApiError> {
    let header_key = idempotency_key(&headers)?;
    let op_id = body.op_id.or(header_key).unwrap_or_else(new_op_id);
    let cmd = if check_in {
        Command::CheckIn {
            person_ids: body.person_ids,
            shelter_id: body.shelter_id,
        }
    } else {
        Command::CheckOut {
            person_ids: body.person_ids,
            shelter_id: body.shelter_id,
        }
    };
    presence_reply(st.driver.command(op_id, Operator(op.0), cmd).await?)
}

async fn checkins(
    State(st): State<ApiState>,
    axum::Extension(op): axum::Extension<AuthOperator>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PresenceBody>,
) -> Result<Response, ApiError> {
    presence(st, op, headers, body, true).await
}

async fn checkouts(
    State(st): State<ApiState>,
    axum::Extension(op): axum::Extension<AuthOperator>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PresenceBody>,
) -> Result<Response, ApiError> {
    presence(st, op, headers, body, false).await
}

async fn shelters(State(st): State<ApiState>) -> Result<Json<Value>, ApiError> {
    match st.driver.query(Query::Shelters).await? {
        QueryReply::Shelters(v) => Ok(Json(Value::Array(
            v.iter()
                .map(|s| {
                    json!({
                        "shelter_id": s.shelter.shelter_id, "name": s.shelter.name,
                        "capacity": s.shelter.capacity, "occupancy": s.occupancy, "last_sync": s.last_sync
                    })
                })
                .collect(),
        ))),
        other => Err(unexpected(other)),
    }
}

type EventStream =
    futures_util::stream::BoxStream<'static, Result<Event, std::convert::Infallible>>;

/// One broadcast receiver as a stream of SSE events.
fn sse_stream<T: Clone + serde::Serialize + Send + 'static>(
    rx: tokio::sync::broadcast::Receiver<T>,
) -> EventStream {
    futures_util::stream::unfold(rx, |mut rx| async move {
        let data = match rx.recv().await {
            Ok(ev) => serde_json::to_string(&ev).expect("serialisable"),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                json!({"type": "lagged", "missed": n}).to_string()
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((
            Ok::<Event, std::convert::Infallible>(Event::default().data(data)),
            rx,
        ))
    })
    .boxed()
}

async fn events(State(st): State<ApiState>) -> impl IntoResponse {
    // Subscribe before answering, so nothing after the response headers
    // is missed.
    let engine = sse_stream(st.driver.subscribe());
    let stream = match &st.card {
        Some(c) => futures_util::stream::select(engine, sse_stream(c.subscribe())).boxed(),
        None => engine,
    };
    Sse::new(stream).keep_alive(KeepAlive::default())
}
