//! `decorr study serve`: the rating pages and their JSON API, on axum.
//!
//! - `GET /rate/<token>`: the rating page (assets embedded in the binary, no CDN);
//!   `GET /assets/<file>`: its script and style.
//! - `GET /api/<token>/next`: the rater's first unanswered comparison,
//!   `{"item", "position", "prompt", "images": [{"slot", "url"}], "ratings", "done", "total"}`, or
//!   `{"finished": true, "done", "total"}`; `GET /api/<token>/item/<position>` the comparison at
//!   a position (1-based; for going back), with the ratings already given.
//! - `POST /api/<token>/answer` `{"item", "ratings": [{"slot", "alignment", "fidelity"}]}`: one
//!   rating per slot, integers 1..=5; committed to SQLite before the reply; a re-sent answer
//!   replaces the earlier one.
//! - `GET /img/<token>/<id>.png`: an image of one of the rater's comparisons.
//! - `GET /admin/<admin>`, `GET /api/admin/<admin>/progress`, `GET /admin/<admin>/export.csv`.
//!
//! Raters see random ids only; a wrong token is a plain 404, bad input a 4xx with a message
//! (`{"error": ...}`) and nothing stored.
//!
//! [`serve`] accepts connections itself (hyper's HTTP/1 server under axum's router) so that no
//! client can hold the server open: [`Limits`] bound the time to send a request's headers (idle
//! keep-alive connections included), the time to send the rest of a request, and the number of
//! open connections.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rusqlite::Connection;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::db::{self, IMAGES_DIR, Rating, Task};
use crate::{StudyError, bail};

/// Largest request body accepted (an answer is a few hundred bytes).
pub const BODY_LIMIT: usize = 16 * 1024;

const RATE_HTML: &str = include_str!("../assets/rate.html");
const ADMIN_HTML: &str = include_str!("../assets/admin.html");
const RATE_JS: &str = include_str!("../assets/rate.js");
const ADMIN_JS: &str = include_str!("../assets/admin.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");

/// What one client may hold of the server (`decorr study serve --header-timeout
/// --request-timeout --max-connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From a connection's start, or from the end of its previous response, until a request's
    /// headers are in: a connection that sends nothing, half a header or nothing more after a
    /// response is closed then.
    pub header_timeout: Duration,
    /// From a request's headers to its response (the body included): a body sent too slowly gets
    /// a 408 and the connection is closed.
    pub request_timeout: Duration,
    /// Connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
}

impl Default for Limits {
    /// A page loads in well under a second, and a browser opens up to 6 connections per rater:
    /// 10 s for headers (and idle keep-alive), 30 s per request, 512 connections.
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 512,
        }
    }
}

/// The server's state: one connection (SQLite serialises writers anyway), used off the async
/// threads.
#[derive(Clone)]
pub struct AppState {
    db: Arc<Mutex<Connection>>,
    images: PathBuf,
    admin: String,
}

/// Opens the study in `dir` for serving, refusing one whose image files are not all there (a
/// rater would meet the gap mid-study).
pub fn state(dir: &Path) -> Result<AppState, StudyError> {
    let conn = db::open(dir)?;
    let Some(admin) = db::meta(&conn, "admin_token")? else {
        bail!("{} has no admin token: not a complete study", dir.display());
    };
    let images = dir.join(IMAGES_DIR);
    check_images(&conn, &images)?;
    Ok(AppState {
        db: Arc::new(Mutex::new(conn)),
        images,
        admin,
    })
}

/// Every image the database lists is a file in `images`; else an error naming the missing ones.
fn check_images(conn: &Connection, images: &Path) -> Result<(), StudyError> {
    let listed = db::image_ids(conn)?;
    let missing: Vec<PathBuf> = listed
        .iter()
        .map(|id| images.join(format!("{id}.png")))
        .filter(|p| !p.is_file())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    const SHOWN: usize = 5;
    let mut names: Vec<String> = missing
        .iter()
        .take(SHOWN)
        .map(|p| p.display().to_string())
        .collect();
    if missing.len() > SHOWN {
        names.push(format!("and {} more", missing.len() - SHOWN));
    }
    bail!(
        "{} of the study's {} images are missing: {}; the study folder is incomplete: restore \
         {} from a copy of the study, or make the study again with `decorr study create`",
        missing.len(),
        listed.len(),
        names.join(", "),
        images.display()
    );
}

/// The links to print: one per rater (name, URL path) and the admin page's path.
pub fn links(dir: &Path) -> Result<(Vec<(String, String)>, String), StudyError> {
    let conn = db::open(dir)?;
    let raters = db::raters(&conn)?
        .into_iter()
        .map(|(name, token, _, _)| (name, format!("/rate/{token}")))
        .collect();
    let admin = db::meta(&conn, "admin_token")?.unwrap_or_default();
    Ok((raters, format!("/admin/{admin}")))
}

/// The router (for `serve` and for tests that bind their own listener).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/rate/{token}", get(rate_page))
        .route("/assets/{file}", get(asset))
        .route("/api/{token}/next", get(next))
        .route("/api/{token}/item/{position}", get(item_at))
        .route("/api/{token}/answer", post(answer))
        .route("/img/{token}/{file}", get(image))
        .route("/admin/{admin}", get(admin_page))
        .route("/api/admin/{admin}/progress", get(admin_progress))
        .route("/admin/{admin}/export.csv", get(export_csv))
        .fallback(|| async { not_found() })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Serves the study in `dir` on `addr` within `limits` until Ctrl-C; `ready` is called with the
/// bound address. The study is checked before anything is bound.
pub async fn serve(
    dir: &Path,
    addr: SocketAddr,
    limits: Limits,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), StudyError> {
    serve_until(dir, addr, limits, ready, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}

/// [`serve`] until `shutdown` completes; then idle connections close at once and requests in
/// flight get [`SHUTDOWN_GRACE`] to finish (an unacknowledged answer is not lost: its commit is
/// whole or absent, and its rater sends it again).
async fn serve_until(
    dir: &Path,
    addr: SocketAddr,
    limits: Limits,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StudyError> {
    if limits.max_connections == 0 || limits.header_timeout.is_zero() {
        bail!("the server needs at least one connection and a header timeout above zero");
    }
    if limits.request_timeout.is_zero() {
        bail!("the server needs a request timeout above zero");
    }
    let app = router(state(dir)?).layer(middleware::from_fn_with_state(
        limits.request_timeout,
        time_limit,
    ));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        StudyError::Msg(format!(
            "cannot listen on {addr}: {e} (another server on that port? choose --port)"
        ))
    })?;
    ready(listener.local_addr()?);

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        let stream = match stream {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted: wait a
                // little instead of spinning, and keep serving.
                log::warn!("study server: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Full: say so without waiting on the client (a write that does not fit the
            // socket's fresh buffer is dropped), then close.
            let _ = stream.try_write(BUSY);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                log::debug!("study server: connection closed: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    let grace = SHUTDOWN_GRACE.min(limits.request_timeout);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        log::warn!("study server: closing connections still open after {grace:?}");
    }
    Ok(())
}

/// How long Ctrl-C waits for requests in flight (an answer commits in milliseconds; a client
/// still sending its headers is not waited for longer).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// The reply to a connection over `Limits::max_connections`.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
    retry-after: 5\r\nconnection: close\r\ncontent-length: 42\r\n\r\n\
    the server is busy; try again in a moment\n";

/// Bounds a request from its headers to its response: a client sending its body slowly gets a
/// 408 instead of holding the connection.
async fn time_limit(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            let mut r = bad(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request was not complete within {} s; send it again",
                    limit.as_secs_f64()
                ),
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found").into_response()
}

fn bad(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": msg.into() }))).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    log::error!("study server: {e}");
    bad(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error; see the server's log",
    )
}

/// Headers every page gets: no referrer (the token is in the URL), no sniffing, nothing from
/// elsewhere, no caching of a rater's state.
fn with_headers(mut r: Response, content_type: &'static str) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; img-src 'self'; frame-ancestors 'none'"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Runs `f` on the database off the async threads.
async fn with_db<T: Send + 'static>(
    s: &AppState,
    f: impl FnOnce(&mut Connection) -> Result<T, StudyError> + Send + 'static,
) -> Result<T, Response> {
    let db = s.db.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = db.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    })
    .await
    .map_err(internal)?
    .map_err(internal)
}

/// Whether `s` has the form of the study's random ids (32 hex digits, `create::random_token`):
/// anything else is answered without touching the database.
fn is_token(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The rater behind `token`, or a plain 404.
async fn rater(s: &AppState, token: String) -> Result<i64, Response> {
    if !is_token(&token) {
        return Err(not_found());
    }
    with_db(s, move |c| db::rater_of(c, &token))
        .await?
        .ok_or_else(not_found)
}

async fn rate_page(State(s): State<AppState>, UrlPath(token): UrlPath<String>) -> Response {
    match rater(&s, token).await {
        Ok(_) => with_headers(RATE_HTML.into_response(), "text/html; charset=utf-8"),
        Err(r) => r,
    }
}

async fn admin_page(State(s): State<AppState>, UrlPath(admin): UrlPath<String>) -> Response {
    if admin != s.admin {
        return not_found();
    }
    with_headers(ADMIN_HTML.into_response(), "text/html; charset=utf-8")
}

async fn asset(UrlPath(file): UrlPath<String>) -> Response {
    let (body, ty) = match file.as_str() {
        "rate.js" => (RATE_JS, "text/javascript; charset=utf-8"),
        "admin.js" => (ADMIN_JS, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        _ => return not_found(),
    };
    with_headers(body.into_response(), ty)
}

/// The label of slot `i` (0-based), as spreadsheet columns go: A..Z, then AA, AB, ..., AZ, BA, ...
/// so that a study of more than 26 methods still has one name per slot.
pub fn slot_name(i: usize) -> String {
    let mut name = Vec::new();
    let mut n = i + 1;
    while n > 0 {
        n -= 1;
        name.push(b'A' + (n % 26) as u8);
        n /= 26;
    }
    name.reverse();
    String::from_utf8(name).expect("ASCII")
}

/// The JSON of a task for `token`'s rater.
fn task_json(token: &str, t: &Task, ratings: &[Rating], done: i64, total: i64) -> Value {
    json!({
        "item": t.public_id,
        "position": t.position,
        "prompt": t.prompt,
        "images": t.images.iter().enumerate().map(|(i, id)| json!({
            "slot": slot_name(i),
            "url": format!("/img/{token}/{id}.png"),
        })).collect::<Vec<_>>(),
        "ratings": ratings.iter().map(|r| json!({
            "slot": slot_name(r.slot),
            "alignment": r.alignment,
            "fidelity": r.fidelity,
        })).collect::<Vec<_>>(),
        "done": done,
        "total": total,
    })
}

fn json_response(v: Value) -> Response {
    with_headers(axum::Json(v).into_response(), "application/json")
}

async fn next(State(s): State<AppState>, UrlPath(token): UrlPath<String>) -> Response {
    let id = match rater(&s, token.clone()).await {
        Ok(id) => id,
        Err(r) => return r,
    };
    let r = with_db(&s, move |c| {
        let (total, done) = db::progress(c, id)?;
        Ok(match db::next_task(c, id)? {
            Some(t) => task_json(&token, &t, &db::ratings(c, t.id)?, done, total),
            None => json!({ "finished": true, "done": done, "total": total }),
        })
    })
    .await;
    match r {
        Ok(v) => json_response(v),
        Err(r) => r,
    }
}

async fn item_at(
    State(s): State<AppState>,
    UrlPath((token, position)): UrlPath<(String, String)>,
) -> Response {
    let id = match rater(&s, token.clone()).await {
        Ok(id) => id,
        Err(r) => return r,
    };
    let Ok(position) = position.parse::<i64>() else {
        return bad(
            StatusCode::BAD_REQUEST,
            "the position must be a number (1, 2, ...)",
        );
    };
    let r = with_db(&s, move |c| {
        let (total, done) = db::progress(c, id)?;
        Ok(match db::task_at(c, id, position)? {
            Some(t) => Some(task_json(&token, &t, &db::ratings(c, t.id)?, done, total)),
            None => None,
        })
    })
    .await;
    match r {
        Ok(Some(v)) => json_response(v),
        Ok(None) => bad(StatusCode::NOT_FOUND, "no comparison at that position"),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerIn {
    item: String,
    ratings: Vec<RatingIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RatingIn {
    slot: String,
    alignment: Value,
    fidelity: Value,
}

/// A 1..=5 integer, or the message saying what is wrong with `v`.
fn score(v: &Value, what: &str, slot: &str) -> Result<u8, String> {
    match v.as_u64() {
        Some(n @ 1..=5) if v.is_u64() => Ok(n as u8),
        _ => Err(format!(
            "slot {slot}: {what} must be an integer from 1 to 5, got {v}"
        )),
    }
}

async fn answer(
    State(s): State<AppState>,
    UrlPath(token): UrlPath<String>,
    body: Bytes,
) -> Response {
    let id = match rater(&s, token).await {
        Ok(id) => id,
        Err(r) => return r,
    };
    let parsed: AnswerIn = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return bad(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body must be JSON {{\"item\": ID, \"ratings\": [{{\"slot\": \"A\", \
                     \"alignment\": 1..5, \"fidelity\": 1..5}}, ...]}}: {e}"
                ),
            );
        }
    };
    let r = with_db(&s, move |c| {
        let Some(task) = db::task_by_public(c, id, &parsed.item)? else {
            return Ok(Err((
                StatusCode::NOT_FOUND,
                format!(
                    "item {:?} is not one of this rater's comparisons",
                    parsed.item
                ),
            )));
        };
        let n = task.images.len();
        let mut ratings: Vec<Option<Rating>> = vec![None; n];
        for r in &parsed.ratings {
            let Some(slot) = (0..n).find(|&i| slot_name(i) == r.slot) else {
                return Ok(Err((
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "slot {:?} is not in this comparison (its slots: {})",
                        r.slot,
                        (0..n).map(slot_name).collect::<Vec<_>>().join(", ")
                    ),
                )));
            };
            let scores = score(&r.alignment, "alignment", &r.slot)
                .and_then(|a| Ok((a, score(&r.fidelity, "fidelity", &r.slot)?)));
            let (alignment, fidelity) = match scores {
                Ok(v) => v,
                Err(m) => return Ok(Err((StatusCode::UNPROCESSABLE_ENTITY, m))),
            };
            if ratings[slot].is_some() {
                return Ok(Err((
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("slot {} is rated twice", r.slot),
                )));
            }
            ratings[slot] = Some(Rating {
                slot,
                alignment,
                fidelity,
            });
        }
        let missing: Vec<String> = (0..n)
            .filter(|&i| ratings[i].is_none())
            .map(slot_name)
            .collect();
        if !missing.is_empty() {
            return Ok(Err((
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "every image needs both ratings; missing: {}",
                    missing.join(", ")
                ),
            )));
        }
        let ratings: Vec<Rating> = ratings.into_iter().flatten().collect();
        db::save_answer(c, task.id, &ratings)?;
        let (total, done) = db::progress(c, id)?;
        Ok(Ok(json!({ "ok": true, "done": done, "total": total })))
    })
    .await;
    match r {
        Ok(Ok(v)) => json_response(v),
        Ok(Err((status, msg))) => bad(status, msg),
        Err(r) => r,
    }
}

async fn image(
    State(s): State<AppState>,
    UrlPath((token, file)): UrlPath<(String, String)>,
) -> Response {
    let id = match rater(&s, token).await {
        Ok(id) => id,
        Err(r) => return r,
    };
    let Some(public) = file.strip_suffix(".png") else {
        return not_found();
    };
    if !is_token(public) {
        return not_found();
    }
    let public = public.to_string();
    let (p, dir) = (public.clone(), s.images.clone());
    let path = dir.join(format!("{public}.png"));
    match with_db(&s, move |c| db::rater_sees_image(c, id, &p)).await {
        Ok(true) => match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let mut r = with_headers(bytes.into_response(), "image/png");
                r.headers_mut().insert(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("private, max-age=3600"),
                );
                r
            }
            // Checked at start, so removed since: the log names the file, the rater gets a
            // message (not the path, which is the server's business).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                log::error!(
                    "study server: the image {} is missing (removed while serving?); restore it \
                     from a copy of the study",
                    path.display()
                );
                bad(
                    StatusCode::NOT_FOUND,
                    "this image is missing on the server; please tell the study's organiser",
                )
            }
            Err(e) => internal(format!("reading the image {}: {e}", path.display())),
        },
        Ok(false) => not_found(),
        Err(r) => r,
    }
}

async fn admin_progress(State(s): State<AppState>, UrlPath(admin): UrlPath<String>) -> Response {
    if admin != s.admin {
        return not_found();
    }
    let r = with_db(&s, |c| {
        let raters = db::raters(c)?
            .into_iter()
            .map(|(name, token, done, total)| {
                json!({ "name": name, "link": format!("/rate/{token}"), "done": done, "total": total })
            })
            .collect::<Vec<_>>();
        Ok(json!({ "raters": raters, "methods": db::method_names(c)? }))
    })
    .await;
    match r {
        Ok(v) => json_response(v),
        Err(r) => r,
    }
}

/// Every answer as CSV (the admin's export: methods named, one row per rated image).
pub fn answers_csv(conn: &Connection) -> Result<String, StudyError> {
    let mut out = String::from(
        "rater,position,item,pair,prompt,seed,repeat,slot,method,alignment,fidelity,answered_at\n",
    );
    for a in db::answers(conn)? {
        out.push_str(
            &[
                crate::csv_cell(&a.rater),
                a.position.to_string(),
                a.item.to_string(),
                crate::csv_cell(&a.pair),
                crate::csv_cell(&a.prompt),
                a.seed.to_string(),
                u8::from(a.is_repeat).to_string(),
                slot_name(a.slot),
                crate::csv_cell(&a.method),
                a.alignment.to_string(),
                a.fidelity.to_string(),
                a.answered_at.clone(),
            ]
            .join(","),
        );
        out.push('\n');
    }
    Ok(out)
}

async fn export_csv(State(s): State<AppState>, UrlPath(admin): UrlPath<String>) -> Response {
    if admin != s.admin {
        return not_found();
    }
    match with_db(&s, |c| answers_csv(c)).await {
        Ok(csv) => {
            let mut r = with_headers(csv.into_response(), "text/csv; charset=utf-8");
            r.headers_mut().insert(
                header::CONTENT_DISPOSITION,
                HeaderValue::from_static("attachment; filename=\"answers.csv\""),
            );
            r
        }
        Err(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_named_as_spreadsheet_columns_one_name_each() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 51, 52, 701, 702]
            .iter()
            .map(|&i| slot_name(i))
            .collect();
        assert_eq!(names, ["A", "B", "Z", "AA", "AB", "AZ", "BA", "ZZ", "AAA"]);
        let many: std::collections::BTreeSet<String> = (0..2000).map(slot_name).collect();
        assert_eq!(many.len(), 2000, "a name repeats");
    }

    #[test]
    fn the_busy_reply_is_a_complete_response() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{text}"
        );
    }
}
