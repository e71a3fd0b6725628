//! The captioning client against a real HTTP server (tiny_http on 127.0.0.1:0) that speaks the
//! OpenAI chat-completions format: it checks each request's shape, answers from the request's
//! content (the PNG's colour, the object in the question), records how many requests it got and
//! how many were in flight at once, and misbehaves on script (429 + Retry-After, 500, a reply
//! slower than the client's timeout, malformed JSON, 400 with an error body).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use decorr_eval::EvalError;
use decorr_eval::captioner::{Answer, Captioner, CaptionerConfig, ImageInput};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const MODEL: &str = "test-vlm";
const KEY: &str = "sk-test";
const INSTRUCTION: &str = "Caption this, please.";

/// What the server does with one request.
#[derive(Clone)]
enum Behaviour {
    /// Answer properly.
    Normal,
    /// Reply with this status, optional Retry-After, and body.
    Status(u16, Option<&'static str>, &'static str),
    /// Reply 200 with this (malformed) body.
    Raw(&'static str),
    /// Answer properly, but only after this long.
    Slow(Duration),
}

#[derive(Default)]
struct State {
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Behaviour of the next requests, in arrival order; `Normal` once empty.
    script: Mutex<VecDeque<Behaviour>>,
    /// Delay of every normal answer (to make requests overlap).
    delay: Mutex<Duration>,
    /// Arrival time of each request.
    arrivals: Mutex<Vec<Instant>>,
    /// sha256 of each decoded image, and the prompt text, per request.
    seen: Mutex<Vec<(String, String)>>,
    /// Problems with request shapes (asserted empty by the tests: a panic in the server thread
    /// would not fail the test).
    problems: Mutex<Vec<String>>,
}

struct MockServer {
    url: String,
    state: Arc<State>,
    server: Arc<tiny_http::Server>,
    accept: Option<JoinHandle<()>>,
}

impl MockServer {
    fn start() -> MockServer {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let state = Arc::new(State::default());
        let accept = {
            let (server, state) = (server.clone(), state.clone());
            std::thread::spawn(move || {
                for rq in server.incoming_requests() {
                    let state = state.clone();
                    std::thread::spawn(move || handle(rq, &state));
                }
            })
        };
        MockServer {
            url: format!("http://127.0.0.1:{port}/v1"),
            state,
            server,
            accept: Some(accept),
        }
    }

    fn script(&self, items: impl IntoIterator<Item = Behaviour>) {
        self.state.script.lock().unwrap().extend(items);
    }

    fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    fn assert_no_problems(&self) {
        let p = self.state.problems.lock().unwrap();
        assert!(p.is_empty(), "malformed requests: {p:#?}");
    }

    fn config(&self) -> CaptionerConfig {
        CaptionerConfig {
            url: self.url.clone(),
            model: MODEL.into(),
            api_key: Some(KEY.into()),
            caption_instruction: INSTRUCTION.into(),
            max_tokens: 40,
            timeout: Duration::from_secs(5),
            retries: 3,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(3),
            concurrency: 2,
            ..Default::default()
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn problem(state: &State, p: String) {
    state.problems.lock().unwrap().push(p);
}

/// Checks the request against the chat-completions shape and answers it.
fn handle(mut rq: tiny_http::Request, state: &State) {
    state.requests.fetch_add(1, Ordering::SeqCst);
    state.arrivals.lock().unwrap().push(Instant::now());
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let behaviour = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Behaviour::Normal);

    let mut body = String::new();
    rq.as_reader().read_to_string(&mut body).unwrap();
    if rq.method() != &tiny_http::Method::Post || rq.url() != "/v1/chat/completions" {
        problem(state, format!("{} {}", rq.method(), rq.url()));
    }
    let auth = rq
        .headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))
        .map(|h| h.value.as_str().to_string());
    if auth.as_deref() != Some(&format!("Bearer {KEY}")) {
        problem(state, format!("Authorization header {auth:?}"));
    }
    let answer = answer_for(&body, state);

    let (status, headers, text) = match behaviour {
        Behaviour::Normal | Behaviour::Slow(_) => {
            let wait = match behaviour {
                Behaviour::Slow(d) => d,
                _ => *state.delay.lock().unwrap(),
            };
            std::thread::sleep(wait);
            let reply = json!({
                "id": "x", "object": "chat.completion", "model": MODEL,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": answer}}],
            });
            (200, None, reply.to_string())
        }
        Behaviour::Status(code, retry_after, body) => (code, retry_after, body.to_string()),
        Behaviour::Raw(body) => (200, None, body.to_string()),
    };
    // Leave the in-flight window before the client can see the reply, so the count never
    // includes a request the client already considers done.
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut resp = tiny_http::Response::from_string(text)
        .with_status_code(status)
        .with_header(tiny_http::Header::from_bytes("Content-Type", "application/json").unwrap());
    if let Some(ra) = headers {
        resp = resp.with_header(tiny_http::Header::from_bytes("Retry-After", ra).unwrap());
    }
    // The client may have given up (timeout); a failed write is fine then.
    let _ = rq.respond(resp);
}

/// The answer a VLM would give: a caption naming the PNG's colour, or for a question "yes" when
/// the red channel is even, "no" otherwise (a JPEG gets "a photo" / "yes").
fn answer_for(body: &str, state: &State) -> String {
    let v: Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(e) => {
            problem(state, format!("body is not JSON: {e}"));
            return String::new();
        }
    };
    let check = |ok: bool, what: &str| {
        if !ok {
            problem(state, format!("{what}: {v}"));
        }
    };
    check(v["model"] == MODEL, "model");
    check(v["max_tokens"] == 40, "max_tokens");
    check(v["temperature"].as_f64() == Some(0.0), "temperature");
    check(
        v["messages"].as_array().map(Vec::len) == Some(1),
        "one message",
    );
    check(v["messages"][0]["role"] == "user", "role");
    let content = &v["messages"][0]["content"];
    check(content[0]["type"] == "text", "text part");
    check(content[1]["type"] == "image_url", "image part");
    let text = content[0]["text"].as_str().unwrap_or("").to_string();
    let url = content[1]["image_url"]["url"].as_str().unwrap_or("");
    let Some((mime, b64)) = url
        .strip_prefix("data:")
        .and_then(|u| u.split_once(";base64,"))
    else {
        problem(state, format!("not a base64 data URL: {url:.40}"));
        return String::new();
    };
    let bytes = match base64::engine::general_purpose::STANDARD.decode(b64) {
        Ok(b) => b,
        Err(e) => {
            problem(state, format!("bad base64: {e}"));
            return String::new();
        }
    };
    state
        .seen
        .lock()
        .unwrap()
        .push((sha_hex(&bytes), text.clone()));
    let red = match mime {
        "image/png" => match image::load_from_memory_with_format(&bytes, image::ImageFormat::Png) {
            Ok(img) => Some(img.to_rgb8().get_pixel(0, 0).0[0]),
            Err(e) => {
                problem(state, format!("image/png that is not a PNG: {e}"));
                return String::new();
            }
        },
        "image/jpeg" => None,
        other => {
            problem(state, format!("mime {other}"));
            return String::new();
        }
    };
    if text == INSTRUCTION {
        match red {
            Some(r) => format!("A square of red level {r}."),
            None => "A photo.".into(),
        }
    } else if let Some(object) = text
        .strip_prefix("Is there ")
        .and_then(|t| t.strip_suffix(" in this image? Answer yes or no."))
    {
        match red {
            Some(r) if r % 2 == 1 => "No.".into(),
            _ => format!("Yes, there is {object}."),
        }
    } else {
        problem(state, format!("unexpected prompt {text:?}"));
        String::new()
    }
}

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A 2×2 PNG whose red channel is `red`.
fn png(red: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(2, 2, image::Rgb([red, 10, 20]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn pngs(n: usize) -> Vec<ImageInput> {
    (0..n)
        .map(|i| ImageInput::from_bytes(png(i as u8)))
        .collect()
}

fn expected_caption(i: usize) -> String {
    format!("A square of red level {i}.")
}

#[test]
fn captions_and_answers_follow_the_requests() {
    let srv = MockServer::start();
    let dir = tempfile::tempdir().unwrap();
    // Files on disk (one a JPEG, sent as image/jpeg) and bytes in memory.
    let mut images = Vec::new();
    for i in 0..3u8 {
        let p = dir.path().join(format!("{i}.png"));
        std::fs::write(&p, png(i)).unwrap();
        images.push(ImageInput::from_path(&p));
    }
    let jpeg: Vec<u8> = [0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3, 4].to_vec();
    let jpeg_path = dir.path().join("photo.jpg");
    std::fs::write(&jpeg_path, &jpeg).unwrap();
    images.push(ImageInput::from_path(&jpeg_path));
    images.push(ImageInput::from_bytes(png(4)));
    images.push(ImageInput::from_path_and_bytes("named.png", png(5)));

    let cap = Captioner::new(srv.config(), None).unwrap();
    let captions = cap.caption_all(&images).unwrap();
    srv.assert_no_problems();
    assert_eq!(srv.requests(), 6);
    for (i, c) in captions.iter().enumerate() {
        let want = if i == 3 {
            "A photo.".to_string()
        } else {
            expected_caption(i)
        };
        assert_eq!(c, &want, "caption {i}");
    }
    // The server decoded exactly the bytes we sent, with the instruction as text.
    let mut sent: Vec<String> = (0..3u8).map(|i| sha_hex(&png(i))).collect();
    sent.extend([sha_hex(&jpeg), sha_hex(&png(4)), sha_hex(&png(5))]);
    let mut seen: Vec<(String, String)> = srv.state.seen.lock().unwrap().clone();
    assert!(seen.iter().all(|(_, t)| t == INSTRUCTION));
    let mut seen_shas: Vec<String> = seen.drain(..).map(|(s, _)| s).collect();
    seen_shas.sort();
    sent.sort();
    assert_eq!(seen_shas, sent);

    // Yes/no questions, with the article added when the object has none.
    let queries: Vec<(ImageInput, String)> = vec![
        (ImageInput::from_bytes(png(2)), "train".into()),
        (ImageInput::from_bytes(png(3)), "train".into()),
        (ImageInput::from_bytes(png(2)), "an apple".into()),
        (ImageInput::from_bytes(png(2)), "umbrella".into()),
    ];
    let answers = cap.ask_all(&queries).unwrap();
    srv.assert_no_problems();
    assert_eq!(
        answers,
        vec![Answer::Yes, Answer::No, Answer::Yes, Answer::Yes]
    );
    let prompts: Vec<String> = srv
        .state
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, t)| t.clone())
        .collect();
    for q in [
        "Is there a train in this image? Answer yes or no.",
        "Is there an apple in this image? Answer yes or no.",
        "Is there an umbrella in this image? Answer yes or no.",
    ] {
        assert!(
            prompts.iter().any(|p| p == q),
            "{q:?} not asked; asked {prompts:?}"
        );
    }
    assert_eq!(srv.requests(), 10);
}

#[test]
fn endpoint_url_may_include_the_path() {
    let srv = MockServer::start();
    let cfg = CaptionerConfig {
        url: format!("{}/chat/completions/", srv.url),
        ..srv.config()
    };
    let cap = Captioner::new(cfg, None).unwrap();
    assert_eq!(
        cap.caption(&ImageInput::from_bytes(png(7))).unwrap(),
        expected_caption(7)
    );
    srv.assert_no_problems();
}

#[test]
fn retry_after_is_honoured_on_429() {
    let srv = MockServer::start();
    srv.script([Behaviour::Status(
        429,
        Some("1"),
        r#"{"error":{"message":"slow down"}}"#,
    )]);
    let cap = Captioner::new(srv.config(), None).unwrap();
    assert_eq!(
        cap.caption(&ImageInput::from_bytes(png(1))).unwrap(),
        expected_caption(1)
    );
    assert_eq!(srv.requests(), 2);
    let t = srv.state.arrivals.lock().unwrap().clone();
    let gap = t[1] - t[0];
    // The backoff alone would be 20 ms; the server asked for 1 s.
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
    assert!(gap < Duration::from_millis(2500), "retried after {gap:?}");
}

#[test]
fn retry_after_is_capped_by_max_backoff() {
    let srv = MockServer::start();
    srv.script([Behaviour::Status(503, Some("120"), "busy")]);
    let cfg = CaptionerConfig {
        max_backoff: Duration::from_millis(200),
        ..srv.config()
    };
    let cap = Captioner::new(cfg, None).unwrap();
    let start = Instant::now();
    assert_eq!(
        cap.caption(&ImageInput::from_bytes(png(1))).unwrap(),
        expected_caption(1)
    );
    assert_eq!(srv.requests(), 2);
    assert!(start.elapsed() < Duration::from_secs(2));
    let t = srv.state.arrivals.lock().unwrap().clone();
    assert!(
        t[1] - t[0] >= Duration::from_millis(190),
        "{:?}",
        t[1] - t[0]
    );
}

#[test]
fn server_error_is_retried_with_doubling_backoff() {
    let srv = MockServer::start();
    srv.script([
        Behaviour::Status(500, None, "oops"),
        Behaviour::Status(502, None, "oops"),
    ]);
    let cfg = CaptionerConfig {
        initial_backoff: Duration::from_millis(100),
        ..srv.config()
    };
    let cap = Captioner::new(cfg, None).unwrap();
    assert_eq!(
        cap.caption(&ImageInput::from_bytes(png(3))).unwrap(),
        expected_caption(3)
    );
    assert_eq!(srv.requests(), 3);
    let t = srv.state.arrivals.lock().unwrap().clone();
    assert!(
        t[1] - t[0] >= Duration::from_millis(95),
        "{:?}",
        t[1] - t[0]
    );
    assert!(
        t[2] - t[1] >= Duration::from_millis(195),
        "{:?}",
        t[2] - t[1]
    );
}

#[test]
fn persistent_server_errors_give_up_with_a_clear_error() {
    let srv = MockServer::start();
    srv.script(std::iter::repeat_n(
        Behaviour::Status(500, None, r#"{"error":{"message":"CUDA out of memory"}}"#),
        10,
    ));
    let cfg = CaptionerConfig {
        retries: 2,
        ..srv.config()
    };
    let cap = Captioner::new(cfg, None).unwrap();
    let err = cap.caption(&ImageInput::from_bytes(png(3))).unwrap_err();
    assert_eq!(srv.requests(), 3);
    let EvalError::Http { url, message } = &err else {
        panic!("expected Http, got {err:?}")
    };
    assert_eq!(url, &format!("{}/chat/completions", srv.url));
    for part in ["3 attempts", "HTTP 500", "CUDA out of memory", "--captions"] {
        assert!(message.contains(part), "{part:?} missing in {message}");
    }
}

#[test]
fn slow_reply_times_out_and_is_retried() {
    let srv = MockServer::start();
    srv.script([Behaviour::Slow(Duration::from_millis(1500))]);
    let cfg = CaptionerConfig {
        timeout: Duration::from_millis(400),
        ..srv.config()
    };
    let cap = Captioner::new(cfg, None).unwrap();
    let start = Instant::now();
    assert_eq!(
        cap.caption(&ImageInput::from_bytes(png(5))).unwrap(),
        expected_caption(5)
    );
    let took = start.elapsed();
    assert_eq!(srv.requests(), 2);
    // Did not wait for the slow reply.
    assert!(took < Duration::from_millis(1400), "took {took:?}");
    assert!(took >= Duration::from_millis(400), "took {took:?}");
}

#[test]
fn malformed_reply_is_bad_reply_without_retry() {
    // A 200 with the wrong shape is not retried: the same server would answer the same way.
    for (body, needle) in [
        (
            r#"{"choices":[{"message":{"role":"assistant"}}]}"#,
            "choices[0].message.content",
        ),
        (r#"{"choices":[]}"#, "`choices` is empty"),
        ("<html>not json</html>", "not JSON"),
    ] {
        let srv = MockServer::start();
        srv.script([Behaviour::Raw(body)]);
        let cap = Captioner::new(srv.config(), None).unwrap();
        let err = cap.caption(&ImageInput::from_bytes(png(1))).unwrap_err();
        let EvalError::BadReply { message, .. } = &err else {
            panic!("expected BadReply for {body}, got {err:?}")
        };
        assert!(message.contains(needle), "{needle:?} missing in {message}");
        assert_eq!(srv.requests(), 1, "{body}");
    }
}

#[test]
fn client_error_is_not_retried_and_stops_the_batch() {
    let srv = MockServer::start();
    // Only the first request fails; the others would succeed (slowly), so a client that kept
    // going after the failure would send all 12.
    srv.script([Behaviour::Status(
        400,
        None,
        r#"{"error":{"message":"model 'test-vlm' does not support images"}}"#,
    )]);
    *srv.state.delay.lock().unwrap() = Duration::from_millis(150);
    let cfg = CaptionerConfig {
        concurrency: 2,
        ..srv.config()
    };
    let cap = Captioner::new(cfg, None).unwrap();
    let err = cap.caption_all(&pngs(12)).unwrap_err();
    let EvalError::Http { message, .. } = &err else {
        panic!("expected Http, got {err:?}")
    };
    assert!(message.contains("HTTP 400"), "{message}");
    assert!(message.contains("does not support images"), "{message}");
    // No retry of the 400 and no new image after it: the other worker finishes the request it
    // has in flight and stops.
    assert!(srv.requests() <= 2, "{} requests", srv.requests());
}

#[test]
fn answers_before_a_fatal_error_stay_cached() {
    let srv = MockServer::start();
    srv.script([
        Behaviour::Normal,
        Behaviour::Normal,
        Behaviour::Status(401, None, r#"{"error":"bad key"}"#),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("sub/cache.jsonl");
    let cfg = CaptionerConfig {
        concurrency: 1,
        ..srv.config()
    };
    let images = pngs(6);
    let err = Captioner::new(cfg.clone(), Some(&cache))
        .unwrap()
        .caption_all(&images)
        .unwrap_err();
    assert!(err.to_string().contains("OPENAI_API_KEY"), "{err}");
    assert_eq!(srv.requests(), 3);
    assert_eq!(lines(&cache).len(), 2);
    // Resuming asks only for the 4 missing ones.
    let captions = Captioner::new(cfg, Some(&cache))
        .unwrap()
        .caption_all(&images)
        .unwrap();
    assert_eq!(srv.requests(), 7);
    assert_eq!(captions, (0..6).map(expected_caption).collect::<Vec<_>>());
}

#[test]
fn unreachable_endpoint_is_a_clear_http_error() {
    // A port nothing listens on: bind, note the port, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = CaptionerConfig {
        url: format!("http://127.0.0.1:{port}/v1"),
        model: MODEL.into(),
        retries: 2,
        initial_backoff: Duration::from_millis(10),
        ..Default::default()
    };
    let cap = Captioner::new(cfg, None).unwrap();
    let start = Instant::now();
    let err = cap.caption(&ImageInput::from_bytes(png(0))).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(3));
    let EvalError::Http { url, message } = &err else {
        panic!("expected Http, got {err:?}")
    };
    assert!(url.contains(&port.to_string()), "{url}");
    let lower = message.to_lowercase();
    assert!(lower.contains("refused"), "{message}");
    assert!(lower.contains("server running"), "{message}");
    assert!(message.contains("3 attempts"), "{message}");
    assert_eq!(cap.requests_sent(), 3);
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn cache_resumes_without_asking_again() {
    let srv = MockServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("answers.jsonl");
    let images = pngs(8);
    let want: Vec<String> = (0..8).map(expected_caption).collect();

    let first = Captioner::new(srv.config(), Some(&cache))
        .unwrap()
        .caption_all(&images)
        .unwrap();
    assert_eq!(first, want);
    assert_eq!(srv.requests(), 8);
    let recs: Vec<Value> = lines(&cache)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 8);
    for r in &recs {
        assert_eq!(r["kind"], "caption");
        assert_eq!(r["model"], MODEL);
        assert_eq!(r["prompt"], INSTRUCTION);
        assert_eq!(r["key"].as_str().unwrap().len(), 64);
    }

    // A fresh client on the same cache: nothing new is asked.
    let again = Captioner::new(srv.config(), Some(&cache))
        .unwrap()
        .caption_all(&images)
        .unwrap();
    assert_eq!(again, want);
    assert_eq!(srv.requests(), 8);

    // Drop every other line: exactly those are asked again.
    let kept: Vec<String> = lines(&cache).into_iter().step_by(2).collect();
    std::fs::write(&cache, kept.join("\n") + "\n").unwrap();
    let resumed = Captioner::new(srv.config(), Some(&cache))
        .unwrap()
        .caption_all(&images)
        .unwrap();
    assert_eq!(resumed, want);
    assert_eq!(srv.requests(), 12);
    assert_eq!(lines(&cache).len(), 8);

    // A different model or instruction is a different question.
    let other = CaptionerConfig {
        caption_instruction: INSTRUCTION.to_string(),
        model: "other".into(),
        ..srv.config()
    };
    // (The mock insists on MODEL, so only count; answers are not checked here.)
    let _ = Captioner::new(other, Some(&cache))
        .unwrap()
        .caption(&images[0]);
    assert_eq!(srv.requests(), 13);
    srv.state.problems.lock().unwrap().clear();

    // Questions are cached apart from captions.
    let q: Vec<(ImageInput, String)> = images
        .iter()
        .map(|i| (i.clone(), "cat".to_string()))
        .collect();
    let a1 = Captioner::new(srv.config(), Some(&cache))
        .unwrap()
        .ask_all(&q)
        .unwrap();
    assert_eq!(srv.requests(), 21);
    let a2 = Captioner::new(srv.config(), Some(&cache))
        .unwrap()
        .ask_all(&q)
        .unwrap();
    assert_eq!(srv.requests(), 21);
    assert_eq!(a1, a2);
    assert_eq!(a1[0], Answer::Yes);
    assert_eq!(a1[1], Answer::No);
    srv.assert_no_problems();
}

#[test]
fn torn_last_cache_line_is_ignored() {
    let srv = MockServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("answers.jsonl");
    let images = pngs(4);
    Captioner::new(srv.config(), Some(&cache))
        .unwrap()
        .caption_all(&images)
        .unwrap();
    assert_eq!(srv.requests(), 4);
    // Simulate a crash in the middle of writing a fifth line.
    let mut text = std::fs::read_to_string(&cache).unwrap();
    let last = lines(&cache).pop().unwrap();
    text.push_str(&last[..last.len() / 2]);
    std::fs::write(&cache, &text).unwrap();

    let more = pngs(5);
    let captions = Captioner::new(srv.config(), Some(&cache))
        .unwrap()
        .caption_all(&more)
        .unwrap();
    assert_eq!(captions, (0..5).map(expected_caption).collect::<Vec<_>>());
    assert_eq!(srv.requests(), 5);
    // The torn bytes are gone and every line parses.
    let all = lines(&cache);
    assert_eq!(all.len(), 5);
    for l in &all {
        serde_json::from_str::<Value>(l).unwrap();
    }

    // A broken line in the middle is an error naming the line.
    let mut bad = all.clone();
    bad[1] = "garbage".into();
    std::fs::write(&cache, bad.join("\n") + "\n").unwrap();
    let err = Captioner::new(srv.config(), Some(&cache))
        .err()
        .expect("corrupt cache accepted");
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[test]
fn concurrency_is_bounded() {
    for concurrency in [1usize, 3] {
        let srv = MockServer::start();
        *srv.state.delay.lock().unwrap() = Duration::from_millis(60);
        let cfg = CaptionerConfig {
            concurrency,
            ..srv.config()
        };
        let captions = Captioner::new(cfg, None)
            .unwrap()
            .caption_all(&pngs(12))
            .unwrap();
        assert_eq!(captions, (0..12).map(expected_caption).collect::<Vec<_>>());
        assert_eq!(srv.requests(), 12);
        let max = srv.state.max_in_flight.load(Ordering::SeqCst);
        assert!(
            max <= concurrency,
            "{max} in flight with concurrency {concurrency}"
        );
        if concurrency > 1 {
            assert!(max > 1, "requests never overlapped");
        }
        srv.assert_no_problems();
    }
}

#[test]
fn duplicate_jobs_are_asked_once() {
    let srv = MockServer::start();
    let img = ImageInput::from_bytes(png(9));
    let captions = Captioner::new(srv.config(), None)
        .unwrap()
        .caption_all(&[img.clone(), img.clone(), img])
        .unwrap();
    assert_eq!(captions, vec![expected_caption(9); 3]);
    assert_eq!(srv.requests(), 1);
}

#[test]
fn bad_inputs_fail_before_sending() {
    let srv = MockServer::start();
    let cap = Captioner::new(srv.config(), None).unwrap();
    let err = cap
        .caption_all(&[
            ImageInput::from_bytes(png(1)),
            ImageInput::from_bytes(b"GIFnope".to_vec()),
        ])
        .unwrap_err();
    assert!(matches!(err, EvalError::Input(_)), "{err:?}");
    let err = cap
        .caption_all(&[ImageInput::from_path("/nonexistent/x.png")])
        .unwrap_err();
    assert!(matches!(err, EvalError::Io { .. }), "{err:?}");
    assert_eq!(srv.requests(), 0);

    for cfg in [
        CaptionerConfig {
            model: String::new(),
            ..srv.config()
        },
        CaptionerConfig {
            concurrency: 0,
            ..srv.config()
        },
        CaptionerConfig {
            question_template: "Is it there?".into(),
            ..srv.config()
        },
        CaptionerConfig {
            url: "ftp://api.example.com/v1".into(),
            ..srv.config()
        },
    ] {
        assert!(matches!(
            Captioner::new(cfg, None),
            Err(EvalError::Input(_))
        ));
    }
}
