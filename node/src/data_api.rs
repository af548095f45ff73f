//! The municipal-data part of the JSON API: single-record edits beside
//! the bulk CSV imports (shelters, family contacts, insurance
//! eligibility), the offline eligibility check, the family-mail outbox,
//! and the audited downloads (roster CSV, PFIF, FHIR handover).
//!
//! Handlers turn requests into the same engine commands the imports use;
//! the engine decides what a role may write (`crdt::policy`), so a shelter
//! node asking to register contacts gets `403` from the engine, not from
//! a rule repeated here. Reads that only headquarters may make (outbox,
//! roster, PFIF) are checked here against the node's role. Mounted by
//! [`crate::api::router`]; documented in `docs/api.md`.

use crate::api::{new_op_id, ApiError, ApiJson, ApiQuery, ApiState, AuthOperator};
use crate::outputs::{Output, OutputError, RosterEncoding};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use crdt::api::{Command, Operator, Query, QueryReply, Reply};
use crdt::model::{Disclosure, Eligibility, FamilyContact, MailStatus, ShelterInfo};
use crdt::Role;
use serde::Deserialize;
use serde_json::{json, Value};

/// Routes of this module (the auth layer is added by the caller).
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route(
            "/api/v1/shelters/{shelter_id}",
            axum::routing::patch(update_shelter),
        )
        .route(
            "/api/v1/persons/{person_id}/contacts",
            axum::routing::put(put_contacts),
        )
        .route(
            "/api/v1/persons/{person_id}/eligibility",
            get(check_eligibility).put(put_eligibility),
        )
        .route("/api/v1/persons/{person_id}/handover", get(handover))
        .route("/api/v1/outbox", get(outbox))
        .route("/api/v1/exports/roster.csv", get(roster))
        .route("/api/v1/exports/pfif.xml", get(pfif))
}

fn op_id(headers: &HeaderMap) -> Result<String, ApiError> {
    match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => Ok(new_op_id()),
        Some(Ok(k)) => Ok(k.to_string()),
        Some(Err(_)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "Idempotency-Key must be ASCII",
        )),
    }
}

fn hq_only(st: &ApiState, what: &str) -> Result<(), ApiError> {
    let role = st.driver.info().role;
    if role == Role::Hq {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{what} is headquarters only (this node is {role}) / 本部ノードのみ"),
        ))
    }
}

fn internal() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "unexpected engine reply",
    )
}

async fn done(st: &ApiState, op: String, operator: String, cmd: Command) -> Result<(), ApiError> {
    match st.driver.command(op, Operator(operator), cmd).await? {
        Reply::Done => Ok(()),
        _ => Err(internal()),
    }
}

/// `POST /api/v1/shelters`: register or replace a shelter (hq; a shelter
/// node its own).
pub async fn put_shelter(
    State(st): State<ApiState>,
    Extension(op): Extension<AuthOperator>,
    headers: HeaderMap,
    ApiJson(shelter): ApiJson<ShelterInfo>,
) -> Result<Response, ApiError> {
    let id = shelter.shelter_id.clone();
    done(&st, op_id(&headers)?, op.0, Command::PutShelter { shelter }).await?;
    Ok((StatusCode::CREATED, Json(json!({ "shelter_id": id }))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShelterUpdate {
    #[serde(default)]
    open: Option<bool>,
    #[serde(default)]
    capacity: Option<u32>,
}

/// `PATCH /api/v1/shelters/{id}`: open or close it, change its capacity.
async fn update_shelter(
    State(st): State<ApiState>,
    Extension(op): Extension<AuthOperator>,
    headers: HeaderMap,
    Path(shelter_id): Path<String>,
    ApiJson(u): ApiJson<ShelterUpdate>,
) -> Result<Json<Value>, ApiError> {
    if u.open.is_none() && u.capacity.is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "give open and/or capacity",
        ));
    }
    done(
        &st,
        op_id(&headers)?,
        op.0,
        Command::UpdateShelter {
            shelter_id: shelter_id.clone(),
            open: u.open,
            capacity: u.capacity,
        },
    )
    .await?;
    match st.driver.query(Query::ShelterInfos).await? {
        QueryReply::ShelterInfos(v) => v
            .into_iter()
            .find(|s| s.shelter_id == shelter_id)
            .map(|s| Json(shelter_json(&s)))
            .ok_or_else(internal),
        _ => Err(internal()),
    }
}

/// A shelter with every field spelled out (the document omits defaults).
pub fn shelter_json(s: &ShelterInfo) -> Value {
    let mut v = serde_json::to_value(s).expect("json");
    v["open"] = json!(s.open);
    v["kind"] = serde_json::to_value(s.kind).expect("json");
    v["address"] = json!(s.address);
    v["district"] = json!(s.district);
    v
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContactsBody {
    contacts: Vec<FamilyContact>,
    disclosure: Disclosure,
}

/// `PUT /api/v1/persons/{id}/contacts`: replaces the person's family
/// contacts and disclosure choices (hq).
async fn put_contacts(
    State(st): State<ApiState>,
    Extension(op): Extension<AuthOperator>,
    headers: HeaderMap,
    Path(person_id): Path<String>,
    ApiJson(b): ApiJson<ContactsBody>,
) -> Result<Response, ApiError> {
    done(
        &st,
        op_id(&headers)?,
        op.0,
        Command::PutContacts {
            person_id: person_id.clone(),
            contacts: b.contacts,
            disclosure: b.disclosure,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(json!({ "person_id": person_id }))).into_response())
}

/// `PUT /api/v1/persons/{id}/eligibility` (hq).
async fn put_eligibility(
    State(st): State<ApiState>,
    Extension(op): Extension<AuthOperator>,
    headers: HeaderMap,
    Path(person_id): Path<String>,
    ApiJson(eligibility): ApiJson<Eligibility>,
) -> Result<Response, ApiError> {
    done(
        &st,
        op_id(&headers)?,
        op.0,
        Command::PutEligibility {
            person_id: person_id.clone(),
            eligibility,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(json!({ "person_id": person_id }))).into_response())
}

/// `GET /api/v1/persons/{id}/eligibility`: valid / expired / unknown,
/// from this node's replica (offline), audited.
async fn check_eligibility(
    State(st): State<ApiState>,
    Extension(op): Extension<AuthOperator>,
    Path(person_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match st
        .driver
        .command(
            new_op_id(),
            Operator(op.0),
            Command::CheckEligibility { person_id },
        )
        .await?
    {
        Reply::Eligibility {
            person_id,
            status,
            record,
            masked,
            on_date,
            audit_seq,
        } => Ok(Json(json!({
            "person_id": person_id, "status": status, "record": record,
            "masked": masked, "on_date": on_date, "audit_seq": audit_seq,
        }))),
        _ => Err(internal()),
    }
}

/// `GET /api/v1/outbox` (hq): one row per (arrival, contact).
async fn outbox(State(st): State<ApiState>) -> Result<Json<Value>, ApiError> {
    hq_only(&st, "the family-mail outbox")?;
    match st.driver.query(Query::Outbox).await? {
        QueryReply::Outbox(rows) => Ok(Json(Value::Array(
            rows.into_iter()
                .map(|r| {
                    let (state, error) = match r.state.status {
                        MailStatus::Pending | MailStatus::Sending => ("pending", None),
                        MailStatus::Sent => ("sent", None),
                        MailStatus::Indeterminate => ("indeterminate", None),
                        MailStatus::FailedPermanent => ("failed", None),
                        // Consent withdrawn before the send: never sent.
                        MailStatus::Cancelled => (
                            "failed",
                            Some("cancelled: consent withdrawn or do-not-disclose"),
                        ),
                    };
                    let last_error = error
                        .map(str::to_string)
                        .or_else(|| (!r.state.reason.is_empty()).then(|| r.state.reason.clone()));
                    json!({
                        "message_id": r.state.message_id, "person_id": r.person_id,
                        "state": state, "attempts": r.state.attempts, "last_error": last_error,
                    })
                })
                .collect(),
        ))),
        _ => Err(internal()),
    }
}

fn download(r: crate::outputs::Rendered) -> Response {
    let mut resp = (StatusCode::OK, r.bytes).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(r.content_type),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{}\"", r.file_name)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&r.records.to_string()) {
        h.insert("x-kizuna-records", v);
    }
    if let Ok(v) = HeaderValue::from_str(&r.audit_seq.to_string()) {
        h.insert("x-kizuna-audit-seq", v);
    }
    resp
}

fn output_error(e: OutputError) -> ApiError {
    match e {
        OutputError::Engine(c) => c.into(),
        OutputError::Driver(d) => d.into(),
        OutputError::Refused(m) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", m),
    }
}

async fn run_output(st: &ApiState, operator: String, what: Output) -> Result<Response, ApiError> {
    crate::outputs::render(&st.driver, &operator, what, crate::run::wall_ms())
        .await
        .map(download)
        .map_err(output_error)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RosterQ {
    #[serde(default)]
    shelter_id: Option<String>,
    #[serde(default)]
    encoding: Option<RosterEncoding>,
}

/// `GET /api/v1/exports/roster.csv?shelter_id=&encoding=utf8_bom|cp932`.
async fn roster(
    State(st): State<ApiState>,
    Extension(op): Extension<AuthOperator>,
    ApiQuery(q): ApiQuery<RosterQ>,
) -> Result<Response, ApiError> {
    let what = Output::Roster {
        shelter_id: q.shelter_id,
        encoding: q.encoding.unwrap_or(RosterEncoding::Utf8Bom),
    };
    run_output(&st, op.0, what).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PfifQ {
    #[serde(default)]
    domain: Option<String>,
}

/// `GET /api/v1/exports/pfif.xml?domain=`.
async fn pfif(
    State(st): State<ApiState>,
    Extension(op): Extension<AuthOperator>,
    ApiQuery(q): ApiQuery<PfifQ>,
) -> Result<Response, ApiError> {
    let domain = q.domain.unwrap_or_else(|| "kizuna.example.lg.jp".into());
    if domain.is_empty()
        || domain.len() > 100
        || !domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "domain: a DNS name",
        ));
    }
    let what = Output::Pfif {
        domain,
        author: "災害対策本部 / Disaster headquarters".into(),
    };
    run_output(&st, op.0, what).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HandoverQ {
    reason: String,
}

/// `GET /api/v1/persons/{id}/handover?reason=`: FHIR R4 Bundle.
async fn handover(
    State(st): State<ApiState>,
    Extension(op): Extension<AuthOperator>,
    Path(person_id): Path<String>,
    ApiQuery(q): ApiQuery<HandoverQ>,
) -> Result<Response, ApiError> {
    let what = Output::Handover {
        person_id,
        reason: q.reason,
    };
    run_output(&st, op.0, what).await
}
