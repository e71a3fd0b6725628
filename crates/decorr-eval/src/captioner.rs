//! Client for an OpenAI-compatible chat-completions endpoint (what vLLM, llama.cpp's `llama-server`
//! and Ollama serve) that captions images and asks yes/no questions about them (the paper's
//! section 6.1: BERTScore of VLM captions, and the omission rate).
//!
//! * [`Captioner::caption_all`] / [`Captioner::ask_all`] send one request per image (the image as a
//!   base64 `data:` URL), with at most [`CaptionerConfig::concurrency`] requests in flight, and
//!   return the answers in input order.
//! * Transient failures (connection errors, timeouts, HTTP 429 and 5xx) are retried with doubling
//!   backoff, honouring `Retry-After` on 429/503. Other 4xx replies and malformed replies are not
//!   retried: the same request would fail the same way. A malformed 200 reply is
//!   [`EvalError::BadReply`] at once, naming the missing field.
//! * Every answer is appended to a JSONL cache ([`Captioner::new`]'s `cache`) as soon as it
//!   arrives, so an interrupted evaluation resumes without asking again.
//! * Users who caption elsewhere can hand the captions in as a JSONL file ([`read_captions_file`]).
//!
//! `http://` and `https://` endpoints both work (TLS through rustls with the webpki roots).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::EvalError;

/// Instruction sent with each image to get a caption.
///
/// The paper does not give the prompt it used for captioning; this one is ours. It asks for a
/// single sentence (BERTScore is computed against one-sentence prompts) and for every object, so
/// that an omitted object shows up as a missing word rather than as the VLM's choice of focus.
pub const DEFAULT_CAPTION_INSTRUCTION: &str =
    "Describe this image in one sentence. Mention every object you can see.";

/// Yes/no question asked per image for the omission rate; `{object}` is replaced by the object.
///
/// The object gets an indefinite article when it has none ("train" → "a train", "apple" →
/// "an apple"); an object that already starts with an article or a quantifier ("a train",
/// "the moon", "some trains", "two cats") is inserted as given, and so is any object when the
/// template itself puts an article before `{object}` ("Is there a {object} ..."). The article is
/// chosen by the first letter (a/e/i/o/u → "an"), so give irregular cases ("an hour",
/// "a unicorn") and plurals ("any trains") with their article.
pub const DEFAULT_QUESTION_TEMPLATE: &str = "Is there {object} in this image? Answer yes or no.";

/// What to tell the user when the endpoint cannot be reached.
const UNREACHABLE_HINT: &str = "Is the server running and serving a vision model? Start one, e.g. \
     `vllm serve Qwen/Qwen2-VL-7B-Instruct --port 8000` (then use http://127.0.0.1:8000/v1), \
     `llama-server -m MODEL.gguf --mmproj MMPROJ.gguf --port 8080` or Ollama \
     (http://127.0.0.1:11434/v1), or caption elsewhere and pass --captions FILE";

/// Words that already determine the object's number, so no article is added before them.
const DETERMINERS: &[&str] = &[
    "a", "an", "the", "some", "any", "one", "two", "three", "four", "five", "six", "seven",
    "eight", "nine", "ten", "several", "many", "multiple", "no",
];

/// Settings of the captioning client. Durations are (de)serialised as seconds (`f64`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CaptionerConfig {
    /// Base URL of the API, e.g. `http://127.0.0.1:8000/v1`; the client POSTs to
    /// `{url}/chat/completions`. A URL that already ends in `/chat/completions` is used as is.
    /// Credentials in it (`http://user:pass@host/v1`, sent as HTTP basic auth) are never shown:
    /// messages, logs, `Debug` and the serialised config carry [`redact_url`]'s form.
    #[serde(serialize_with = "serialize_redacted")]
    pub url: String,
    /// Model name as the server knows it (vLLM: the served model name; Ollama: the tag).
    pub model: String,
    /// Sent as `Authorization: Bearer ...` when set (the CLI reads `OPENAI_API_KEY`). Never
    /// serialised, so it does not end up in reports.
    #[serde(skip_serializing)]
    pub api_key: Option<String>,
    /// Instruction sent with each image for a caption.
    pub caption_instruction: String,
    /// Yes/no question template; must contain `{object}` (see [`DEFAULT_QUESTION_TEMPLATE`]).
    pub question_template: String,
    /// `max_tokens` of each request.
    pub max_tokens: u32,
    /// Sampling temperature; 0 for reproducible answers.
    pub temperature: f64,
    /// Time limit of one request, from connecting to reading the whole reply.
    #[serde(with = "secs_f64")]
    pub timeout: Duration,
    /// How many times a failed request is retried (so at most `retries + 1` attempts).
    pub retries: u32,
    /// Wait before the first retry; doubled for each further retry.
    #[serde(with = "secs_f64")]
    pub initial_backoff: Duration,
    /// Upper bound of any wait between attempts, including one asked for by `Retry-After`.
    #[serde(with = "secs_f64")]
    pub max_backoff: Duration,
    /// Requests in flight at once.
    pub concurrency: usize,
}

impl Default for CaptionerConfig {
    fn default() -> Self {
        CaptionerConfig {
            url: "http://127.0.0.1:8000/v1".into(),
            model: String::new(),
            api_key: None,
            caption_instruction: DEFAULT_CAPTION_INSTRUCTION.into(),
            question_template: DEFAULT_QUESTION_TEMPLATE.into(),
            max_tokens: 128,
            temperature: 0.0,
            timeout: Duration::from_secs(120),
            retries: 4,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            concurrency: 4,
        }
    }
}

impl std::fmt::Debug for CaptionerConfig {
    /// Like a derived `Debug`, but with the API key redacted so it cannot leak into logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptionerConfig")
            .field("url", &redact_url(&self.url))
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("caption_instruction", &self.caption_instruction)
            .field("question_template", &self.question_template)
            .field("max_tokens", &self.max_tokens)
            .field("temperature", &self.temperature)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

fn serialize_redacted<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

/// `url` with the password of its userinfo replaced by `***` (`http://user:***@host/v1`), or
/// the whole userinfo when it has no password (a bare token: `http://***@host/v1`); other URLs
/// unchanged. What every message, log line and report shows of a captioner URL.
pub fn redact_url(url: &str) -> String {
    let Some(info) = userinfo(url) else {
        return url.to_string();
    };
    let shown = match info.split_once(':') {
        Some((user, _)) => format!("{user}:***@"),
        None => "***@".to_string(),
    };
    url.replacen(info, &shown, 1)
}

/// The userinfo of `url` with its `@` (`user:pass@`), if it has one.
fn userinfo(url: &str) -> Option<&str> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest[..end].rfind('@').map(|at| &rest[..=at])
}

/// `Duration` as a number of seconds in JSON.
mod secs_f64 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(|_| {
            serde::de::Error::custom(format!("{v} is not a duration in seconds (>= 0)"))
        })
    }
}

/// One image to send: a file, bytes already in memory (PNG or JPEG), or both (the path then only
/// names the image in messages).
#[derive(Debug, Clone)]
pub struct ImageInput {
    pub path: Option<PathBuf>,
    pub bytes: Option<Arc<[u8]>>,
}

impl ImageInput {
    /// An image file, read when it is needed.
    pub fn from_path(path: impl Into<PathBuf>) -> Self {
        ImageInput {
            path: Some(path.into()),
            bytes: None,
        }
    }

    /// Encoded image bytes (PNG or JPEG) held in memory.
    pub fn from_bytes(bytes: impl Into<Arc<[u8]>>) -> Self {
        ImageInput {
            path: None,
            bytes: Some(bytes.into()),
        }
    }

    /// Encoded bytes together with the path they came from (used in messages only).
    pub fn from_path_and_bytes(path: impl Into<PathBuf>, bytes: impl Into<Arc<[u8]>>) -> Self {
        ImageInput {
            path: Some(path.into()),
            bytes: Some(bytes.into()),
        }
    }

    /// How messages refer to this image.
    pub fn name(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "<image in memory>".into(),
        }
    }

    /// The encoded bytes: the in-memory ones, else the file's.
    fn load(&self) -> Result<Cow<'_, [u8]>, EvalError> {
        match (&self.bytes, &self.path) {
            (Some(b), _) => Ok(Cow::Borrowed(b)),
            // A FIFO or a device is refused by name, never waited on; I/O errors stay Io.
            (None, Some(p)) => decorr_core::input::read_image_bytes(p, "an image")
                .map(Cow::Owned)
                .map_err(|e| match e {
                    decorr_core::CoreError::Io { path, source } => EvalError::Io { path, source },
                    other => other.into(),
                }),
            (None, None) => Err(EvalError::Input(
                "an ImageInput has neither a path nor bytes; give one of them".into(),
            )),
        }
    }
}

/// MIME type of encoded image bytes, from their magic number.
fn image_mime(bytes: &[u8], name: &str) -> Result<&'static str, EvalError> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Ok("image/png")
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Ok("image/jpeg")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Ok("image/webp")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Ok("image/gif")
    } else {
        Err(EvalError::Input(format!(
            "{name}: not a PNG or JPEG image (first bytes {:02x?}); convert it to PNG",
            &bytes[..bytes.len().min(8)]
        )))
    }
}

/// A parsed reply to a yes/no question.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    Yes,
    No,
    /// Neither "yes" nor "no" as the first word; holds the whole reply.
    Unclear(String),
}

impl Answer {
    /// From the reply's first word, case-insensitive, ignoring punctuation and markup around it:
    /// "Yes, there is a train." → `Yes`, "**No**" → `No`, "There is a train." → `Unclear`.
    pub fn parse(reply: &str) -> Answer {
        let rest = reply.trim_start_matches(|c: char| !c.is_alphanumeric());
        let word: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric())
            .collect::<String>()
            .to_lowercase();
        match word.as_str() {
            "yes" => Answer::Yes,
            "no" => Answer::No,
            _ => Answer::Unclear(reply.trim().to_string()),
        }
    }
}

/// `object` with an indefinite article when it has no determiner ("train" → "a train",
/// "apple" → "an apple", "the moon" and "two cats" unchanged). See [`DEFAULT_QUESTION_TEMPLATE`].
pub fn with_article(object: &str) -> String {
    let object = object.trim();
    let first = object
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_lowercase();
    if object.is_empty()
        || DETERMINERS.contains(&first.as_str())
        || first.starts_with(|c: char| c.is_ascii_digit())
    {
        return object.to_string();
    }
    let article = match first.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    };
    format!("{article} {object}")
}

/// The question for `object`: `template` with every `{object}` replaced. An article is added to
/// the object (see [`with_article`]) unless the template already puts one before `{object}`.
pub fn format_question(template: &str, object: &str) -> String {
    let mut out = String::with_capacity(template.len() + object.len() + 3);
    let mut rest = template;
    while let Some(pos) = rest.find("{object}") {
        let before = &rest[..pos];
        out.push_str(before);
        let prev_word = out
            .trim_end()
            .rsplit(|c: char| !c.is_alphanumeric())
            .next()
            .unwrap_or("")
            .to_lowercase();
        let template_has_article = before.ends_with(' ')
            && matches!(prev_word.as_str(), "a" | "an" | "the" | "any" | "some");
        if template_has_article {
            out.push_str(object.trim());
        } else {
            out.push_str(&with_article(object));
        }
        rest = &rest[pos + "{object}".len()..];
    }
    out.push_str(rest);
    out
}

/// One line of the answer cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheRecord {
    /// [`cache_key`] of the other fields; informative (the loader recomputes it).
    key: String,
    image_sha256: String,
    /// `"caption"` or `"question"`.
    kind: String,
    object: Option<String>,
    model: String,
    prompt: String,
    /// The reply text as the server sent it (trimmed); questions are parsed when used.
    answer: String,
}

/// Identity of one question: sha256 over image hash, kind, model and prompt text.
fn cache_key(image_sha256: &str, kind: &str, model: &str, prompt: &str) -> String {
    let mut h = Sha256::new();
    for part in [image_sha256, kind, model, prompt] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Answers known so far, and the open cache file they are appended to.
struct Cache {
    path: Option<PathBuf>,
    file: Option<File>,
    answers: HashMap<String, String>,
}

impl Cache {
    fn in_memory() -> Self {
        Cache {
            path: None,
            file: None,
            answers: HashMap::new(),
        }
    }

    /// Opens (creating it and its folder if needed) and loads a cache file. A last line that does
    /// not parse is what a crash mid-write leaves: it is dropped (the file is truncated before it)
    /// with a warning. A bad line elsewhere is an error, since it means the file was edited or
    /// written by something else.
    fn open(path: &Path) -> Result<Self, EvalError> {
        let io = |source| EvalError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let data = std::fs::read(path).map_err(io)?;
        let mut answers = HashMap::new();
        let mut offset = 0usize;
        let mut lines = data.split_inclusive(|&b| b == b'\n').enumerate().peekable();
        let mut needs_newline = false;
        while let Some((i, line)) = lines.next() {
            let is_last = lines.peek().is_none();
            let start = offset;
            offset += line.len();
            let text = String::from_utf8_lossy(line);
            // The first line may start with a byte-order mark, which is not JSON.
            let trimmed = decorr_core::io::strip_bom(text.trim());
            if trimmed.is_empty() {
                continue;
            }
            match serde_json::from_str::<CacheRecord>(trimmed) {
                Ok(r) => {
                    let key = cache_key(&r.image_sha256, &r.kind, &r.model, &r.prompt);
                    answers.insert(key, r.answer);
                    needs_newline = is_last && !line.ends_with(b"\n");
                }
                Err(e) if is_last => {
                    log::warn!(
                        "{}: ignoring the unreadable last line {} ({e}), probably cut off by a crash",
                        path.display(),
                        i + 1
                    );
                    file.set_len(start as u64).map_err(io)?;
                }
                Err(e) => {
                    return Err(EvalError::BadFile {
                        path: path.to_path_buf(),
                        message: format!(
                            "line {} is not a cache record ({e}); delete that line (or the whole \
                             cache file, which only costs asking the VLM again)",
                            i + 1
                        ),
                    });
                }
            }
        }
        if needs_newline {
            file.write_all(b"\n").map_err(io)?;
        }
        log::info!("{}: {} cached answers", path.display(), answers.len());
        Ok(Cache {
            path: Some(path.to_path_buf()),
            file: Some(file),
            answers,
        })
    }

    /// Records an answer, appending it to the file (one `write` of a whole line, then flush).
    fn store(&mut self, key: String, record: &CacheRecord) -> Result<(), EvalError> {
        if let (Some(file), Some(path)) = (&mut self.file, &self.path) {
            let mut line = serde_json::to_vec(record).expect("cache record serialises");
            line.push(b'\n');
            file.write_all(&line)
                .and_then(|()| file.flush())
                .map_err(|source| EvalError::Io {
                    path: path.clone(),
                    source,
                })?;
        }
        self.answers.insert(key, record.answer.clone());
        Ok(())
    }
}

/// What one request asks.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Caption,
    Question,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Caption => "caption",
            Kind::Question => "question",
        }
    }
}

struct Job<'a> {
    image: &'a ImageInput,
    kind: Kind,
    object: Option<&'a str>,
    prompt: String,
}

/// Outcome of one failed attempt.
enum Failure {
    /// Worth trying again (after at least `retry_after`, when the server said so).
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Trying again would fail the same way.
    Fatal(EvalError),
}

/// The chat-completions client. Cheap to share across threads (`&self` everywhere).
pub struct Captioner {
    config: CaptionerConfig,
    /// Where requests go (credentials included).
    endpoint: String,
    /// The same, credentials redacted: what messages show.
    shown: String,
    agent: ureq::Agent,
    cache: Mutex<Cache>,
    requests: AtomicU64,
}

impl Captioner {
    /// A client for `config`, caching answers in the JSONL file `cache` (created if missing;
    /// answers already in it are not asked again). `None`: no cache (every call asks).
    ///
    /// One cache file must not be written by two processes at once.
    pub fn new(config: CaptionerConfig, cache: Option<&Path>) -> Result<Self, EvalError> {
        let endpoint = endpoint_url(&config.url)?;
        if config.model.trim().is_empty() {
            return Err(EvalError::Input(
                "no VLM model name given; pass the name the server serves (e.g. \
                 Qwen/Qwen2-VL-7B-Instruct for vLLM, llava for Ollama)"
                    .into(),
            ));
        }
        if config.concurrency == 0 {
            return Err(EvalError::Input(
                "captioner concurrency is 0; use at least 1".into(),
            ));
        }
        if !config.question_template.contains("{object}") {
            return Err(EvalError::Input(format!(
                "question template {:?} has no {{object}} placeholder; write it like {:?}",
                config.question_template, DEFAULT_QUESTION_TEMPLATE
            )));
        }
        if !config.temperature.is_finite() || config.temperature < 0.0 {
            return Err(EvalError::Input(format!(
                "temperature {} is not a number >= 0",
                config.temperature
            )));
        }
        let agent_config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(config.timeout))
            .max_idle_connections_per_host(config.concurrency.max(3))
            .user_agent(concat!("decorr-eval/", env!("CARGO_PKG_VERSION")))
            .build();
        let cache = match cache {
            Some(p) => Cache::open(p)?,
            None => Cache::in_memory(),
        };
        Ok(Captioner {
            shown: redact_url(&endpoint),
            endpoint,
            agent: ureq::Agent::new_with_config(agent_config),
            cache: Mutex::new(cache),
            requests: AtomicU64::new(0),
            config,
        })
    }

    pub fn config(&self) -> &CaptionerConfig {
        &self.config
    }

    /// The URL requests are POSTed to, as messages show it (credentials redacted).
    pub fn shown_endpoint(&self) -> &str {
        &self.shown
    }

    /// `message` with this endpoint's credentials redacted, wherever they appear in it.
    fn scrub(&self, message: String) -> String {
        match (userinfo(&self.endpoint), userinfo(&self.shown)) {
            (Some(raw), Some(shown)) if raw != shown => message.replace(raw, shown),
            _ => message,
        }
    }

    /// HTTP requests sent by this client so far (attempts, including retries).
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The question asked about `object` (the template filled in).
    pub fn question(&self, object: &str) -> String {
        format_question(&self.config.question_template, object)
    }

    /// Captions every image, in input order.
    pub fn caption_all(&self, images: &[ImageInput]) -> Result<Vec<String>, EvalError> {
        let jobs = images
            .iter()
            .map(|image| Job {
                image,
                kind: Kind::Caption,
                object: None,
                prompt: self.config.caption_instruction.clone(),
            })
            .collect::<Vec<_>>();
        self.run_batch(&jobs)
    }

    /// Asks, for each `(image, object)`, whether the object is in the image; in input order.
    pub fn ask_all(&self, queries: &[(ImageInput, String)]) -> Result<Vec<Answer>, EvalError> {
        let jobs = queries
            .iter()
            .map(|(image, object)| Job {
                image,
                kind: Kind::Question,
                object: Some(object.as_str()),
                prompt: self.question(object),
            })
            .collect::<Vec<_>>();
        Ok(self
            .run_batch(&jobs)?
            .iter()
            .map(|reply| Answer::parse(reply))
            .collect())
    }

    /// Caption of one image.
    pub fn caption(&self, image: &ImageInput) -> Result<String, EvalError> {
        Ok(self.caption_all(std::slice::from_ref(image))?.remove(0))
    }

    /// Whether `object` is in one image.
    pub fn ask(&self, image: &ImageInput, object: &str) -> Result<Answer, EvalError> {
        Ok(self
            .ask_all(&[(image.clone(), object.to_string())])?
            .remove(0))
    }

    /// Answers `jobs`: cached ones from the cache, the rest from the server by `concurrency`
    /// workers pulling from a shared counter. Identical jobs are asked once. The first error stops
    /// all workers (none starts a new request or retry after it); answers received until then
    /// stay cached.
    fn run_batch(&self, jobs: &[Job<'_>]) -> Result<Vec<String>, EvalError> {
        let model = self.config.model.as_str();
        // Hash every image first: a missing or non-image file fails before anything is sent.
        let mut keys = Vec::with_capacity(jobs.len());
        let mut shas = Vec::with_capacity(jobs.len());
        for job in jobs {
            let bytes = job.image.load()?;
            image_mime(&bytes, &job.image.name())?;
            let sha = hex(&Sha256::digest(&bytes));
            keys.push(cache_key(&sha, job.kind.as_str(), model, &job.prompt));
            shas.push(sha);
        }
        let mut todo: Vec<usize> = Vec::new();
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let mut seen = std::collections::HashSet::new();
            for (i, key) in keys.iter().enumerate() {
                if !cache.answers.contains_key(key) && seen.insert(key.as_str()) {
                    todo.push(i);
                }
            }
        }
        if !todo.is_empty() {
            log::info!(
                "asking {} for {} of {} answers ({} cached)",
                self.shown,
                todo.len(),
                jobs.len(),
                jobs.len() - todo.len()
            );
        }

        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let first_error: Mutex<Option<EvalError>> = Mutex::new(None);
        let done = AtomicUsize::new(0);
        let workers = self.config.concurrency.min(todo.len());
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    loop {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let t = next.fetch_add(1, Ordering::SeqCst);
                        let Some(&i) = todo.get(t) else { break };
                        let job = &jobs[i];
                        match self.answer_job(job, &shas[i], &keys[i], &stop) {
                            Ok(true) => {
                                let n = done.fetch_add(1, Ordering::SeqCst) + 1;
                                if n.is_multiple_of(50) || n == todo.len() {
                                    log::info!("{n}/{} answers received", todo.len());
                                }
                            }
                            Ok(false) => break,
                            Err(e) => {
                                stop.store(true, Ordering::SeqCst);
                                first_error
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .get_or_insert(e);
                                break;
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        keys.iter()
            .zip(jobs)
            .map(|(key, job)| {
                cache.answers.get(key).cloned().ok_or_else(|| {
                    EvalError::Input(format!(
                        "internal: no answer recorded for {}",
                        job.image.name()
                    ))
                })
            })
            .collect()
    }

    /// Asks one job (with retries) and caches the answer. `Ok(false)`: stopped by another
    /// worker's error before an answer came.
    fn answer_job(
        &self,
        job: &Job<'_>,
        sha: &str,
        key: &str,
        stop: &AtomicBool,
    ) -> Result<bool, EvalError> {
        let name = job.image.name();
        let bytes = job.image.load()?;
        let mime = image_mime(&bytes, &name)?;
        let body = self.request_body(&job.prompt, &bytes, mime);
        let Some(answer) = self.send_with_retries(&body, &name, stop)? else {
            return Ok(false);
        };
        let record = CacheRecord {
            key: key.to_string(),
            image_sha256: sha.to_string(),
            kind: job.kind.as_str().to_string(),
            object: job.object.map(str::to_string),
            model: self.config.model.clone(),
            prompt: job.prompt.clone(),
            answer,
        };
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .store(key.to_string(), &record)?;
        Ok(true)
    }

    /// The JSON request body (serialised once, resent on retries).
    fn request_body(&self, prompt: &str, bytes: &[u8], mime: &str) -> Vec<u8> {
        let data_url = format!(
            "data:{mime};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        );
        let body = serde_json::json!({
            "model": self.config.model,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "text", "text": prompt},
                    {"type": "image_url", "image_url": {"url": data_url}},
                ],
            }],
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
        });
        serde_json::to_vec(&body).expect("request body serialises")
    }

    /// Sends `body` until it gets an answer, a fatal failure, or runs out of retries. `Ok(None)`:
    /// `stop` was raised while waiting to retry.
    fn send_with_retries(
        &self,
        body: &[u8],
        image: &str,
        stop: &AtomicBool,
    ) -> Result<Option<String>, EvalError> {
        let cfg = &self.config;
        let mut backoff = cfg.initial_backoff;
        let mut last = String::new();
        for attempt in 0..=cfg.retries {
            if stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            match self.send_once(body) {
                Ok(answer) => return Ok(Some(answer)),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient {
                    message,
                    retry_after,
                }) => {
                    last = message;
                    if attempt == cfg.retries {
                        break;
                    }
                    let wait = retry_after.unwrap_or(backoff).min(cfg.max_backoff);
                    log::warn!(
                        "{image}: {last}; retry {}/{} in {:.1} s",
                        attempt + 1,
                        cfg.retries,
                        wait.as_secs_f64()
                    );
                    if !sleep_unless(wait, stop) {
                        return Ok(None);
                    }
                    backoff = backoff.saturating_mul(2).min(cfg.max_backoff);
                }
            }
        }
        Err(EvalError::Http {
            url: self.shown.clone(),
            message: format!(
                "gave up on {image} after {} attempts; last problem: {last}. {UNREACHABLE_HINT}",
                cfg.retries + 1
            ),
        })
    }

    /// One HTTP exchange, its failure messages scrubbed of the URL's credentials.
    fn send_once(&self, body: &[u8]) -> Result<String, Failure> {
        self.exchange(body).map_err(|f| match f {
            Failure::Transient {
                message,
                retry_after,
            } => Failure::Transient {
                message: self.scrub(message),
                retry_after,
            },
            Failure::Fatal(EvalError::Http { url, message }) => Failure::Fatal(EvalError::Http {
                url,
                message: self.scrub(message),
            }),
            Failure::Fatal(EvalError::BadReply { url, message }) => {
                Failure::Fatal(EvalError::BadReply {
                    url,
                    message: self.scrub(message),
                })
            }
            other => other,
        })
    }

    fn exchange(&self, body: &[u8]) -> Result<String, Failure> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = self
            .agent
            .post(&self.endpoint)
            .header("Content-Type", "application/json");
        if let Some(key) = &self.config.api_key {
            req = req.header("Authorization", format!("Bearer {key}"));
        }
        let mut resp = match req.send(body) {
            Ok(r) => r,
            Err(e) => return Err(self.transport_failure(e)),
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .and_then(|s| Duration::try_from_secs_f64(s).ok());
        let text = match resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
        {
            Ok(t) => t,
            Err(e) => return Err(self.transport_failure(e)),
        };
        if (200..300).contains(&status) {
            return parse_reply(&text).map_err(|message| {
                Failure::Fatal(EvalError::BadReply {
                    url: self.shown.clone(),
                    message,
                })
            });
        }
        let server_message = error_message(&text);
        if status == 429 || status >= 500 {
            return Err(Failure::Transient {
                message: format!("HTTP {status}: {server_message}"),
                retry_after: if status == 429 || status == 503 {
                    retry_after
                } else {
                    None
                },
            });
        }
        let hint = match status {
            401 | 403 => " (set OPENAI_API_KEY to the key the server expects)",
            404 => {
                " (check the URL: it should be the API base ending in /v1, and the model name must be one the server serves)"
            }
            _ => "",
        };
        Err(Failure::Fatal(EvalError::Http {
            url: self.shown.clone(),
            message: format!("HTTP {status}: {server_message}{hint}"),
        }))
    }

    /// Classifies a ureq error: configuration mistakes are fatal, the rest (connection refused or
    /// reset, timeouts, protocol hiccups) transient.
    fn transport_failure(&self, e: ureq::Error) -> Failure {
        match e {
            ureq::Error::BadUri(_) | ureq::Error::Http(_) | ureq::Error::TlsRequired => {
                Failure::Fatal(EvalError::Http {
                    url: self.shown.clone(),
                    message: format!("{e}; check the --captioner URL"),
                })
            }
            ureq::Error::Timeout(_) => Failure::Transient {
                message: format!(
                    "no complete reply within {:.1} s ({e}); raise the timeout if the model is slow",
                    self.config.timeout.as_secs_f64()
                ),
                retry_after: None,
            },
            e => Failure::Transient {
                message: e.to_string(),
                retry_after: None,
            },
        }
    }
}

/// Waits `d`, waking early (and returning false) when `stop` is raised.
fn sleep_unless(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    loop {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// `{url}/chat/completions`, or `url` itself when it already ends so.
fn endpoint_url(url: &str) -> Result<String, EvalError> {
    let url = url.trim().trim_end_matches('/');
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(EvalError::Input(format!(
            "{:?} is not an http(s):// URL; give the API base, e.g. http://127.0.0.1:8000/v1",
            redact_url(url)
        )));
    }
    if url.ends_with("/chat/completions") {
        Ok(url.to_string())
    } else {
        Ok(format!("{url}/chat/completions"))
    }
}

/// First part of a body for messages.
fn excerpt(text: &str) -> String {
    let t = text.trim();
    match t.char_indices().nth(300) {
        Some((i, _)) => format!("{}...", &t[..i]),
        None => t.to_string(),
    }
}

/// The server's own explanation in an error body: OpenAI's `{"error": {"message": ...}}`,
/// `{"error": "..."}`, FastAPI's `{"detail": ...}`, `{"message": ...}`, else the body's start.
fn error_message(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        let found = v
            .pointer("/error/message")
            .or_else(|| v.get("error"))
            .or_else(|| v.get("detail"))
            .or_else(|| v.get("message"));
        if let Some(m) = found {
            return match m {
                Value::String(s) => excerpt(s),
                other => excerpt(&other.to_string()),
            };
        }
    }
    if body.trim().is_empty() {
        "(empty body)".into()
    } else {
        excerpt(body)
    }
}

/// `choices[0].message.content` of a chat-completions reply, as a string (a content array has its
/// text parts joined), trimmed. `Err`: what is missing, for [`EvalError::BadReply`].
fn parse_reply(text: &str) -> Result<String, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        format!(
            "reply is not JSON ({e}); it starts with {:?}",
            excerpt(text)
        )
    })?;
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        return Err(format!(
            "the server reported an error: {}",
            error_message(&err.to_string())
        ));
    }
    let choices = v
        .get("choices")
        .ok_or("no `choices` in the reply")?
        .as_array()
        .ok_or("`choices` is not an array")?;
    let first = choices.first().ok_or("`choices` is empty")?;
    let message = first
        .get("message")
        .ok_or("no `choices[0].message` in the reply")?;
    match message.get("content") {
        Some(Value::String(s)) => Ok(s.trim().to_string()),
        Some(Value::Array(parts)) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str).unwrap_or("text") == "text")
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            if texts.is_empty() {
                Err("`choices[0].message.content` is an array without text parts".into())
            } else {
                Ok(texts.concat().trim().to_string())
            }
        }
        Some(Value::Null) | None => {
            let finish = first
                .get("finish_reason")
                .and_then(Value::as_str)
                .unwrap_or("not given");
            Err(format!(
                "no `choices[0].message.content` (finish_reason: {finish}); if the model spent \
                 its tokens elsewhere (reasoning), raise max_tokens"
            ))
        }
        Some(other) => Err(format!(
            "`choices[0].message.content` is {other}, expected a string"
        )),
    }
}

/// One line of a captions file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptionLine {
    image: String,
    caption: String,
}

/// Reads captions made elsewhere: a JSONL file, one `{"image": "<file name or path>", "caption":
/// "..."}` per line (blank lines skipped). Returns image → caption; look images up with
/// [`caption_for`]. The same image twice with different captions is an error.
pub fn read_captions_file(path: &Path) -> Result<HashMap<String, String>, EvalError> {
    let text = decorr_core::input::read_text(path, "a captions file (JSON lines)")?;
    let bad = |message: String| EvalError::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let mut out: HashMap<String, String> = HashMap::new();
    let mut line_of: HashMap<String, usize> = HashMap::new();
    // A byte-order mark at the start (some Windows editors write one) is not JSON.
    let text = decorr_core::io::strip_bom(&text);
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let rec: CaptionLine = serde_json::from_str(line).map_err(|e| {
            bad(format!(
                "line {}: {e}; each line must be {{\"image\": \"<file name or path>\", \"caption\": \"...\"}}",
                i + 1
            ))
        })?;
        if let Some(prev) = out.get(&rec.image) {
            if *prev != rec.caption {
                return Err(bad(format!(
                    "line {}: image {:?} already has a different caption on line {}; keep one",
                    i + 1,
                    rec.image,
                    line_of[&rec.image]
                )));
            }
            continue;
        }
        line_of.insert(rec.image.clone(), i + 1);
        out.insert(rec.image, rec.caption);
    }
    Ok(out)
}

/// The caption of `image` in a captions map: by its path as given, else by its file name.
pub fn caption_for<'a>(captions: &'a HashMap<String, String>, image: &Path) -> Option<&'a str> {
    captions
        .get(image.to_string_lossy().as_ref())
        .or_else(|| {
            image
                .file_name()
                .and_then(|n| captions.get(n.to_string_lossy().as_ref()))
        })
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_from_first_word() {
        assert_eq!(Answer::parse("Yes, there is a train."), Answer::Yes);
        assert_eq!(Answer::parse("  **NO**."), Answer::No);
        assert_eq!(Answer::parse("no"), Answer::No);
        assert_eq!(Answer::parse("\"Yes\""), Answer::Yes);
        assert_eq!(
            Answer::parse("There is a train."),
            Answer::Unclear("There is a train.".into())
        );
        assert_eq!(
            Answer::parse("Not sure"),
            Answer::Unclear("Not sure".into())
        );
        assert_eq!(
            Answer::parse("Yesterday"),
            Answer::Unclear("Yesterday".into())
        );
        assert_eq!(Answer::parse(""), Answer::Unclear(String::new()));
    }

    #[test]
    fn questions_get_articles() {
        let t = DEFAULT_QUESTION_TEMPLATE;
        assert_eq!(
            format_question(t, "train"),
            "Is there a train in this image? Answer yes or no."
        );
        assert_eq!(
            format_question(t, "apple").split(" in ").next(),
            Some("Is there an apple")
        );
        assert_eq!(format_question(t, "a train"), format_question(t, "train"));
        assert_eq!(
            format_question(t, "the moon").split(" in ").next(),
            Some("Is there the moon")
        );
        assert_eq!(
            format_question(t, "2 cats").split(" in ").next(),
            Some("Is there 2 cats")
        );
        assert_eq!(
            format_question("Is there a {object}? ({object})", "train"),
            "Is there a train? (a train)"
        );
        assert_eq!(with_article("  Umbrella "), "an Umbrella");
    }

    #[test]
    fn endpoint_urls() {
        assert_eq!(
            endpoint_url("http://h:1/v1/").unwrap(),
            "http://h:1/v1/chat/completions"
        );
        assert_eq!(
            endpoint_url("http://h:1/v1/chat/completions").unwrap(),
            "http://h:1/v1/chat/completions"
        );
        assert_eq!(
            endpoint_url("https://api.x/v1").unwrap(),
            "https://api.x/v1/chat/completions"
        );
        assert!(matches!(
            endpoint_url("127.0.0.1:8000"),
            Err(EvalError::Input(_))
        ));
    }

    #[test]
    fn replies_parse() {
        let ok = r#"{"choices":[{"message":{"role":"assistant","content":" A train. "}}]}"#;
        assert_eq!(parse_reply(ok).unwrap(), "A train.");
        let parts = r#"{"choices":[{"message":{"content":[{"type":"text","text":"A "},{"type":"text","text":"cat"}]}}]}"#;
        assert_eq!(parse_reply(parts).unwrap(), "A cat");
        let e = parse_reply(r#"{"choices":[]}"#).unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e =
            parse_reply(r#"{"choices":[{"message":{"content":null},"finish_reason":"length"}]}"#)
                .unwrap_err();
        assert!(e.contains("length") && e.contains("max_tokens"), "{e}");
        let e = parse_reply("<html>").unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
        assert!(
            parse_reply(r#"{"object":"x"}"#)
                .unwrap_err()
                .contains("choices")
        );
    }

    #[test]
    fn server_error_messages() {
        assert_eq!(
            error_message(r#"{"error":{"message":"bad model"}}"#),
            "bad model"
        );
        assert_eq!(error_message(r#"{"detail":"nope"}"#), "nope");
        assert_eq!(error_message(""), "(empty body)");
        assert_eq!(error_message("plain"), "plain");
    }

    #[test]
    fn config_roundtrips_without_key() {
        let c = CaptionerConfig {
            api_key: Some("secret".into()),
            model: "m".into(),
            timeout: Duration::from_millis(1500),
            ..Default::default()
        };
        let s = serde_json::to_string(&c).unwrap();
        assert!(
            !s.contains("secret") && s.contains("\"timeout\":1.5"),
            "{s}"
        );
        assert!(!format!("{c:?}").contains("secret"));
        let back: CaptionerConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(back.timeout, Duration::from_millis(1500));
        assert_eq!(back.model, "m");
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(
            redact_url("http://user:pass@h:8000/v1"),
            "http://user:***@h:8000/v1"
        );
        assert_eq!(
            redact_url("https://tok@h/v1?a=b@c"),
            "https://***@h/v1?a=b@c"
        );
        assert_eq!(redact_url("http://h:1/v1?x=a@b"), "http://h:1/v1?x=a@b");
        assert_eq!(redact_url("u:p@h/v1"), "u:***@h/v1");
        assert_eq!(redact_url("http://a:b:c@h"), "http://a:***@h");
        let c = CaptionerConfig {
            url: "http://alice:s3cret@127.0.0.1:9/v1".into(),
            model: "m".into(),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(!serde_json::to_string(&c).unwrap().contains("s3cret"));
        let cap = Captioner::new(c, None).unwrap();
        assert_eq!(
            cap.shown_endpoint(),
            "http://alice:***@127.0.0.1:9/v1/chat/completions"
        );
        assert_eq!(
            cap.scrub("error sending to http://alice:s3cret@127.0.0.1:9/v1/x".into()),
            "error sending to http://alice:***@127.0.0.1:9/v1/x"
        );
        let e = Captioner::new(
            CaptionerConfig {
                url: "ftp://alice:s3cret@h/v1".into(),
                model: "m".into(),
                ..Default::default()
            },
            None,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("alice:***@") && !e.contains("s3cret"), "{e}");
    }

    #[test]
    fn files_with_a_byte_order_mark_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(&p, "\u{feff}{\"image\":\"a.png\",\"caption\":\"a cat\"}\n").unwrap();
        let m = read_captions_file(&p).unwrap();
        assert_eq!(caption_for(&m, Path::new("a.png")), Some("a cat"));
        // The VLM cache too, its answers kept.
        let rec = CacheRecord {
            key: String::new(),
            image_sha256: "ab".into(),
            kind: "caption".into(),
            object: None,
            model: "m".into(),
            prompt: "p".into(),
            answer: "a train".into(),
        };
        let cache = dir.path().join("vlm-cache.jsonl");
        std::fs::write(
            &cache,
            format!("\u{feff}{}\n", serde_json::to_string(&rec).unwrap()),
        )
        .unwrap();
        let c = Cache::open(&cache).unwrap();
        assert_eq!(
            c.answers
                .get(&cache_key("ab", "caption", "m", "p"))
                .map(String::as_str),
            Some("a train")
        );
    }

    #[test]
    fn captions_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(
            &p,
            "{\"image\":\"a.png\",\"caption\":\"a cat\"}\n\n{\"image\":\"out/b.png\",\"caption\":\"a dog\"}\n",
        )
        .unwrap();
        let m = read_captions_file(&p).unwrap();
        assert_eq!(caption_for(&m, Path::new("imgs/a.png")), Some("a cat"));
        assert_eq!(caption_for(&m, Path::new("out/b.png")), Some("a dog"));
        assert_eq!(caption_for(&m, Path::new("c.png")), None);
        std::fs::write(
            &p,
            "{\"image\":\"a.png\",\"caption\":\"x\"}\n{\"image\":\"a.png\",\"caption\":\"y\"}\n",
        )
        .unwrap();
        let e = read_captions_file(&p).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("line 1"), "{e}");
        std::fs::write(&p, "{\"img\":\"a.png\"}\n").unwrap();
        let e = read_captions_file(&p).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
