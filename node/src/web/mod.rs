//! The browser screens every node serves next to its JSON API: sign-in,
//! and one screen per role (shelter desk, ambulance, clinic, headquarters
//! dashboard), Japanese first with an English switch.
//!
//! Pages are rendered with maud (every value is escaped by the template
//! engine) as skeletons that the embedded script (`assets/app.js`) fills
//! from the JSON API, building DOM nodes with `textContent` only (no
//! `innerHTML`). Every asset is compiled into the binary and served from
//! `/ui/static/`; the Content-Security-Policy ([`crate::api::CSP`]) allows
//! scripts and styles from this node only, with no inline code at all.
//!
//! Sign-in ([`crate::auth`]): a password (plus a TOTP code on nodes whose
//! role reads medical data), a staff card tap plus PIN, or a one-time link.
//! The session lives in an HttpOnly, SameSite=Strict cookie; its CSRF
//! token is in the page (`data-csrf`) and goes back in `X-CSRF-Token`.
//! Sign-in forms carry a pre-session token (cookie + hidden field) and are
//! refused from a foreign `Origin` or `Host`.

pub mod i18n;

use crate::api::{cookie, host_allowed, same_origin, ApiState};
use crate::auth::{LoginRefusal, Session, SigninLinks, Via, CARD_SESSION_TTL};
use axum::extract::{Form, Path, Query as UrlQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use crdt::api::{Query, QueryReply};
use crdt::Role;
use i18n::{dictionary, t, Lang};
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;

/// The language cookie (not secret: readable by the page is fine, but the
/// script never needs it).
pub const LANG_COOKIE: &str = "kz_lang";

struct Asset {
    name: &'static str,
    mime: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "app.css",
        mime: "text/css; charset=utf-8",
        body: include_str!("assets/app.css"),
    },
    Asset {
        name: "app.js",
        mime: "text/javascript; charset=utf-8",
        body: include_str!("assets/app.js"),
    },
];

/// The `/`, `/ui/…` routes; merged into [`crate::api::router`].
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(screen))
        .route("/ui/login", get(login_page).post(login_password))
        .route("/ui/login/card", post(login_card))
        .route("/ui/link/{token}", get(login_link))
        .route("/ui/logout", post(logout))
        .route("/ui/lang/{lang}", get(set_lang))
        .route("/ui/roster/print", get(roster_print))
        .route("/ui/static/{name}", get(asset))
        .with_state(state)
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) => (
            [
                (header::CONTENT_TYPE, a.mime),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            a.body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}

fn lang_of(headers: &HeaderMap) -> Lang {
    Lang::parse(cookie(headers, LANG_COOKIE).unwrap_or("ja"))
}

fn html_response(m: Markup) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        m.into_string(),
    )
        .into_response()
}

/// The signed-in session of this request, if any.
fn session_of(st: &ApiState, headers: &HeaderMap) -> Option<Session> {
    let token = cookie(headers, &st.session_cookie())?;
    let ops = st.operators().ok()?;
    st.sessions.get(token, &ops)
}

fn role_key(role: Option<Role>) -> &'static str {
    match role {
        Some(Role::Shelter) | None => "role.shelter",
        Some(Role::Facility) => "role.facility",
        Some(Role::Ambulance) => "role.ambulance",
        Some(Role::Clinic) => "role.clinic",
        Some(Role::Hq) => "role.hq",
    }
}

/// Whether password sign-in on this node needs the second factor: roles
/// that read medical data (MHLW guideline: two factors for new systems
/// handling health information).
fn needs_second_factor(role: Option<Role>) -> bool {
    role.is_none_or(|r| crdt::policy::may_read(r, crdt::Kind::Medical))
}

struct Ctx<'a> {
    lang: Lang,
    st: &'a ApiState,
    session: Option<&'a Session>,
}

fn layout(cx: &Ctx<'_>, screen: &str, body: Markup) -> Markup {
    let lang = cx.lang;
    let title = t(lang, role_key(cx.st.role));
    html! {
        (DOCTYPE)
        html lang=(lang.code()) {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " — " (t(lang, "app")) }
                link rel="stylesheet" href="/ui/static/app.css";
                script src="/ui/static/app.js" defer {}
            }
            body data-screen=(screen) data-lang=(lang.code())
                data-csrf=(cx.session.map(|s| s.csrf.as_str()).unwrap_or(""))
                data-role=(cx.st.role.map(|r| r.as_str()).unwrap_or(""))
                data-node=(cx.st.node_id.as_deref().unwrap_or(""))
                data-shelter=(cx.st.shelter_id.as_deref().unwrap_or(""))
                data-i18n=(dictionary(lang)) {
                header.top {
                    div.brand {
                        span.logo aria-hidden="true" { "絆" }
                        span { (t(lang, "app")) }
                        span.role { (title) }
                        @if let Some(n) = &cx.st.node_id { span.node { bdi { (n) } } }
                    }
                    nav.tools {
                        a.lang href={ "/ui/lang/" (lang.other().code()) } lang=(lang.other().code()) {
                            (t(lang, "lang.switch"))
                        }
                        @if let Some(s) = cx.session {
                            span.who { (t(lang, "signed_in_as")) ": " bdi #operator { (s.operator) } }
                            form.logout method="post" action="/ui/logout" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button type="submit" { (t(lang, "logout")) }
                            }
                        }
                    }
                }
                div #banners role="status" aria-live="polite" {}
                main #main { (body) }
            }
        }
    }
}

async fn set_lang(
    State(st): State<ApiState>,
    Path(lang): Path<String>,
    headers: HeaderMap,
) -> Response {
    let lang = Lang::parse(&lang);
    let back = if cookie(&headers, &st.session_cookie()).is_some() {
        "/ui/"
    } else {
        "/ui/login"
    };
    let mut r = Redirect::to(back).into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!(
            "{LANG_COOKIE}={}; Path=/; SameSite=Strict; Max-Age=31536000",
            lang.code()
        ))
        .expect("ascii"),
    );
    r
}

// ----- sign-in ---------------------------------------------------------------

fn new_pre_token() -> String {
    crate::api::new_op_id()
        .trim_start_matches("api-")
        .to_string()
}

fn login_markup(cx: &Ctx<'_>, pre: &str, error: Option<&str>) -> Markup {
    let lang = cx.lang;
    let two = needs_second_factor(cx.st.role);
    html! {
        div.login {
            h1 { (t(lang, "login.title")) }
            @if let Some(e) = error {
                p.error #login-error role="alert" { (e) }
            }
            section.card-login aria-labelledby="card-h" {
                h2 #card-h { (t(lang, "login.card")) }
                p.hint { (t(lang, "login.card_hint")) }
                form method="post" action="/ui/login/card" {
                    input type="hidden" name="csrf" value=(pre);
                    label for="pin" { (t(lang, "login.pin")) }
                    input #pin type="password" name="pin" inputmode="numeric" autocomplete="off"
                        minlength="4" maxlength="8" pattern="[0-9]{4,8}" required;
                    button type="submit" { (t(lang, "login.card_submit")) }
                }
            }
            section.password-login aria-labelledby="pw-h" {
                h2 #pw-h { (t(lang, "login.submit")) }
                form method="post" action="/ui/login" {
                    input type="hidden" name="csrf" value=(pre);
                    label for="name" { (t(lang, "login.name")) }
                    input #name type="text" name="name" autocomplete="username" maxlength="100" required;
                    label for="password" { (t(lang, "login.password")) }
                    input #password type="password" name="password" autocomplete="current-password" maxlength="200" required;
                    @if two {
                        label for="totp" { (t(lang, "login.totp")) }
                        p.hint #totp-hint { (t(lang, "login.totp_hint")) }
                        input #totp type="text" name="totp" inputmode="numeric" autocomplete="one-time-code"
                            maxlength="6" pattern="[0-9]{6}" required aria-describedby="totp-hint";
                    }
                    button type="submit" { (t(lang, "login.submit")) }
                }
            }
        }
    }
}

/// The sign-in page with a fresh pre-session token in cookie and form.
fn login_response(
    st: &ApiState,
    headers: &HeaderMap,
    status: StatusCode,
    error: Option<&str>,
) -> Response {
    let cx = Ctx {
        lang: lang_of(headers),
        st,
        session: None,
    };
    let pre = new_pre_token();
    let mut r = html_response(layout(&cx, "login", login_markup(&cx, &pre, error)));
    *r.status_mut() = status;
    r.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!(
            "{}={pre}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=3600",
            st.pre_cookie()
        ))
        .expect("ascii"),
    );
    r
}

async fn login_page(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    if !host_allowed(&headers, &st.hosts) {
        return (StatusCode::FORBIDDEN, "Host not accepted").into_response();
    }
    if session_of(&st, &headers).is_some() {
        return Redirect::to("/ui/").into_response();
    }
    login_response(&st, &headers, StatusCode::OK, None)
}

/// Host, Origin and the pre-session token of a sign-in form.
fn form_guard(st: &ApiState, headers: &HeaderMap, csrf: &str) -> bool {
    let pre_ok = cookie(headers, &st.pre_cookie()).is_some_and(|c| {
        !c.is_empty() && blake3::hash(c.as_bytes()) == blake3::hash(csrf.as_bytes())
    });
    host_allowed(headers, &st.hosts) && same_origin(headers) && pre_ok
}

fn signed_in(st: &ApiState, token: String) -> Response {
    let mut r = Redirect::to("/ui/").into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!(
            "{}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
            st.session_cookie(),
            CARD_SESSION_TTL.as_secs()
        ))
        .expect("ascii"),
    );
    r.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!(
            "{}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0",
            st.pre_cookie()
        ))
        .expect("ascii"),
    );
    r
}

#[derive(Deserialize)]
struct PasswordForm {
    csrf: String,
    name: String,
    password: String,
    #[serde(default)]
    totp: Option<String>,
}

async fn login_password(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Form(f): Form<PasswordForm>,
) -> Response {
    let lang = lang_of(&headers);
    if !form_guard(&st, &headers, &f.csrf) {
        return login_response(
            &st,
            &headers,
            StatusCode::FORBIDDEN,
            Some(t(lang, "login.refused")),
        );
    }
    let ops = match st.operators() {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let two = needs_second_factor(st.role);
    let t_s = crate::auth::now_ms() / 1000;
    // The slow hash runs off the async threads.
    let (name, pw, code) = (f.name.clone(), f.password.clone(), f.totp.clone());
    let ops2 = ops.clone();
    let result = tokio::task::spawn_blocking(move || {
        ops2.login(&name, &pw, code.as_deref(), two, t_s)
            .map(|e| e.clone())
    })
    .await;
    match result {
        Ok(Ok(entry)) => {
            if two {
                // A one-time code works once: an observed code cannot be
                // replayed within its validity.
                let code = f.totp.as_deref().unwrap_or("").trim().to_string();
                let mut g = st.login_guard.lock().expect("login guard");
                if let Some((c, at)) = g.totp_used.get(&entry.name) {
                    if *c == code && t_s.saturating_sub(*at) < 120 {
                        drop(g);
                        return login_response(
                            &st,
                            &headers,
                            StatusCode::UNAUTHORIZED,
                            Some(t(lang, "login.bad_2fa")),
                        );
                    }
                }
                g.totp_used.insert(entry.name.clone(), (code, t_s));
            }
            let token = st.sessions.issue(&entry, Via::Password, CARD_SESSION_TTL);
            tracing::info!(operator = %entry.name, "signed in with a password");
            signed_in(&st, token)
        }
        Ok(Err(r)) => {
            let key = match r {
                LoginRefusal::BadCredentials | LoginRefusal::NoPin => "login.bad",
                LoginRefusal::SecondFactorRequired => "login.need_2fa",
                LoginRefusal::BadSecondFactor => "login.bad_2fa",
            };
            tracing::warn!("password sign-in refused");
            login_response(&st, &headers, StatusCode::UNAUTHORIZED, Some(t(lang, key)))
        }
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "sign-in failed").into_response(),
    }
}

#[derive(Deserialize)]
struct PinForm {
    csrf: String,
    pin: String,
}

async fn login_card(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Form(f): Form<PinForm>,
) -> Response {
    let lang = lang_of(&headers);
    if !form_guard(&st, &headers, &f.csrf) {
        return login_response(
            &st,
            &headers,
            StatusCode::FORBIDDEN,
            Some(t(lang, "login.refused")),
        );
    }
    let st2 = st.clone();
    let pin = f.pin.clone();
    match tokio::task::spawn_blocking(move || crate::api::card_login(&st2, &pin)).await {
        Ok(Ok((token, _))) => signed_in(&st, token),
        Ok(Err(e)) => {
            let api: crate::api::ApiError = e.into();
            let key = format!("err.{}", api.code);
            let msg = i18n::lookup(lang, &key).unwrap_or(t(lang, "login.bad"));
            login_response(&st, &headers, StatusCode::FORBIDDEN, Some(msg))
        }
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "sign-in failed").into_response(),
    }
}

async fn login_link(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Response {
    let lang = lang_of(&headers);
    if !host_allowed(&headers, &st.hosts) {
        return (StatusCode::FORBIDDEN, "Host not accepted").into_response();
    }
    let dir = st.data_dir.clone();
    let tok = token.clone();
    let op = tokio::task::spawn_blocking(move || SigninLinks::consume(&dir, &tok)).await;
    let ops = match st.operators() {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    match op {
        Ok(Ok(Some(name))) => match ops.get(&name) {
            Some(entry) => {
                let token = st.sessions.issue(entry, Via::Link, CARD_SESSION_TTL);
                tracing::info!(operator = %name, "signed in with a one-time link");
                signed_in(&st, token)
            }
            None => login_response(
                &st,
                &headers,
                StatusCode::UNAUTHORIZED,
                Some(t(lang, "login.expired_link")),
            ),
        },
        Ok(Ok(None)) => login_response(
            &st,
            &headers,
            StatusCode::UNAUTHORIZED,
            Some(t(lang, "login.expired_link")),
        ),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "sign-in links unreadable");
            (StatusCode::SERVICE_UNAVAILABLE, "sign-in links unreadable").into_response()
        }
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "sign-in failed").into_response(),
    }
}

#[derive(Deserialize)]
struct LogoutForm {
    csrf: String,
}

async fn logout(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Form(f): Form<LogoutForm>,
) -> Response {
    let name = st.session_cookie();
    if let (Some(token), Some(s)) = (cookie(&headers, &name), session_of(&st, &headers)) {
        let csrf_ok = blake3::hash(f.csrf.as_bytes()) == blake3::hash(s.csrf.as_bytes());
        if !(same_origin(&headers) && host_allowed(&headers, &st.hosts) && csrf_ok) {
            return (StatusCode::FORBIDDEN, "refused").into_response();
        }
        st.sessions.end(token);
        tracing::info!(operator = %s.operator, "signed out");
    }
    let mut r = Redirect::to("/ui/login").into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!(
            "{name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
        ))
        .expect("ascii"),
    );
    r
}

// ----- screens ---------------------------------------------------------------

async fn screen(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    if !host_allowed(&headers, &st.hosts) {
        return (StatusCode::FORBIDDEN, "Host not accepted").into_response();
    }
    let Some(session) = session_of(&st, &headers) else {
        return Redirect::to("/ui/login").into_response();
    };
    let cx = Ctx {
        lang: lang_of(&headers),
        st: &st,
        session: Some(&session),
    };
    let (screen, body) = match st.role {
        Some(Role::Hq) => ("hq", hq_screen(&cx)),
        Some(Role::Ambulance) => ("ambulance", medical_screen(&cx, false)),
        Some(Role::Clinic) => ("clinic", medical_screen(&cx, true)),
        Some(Role::Facility) => ("facility", shelter_screen(&cx, false)),
        Some(Role::Shelter) | None => ("shelter", shelter_screen(&cx, true)),
    };
    html_response(layout(&cx, screen, body))
}

fn search_section(lang: Lang, title_key: &str) -> Markup {
    html! {
        section.panel #search-sec aria-labelledby="search-h" {
            h2 #search-h { (t(lang, title_key)) }
            form #search-form.inline role="search" {
                div.field {
                    label for="q" { (t(lang, "search.q")) }
                    input #q type="search" name="q" maxlength="100" required autocomplete="off";
                }
                div.field {
                    label for="birth" { (t(lang, "search.birth")) }
                    input #birth type="date" name="birth_date";
                }
                button type="submit" { (t(lang, "search.submit")) }
            }
            ul #search-results.results aria-live="polite" {}
        }
    }
}

fn shelter_screen(cx: &Ctx<'_>, can_check_in: bool) -> Markup {
    let lang = cx.lang;
    html! {
        div.grid.desk {
            section.panel.intake #intake aria-labelledby="intake-h" {
                h2 #intake-h { (t(lang, "intake.title")) }
                div #card-status.card-status role="status" { (t(lang, "card.ready")) }
                div #household data-can-check-in=(can_check_in) {
                    p.hint { (t(lang, "household.none")) }
                }
                div #intake-result.result role="status" aria-live="polite" {}
            }
            (search_section(lang, "search.title"))
            @if can_check_in {
                section.panel #register-sec aria-labelledby="register-h" {
                    h2 #register-h { (t(lang, "register.title")) }
                    form #register-form {
                        div.field {
                            label for="reg-name" { (t(lang, "register.name")) }
                            input #reg-name name="name" maxlength="100" required autocomplete="off";
                        }
                        div.field {
                            label for="reg-kana" { (t(lang, "register.kana")) }
                            input #reg-kana name="kana" maxlength="100" required autocomplete="off";
                        }
                        div.field {
                            label for="reg-birth" { (t(lang, "search.birth")) }
                            input #reg-birth type="date" name="birth_date";
                        }
                        div.field {
                            label for="reg-note" { (t(lang, "register.note")) }
                            input #reg-note name="note" maxlength="500" autocomplete="off";
                        }
                        button type="submit" { (t(lang, "register.submit")) }
                    }
                    div #register-result.result role="status" aria-live="polite" {}
                }
            }
            section.panel.wide #roster-sec aria-labelledby="roster-h" {
                h2 #roster-h { (t(lang, "roster.title")) }
                div.roster-tools {
                    p #roster-count {}
                    div.field {
                        label for="roster-filter" { (t(lang, "roster.filter")) }
                        input #roster-filter type="search" autocomplete="off" maxlength="100";
                    }
                    a.button href="/ui/roster/print" target="_blank" rel="noopener" { (t(lang, "roster.print")) }
                }
                table #roster {
                    thead { tr {
                        th scope="col" { (t(lang, "col.name")) }
                        th scope="col" { (t(lang, "col.kana")) }
                        th scope="col" { (t(lang, "col.birth")) }
                        th scope="col" { (t(lang, "roster.since")) }
                        th scope="col" { (t(lang, "roster.status")) }
                    } }
                    tbody {}
                }
            }
        }
    }
}

fn medical_screen(cx: &Ctx<'_>, clinic: bool) -> Markup {
    let lang = cx.lang;
    let reasons = crdt::access::AccessReason::ALL;
    let reason_options = html! {
        @for r in reasons {
            option value=(r.code()) { (match lang { Lang::Ja => r.ja(), Lang::En => r.en() }) }
        }
    };
    html! {
        div.grid.medical {
            section.panel #patient aria-labelledby="patient-h" {
                h2 #patient-h { (t(lang, "person.title")) }
                div #card-status.card-status role="status" { (t(lang, "card.ready")) }
                div #person { p.hint { (t(lang, "household.none")) } }
                form #reason-form hidden {
                    div.field {
                        label for="reason" { (t(lang, "medical.reason")) }
                        select #reason name="reason" required { (reason_options) }
                    }
                    button type="submit" { (t(lang, "medical.read")) }
                }
                div #medical-result.result role="status" aria-live="polite" {}
            }
            (search_section(lang, "search.title"))
            section.panel.wide #bg-sec hidden aria-labelledby="bg-h" {
                h2 #bg-h { (t(lang, "bg.title")) }
                p.hint { (t(lang, "bg.hint")) }
                form #bg-form {
                    div.field {
                        label for="bg-reason" { (t(lang, "medical.reason")) }
                        select #bg-reason name="reason" required { (reason_options) }
                    }
                    div.field {
                        label for="bg-just" { (t(lang, "bg.justification")) }
                        input #bg-just name="justification" maxlength="200" required autocomplete="off";
                    }
                    button.danger type="submit" { (t(lang, "bg.submit")) }
                }
            }
            section.panel.wide.printable #profile-sec hidden aria-labelledby="profile-h" {
                h2 #profile-h { (t(lang, "medical.title")) }
                div #bg-banner {}
                div #profile {}
                button #print-handover.noprint type="button" { (t(lang, "medical.handover")) }
            }
            @if clinic {
                section.panel #edit-sec hidden aria-labelledby="edit-h" {
                    h2 #edit-h { (t(lang, "clinic.edit")) }
                    form #add-entry-form.inline {
                        div.field {
                            label for="entry-section" { (t(lang, "clinic.section")) }
                            select #entry-section name="section" {
                                @for s in crdt::model::MedicalSection::ALL {
                                    option value=(s.as_str()) { (t(lang, &format!("medical.{}", s.as_str()))) }
                                }
                            }
                        }
                        div.field {
                            label for="entry-text" { (t(lang, "clinic.text")) }
                            input #entry-text name="text" maxlength="200" required autocomplete="off";
                        }
                        button type="submit" { (t(lang, "clinic.add")) }
                    }
                    form #blood-form.inline {
                        div.field {
                            label for="blood" { (t(lang, "medical.blood")) }
                            select #blood name="blood" {
                                @for b in ["A+", "A-", "B+", "B-", "O+", "O-", "AB+", "AB-", "unknown"] {
                                    option value=(b) { (b) }
                                }
                            }
                        }
                        button type="submit" { (t(lang, "clinic.set_blood")) }
                    }
                    form #consent-form.inline {
                        div.field {
                            label for="consent" { (t(lang, "medical.consent")) }
                            select #consent name="consent" {
                                option value="consented" { (t(lang, "medical.consented")) }
                                option value="life_saving" { (t(lang, "medical.life_saving")) }
                            }
                        }
                        button type="submit" { (t(lang, "clinic.set_consent")) }
                    }
                    div #edit-result.result role="status" aria-live="polite" {}
                }
                section.panel #elig-sec hidden aria-labelledby="elig-h" {
                    h2 #elig-h { (t(lang, "elig.title")) }
                    dl #elig {}
                    p.hint { (t(lang, "elig.note")) }
                }
            }
        }
    }
}

fn hq_screen(cx: &Ctx<'_>) -> Markup {
    let lang = cx.lang;
    html! {
        div.kpis #kpis {
            div.kpi { span.label { (t(lang, "hq.evacuees")) } span.value #kpi-evacuees { "…" } }
            div.kpi { span.label { (t(lang, "hq.shelters")) } span.value #kpi-shelters { "…" } }
            div.kpi { span.label { (t(lang, "hq.conflicts")) } span.value #kpi-conflicts { "…" } }
            div.kpi { span.label { (t(lang, "hq.outbox")) } span.value #kpi-mail { "…" } }
            div.kpi { span.label { (t(lang, "hq.updated")) } span.value #kpi-updated { "…" } }
        }
        div.grid.hq {
            section.panel.wide #shelters-sec aria-labelledby="shelters-h" {
                h2 #shelters-h { (t(lang, "hq.shelters")) }
                div.scroll {
                    table #shelters {
                        thead { tr {
                            th scope="col" { (t(lang, "col.shelter")) }
                            th scope="col" { (t(lang, "hq.occupancy")) }
                            th scope="col" { (t(lang, "hq.last_sync")) }
                        } }
                        tbody {}
                    }
                }
            }
            section.panel #arrivals-sec aria-labelledby="arrivals-h" {
                h2 #arrivals-h { (t(lang, "hq.arrivals")) }
                div #arrivals-chart.chart {}
            }
            section.panel #districts-sec aria-labelledby="districts-h" {
                h2 #districts-h { (t(lang, "hq.districts")) }
                div.scroll {
                    table #districts {
                        thead { tr {
                            th scope="col" { (t(lang, "hq.district")) }
                            th scope="col" { (t(lang, "hq.residents")) }
                            th scope="col" { (t(lang, "hq.accounted")) }
                            th scope="col" { (t(lang, "hq.unaccounted")) }
                            th scope="col" { span.sr { (t(lang, "hq.show")) } }
                        } }
                        tbody {}
                    }
                }
                div #unaccounted {}
            }
            section.panel #conflicts-sec aria-labelledby="conflicts-h" {
                h2 #conflicts-h { (t(lang, "hq.conflicts")) }
                ul #conflicts.results {}
            }
            section.panel #outbox-sec aria-labelledby="outbox-h" {
                h2 #outbox-h { (t(lang, "hq.outbox")) }
                dl #outbox-counts.counts {}
                table #outbox-failures {
                    thead { tr {
                        th scope="col" { (t(lang, "col.status")) }
                        th scope="col" { (t(lang, "hq.mail_reason")) }
                        th scope="col" { (t(lang, "col.count")) }
                    } }
                    tbody {}
                }
            }
            section.panel #mesh-sec aria-labelledby="mesh-h" {
                h2 #mesh-h { (t(lang, "hq.mesh")) }
                dl #mesh.counts {}
                ul #peers.results {}
            }
            section.panel #bg-review-sec aria-labelledby="bgr-h" {
                h2 #bgr-h { (t(lang, "hq.break_glass")) }
                div.scroll {
                    table #bg-review {
                        thead { tr {
                            th scope="col" { (t(lang, "col.time")) }
                            th scope="col" { (t(lang, "col.node")) }
                            th scope="col" { (t(lang, "col.operator")) }
                            th scope="col" { (t(lang, "col.record")) }
                            th scope="col" { (t(lang, "col.reason")) }
                        } }
                        tbody {}
                    }
                }
            }
            (search_section(lang, "hq.find"))
        }
    }
}

// ----- printable roster ------------------------------------------------------

#[derive(Deserialize)]
struct PrintQ {
    shelter_id: Option<String>,
}

/// Wall ms as `YYYY-MM-DD HH:MM` in Japan time (the product's users).
pub fn jst(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .to_offset(time::UtcOffset::from_hms(9, 0, 0).expect("valid offset"));
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute()
    )
}

async fn roster_print(
    State(st): State<ApiState>,
    headers: HeaderMap,
    UrlQuery(q): UrlQuery<PrintQ>,
) -> Response {
    if !host_allowed(&headers, &st.hosts) {
        return (StatusCode::FORBIDDEN, "Host not accepted").into_response();
    }
    let Some(session) = session_of(&st, &headers) else {
        return Redirect::to("/ui/login").into_response();
    };
    let lang = lang_of(&headers);
    let shelter_id = q.shelter_id.or_else(|| st.shelter_id.clone());
    let rows = match st
        .driver
        .query(Query::Roster {
            shelter_id: shelter_id.clone(),
        })
        .await
    {
        Ok(QueryReply::Roster(r)) => r,
        Ok(_) => Vec::new(),
        Err(e) => return crate::api::ApiError::from(e).into_response(),
    };
    let shelters = match st.driver.query(Query::Shelters).await {
        Ok(QueryReply::Shelters(v)) => v,
        _ => Vec::new(),
    };
    let shelter = shelters
        .iter()
        .find(|s| Some(&s.shelter.shelter_id) == shelter_id.as_ref());
    let cx = Ctx {
        lang,
        st: &st,
        session: Some(&session),
    };
    let body = html! {
        div.print-page {
            h1 {
                (t(lang, "roster.title")) " — "
                bdi { (shelter.map(|s| s.shelter.name.as_str()).unwrap_or(shelter_id.as_deref().unwrap_or(""))) }
            }
            p {
                (t(lang, "roster.printed")) ": " (jst(crate::auth::now_ms())) " JST · "
                @if let Some(s) = shelter {
                    (t(lang, "roster.count").replace("{n}", &rows.iter().filter(|(_, l)| l.status == crdt::store::LocationStatus::In).count().to_string()).replace("{cap}", &s.shelter.capacity.to_string()))
                }
            }
            button #print-now.noprint type="button" { (t(lang, "roster.do_print")) }
            table.print-roster {
                thead { tr {
                    th scope="col" { "#" }
                    th scope="col" { (t(lang, "col.name")) }
                    th scope="col" { (t(lang, "col.kana")) }
                    th scope="col" { (t(lang, "col.birth")) }
                    th scope="col" { (t(lang, "roster.since")) }
                    th scope="col" { (t(lang, "roster.status")) }
                } }
                tbody {
                    @for (i, (p, l)) in rows.iter().enumerate() {
                        tr {
                            td { (i + 1) }
                            td { bdi { (p.name) } }
                            td { bdi { (p.kana) } }
                            td { (p.birth_date.as_deref().unwrap_or("")) }
                            td { (jst(l.since_ms)) }
                            td {
                                (t(lang, match l.status {
                                    crdt::store::LocationStatus::In => "where.in",
                                    crdt::store::LocationStatus::Out => "where.out",
                                    crdt::store::LocationStatus::Pending => "where.pending",
                                }))
                                @if l.conflict { " ⚠ " (t(lang, "conflict.short")) }
                            }
                        }
                    }
                }
            }
        }
    };
    html_response(layout(&cx, "print", body))
}
