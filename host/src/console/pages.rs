//! The console's pages (GET). Each authorises like the API route it shows (the same
//! `Principal` checks, before any input is examined), reads through the same services, and
//! renders HTML in which every value is escaped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;

use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, TimeZone, Utc};
use serde::Deserialize;

use super::html::{self, Nav, badge, csrf_field, esc, q};
use super::{CPath, CQuery, ConsoleError, Transport, Viewer};
use crate::api::AppState;
use crate::api::connectors::ConnectorDto;
use crate::api::error::ApiError;
use crate::api::receipts::logout_subscribers;
use crate::auth::{Permission, Principal};
use crate::domain::ProblemCode;
use crate::domain::rules;
use crate::domain::{SessionKind, SessionStatus};
use crate::store::deliveries::{DeliveryQuery, DeliveryStatus};
use crate::store::overview::LiveCounts;
use crate::store::{SessionQuery, split_page};
use crate::sync::receipts::{self, Confirmation};

/// Rows per page of every list.
pub const PAGE: u32 = 50;
/// Sessions per page of a tree.
pub const TREE_PAGE: usize = 1_000;

type Page = Result<Html<String>, ConsoleError>;

fn ms(t: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(t).single().unwrap_or_default()
}

/// `users:manage` in the realm, then a well-formed realm name (as `api::sessions`).
pub(super) fn authorize_sessions(p: &Principal, realm: &str) -> Result<(), ConsoleError> {
    p.authorize(realm, Permission::UsersManage)?;
    rules::realm(realm)?;
    Ok(())
}

/// `users:manage` or `audit:read` in the realm (as `api::receipts`).
fn authorize_receipts(p: &Principal, realm: &str) -> Result<(), ConsoleError> {
    if p.authorize(realm, Permission::UsersManage).is_err()
        && p.authorize(realm, Permission::AuditRead).is_err()
    {
        return Err(ApiError::Forbidden(format!(
            "{} may not read receipts in realm {realm:?} (needs users:manage or audit:read)",
            p.name()
        ))
        .into());
    }
    rules::realm(realm)?;
    Ok(())
}

/// A page cursor: the sequence number or id to continue after.
fn cursor(c: Option<&str>) -> Result<Option<i64>, ConsoleError> {
    c.filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| ApiError::Validation(format!("invalid page cursor {c:?}")).into())
        })
        .transpose()
}

/// Empty form fields mean "not given".
fn given(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// Realms the viewer can see sessions of: those with sessions or an identity provider.
async fn visible_realms(state: &AppState, p: &Principal) -> Result<Vec<LiveCounts>, ConsoleError> {
    let mut counts = match &state.console {
        Some(c) => c
            .live
            .counts(state.sessions.store())
            .await?
            .as_ref()
            .clone(),
        None => state.sessions.store().live_counts().await?,
    };
    let known: BTreeSet<String> = counts.iter().map(|c| c.realm.clone()).collect();
    if let Some(console) = &state.console {
        for realm in console.sso.realms() {
            if !known.contains(realm) {
                counts.push(LiveCounts {
                    realm: realm.to_owned(),
                    ..LiveCounts::default()
                });
            }
        }
    }
    if let Principal::Token { realm, .. } = p
        && !counts.iter().any(|c| &c.realm == realm)
    {
        counts.push(LiveCounts {
            realm: realm.clone(),
            ..LiveCounts::default()
        });
    }
    counts.retain(|c| p.authorize(&c.realm, Permission::UsersManage).is_ok());
    counts.sort_by(|a, b| a.realm.cmp(&b.realm));
    Ok(counts)
}

// ---------------------------------------------------------------- sign-in

#[derive(Deserialize)]
pub struct LoginParams {
    signed_out: Option<String>,
}

/// The sign-in form (and the Keycloak sign-in of each realm that has one).
pub async fn login(
    State(state): State<AppState>,
    transport: Transport,
    CQuery(params): CQuery<LoginParams>,
) -> Result<Response, ConsoleError> {
    let console = super::console(&state)?;
    let note = params.signed_out.is_some().then_some("You are signed out.");
    Ok(login_page(
        console,
        &transport,
        axum::http::StatusCode::OK,
        note,
    ))
}

/// The sign-in page with a fresh form token (double-submitted: cookie and field).
pub(super) fn login_page(
    console: &super::Console,
    transport: &Transport,
    status: axum::http::StatusCode,
    message: Option<&str>,
) -> Response {
    let token = super::session::random_token();
    let secure = transport.secure;
    let mut body = String::new();
    if let Some(m) = message {
        let class = if status.is_success() {
            "flash"
        } else {
            "error"
        };
        let _ = write!(body, "<p class=\"{class}\" role=\"alert\">{}</p>", esc(m));
    }
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/console/login\" class=\"card narrow\">{}\
         <label for=\"token\">Admin token or API key</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" required autofocus>\
         <button type=\"submit\">Sign in</button></form>",
        csrf_field(&token)
    );
    let realms: Vec<&str> = console.sso.realms().collect();
    if !realms.is_empty() {
        body.push_str(
            "<section class=\"card narrow\"><h2>Sign in with Keycloak</h2><ul class=\"plain\">",
        );
        for realm in realms {
            let _ = write!(
                body,
                "<li><a class=\"button\" href=\"/console/sso/start?realm={}\">Sign in with Keycloak ({})</a></li>",
                esc(&q(realm)),
                esc(realm)
            );
        }
        body.push_str("</ul></section>");
    }
    let page = html::page(
        "Sign in",
        Nav::None,
        &html::Chrome {
            actor: None,
            csrf: None,
            flash: None,
        },
        &body,
    );
    (
        status,
        [(
            axum::http::header::SET_COOKIE,
            super::session::set_cookie(
                super::session::PRE_COOKIE,
                &token,
                Some(std::time::Duration::from_secs(3600)),
                secure,
            ),
        )],
        Html(page),
    )
        .into_response()
}

// ---------------------------------------------------------------- overview

/// Overview: per realm, live sessions; per connector, its state, queue and latency.
pub async fn overview(State(state): State<AppState>, viewer: Viewer) -> Page {
    let live = overview_body(&state, &viewer.principal).await?;
    let body = format!(
        "<p class=\"hint\">Updates every 5 seconds.</p>\
         <div id=\"live\" data-refresh=\"/console/overview/live\" aria-live=\"polite\">{live}</div>"
    );
    Ok(Html(html::page(
        "Overview",
        Nav::Overview,
        &viewer.chrome(),
        &body,
    )))
}

/// The overview's changing part, fetched again by `console.js`.
pub async fn overview_live(State(state): State<AppState>, viewer: Viewer) -> Page {
    Ok(Html(overview_body(&state, &viewer.principal).await?))
}

async fn overview_body(state: &AppState, p: &Principal) -> Result<String, ConsoleError> {
    let now = Utc::now();
    let mut out = String::new();
    let realms = visible_realms(state, p).await?;
    out.push_str("<section><h2>Live sessions</h2>");
    if realms.is_empty() {
        out.push_str("<p>No realm you may manage has sessions.</p>");
    } else {
        out.push_str(
            "<div class=\"scroll\"><table><caption>Sessions that have not ended, per realm</caption>\
             <thead><tr><th scope=\"col\">Realm</th><th scope=\"col\">PARENT</th><th scope=\"col\">CHILD</th>\
             <th scope=\"col\">FIXED</th><th scope=\"col\">ORPHANED</th></tr></thead><tbody>",
        );
        for c in &realms {
            let _ = write!(
                out,
                "<tr><th scope=\"row\"><a href=\"/console/sessions?realm={}\">{}</a></th>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                esc(&q(&c.realm)),
                esc(&c.realm),
                c.parent,
                c.child,
                c.fixed,
                c.orphaned
            );
        }
        out.push_str("</tbody></table></div>");
    }
    out.push_str("</section>");
    // Connectors and deliveries span realms: shown to whoever may manage them everywhere,
    // as `/admin/connectors` and `/admin/deliveries` are.
    if p.authorize_global(Permission::ConnectorsManage).is_err() {
        out.push_str(
            "<section><h2>Connectors and deliveries</h2><p>Connectors and deliveries span every \
             realm; they are shown to callers with connectors:manage in every realm.</p></section>",
        );
        return Ok(out);
    }
    let infos = state.connectors.list().await?;
    let backlog = state.sessions.store().backlog().await?;
    let (mut up, mut failed, mut disabled) = (0, 0, 0);
    let dtos: Vec<ConnectorDto> = infos.into_iter().map(Into::into).collect();
    for c in &dtos {
        match c.state.as_str() {
            "active" => up += 1,
            "disabled" => disabled += 1,
            _ => failed += 1,
        }
    }
    let oldest = backlog.oldest_waiting_ms.map_or_else(
        || "none".to_owned(),
        |t| format!("{} old", html::duration((now - ms(t)).num_seconds().max(0))),
    );
    let _ = write!(
        out,
        "<section><h2>Connectors and deliveries</h2><dl class=\"stats\">\
         <div><dt>Up</dt><dd>{up}</dd></div><div><dt>Failed</dt><dd>{failed}</dd></div>\
         <div><dt>Disabled</dt><dd>{disabled}</dd></div>\
         <div><dt>Events not yet routed</dt><dd>{}</dd></div>\
         <div><dt>Oldest waiting event</dt><dd>{}</dd></div></dl>",
        backlog.unrouted,
        esc(&oldest)
    );
    if dtos.is_empty() {
        out.push_str("<p>No connector is loaded.</p>");
    } else {
        out.push_str(
            "<div class=\"scroll\"><table><caption>Deliveries and hook latency per connector (latency since this instance started)</caption>\
             <thead><tr><th scope=\"col\">Connector</th><th scope=\"col\">State</th>\
             <th scope=\"col\">Pending</th><th scope=\"col\">Dead</th><th scope=\"col\">Dropped</th>\
             <th scope=\"col\">Hook p50</th><th scope=\"col\">Hook p99</th></tr></thead><tbody>",
        );
        for c in &dtos {
            let _ = write!(
                out,
                "<tr><th scope=\"row\"><a href=\"/console/connectors/{}\">{}</a></th><td>{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\"><a href=\"/console/deliveries?status=dead&amp;connector={}\">{}</a></td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                esc(&q(&c.name)),
                esc(&c.name),
                badge(&c.state),
                c.deliveries.pending,
                esc(&q(&c.name)),
                c.deliveries.dead,
                c.deliveries.dropped,
                latency(c.hook_latency.p50_ms),
                latency(c.hook_latency.p99_ms)
            );
        }
        out.push_str("</tbody></table></div>");
    }
    out.push_str("</section>");
    Ok(out)
}

fn latency(ms: Option<f64>) -> String {
    ms.map_or_else(|| "–".to_owned(), |v| format!("{v:.1} ms"))
}

// ---------------------------------------------------------------- sessions

#[derive(Deserialize)]
pub struct SessionParams {
    realm: Option<String>,
    /// externalId, userId or keycloakSessionId.
    field: Option<String>,
    value: Option<String>,
    status: Option<String>,
    cursor: Option<String>,
}

/// Session search: by external id, user id or Keycloak session id, and status.
pub async fn sessions(
    State(state): State<AppState>,
    viewer: Viewer,
    CQuery(params): CQuery<SessionParams>,
) -> Page {
    let now = Utc::now();
    let p = &viewer.principal;
    let realms = visible_realms(&state, p).await?;
    let realm = match given(&params.realm) {
        Some(r) => Some(r),
        None => realms.first().map(|c| c.realm.clone()),
    };
    let field = given(&params.field).unwrap_or_else(|| "externalId".to_owned());
    let value = given(&params.value);
    let status = given(&params.status)
        .map(|s| {
            s.parse::<SessionStatus>()
                .map_err(|e| ConsoleError::from(ApiError::Validation(e.to_string())))
        })
        .transpose()?;
    let mut body = String::new();
    // The form.
    let _ = write!(
        body,
        "<form method=\"get\" action=\"/console/sessions\" class=\"search\">\
         <div><label for=\"realm\">Realm</label><input id=\"realm\" name=\"realm\" list=\"realms\" value=\"{}\" required></div>\
         <datalist id=\"realms\">",
        esc(realm.as_deref().unwrap_or(""))
    );
    for c in &realms {
        let _ = write!(body, "<option value=\"{}\">", esc(&c.realm));
    }
    body.push_str("</datalist><div><label for=\"field\">Search by</label><select id=\"field\" name=\"field\">");
    for (v, label) in [
        ("externalId", "External id"),
        ("userId", "User id"),
        ("keycloakSessionId", "Keycloak session id"),
    ] {
        let sel = if v == field { " selected" } else { "" };
        let _ = write!(body, "<option value=\"{v}\"{sel}>{label}</option>");
    }
    let _ = write!(
        body,
        "</select></div><div><label for=\"value\">Value</label><input id=\"value\" name=\"value\" value=\"{}\"></div>\
         <div><label for=\"status\">Status</label><select id=\"status\" name=\"status\"><option value=\"\">any</option>",
        esc(value.as_deref().unwrap_or(""))
    );
    for s in ["ACTIVE", "DESTROYED", "ORPHANED"] {
        let sel = if status.map(|x| x.as_str()) == Some(s) {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option value=\"{s}\"{sel}>{s}</option>");
    }
    body.push_str("</select></div><button type=\"submit\">Search</button></form>");
    let Some(realm) = realm else {
        body.push_str("<p>No realm you may manage has sessions yet.</p>");
        return Ok(Html(html::page(
            "Sessions",
            Nav::Sessions,
            &viewer.chrome(),
            &body,
        )));
    };
    authorize_sessions(p, &realm)?;
    let after = cursor(params.cursor.as_deref())?;
    let (items, next) = match (field.as_str(), value) {
        ("externalId", Some(id)) => {
            let found = state.sessions.get(&realm, &id).await?;
            (
                found
                    .into_iter()
                    .filter(|s| status.is_none_or(|st| s.status == st))
                    .collect::<Vec<_>>(),
                None,
            )
        }
        (f @ ("externalId" | "userId" | "keycloakSessionId"), v) => {
            let mut query = SessionQuery {
                idp_session_id: None,
                idp_client_session_id: None,
                user_id: None,
                status,
                system: None,
                after,
                limit: PAGE,
            };
            match f {
                "userId" => query.user_id = v,
                "keycloakSessionId" => query.idp_session_id = v,
                _ => {}
            }
            let page = state.sessions.query(&realm, query).await?;
            (page.items, page.next_after)
        }
        (other, _) => {
            return Err(ApiError::Validation(format!(
                "cannot search by {other:?} (externalId, userId or keycloakSessionId)"
            ))
            .into());
        }
    };
    if items.is_empty() {
        body.push_str("<p>No session matches.</p>");
    } else {
        let _ = write!(
            body,
            "<div class=\"scroll\"><table><caption>Sessions of realm {}</caption><thead><tr>\
             <th scope=\"col\">External id</th><th scope=\"col\">Kind</th><th scope=\"col\">Status</th>\
             <th scope=\"col\">User</th><th scope=\"col\">System</th><th scope=\"col\">Keycloak session</th>\
             <th scope=\"col\">Created</th><th scope=\"col\">Expires</th></tr></thead><tbody>",
            esc(&realm)
        );
        for s in &items {
            let _ = write!(
                body,
                "<tr><td><a href=\"/console/tree?realm={}&amp;id={}\">{}</a></td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&q(&realm)),
                esc(&q(&s.external_id)),
                esc(&s.external_id),
                s.kind,
                badge(s.status.as_str()),
                user_link(&realm, s.user_id.as_deref()),
                esc(s.system.as_deref().unwrap_or("–")),
                esc(s.idp_session_id.as_deref().unwrap_or("–")),
                html::time(s.created_at, now),
                html::opt_time(s.expires_at, now)
            );
        }
        body.push_str("</tbody></table></div>");
    }
    let base = format!(
        "/console/sessions?realm={}&field={}&value={}&status={}",
        q(&realm),
        q(&field),
        q(params.value.as_deref().unwrap_or("")),
        q(status.map(|s| s.as_str()).unwrap_or(""))
    );
    body.push_str(&html::pager(
        &base,
        next.map(|n| n.to_string()).as_deref(),
        after.is_none(),
    ));
    Ok(Html(html::page(
        "Sessions",
        Nav::Sessions,
        &viewer.chrome(),
        &body,
    )))
}

fn user_link(realm: &str, user: Option<&str>) -> String {
    match user {
        Some(u) => format!(
            "<a href=\"/console/sessions?realm={}&amp;field=userId&amp;value={}\">{}</a>",
            esc(&q(realm)),
            esc(&q(u)),
            esc(u)
        ),
        None => "–".to_owned(),
    }
}

#[derive(Deserialize)]
pub struct TreeParams {
    realm: String,
    id: String,
    page: Option<usize>,
}

/// The tree of a session: every session with its depth, status, end reason, expiry and its
/// deliveries per connector, with links to receipts and the destroy confirmations.
pub async fn tree(
    State(state): State<AppState>,
    viewer: Viewer,
    CQuery(params): CQuery<TreeParams>,
) -> Page {
    let now = Utc::now();
    authorize_sessions(&viewer.principal, &params.realm)?;
    let realm = &params.realm;
    let entries = state
        .sessions
        .tree(realm, &params.id)
        .await?
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::refused(
                ProblemCode::NotFound,
                format!("session {:?} not found in this realm", params.id),
            )
        })?;
    let pages = entries.len().div_ceil(TREE_PAGE);
    let page = params.page.unwrap_or(0).min(pages.saturating_sub(1));
    let shown = &entries[page * TREE_PAGE..((page + 1) * TREE_PAGE).min(entries.len())];
    let ids: Vec<String> = shown
        .iter()
        .map(|e| e.session.external_id.clone())
        .collect();
    let mut deliveries: HashMap<String, Vec<crate::store::deliveries::DeliveryRow>> =
        HashMap::new();
    for d in state
        .sessions
        .store()
        .session_deliveries(realm, &ids)
        .await?
    {
        deliveries.entry(d.external_id.clone()).or_default().push(d);
    }
    let root = &entries[0].session;
    let live = entries
        .iter()
        .filter(|e| e.session.status != SessionStatus::Destroyed)
        .count();
    let mut body = String::new();
    let _ = write!(
        body,
        "<p>Tree of <strong>{}</strong> in realm <strong>{}</strong>: {} sessions, {} not ended.</p><p class=\"actions\">",
        esc(&root.external_id),
        esc(realm),
        entries.len(),
        live
    );
    if root.status == SessionStatus::Active && root.kind != SessionKind::Child {
        let _ = write!(
            body,
            "<a class=\"button danger\" href=\"/console/destroy?realm={}&amp;kind=parent&amp;id={}\">Destroy this tree…</a> ",
            esc(&q(realm)),
            esc(&q(&root.external_id))
        );
    }
    if let Some(user) = &root.user_id {
        let _ = write!(
            body,
            "<a class=\"button danger\" href=\"/console/destroy?realm={r}&amp;kind=user&amp;id={u}\">End every session of user {ue}…</a> \
             <a class=\"button\" href=\"/console/receipts?realm={r}&amp;user={u}\">Receipt of user {ue}</a>",
            r = esc(&q(realm)),
            u = esc(&q(user)),
            ue = esc(user)
        );
    }
    body.push_str("</p><div class=\"scroll\"><table class=\"tree\"><caption>Sessions, each followed by its children</caption><thead><tr>\
        <th scope=\"col\">Session</th><th scope=\"col\">Kind</th><th scope=\"col\">Status</th><th scope=\"col\">End reason</th>\
        <th scope=\"col\">Delegated by</th><th scope=\"col\">User</th><th scope=\"col\">System</th><th scope=\"col\">Expires</th>\
        <th scope=\"col\">Deliveries</th><th scope=\"col\">Receipt</th></tr></thead><tbody>");
    for e in shown {
        let s = &e.session;
        let mut ds = String::new();
        for d in deliveries
            .get(&s.external_id)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let _ = write!(
                ds,
                "<li><a href=\"/console/deliveries/{}\">{} {}</a> {}{}</li>",
                d.id,
                esc(&d.connector),
                esc(&d.event_type),
                badge(&d.status),
                d.last_error
                    .as_deref()
                    .map(|e| format!(" <span class=\"err\">{}</span>", esc(e)))
                    .unwrap_or_default()
            );
        }
        let _ = write!(
            body,
            "<tr class=\"d{}\"><td class=\"sid\"><span class=\"indent\" aria-hidden=\"true\">{}</span>{}</td><td>{}</td><td class=\"status\">{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><ul class=\"plain\">{}</ul></td>\
             <td><a href=\"/console/receipt?realm={}&amp;id={}\">Receipt<span class=\"sr\"> of {}</span></a></td></tr>",
            e.depth.min(8),
            if e.depth == 0 { "" } else { "└ " },
            esc(&s.external_id),
            s.kind,
            badge(s.status.as_str()),
            esc(s.end_reason.map(|r| r.as_str()).unwrap_or("–")),
            esc(s.delegated_by.as_deref().unwrap_or("–")),
            user_link(realm, s.user_id.as_deref()),
            esc(s.system.as_deref().unwrap_or("–")),
            html::opt_time(s.expires_at, now),
            ds,
            esc(&q(realm)),
            esc(&q(&s.external_id)),
            esc(&s.external_id)
        );
    }
    body.push_str("</tbody></table></div>");
    // Sessions delegated from this tree are not in it (other trees) but end with it.
    let delegated: Vec<_> = state
        .sessions
        .store()
        .reach(realm, std::slice::from_ref(&root.external_id), MAX_REACH)
        .await?
        .into_iter()
        .filter(|r| r.via == 2)
        .collect();
    if !delegated.is_empty() {
        body.push_str(
            "<h2>Delegated from this tree</h2><div class=\"scroll\"><table><caption>Sessions \
             delegated by a session of this tree (and their trees): they end with it</caption>\
             <thead><tr><th scope=\"col\">Session</th><th scope=\"col\">Delegated by</th>\
             <th scope=\"col\">Status</th></tr></thead><tbody>",
        );
        for d in &delegated {
            let _ = write!(
                body,
                "<tr><td><a href=\"/console/tree?realm={}&amp;id={}\">{}</a></td><td>{}</td><td>{}</td></tr>",
                esc(&q(realm)),
                esc(&q(&d.external_id)),
                esc(&d.external_id),
                esc(d.delegated_by.as_deref().unwrap_or("–")),
                badge(&d.status)
            );
        }
        body.push_str("</tbody></table></div>");
    }
    body.push_str(&html::offset_pager(
        &format!("/console/tree?realm={}&id={}", q(realm), q(&params.id)),
        page,
        pages,
    ));
    Ok(Html(html::page(
        "Session tree",
        Nav::Sessions,
        &viewer.chrome(),
        &body,
    )))
}

#[derive(Deserialize)]
pub struct DestroyParams {
    pub(super) realm: String,
    /// `parent` or `user`.
    pub(super) kind: String,
    pub(super) id: String,
}

/// Most sessions a confirmation walks (beyond any `[limits] max_cascade` a destroy takes).
const MAX_REACH: i64 = 100_001;

/// How many sessions a destroy would end now: the same walk as the cascade (children, and
/// sessions delegated from any session it reaches) over the sessions it starts from.
pub(super) async fn sessions_to_end(
    state: &AppState,
    realm: &str,
    kind: &str,
    id: &str,
) -> Result<usize, ConsoleError> {
    let seeds = match kind {
        "parent" => {
            let session = state.sessions.get(realm, id).await?.ok_or_else(|| {
                ApiError::refused(
                    ProblemCode::NotFound,
                    format!("session {id:?} not found in this realm"),
                )
            })?;
            if session.kind == SessionKind::Child {
                return Err(ApiError::refused(
                    ProblemCode::WrongKind,
                    format!("session {id:?} is a CHILD; destroy its root, or use the API's destroy-child"),
                )
                .into());
            }
            vec![id.to_owned()]
        }
        "user" => {
            let mut seeds = Vec::new();
            let mut after = None;
            loop {
                let page = state
                    .sessions
                    .query(
                        realm,
                        SessionQuery {
                            idp_session_id: None,
                            idp_client_session_id: None,
                            user_id: Some(id.to_owned()),
                            status: Some(SessionStatus::Active),
                            system: None,
                            after,
                            limit: crate::sync::sessions::MAX_PAGE,
                        },
                    )
                    .await?;
                seeds.extend(page.items.into_iter().map(|s| s.external_id));
                match page.next_after {
                    Some(n) if (seeds.len() as i64) < MAX_REACH => after = Some(n),
                    _ => break,
                }
            }
            seeds
        }
        other => {
            return Err(ApiError::Validation(format!(
                "kind must be parent or user, got {other:?}"
            ))
            .into());
        }
    };
    if seeds.is_empty() {
        return Ok(0);
    }
    Ok(state
        .sessions
        .store()
        .reach(realm, &seeds, MAX_REACH)
        .await?
        .iter()
        .filter(|r| r.status != "DESTROYED")
        .count())
}

/// The confirmation of a destroy: what it ends, and how many sessions.
pub async fn destroy_confirm(
    State(state): State<AppState>,
    viewer: Viewer,
    CQuery(params): CQuery<DestroyParams>,
) -> Page {
    authorize_sessions(&viewer.principal, &params.realm)?;
    let n = sessions_to_end(&state, &params.realm, &params.kind, &params.id).await?;
    let what = if params.kind == "parent" {
        format!("the session tree of <strong>{}</strong>", esc(&params.id))
    } else {
        format!("every session of user <strong>{}</strong>", esc(&params.id))
    };
    let back = if params.kind == "parent" {
        format!(
            "/console/tree?realm={}&id={}",
            q(&params.realm),
            q(&params.id)
        )
    } else {
        format!(
            "/console/sessions?realm={}&field=userId&value={}",
            q(&params.realm),
            q(&params.id)
        )
    };
    let body = format!(
        "<form method=\"post\" action=\"/console/destroy\" class=\"card narrow\">{}\
         <p>This ends {what} in realm <strong>{}</strong>: <strong class=\"count\">{n}</strong> session{} will end \
         (the tree{}, and every session delegated from a session it ends), and every connector is \
         sent their logout.</p>\
         <input type=\"hidden\" name=\"realm\" value=\"{}\"><input type=\"hidden\" name=\"kind\" value=\"{}\">\
         <input type=\"hidden\" name=\"id\" value=\"{}\">\
         <label for=\"reason\">Reason</label><select id=\"reason\" name=\"reason\">\
         <option value=\"admin\" selected>admin</option><option value=\"logout\">logout</option>\
         <option value=\"revoked\">revoked</option></select>\
         <button type=\"submit\" class=\"danger\">End {n} session{}</button> <a href=\"{}\">Cancel</a></form>",
        csrf_field(&viewer.csrf),
        esc(&params.realm),
        if n == 1 { "" } else { "s" },
        if params.kind == "user" { "s" } else { "" },
        esc(&params.realm),
        esc(&params.kind),
        esc(&params.id),
        if n == 1 { "" } else { "s" },
        esc(&back)
    );
    Ok(Html(html::page(
        "Confirm destroy",
        Nav::Sessions,
        &viewer.chrome(),
        &body,
    )))
}

// ---------------------------------------------------------------- receipts

fn confirmation(c: Confirmation) -> &'static str {
    match c {
        Confirmation::Delivered => "delivered",
        Confirmation::Pending => "pending",
        Confirmation::Retrying => "retrying",
        Confirmation::Dead => "dead",
        Confirmation::Dropped => "dropped",
    }
}

fn receipt_rows(out: &mut String, r: &receipts::SessionReceipt, now: DateTime<Utc>) {
    for l in &r.logouts {
        for c in &l.connectors {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                esc(&r.session.external_id),
                esc(&c.connector),
                badge(confirmation(c.state)),
                html::opt_time(c.confirmed_at, now),
                esc(c.connector_version.as_deref().unwrap_or("–")),
                c.attempts,
                esc(c.last_error.as_deref().unwrap_or(""))
            );
        }
        for s in &l.skipped {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td colspan=\"4\">not sent: the logout came from this system</td></tr>",
                esc(&r.session.external_id),
                esc(s),
                badge("origin")
            );
        }
        if !l.routed {
            let _ = write!(
                out,
                "<tr><td>{}</td><td colspan=\"6\">logout not routed to connectors yet</td></tr>",
                esc(&r.session.external_id)
            );
        }
    }
}

const RECEIPT_HEAD: &str = "<thead><tr><th scope=\"col\">Session</th><th scope=\"col\">Connector</th>\
    <th scope=\"col\">Status</th><th scope=\"col\">Confirmed</th><th scope=\"col\">Version</th>\
    <th scope=\"col\">Attempts</th><th scope=\"col\">Last error</th></tr></thead>";

#[derive(Deserialize)]
pub struct ReceiptParams {
    realm: String,
    id: String,
}

/// The termination receipt of one session.
pub async fn session_receipt(
    State(state): State<AppState>,
    viewer: Viewer,
    CQuery(params): CQuery<ReceiptParams>,
) -> Page {
    let now = Utc::now();
    authorize_receipts(&viewer.principal, &params.realm)?;
    let subscribers = logout_subscribers(&state, &params.realm);
    let r = receipts::session_receipt(
        state.sessions.store(),
        &params.realm,
        &params.id,
        &subscribers,
    )
    .await?
    .ok_or_else(|| {
        ApiError::refused(
            ProblemCode::NotFound,
            format!("session {:?} not found in this realm", params.id),
        )
    })?;
    let s = &r.session;
    let mut body = format!(
        "<dl class=\"facts\"><div><dt>Session</dt><dd>{}</dd></div><div><dt>Realm</dt><dd>{}</dd></div>\
         <div><dt>Kind</dt><dd>{}</dd></div><div><dt>Status</dt><dd>{}</dd></div>\
         <div><dt>End reason</dt><dd>{}</dd></div><div><dt>Ended</dt><dd>{}</dd></div>\
         <div><dt>User</dt><dd>{}</dd></div><div><dt>Complete</dt><dd>{}</dd></div></dl>",
        esc(&s.external_id),
        esc(&s.realm),
        s.kind,
        badge(s.status.as_str()),
        esc(s.end_reason.map(|r| r.as_str()).unwrap_or("–")),
        html::opt_time(r.ended_at, now),
        user_link(&params.realm, s.user_id.as_deref()),
        if r.complete {
            "yes: every connector confirmed the logout"
        } else {
            "no"
        }
    );
    body.push_str("<div class=\"scroll\"><table><caption>Connectors</caption>");
    body.push_str(RECEIPT_HEAD);
    body.push_str("<tbody>");
    receipt_rows(&mut body, &r, now);
    body.push_str("</tbody></table></div>");
    let _ = write!(
        body,
        "<p class=\"noprint\">Read at {}. <a href=\"/console/tree?realm={}&amp;id={}\">Back to the tree</a></p>",
        html::time(now, now),
        esc(&q(&params.realm)),
        esc(&q(&params.id))
    );
    Ok(Html(html::page(
        "Termination receipt",
        Nav::Audit,
        &viewer.chrome(),
        &body,
    )))
}

#[derive(Deserialize)]
pub struct UserReceiptParams {
    realm: Option<String>,
    user: Option<String>,
    cursor: Option<String>,
}

/// The printable receipt of every session of a user.
pub async fn user_receipts(
    State(state): State<AppState>,
    viewer: Viewer,
    CQuery(params): CQuery<UserReceiptParams>,
) -> Page {
    let now = Utc::now();
    let mut body = format!(
        "<form method=\"get\" action=\"/console/receipts\" class=\"search noprint\">\
         <div><label for=\"realm\">Realm</label><input id=\"realm\" name=\"realm\" value=\"{}\" required></div>\
         <div><label for=\"user\">User id</label><input id=\"user\" name=\"user\" value=\"{}\" required></div>\
         <button type=\"submit\">Show receipt</button></form>",
        esc(params.realm.as_deref().unwrap_or("")),
        esc(params.user.as_deref().unwrap_or(""))
    );
    let (Some(realm), Some(user)) = (given(&params.realm), given(&params.user)) else {
        return Ok(Html(html::page(
            "User receipt",
            Nav::Audit,
            &viewer.chrome(),
            &body,
        )));
    };
    authorize_receipts(&viewer.principal, &realm)?;
    let after = cursor(params.cursor.as_deref())?;
    let r = receipts::user_receipts(
        state.sessions.store(),
        &realm,
        &user,
        after,
        Some(PAGE),
        &logout_subscribers(&state, &realm),
    )
    .await?;
    let systems: BTreeSet<&str> = r
        .sessions
        .iter()
        .filter_map(|s| s.session.system.as_deref())
        .collect();
    let mut confirmed: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &r.sessions {
        for l in &s.logouts {
            for c in &l.connectors {
                if c.state == Confirmation::Delivered {
                    *confirmed.entry(c.connector.as_str()).or_default() += 1;
                }
            }
        }
    }
    let last_end = r.sessions.iter().filter_map(|s| s.ended_at).max();
    let t = &r.totals;
    let _ = write!(
        body,
        "<section class=\"receipt\"><p class=\"summary\">User <strong>{}</strong> (realm {}): {} session{} in {} system{}, \
         {} ended{}; confirmed by {}.</p>\
         <p>{}</p><dl class=\"facts\"><div><dt>Active</dt><dd>{}</dd></div><div><dt>Orphaned</dt><dd>{}</dd></div>\
         <div><dt>Deliveries confirmed</dt><dd>{} of {}</dd></div><div><dt>Pending / retrying</dt><dd>{} / {}</dd></div>\
         <div><dt>Dead / dropped</dt><dd>{} / {}</dd></div><div><dt>Logouts not yet routed</dt><dd>{}</dd></div></dl>",
        esc(&user),
        esc(&realm),
        t.sessions,
        if t.sessions == 1 { "" } else { "s" },
        systems.len(),
        if systems.len() == 1 { "" } else { "s" },
        t.ended,
        last_end
            .map(|e| format!(", the last at {}", html::time(e, now)))
            .unwrap_or_default(),
        if confirmed.is_empty() {
            "no connector yet".to_owned()
        } else {
            confirmed
                .keys()
                .map(|c| esc(c))
                .collect::<Vec<_>>()
                .join(", ")
        },
        if r.complete {
            "<strong>Complete:</strong> every session has ended and every connector confirmed every logout."
        } else {
            "<strong>Not complete:</strong> a session is live, or a logout is not confirmed yet."
        },
        t.active,
        t.orphaned,
        t.deliveries.delivered,
        t.deliveries.connectors,
        t.deliveries.pending,
        t.deliveries.retrying,
        t.deliveries.dead,
        t.deliveries.dropped,
        t.unrouted
    );
    body.push_str(
        "<div class=\"scroll\"><table><caption>Every connector of every logout</caption>",
    );
    body.push_str(RECEIPT_HEAD);
    body.push_str("<tbody>");
    for s in &r.sessions {
        receipt_rows(&mut body, s, now);
        if s.logouts.is_empty() {
            let _ = write!(
                body,
                "<tr><td>{}</td><td colspan=\"6\">{} – no logout</td></tr>",
                esc(&s.session.external_id),
                esc(s.session.status.as_str())
            );
        }
    }
    body.push_str("</tbody></table></div>");
    let _ = write!(body, "<p>Read at {}.</p></section>", html::time(now, now));
    body.push_str(&html::pager(
        &format!("/console/receipts?realm={}&user={}", q(&realm), q(&user)),
        r.next_after.map(|n| n.to_string()).as_deref(),
        after.is_none(),
    ));
    Ok(Html(html::page(
        "User receipt",
        Nav::Audit,
        &viewer.chrome(),
        &body,
    )))
}

// ---------------------------------------------------------------- connectors

#[derive(Deserialize)]
pub struct OffsetParams {
    page: Option<usize>,
}

/// Every connector, its version, source, state, limits, last error and backlog.
pub async fn connectors(
    State(state): State<AppState>,
    viewer: Viewer,
    CQuery(params): CQuery<OffsetParams>,
) -> Page {
    let now = Utc::now();
    viewer
        .principal
        .authorize_global(Permission::ConnectorsManage)?;
    let all: Vec<ConnectorDto> = state
        .connectors
        .list()
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    let per = PAGE as usize;
    let pages = all.len().div_ceil(per).max(1);
    let page = params.page.unwrap_or(0).min(pages - 1);
    let mut body = String::from(
        "<p class=\"actions\"><a class=\"button\" href=\"/console/upload\">Upload a connector…</a></p>",
    );
    if all.is_empty() {
        body.push_str("<p>No connector is loaded.</p>");
    } else {
        body.push_str(
            "<div class=\"scroll\"><table><caption>Connectors</caption><thead><tr>\
             <th scope=\"col\">Name</th><th scope=\"col\">Version</th><th scope=\"col\">Source</th>\
             <th scope=\"col\">State</th><th scope=\"col\">World</th><th scope=\"col\">Limits</th>\
             <th scope=\"col\">Last error</th><th scope=\"col\">Pending</th><th scope=\"col\">Dead</th>\
             <th scope=\"col\">Hook p50 / p99</th></tr></thead><tbody>",
        );
        for c in all.iter().skip(page * per).take(per) {
            let _ = write!(
                body,
                "<tr><th scope=\"row\"><a href=\"/console/connectors/{}\">{}</a></th><td><code>{}</code></td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{} / {}</td></tr>",
                esc(&q(&c.name)),
                esc(&c.name),
                esc(&short_version(c.version.as_deref())),
                esc(&c.source),
                badge(&c.state),
                esc(c.world.as_deref().unwrap_or("–")),
                esc(&limits(c)),
                last_error(c, now),
                c.deliveries.pending,
                c.deliveries.dead,
                latency(c.hook_latency.p50_ms),
                latency(c.hook_latency.p99_ms)
            );
        }
        body.push_str("</tbody></table></div>");
    }
    body.push_str(&html::offset_pager("/console/connectors", page, pages));
    Ok(Html(html::page(
        "Connectors",
        Nav::Connectors,
        &viewer.chrome(),
        &body,
    )))
}

fn short_version(v: Option<&str>) -> String {
    v.map_or_else(|| "–".to_owned(), |v| v.chars().take(12).collect())
}

fn limits(c: &ConnectorDto) -> String {
    match (c.timeout_ms, c.memory_mb) {
        (Some(t), Some(m)) => format!("{t} ms, {m} MiB"),
        _ => "–".to_owned(),
    }
}

fn last_error(c: &ConnectorDto, now: DateTime<Utc>) -> String {
    c.last_error.as_ref().map_or_else(
        || "–".to_owned(),
        |e| {
            format!(
                "<span class=\"err\">{}</span> {}",
                esc(&e.message),
                html::time(e.at, now)
            )
        },
    )
}

/// One connector: everything about it, its configuration masked, and its actions.
pub async fn connector(
    State(state): State<AppState>,
    viewer: Viewer,
    CPath(name): CPath<String>,
) -> Page {
    let now = Utc::now();
    viewer
        .principal
        .authorize_global(Permission::ConnectorsManage)?;
    crate::runtime::manifest::check_name(&name).map_err(ApiError::Validation)?;
    let info = state.connectors.describe(&name).await?;
    // Values may be secrets (passwords, tokens): only the keys are shown.
    let config: Vec<String> = info
        .entry
        .as_deref()
        .map(|e| e.connector.manifest.config.keys().cloned().collect())
        .unwrap_or_default();
    let c = ConnectorDto::from(info);
    let mut body = format!(
        "<dl class=\"facts\"><div><dt>State</dt><dd>{}</dd></div><div><dt>Version</dt><dd><code>{}</code></dd></div>\
         <div><dt>Source</dt><dd>{}{}</dd></div><div><dt>World</dt><dd>{}</dd></div>\
         <div><dt>Realms</dt><dd>{}</dd></div><div><dt>Events</dt><dd>{}</dd></div><div><dt>Mode</dt><dd>{}</dd></div>\
         <div><dt>Allowed hosts</dt><dd>{}</dd></div><div><dt>Signs events for</dt><dd>{}</dd></div><div><dt>Limits</dt><dd>{}</dd></div>\
         <div><dt>Failure policy</dt><dd>{}</dd></div><div><dt>Loaded</dt><dd>{}</dd></div>\
         <div><dt>Last error</dt><dd>{}</dd></div><div><dt>Backlog</dt><dd>{} pending, {} dead, {} dropped</dd></div>\
         <div><dt>Hook latency</dt><dd>p50 {}, p99 {} over {} calls</dd></div></dl>",
        badge(&c.state),
        esc(c.version.as_deref().unwrap_or("–")),
        esc(&c.source),
        c.manifest_path
            .as_deref()
            .map(|p| format!(" ({})", esc(p)))
            .unwrap_or_default(),
        esc(c.world.as_deref().unwrap_or("–")),
        esc(&c.realms.clone().unwrap_or_default().join(", ")),
        esc(&c.events.clone().unwrap_or_default().join(", ")),
        esc(c.mode.as_deref().unwrap_or("–")),
        esc(&c.allowed_hosts.clone().unwrap_or_default().join(", ")),
        esc(&c
            .signing_audiences
            .clone()
            .filter(|a| !a.is_empty())
            .map_or_else(|| "–".to_owned(), |a| a.join(", "))),
        esc(&limits(&c)),
        esc(&c
            .policy
            .as_ref()
            .map(|p| format!("{}, {} attempts", p.on_failure, p.max_attempts))
            .unwrap_or_else(|| "–".into())),
        html::opt_time(c.loaded_at, now),
        last_error(&c, now),
        c.deliveries.pending,
        c.deliveries.dead,
        c.deliveries.dropped,
        latency(c.hook_latency.p50_ms),
        latency(c.hook_latency.p99_ms),
        c.hook_latency.calls
    );
    body.push_str("<h2>Configuration</h2>");
    if config.is_empty() {
        body.push_str("<p>No configuration values.</p>");
    } else {
        body.push_str("<dl class=\"facts\">");
        for key in &config {
            let _ = write!(
                body,
                "<div><dt>{}</dt><dd class=\"masked\" title=\"value hidden\">••••••••</dd></div>",
                esc(key)
            );
        }
        body.push_str("</dl>");
    }
    body.push_str("<h2>Actions</h2><div class=\"actions\">");
    let n = esc(&q(&c.name));
    match c.state.as_str() {
        "active" => {
            let _ = write!(
                body,
                "<form method=\"post\" action=\"/console/connectors/{n}/disable\">{}<button type=\"submit\">Disable</button></form>",
                csrf_field(&viewer.csrf)
            );
        }
        "disabled" => {
            let _ = write!(
                body,
                "<form method=\"post\" action=\"/console/connectors/{n}/enable\">{}<button type=\"submit\">Enable</button></form>",
                csrf_field(&viewer.csrf)
            );
        }
        _ => {}
    }
    if c.deliveries.dead + c.deliveries.dropped > 0 {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/console/replay\">{}<input type=\"hidden\" name=\"connector\" value=\"{}\">\
             <button type=\"submit\">Replay all {} dead or dropped</button></form>",
            csrf_field(&viewer.csrf),
            esc(&c.name),
            c.deliveries.dead + c.deliveries.dropped
        );
    }
    let _ = write!(
        body,
        "<a class=\"button\" href=\"/console/deliveries?connector={n}&amp;status=dead\">Dead letters</a>\
         <a class=\"button\" href=\"/console/upload?name={n}\">Upload a new version…</a></div>"
    );
    Ok(Html(html::page(
        &format!("Connector {}", c.name),
        Nav::Connectors,
        &viewer.chrome(),
        &body,
    )))
}

#[derive(Deserialize)]
pub struct UploadParams {
    name: Option<String>,
}

/// The upload form: manifest and component.
pub async fn upload(viewer: Viewer, CQuery(params): CQuery<UploadParams>) -> Page {
    viewer
        .principal
        .authorize_global(Permission::ConnectorsManage)?;
    Ok(Html(upload_page(
        &viewer,
        params.name.as_deref().unwrap_or(""),
        None,
    )))
}

/// The upload form, with the host's refusal when there is one.
pub(super) fn upload_page(viewer: &Viewer, name: &str, refusal: Option<&str>) -> String {
    let mut body = String::new();
    if let Some(r) = refusal {
        let _ = write!(
            body,
            "<div class=\"error\" role=\"alert\"><p><strong>The host refused the upload:</strong></p><pre class=\"refusal\">{}</pre></div>",
            esc(r)
        );
    }
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/console/upload\" enctype=\"multipart/form-data\" class=\"card narrow\">{}\
         <label for=\"name\">Connector name</label><input id=\"name\" name=\"name\" value=\"{}\" required>\
         <label for=\"manifest\">Manifest (TOML)</label><input id=\"manifest\" name=\"manifest\" type=\"file\" accept=\".toml\" required>\
         <label for=\"component\">Component (.wasm; optional when replacing, the stored one is kept)</label>\
         <input id=\"component\" name=\"component\" type=\"file\" accept=\".wasm\">\
         <button type=\"submit\">Upload</button></form>",
        csrf_field(&viewer.csrf),
        esc(name)
    );
    html::page(
        "Upload a connector",
        Nav::Connectors,
        &viewer.chrome(),
        &body,
    )
}

// ---------------------------------------------------------------- deliveries

#[derive(Deserialize)]
pub struct DeliveryParams {
    status: Option<String>,
    connector: Option<String>,
    realm: Option<String>,
    session: Option<String>,
    cursor: Option<String>,
}

/// Deliveries (dead letters by default) with their attempts, errors and replay.
pub async fn deliveries(
    State(state): State<AppState>,
    viewer: Viewer,
    CQuery(params): CQuery<DeliveryParams>,
) -> Page {
    let now = Utc::now();
    viewer
        .principal
        .authorize_global(Permission::ConnectorsManage)?;
    let status_text = params.status.clone().unwrap_or_else(|| "dead".to_owned());
    let status = match status_text.as_str() {
        "" | "any" => None,
        s => Some(DeliveryStatus::parse(s).ok_or_else(|| {
            ApiError::Validation(format!(
                "status must be pending, delivered, dead or dropped, got {s:?}"
            ))
        })?),
    };
    let connector = given(&params.connector);
    let realm = given(&params.realm);
    let session = given(&params.session);
    if let Some(c) = &connector {
        rules::id("connector", c)?;
    }
    if let Some(r) = &realm {
        rules::realm(r)?;
    }
    if let Some(s) = &session {
        rules::id("session", s)?;
    }
    let after = cursor(params.cursor.as_deref())?;
    let rows = state
        .sessions
        .store()
        .list_deliveries(&DeliveryQuery {
            status,
            connector: connector.clone(),
            session: session.clone(),
            realm: realm.clone(),
            after,
            limit: PAGE + 1,
        })
        .await?;
    let (rows, next) = split_page(rows, PAGE as usize, |r| r.id);
    let next = next.map(|id| id.to_string());
    let mut body = String::from(
        "<form method=\"get\" action=\"/console/deliveries\" class=\"search\">\
         <div><label for=\"status\">Status</label><select id=\"status\" name=\"status\">",
    );
    for s in ["dead", "dropped", "pending", "delivered", "any"] {
        let sel = if s == status_text || (s == "any" && status.is_none()) {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option value=\"{s}\"{sel}>{s}</option>");
    }
    let _ = write!(
        body,
        "</select></div><div><label for=\"connector\">Connector</label><input id=\"connector\" name=\"connector\" value=\"{}\"></div>\
         <div><label for=\"drealm\">Realm</label><input id=\"drealm\" name=\"realm\" value=\"{}\"></div>\
         <div><label for=\"session\">Session</label><input id=\"session\" name=\"session\" value=\"{}\"></div>\
         <button type=\"submit\">Filter</button></form>",
        esc(connector.as_deref().unwrap_or("")),
        esc(realm.as_deref().unwrap_or("")),
        esc(session.as_deref().unwrap_or(""))
    );
    if let Some(c) = &connector {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/console/replay\" class=\"actions\">{}<input type=\"hidden\" name=\"connector\" value=\"{}\">\
             <button type=\"submit\">Replay every dead or dropped delivery of {}</button></form>",
            csrf_field(&viewer.csrf),
            esc(c),
            esc(c)
        );
    }
    if rows.is_empty() {
        body.push_str("<p>No delivery matches.</p>");
    } else {
        body.push_str(
            "<div class=\"scroll\"><table><caption>Deliveries</caption><thead><tr><th scope=\"col\">Id</th>\
             <th scope=\"col\">Connector</th><th scope=\"col\">Realm</th><th scope=\"col\">Session</th>\
             <th scope=\"col\">Event</th><th scope=\"col\">Status</th><th scope=\"col\">Attempts</th>\
             <th scope=\"col\">Last error</th><th scope=\"col\">Updated</th><th scope=\"col\">Action</th></tr></thead><tbody>",
        );
        for d in &rows {
            let action = if matches!(d.status.as_str(), "dead" | "dropped") {
                format!(
                    "<form method=\"post\" action=\"/console/replay\">{}<input type=\"hidden\" name=\"delivery_id\" value=\"{}\">\
                     <button type=\"submit\">Replay<span class=\"sr\"> delivery {}</span></button></form>",
                    csrf_field(&viewer.csrf),
                    d.id,
                    d.id
                )
            } else {
                String::new()
            };
            let _ = write!(
                body,
                "<tr><td><a href=\"/console/deliveries/{}\">{}</a></td><td>{}</td><td>{}</td>\
                 <td><a href=\"/console/tree?realm={}&amp;id={}\">{}</a></td><td>{}</td><td>{}</td>\
                 <td class=\"num\">{}</td><td class=\"err\">{}</td><td>{}</td><td>{}</td></tr>",
                d.id,
                d.id,
                esc(&d.connector),
                esc(&d.realm),
                esc(&q(&d.realm)),
                esc(&q(&d.external_id)),
                esc(&d.external_id),
                esc(&d.event_type),
                badge(&d.status),
                d.attempts,
                esc(d.last_error.as_deref().unwrap_or("")),
                html::time(ms(d.updated_at), now),
                action
            );
        }
        body.push_str("</tbody></table></div>");
    }
    let base = format!(
        "/console/deliveries?status={}&connector={}&realm={}&session={}",
        q(&status_text),
        q(connector.as_deref().unwrap_or("")),
        q(realm.as_deref().unwrap_or("")),
        q(session.as_deref().unwrap_or(""))
    );
    body.push_str(&html::pager(&base, next.as_deref(), after.is_none()));
    Ok(Html(html::page(
        "Deliveries",
        Nav::Deliveries,
        &viewer.chrome(),
        &body,
    )))
}

/// One delivery with every attempt.
pub async fn delivery(
    State(state): State<AppState>,
    viewer: Viewer,
    CPath(id): CPath<String>,
) -> Page {
    let now = Utc::now();
    viewer
        .principal
        .authorize_global(Permission::ConnectorsManage)?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::Validation(format!("delivery id {id:?} is not a number")))?;
    let (d, attempts) = crate::api::deliveries::find(&state, id).await?;
    let mut body = format!(
        "<dl class=\"facts\"><div><dt>Connector</dt><dd><a href=\"/console/connectors/{}\">{}</a></dd></div>\
         <div><dt>Session</dt><dd><a href=\"/console/tree?realm={}&amp;id={}\">{}</a> ({})</dd></div>\
         <div><dt>Event</dt><dd>{} <code>{}</code></dd></div><div><dt>Status</dt><dd>{}</dd></div>\
         <div><dt>Attempts</dt><dd>{}</dd></div><div><dt>Last error</dt><dd class=\"err\">{}</dd></div>\
         <div><dt>Created</dt><dd>{}</dd></div><div><dt>Delivered</dt><dd>{}</dd></div></dl>",
        esc(&q(&d.connector)),
        esc(&d.connector),
        esc(&q(&d.realm)),
        esc(&q(&d.external_id)),
        esc(&d.external_id),
        esc(&d.realm),
        esc(&d.event_type),
        esc(&d.event_id),
        badge(&d.status),
        d.attempts,
        esc(d.last_error.as_deref().unwrap_or("–")),
        html::time(ms(d.created_at), now),
        html::opt_time(d.delivered_at.map(ms), now)
    );
    if matches!(d.status.as_str(), "dead" | "dropped") {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/console/replay\" class=\"actions\">{}<input type=\"hidden\" name=\"delivery_id\" value=\"{}\">\
             <button type=\"submit\">Replay this delivery</button></form>",
            csrf_field(&viewer.csrf),
            d.id
        );
    }
    body.push_str(
        "<div class=\"scroll\"><table><caption>Attempts, oldest first</caption><thead><tr><th scope=\"col\">#</th>\
         <th scope=\"col\">Outcome</th><th scope=\"col\">Error</th><th scope=\"col\">Version</th>\
         <th scope=\"col\">Started</th><th scope=\"col\">Took</th></tr></thead><tbody>",
    );
    for a in &attempts {
        let _ = write!(
            body,
            "<tr><td class=\"num\">{}</td><td>{}</td><td class=\"err\">{}</td><td><code>{}</code></td><td>{}</td><td class=\"num\">{} ms</td></tr>",
            a.attempt,
            badge(&a.outcome),
            esc(a.error.as_deref().unwrap_or("")),
            esc(&short_version(a.connector_version.as_deref())),
            html::time(ms(a.started_at), now),
            a.finished_at - a.started_at
        );
    }
    body.push_str("</tbody></table></div>");
    Ok(Html(html::page(
        &format!("Delivery {id}"),
        Nav::Deliveries,
        &viewer.chrome(),
        &body,
    )))
}

// ---------------------------------------------------------------- audit

#[derive(Deserialize)]
pub struct AuditParams {
    realm: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    since: Option<String>,
    cursor: Option<String>,
}

fn parse_since(s: &str) -> Result<DateTime<Utc>, ConsoleError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    Err(ApiError::Validation(format!(
        "since {s:?} is not a time (YYYY-MM-DDTHH:MM, UTC, or RFC 3339)"
    ))
    .into())
}

/// The audit log, newest first, filtered by realm, actor, action and time.
pub async fn audit(
    State(state): State<AppState>,
    viewer: Viewer,
    CQuery(params): CQuery<AuditParams>,
) -> Page {
    use crate::store::audit::{AuditQuery, AuditScope};
    let now = Utc::now();
    let p = &viewer.principal;
    let realm = given(&params.realm);
    // As `/admin/audit`: a realm needs audit:read there, every realm needs it everywhere.
    let scope = match &realm {
        Some(r) => {
            p.authorize(r, Permission::AuditRead)?;
            rules::realm(r)?;
            AuditScope::Realm(r.clone())
        }
        None => {
            p.authorize_global(Permission::AuditRead)?;
            AuditScope::All
        }
    };
    let actor = given(&params.actor);
    let action = given(&params.action);
    rules::optional_id("actor", actor.as_deref())?;
    rules::optional_id("action", action.as_deref())?;
    let since = given(&params.since).map(|s| parse_since(&s)).transpose()?;
    let before = cursor(params.cursor.as_deref())?;
    let rows = state
        .sessions
        .store()
        .list_audit(&AuditQuery {
            scope,
            actor: actor.clone(),
            action: action.clone(),
            since_ms: since.map(|t| t.timestamp_millis()),
            before,
            limit: i64::from(PAGE) + 1,
        })
        .await?;
    let (rows, next) = split_page(rows, PAGE as usize, |r| r.id);
    let next = next.map(|id| id.to_string());
    let mut body = format!(
        "<form method=\"get\" action=\"/console/audit\" class=\"search\">\
         <div><label for=\"arealm\">Realm</label><input id=\"arealm\" name=\"realm\" value=\"{}\"></div>\
         <div><label for=\"actor\">Actor</label><input id=\"actor\" name=\"actor\" value=\"{}\" placeholder=\"key:portal\"></div>\
         <div><label for=\"action\">Action</label><input id=\"action\" name=\"action\" value=\"{}\" placeholder=\"destroy-parent\"></div>\
         <div><label for=\"since\">Since (UTC)</label><input id=\"since\" name=\"since\" type=\"datetime-local\" value=\"{}\"></div>\
         <button type=\"submit\">Filter</button></form>\
         <p class=\"actions\"><a class=\"button\" href=\"/console/receipts\">Receipt of a user…</a></p>",
        esc(realm.as_deref().unwrap_or("")),
        esc(actor.as_deref().unwrap_or("")),
        esc(action.as_deref().unwrap_or("")),
        esc(&since
            .map(|t| t.format("%Y-%m-%dT%H:%M").to_string())
            .unwrap_or_default())
    );
    if rows.is_empty() {
        body.push_str("<p>No record matches.</p>");
    } else {
        body.push_str(
            "<div class=\"scroll\"><table><caption>Audit records, newest first</caption><thead><tr>\
             <th scope=\"col\">When</th><th scope=\"col\">Realm</th><th scope=\"col\">Actor</th>\
             <th scope=\"col\">Action</th><th scope=\"col\">Target</th><th scope=\"col\">Result</th>\
             <th scope=\"col\">Changed</th><th scope=\"col\">Detail</th></tr></thead><tbody>",
        );
        for r in &rows {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td><code>{}</code></td></tr>",
                html::time(ms(r.at_ms), now),
                esc(r.realm.as_deref().unwrap_or("–")),
                esc(&r.actor),
                esc(&r.action),
                esc(r.target.as_deref().unwrap_or("–")),
                badge(&r.result),
                r.changed.map(|c| c.to_string()).unwrap_or_default(),
                esc(r.detail.as_deref().unwrap_or(""))
            );
        }
        body.push_str("</tbody></table></div>");
    }
    let base = format!(
        "/console/audit?realm={}&actor={}&action={}&since={}",
        q(realm.as_deref().unwrap_or("")),
        q(actor.as_deref().unwrap_or("")),
        q(action.as_deref().unwrap_or("")),
        q(&since.map(|t| t.to_rfc3339()).unwrap_or_default())
    );
    body.push_str(&html::pager(&base, next.as_deref(), before.is_none()));
    Ok(Html(html::page(
        "Audit log",
        Nav::Audit,
        &viewer.chrome(),
        &body,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_the_forms_a_browser_sends() {
        assert_eq!(
            parse_since("2026-12-04T10:30").unwrap().to_rfc3339(),
            "2026-12-04T10:30:00+00:00"
        );
        assert!(parse_since("2026-12-04T10:30:00Z").is_ok());
        assert!(parse_since("2026-12-04").is_ok());
        assert!(parse_since("yesterday").is_err());
    }

    #[test]
    fn cursors_are_numbers() {
        assert_eq!(cursor(Some("42")).unwrap(), Some(42));
        assert_eq!(cursor(Some("")).unwrap(), None);
        assert!(cursor(Some("x")).is_err());
    }
}
