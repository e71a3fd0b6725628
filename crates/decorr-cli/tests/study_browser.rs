//! The study's rating page in a real browser: headless Chromium driven through WebDriver
//! (Debian's `chromium` and `chromium-driver`; `.ci/run` installs them, and without
//! `chromedriver` this test fails and says how to install it).
//!
//! As rater-01 of a study made with `decorr study create` from two runs of the tiny models, it
//! rates the first comparison with the mouse and the second with the keyboard only, goes back to
//! the first (which shows the answers given) and changes one answer, continues; then, in a new
//! browser session (another device), the same link resumes at the first unanswered comparison,
//! and the rater finishes the study and sees the thank-you page. The server's CSV export then
//! holds the changed answer and every comparison answered once, and nothing the page showed or
//! fetched names a method, a run folder or a seed. Screenshots of the rating, thank-you and admin
//! pages go to `target/study-screenshots/`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

mod common;
use common::{decorr, text};
#[path = "common/study_support.rs"]
mod study_support;
use study_support::StudyServer;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// How long any one wait (a page, a process, a WebDriver answer) may take.
const TIMEOUT: Duration = Duration::from_secs(30);
const WINDOW: (u32, u32) = (1280, 900);
const PROMPTS: [&str; 2] = ["rusty tracks with an old train", "a cat with a hat"];
/// The methods' names (`decorr generate --guidance cfg` is `sd`) and the guidance that makes each.
const METHODS: [(&str, &str); 2] = [("sd", "cfg"), ("pag", "pag")];
/// `decorr generate`'s options: 4 steps and a strong PAG, so that the two methods' images differ
/// visibly (in the screenshots too).
const GENERATE: [&str; 6] = ["--steps", "4", "--num-images", "4", "--pag-scale", "40"];

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+).into());
        }
    };
}

// ---- child processes -----------------------------------------------------------------------

/// A child process, killed (and reaped) on drop, whatever way the test ends.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's last 40 lines.
    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `chromedriver`: `$CHROMEDRIVER`, else `/usr/bin/chromedriver`, else one on `PATH`.
fn chromedriver() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMEDRIVER").map(PathBuf::from) {
        assert!(p.is_file(), "CHROMEDRIVER={} is not a file", p.display());
        return p;
    }
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("chromedriver"))
                .collect()
        })
        .unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/bin/chromedriver"))
        .chain(on_path)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "chromedriver is not installed: this test drives headless Chromium through \
                 WebDriver. Install both with `sudo apt-get install -y chromium chromium-driver` \
                 (Debian/Ubuntu; .ci/run does it when /usr/bin/chromedriver is missing), or set \
                 CHROMEDRIVER=/path/to/chromedriver (and CHROME_BIN to its browser)"
            )
        })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .build()
        .into()
}

fn get(url: &str) -> Res<(u16, String)> {
    let mut r = agent().get(url).call()?;
    Ok((r.status().as_u16(), r.body_mut().read_to_string()?))
}

/// Starts chromedriver on a free port and waits until it is ready.
fn start_chromedriver(dir: &Path) -> (Proc, u16) {
    let exe = chromedriver();
    let port = free_port();
    let log = dir.join("chromedriver.log");
    let child = Command::new(&exe)
        .arg(format!("--port={port}"))
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::from(
            std::fs::File::options().append(true).open(&log).unwrap(),
        ))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
    let mut p = Proc { child, log };
    let start = Instant::now();
    loop {
        if let Ok((200, body)) = get(&format!("http://127.0.0.1:{port}/status")) {
            let v: Value = serde_json::from_str(&body).unwrap_or_default();
            if v["value"]["ready"] == json!(true) {
                return (p, port);
            }
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("{} exited ({status}):\n{}", exe.display(), p.log());
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "{} not ready after {TIMEOUT:?}:\n{}",
            exe.display(),
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_server(study: &Path, dir: &Path) -> StudyServer {
    StudyServer::start(study, "127.0.0.1", dir.join("serve.log"))
}

/// Two runs (`sd` and `pag`) of both prompts, 4 seeds, on the tiny models; a study of them with
/// 2 raters and 1 repeated comparison.
fn make_study(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/sd-tiny");
    let mut runs = Vec::new();
    for (_, guidance) in METHODS {
        let out = dir.join("runs").join(guidance);
        let mut args = vec!["generate", "--weights", model.to_str().unwrap()];
        args.extend(["--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]);
        args.extend(["--guidance", guidance]);
        args.extend(GENERATE);
        args.extend(["--out", out.to_str().unwrap(), "--quiet"]);
        let o = decorr(&args);
        assert!(o.status.success(), "{}", text(&o));
        runs.push(out);
    }
    let study = dir.join("study");
    let mut args = vec!["study", "create", "--runs"];
    args.extend(runs.iter().map(|r| r.to_str().unwrap()));
    args.extend(["--seeds-per-prompt", "3", "--raters", "2", "--repeat", "1"]);
    args.extend(["--out", study.to_str().unwrap()]);
    let o = decorr(&args);
    assert!(o.status.success(), "{}", text(&o));
    (study, runs)
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("study-screenshots")
}

// ---- the browser ---------------------------------------------------------------------------

/// A new headless browser session: a fresh profile, like another device.
async fn session(port: u16) -> Res<Client> {
    let mut opts = json!({
        "args": [
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            "--lang=en-US",
            format!("--window-size={},{}", WINDOW.0, WINDOW.1),
        ]
    });
    let bin = std::env::var_os("CHROME_BIN")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/usr/bin/chromium")).filter(|p| p.is_file()));
    if let Some(bin) = bin {
        opts["binary"] = json!(bin);
    }
    let mut caps = serde_json::Map::new();
    caps.insert("goog:chromeOptions".into(), opts);
    // Two rustls crypto providers are linked (ureq's ring, fantoccini's aws-lc-rs): rustls
    // wants the process's choice before fantoccini builds its connector.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = ClientBuilder::rustls()?
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .map_err(|e| format!("no browser session from chromedriver: {e}"))?;
    Ok(c)
}

/// Runs `f` in a new browser session and ends the session whatever `f` returns.
async fn in_session<T, F, Fut>(port: u16, f: F) -> Res<T>
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Res<T>>,
{
    let c = session(port).await?;
    let r = tokio::time::timeout(Duration::from_secs(240), f(c.clone()))
        .await
        .unwrap_or_else(|_| Err("the browser steps took over 240 s".into()));
    let _ = c.close().await;
    r
}

/// What the rating page shows, read from its DOM (observing only: the test acts through the
/// mouse and keyboard).
const STATE_JS: &str = r##"
const q = (s) => document.querySelector(s);
const shown = (e) => !!e && !e.hidden;
const values = {};
for (const fs of document.querySelectorAll("#images fieldset.scale")) {
  const c = fs.querySelector("input:checked");
  values[fs.dataset.slot + "-" + fs.dataset.scale] = c ? Number(c.value) : null;
}
const imgs = [...document.querySelectorAll("#images img")];
const a = document.activeElement;
const cur = q("#images fieldset.scale.current");
return {
  task: shown(q("#task")),
  finished: shown(q("#finished")),
  progress: q("#progress-text") ? q("#progress-text").textContent : "",
  prompt: q("#prompt") ? q("#prompt").textContent : "",
  slots: [...document.querySelectorAll("#images .card")].map((e) => e.dataset.slot),
  values: values,
  next_disabled: !!q("#next") && q("#next").disabled,
  back_disabled: !!q("#back") && q("#back").disabled,
  hint: q("#hint") ? q("#hint").textContent : "",
  error: [q("#error"), q("#page-error")].filter(shown).map((e) => e.textContent).join(" ") || null,
  focus: a ? (a.id || a.tagName.toLowerCase()) : null,
  current: cur ? cur.dataset.slot + "-" + cur.dataset.scale : null,
  images: imgs.map((i) => i.src),
  loaded: imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0),
  resources: performance.getEntriesByType("resource").map((e) => e.name).concat([location.href]),
  text: document.body.innerText,
};
"##;

async fn state(c: &Client) -> Res<Value> {
    Ok(c.execute(STATE_JS, vec![]).await?)
}

/// Polls the page's state until `ok` holds (or fails after TIMEOUT, showing the last state).
async fn wait_for(c: &Client, what: &str, ok: impl Fn(&Value) -> bool) -> Res<Value> {
    let start = Instant::now();
    loop {
        let s = state(c).await?;
        if ok(&s) {
            return Ok(s);
        }
        if let Some(e) = s["error"].as_str() {
            return Err(format!("the page shows an error while waiting for {what}: {e}").into());
        }
        if start.elapsed() > TIMEOUT {
            let mut s = s;
            s["resources"] = json!("...");
            return Err(format!("timed out waiting for {what}; the page shows {s:#}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for comparison `k` of `n` with its images loaded.
async fn wait_position(c: &Client, k: usize, n: usize) -> Res<Value> {
    let want = format!("Comparison {k} of {n}");
    wait_for(c, &want, |s| {
        s["task"] == json!(true)
            && s["progress"].as_str() == Some(want.as_str())
            && s["loaded"] == json!(true)
    })
    .await
}

/// The total from "Comparison k of N".
fn total_of(s: &Value) -> Res<usize> {
    let p = s["progress"].as_str().unwrap_or_default();
    Ok(p.rsplit(' ')
        .next()
        .unwrap_or_default()
        .parse()
        .map_err(|_| format!("progress {p:?}"))?)
}

fn slots(s: &Value) -> Vec<String> {
    s["slots"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The ratings the test gives at `position` to the image in slot `i`: (alignment, fidelity).
fn rating(position: usize, i: usize) -> (u8, u8) {
    (
        ((position + i) % 5 + 1) as u8,
        ((2 * position + 3 * i + 1) % 5 + 1) as u8,
    )
}

/// The alignment the first comparison's image A gets when the rater comes back to change it.
fn changed(first: u8) -> u8 {
    (first + 1) % 5 + 1
}

/// The page's values map for these ratings.
fn values_for(slots: &[String], r: impl Fn(usize) -> (u8, u8)) -> Value {
    let mut m = serde_json::Map::new();
    for (i, s) in slots.iter().enumerate() {
        let (a, f) = r(i);
        m.insert(format!("{s}-alignment"), json!(a));
        m.insert(format!("{s}-fidelity"), json!(f));
    }
    Value::Object(m)
}

/// A mouse click on a rating button (scrolled to the middle of the window first, as a person
/// would scroll to it).
async fn click_rating(c: &Client, slot: &str, scale: &str, v: u8) -> Res<()> {
    let sel = format!("label[for=\"{slot}-{scale}-{v}\"]");
    c.execute(
        "document.querySelector(arguments[0]).scrollIntoView({block: 'center'});",
        vec![json!(sel)],
    )
    .await?;
    c.find(Locator::Css(&sel)).await?.click().await?;
    Ok(())
}

async fn click(c: &Client, css: &str) -> Res<()> {
    c.execute(
        "document.querySelector(arguments[0]).scrollIntoView({block: 'center'});",
        vec![json!(css)],
    )
    .await?;
    c.find(Locator::Css(css)).await?.click().await?;
    Ok(())
}

/// One key pressed and released, sent to whatever has the focus.
async fn press(c: &Client, key: char) -> Res<()> {
    let k = KeyActions::new("keyboard".into())
        .then(KeyAction::Down { value: key })
        .then(KeyAction::Up { value: key });
    c.perform_actions(k).await?;
    Ok(())
}

/// Rates the comparison shown with the mouse only, checking that Next waits for the last scale.
async fn rate_with_mouse(c: &Client, position: usize) -> Res<Value> {
    let s = state(c).await?;
    let slots = slots(&s);
    let last = slots.len() * 2;
    let mut set = 0;
    for (i, slot) in slots.iter().enumerate() {
        let (a, f) = rating(position, i);
        for (scale, v) in [("alignment", a), ("fidelity", f)] {
            let before = state(c).await?;
            ensure!(
                before["next_disabled"] == json!(true),
                "Next is enabled with {set} of {last} scales set: {before:#}"
            );
            click_rating(c, slot, scale, v).await?;
            set += 1;
        }
    }
    let want = values_for(&slots, |i| rating(position, i));
    wait_for(c, "the mouse's ratings and Next enabled", |s| {
        s["values"] == want && s["next_disabled"] == json!(false)
    })
    .await
}

/// Rates the comparison shown with the keyboard only: digits 1-5 set the highlighted scale and
/// move on; after the last one the focus is on Next. `shot`: a screenshot of the page halfway.
async fn rate_with_keyboard(c: &Client, position: usize, shot: Option<&str>) -> Res<Value> {
    let s = state(c).await?;
    let slots = slots(&s);
    let mut expect = serde_json::Map::new();
    for (i, slot) in slots.iter().enumerate() {
        let (a, f) = rating(position, i);
        for (scale, v) in [("alignment", a), ("fidelity", f)] {
            let name = format!("{slot}-{scale}");
            if let Some(shot) = shot.filter(|_| expect.len() == slots.len()) {
                c.execute("window.scrollTo(0, 0)", vec![]).await?;
                save_screenshot(c, shot).await?;
            }
            let now = state(c).await?;
            ensure!(
                now["current"] == json!(name),
                "the highlighted scale is {} where {name} was expected: {now:#}",
                now["current"]
            );
            press(c, char::from(b'0' + v)).await?;
            expect.insert(name.clone(), json!(v));
            let e = expect.clone();
            wait_for(c, &format!("{name} = {v} by the keyboard"), move |s| {
                e.iter().all(|(k, v)| s["values"][k] == *v)
            })
            .await?;
        }
    }
    wait_for(c, "the focus on an enabled Next", |s| {
        s["focus"] == json!("next") && s["next_disabled"] == json!(false)
    })
    .await
}

/// Everything a rater's page showed and fetched, for the blindness check at the end.
#[derive(Default)]
struct Seen {
    pages: Vec<String>,
    urls: BTreeSet<String>,
}

impl Seen {
    async fn record(&mut self, c: &Client) -> Res<()> {
        self.pages.push(c.source().await?);
        let s = state(c).await?;
        self.pages
            .push(s["text"].as_str().unwrap_or_default().to_string());
        for key in ["resources", "images"] {
            for u in s[key].as_array().into_iter().flatten() {
                self.urls.insert(u.as_str().unwrap_or_default().to_string());
            }
        }
        Ok(())
    }
}

async fn save_screenshot(c: &Client, name: &str) -> Res<()> {
    let png = c.screenshot().await?;
    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(name), png)?;
    Ok(())
}

/// The first device: comparison 1 by mouse, 2 by keyboard, back to 1 (showing the answers given)
/// to change one answer, forward to 3 and rate it, then leave at 4. Returns N.
async fn first_device(c: Client, link: String, seen: &mut Seen) -> Res<usize> {
    c.set_window_size(WINDOW.0, WINDOW.1).await?;
    c.goto(&link).await?;
    let s = wait_for(&c, "the first comparison", |s| {
        s["task"] == json!(true) && s["loaded"] == json!(true)
    })
    .await?;
    let n = total_of(&s)?;
    ensure!(
        s["progress"] == json!(format!("Comparison 1 of {n}")),
        "starts at {}",
        s["progress"]
    );
    ensure!(
        n >= 4,
        "a study of {n} comparisons is too short for this test"
    );
    ensure!(
        PROMPTS.contains(&s["prompt"].as_str().unwrap_or_default()),
        "prompt {}",
        s["prompt"]
    );
    ensure!(
        s["back_disabled"] == json!(true),
        "Back is enabled on the first comparison"
    );
    ensure!(
        s["hint"] == json!(format!("{} ratings left", 2 * METHODS.len())),
        "a fresh comparison's hint: {}",
        s["hint"]
    );
    let text = s["text"].as_str().unwrap_or_default();
    for needle in [
        "Alignment",
        "Fidelity",
        "1 = poor",
        "5 = excellent",
        "Keyboard shortcuts",
    ] {
        ensure!(
            text.contains(needle),
            "the page does not show {needle:?}:\n{text}"
        );
    }
    let slots1 = slots(&s);
    ensure!(slots1.len() == METHODS.len(), "slots {slots1:?}");
    ensure!(
        slots1.iter().zip(["A", "B"]).all(|(a, b)| a == b),
        "slots {slots1:?}"
    );
    seen.record(&c).await?;

    // 1: the mouse.
    rate_with_mouse(&c, 1).await?;
    c.execute("window.scrollTo(0, 0)", vec![]).await?;
    save_screenshot(&c, "rate.png").await?;
    click(&c, "#next").await?;

    // 2: the keyboard only.
    wait_position(&c, 2, n).await?;
    seen.record(&c).await?;
    rate_with_keyboard(&c, 2, Some("rate-keyboard.png")).await?;
    press(&c, char::from(Key::Enter)).await?;
    wait_position(&c, 3, n).await?;

    // Back (the button) to 2, which shows the keyboard's answers; Back (Backspace) to 1, which
    // shows the mouse's.
    click(&c, "#back").await?;
    let s = wait_position(&c, 2, n).await?;
    let slots2 = slots(&s);
    ensure!(
        s["values"] == values_for(&slots2, |i| rating(2, i)),
        "comparison 2 does not show the answers given: {:#}",
        s["values"]
    );
    ensure!(
        s["hint"]
            .as_str()
            .is_some_and(|h| h.starts_with("Answered before")),
        "an answered comparison does not say so: {}",
        s["hint"]
    );
    press(&c, char::from(Key::Backspace)).await?;
    let s = wait_position(&c, 1, n).await?;
    ensure!(
        s["values"] == values_for(&slots1, |i| rating(1, i)),
        "comparison 1 does not show the answers given: {:#}",
        s["values"]
    );
    ensure!(
        s["next_disabled"] == json!(false),
        "Next is disabled on an answered comparison"
    );
    seen.record(&c).await?;

    // Change A's alignment; Next saves it and shows 2 again (answered: Next right away), then 3.
    click_rating(&c, "A", "alignment", changed(rating(1, 0).0)).await?;
    wait_for(&c, "the hint to say the answer changed", |s| {
        s["hint"].as_str().is_some_and(|h| h.starts_with("Changed"))
    })
    .await?;
    click(&c, "#next").await?;
    let s = wait_position(&c, 2, n).await?;
    ensure!(
        s["next_disabled"] == json!(false),
        "Next is disabled on answered comparison 2"
    );
    press(&c, char::from(Key::Enter)).await?;
    wait_position(&c, 3, n).await?;
    rate_with_mouse(&c, 3).await?;
    click(&c, "#next").await?;
    wait_position(&c, 4, n).await?;
    seen.record(&c).await?;
    Ok(n)
}

/// The second device: resumes at 4 of N, finishes (keyboard and mouse alternating), sees the
/// thank-you page and can go back from it.
async fn second_device(c: Client, link: String, n: usize, seen: &mut Seen) -> Res<()> {
    c.set_window_size(WINDOW.0, WINDOW.1).await?;
    c.goto(&link).await?;
    let s = wait_position(&c, 4, n).await?;
    ensure!(s["back_disabled"] == json!(false), "Back is disabled at 4");
    seen.record(&c).await?;
    for k in 4..=n {
        wait_position(&c, k, n).await?;
        if k % 2 == 0 {
            rate_with_keyboard(&c, k, None).await?;
            press(&c, char::from(Key::Enter)).await?;
        } else {
            rate_with_mouse(&c, k).await?;
            click(&c, "#next").await?;
        }
    }
    let s = wait_for(&c, "the thank-you page", |s| s["finished"] == json!(true)).await?;
    let text = s["text"].as_str().unwrap_or_default();
    ensure!(text.contains("Thank you"), "the last page says:\n{text}");
    ensure!(
        s["progress"] == json!(format!("All {n} comparisons answered")),
        "progress {}",
        s["progress"]
    );
    seen.record(&c).await?;
    save_screenshot(&c, "thanks.png").await?;

    // Back from the thank-you page: the last comparison with its answers.
    click(&c, "#review-last").await?;
    let s = wait_position(&c, n, n).await?;
    let slots = slots(&s);
    ensure!(
        s["values"] == values_for(&slots, |i| rating(n, i)),
        "the last comparison does not show its answers: {:#}",
        s["values"]
    );
    Ok(())
}

/// The admin page: both raters, rater-01 complete; a screenshot.
async fn admin_page(c: Client, url: String, n: usize) -> Res<String> {
    c.set_window_size(WINDOW.0, WINDOW.1).await?;
    c.goto(&url).await?;
    let want = format!("{n} / {n}");
    let start = Instant::now();
    loop {
        let rows = c.find_all(Locator::Css("#raters tr")).await?;
        if rows.len() == 2 && rows[0].text().await?.contains(&want) {
            break;
        }
        ensure!(
            start.elapsed() < TIMEOUT,
            "the admin page does not show rater-01 at {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = c.find_all(Locator::Css("#raters tr")).await?;
    let second = rows[1].text().await?;
    ensure!(
        second.contains("rater-02") && second.contains(&format!("0 / {n}")),
        "{second}"
    );
    let methods = c.find(Locator::Id("methods")).await?.text().await?;
    for (m, _) in METHODS {
        ensure!(
            methods.split_whitespace().any(|w| w == m),
            "methods {methods:?}"
        );
    }
    let export = c.find(Locator::Id("export")).await?;
    let href = export.prop("href").await?.unwrap_or_default();
    ensure!(export.text().await? == "Export CSV", "the export link");
    save_screenshot(&c, "admin.png").await?;
    Ok(href)
}

// ---- checks on what the server stored and what the rater saw -------------------------------

/// `word` in `hay` as a whole word (case-insensitive; letters, digits and `_` make words).
fn has_word(hay: &str, word: &str) -> bool {
    let (hay, word) = (hay.to_lowercase(), word.to_lowercase());
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    hay.match_indices(&word).any(|(i, _)| {
        !hay[..i].chars().next_back().is_some_and(is_word)
            && !hay[i + word.len()..].chars().next().is_some_and(is_word)
    })
}

/// One CSV line's fields (quoted fields may hold commas and doubled quotes).
fn csv_fields(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted, mut chars) =
        (Vec::new(), String::new(), false, line.chars().peekable());
    while let Some(ch) = chars.next() {
        match (ch, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            _ => cur.push(ch),
        }
    }
    out.push(cur);
    out
}

#[test]
fn a_rater_rates_goes_back_resumes_and_finishes_in_chromium() {
    // Fails (does not skip) without chromedriver: CI installs it.
    let _ = chromedriver();
    let tmp = tempfile::tempdir().unwrap();
    let (study, runs) = make_study(tmp.path());
    let server = start_server(&study, tmp.path());
    let (driver, port) = start_chromedriver(tmp.path());
    assert_eq!(server.raters.len(), 2, "{:?}", server.raters);
    let (name, link) = server.raters[0].clone();
    assert_eq!(name, "rater-01");
    let token = link.rsplit('/').next().unwrap().to_string();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut seen = Seen::default();
    let r: Res<(usize, String)> = rt.block_on(async {
        let (l, s) = (link.clone(), &mut seen);
        let n = in_session(port, |c| async move { first_device(c, l, s).await }).await?;
        let (l, s) = (link.clone(), &mut seen);
        in_session(port, |c| async move { second_device(c, l, n, s).await }).await?;
        let a = server.admin.clone();
        let href = in_session(port, |c| async move { admin_page(c, a, n).await }).await?;
        Ok((n, href))
    });
    let (n, export) = r.unwrap_or_else(|e| {
        panic!(
            "{e}\n--- decorr study serve:\n{}\n--- chromedriver:\n{}",
            server.log(),
            driver.log_tail()
        )
    });

    // The server's state: the API says finished; the CSV holds every comparison once, with the
    // changed answer.
    let (status, body) = get(&format!("{}/api/{token}/next", server.base)).unwrap();
    assert_eq!(status, 200, "{body}");
    let next: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(next, json!({"finished": true, "done": n, "total": n}));
    let admin = server.admin.rsplit('/').next().unwrap();
    assert!(
        export.ends_with(&format!("/admin/{admin}/export.csv")),
        "{export}"
    );
    let (status, csv) = get(&export).unwrap();
    assert_eq!(status, 200, "{csv}");
    let mut lines = csv.lines();
    let header = csv_fields(lines.next().unwrap());
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let (rater, position, slot, alignment, fidelity, prompt) = (
        col("rater"),
        col("position"),
        col("slot"),
        col("alignment"),
        col("fidelity"),
        col("prompt"),
    );
    let mut stored: BTreeMap<(usize, String), (u8, u8)> = BTreeMap::new();
    for line in lines {
        let f = csv_fields(line);
        assert_eq!(f[rater], "rater-01", "only rater-01 answered: {line}");
        assert!(PROMPTS.contains(&f[prompt].as_str()), "{line}");
        let key = (f[position].parse().unwrap(), f[slot].clone());
        let v = (f[alignment].parse().unwrap(), f[fidelity].parse().unwrap());
        assert!(stored.insert(key, v).is_none(), "answered twice: {line}");
    }
    let mut expected = BTreeMap::new();
    for p in 1..=n {
        for (i, s) in ["A", "B"].iter().enumerate() {
            expected.insert((p, s.to_string()), rating(p, i));
        }
    }
    let first_a = expected.get_mut(&(1, "A".to_string())).unwrap();
    first_a.0 = changed(first_a.0);
    assert_eq!(
        stored, expected,
        "the stored answers (position, slot) -> (alignment, fidelity)"
    );

    // Blindness: no method name, run folder or seed in any page the rater saw or URL it fetched.
    assert!(seen.pages.len() >= 8, "{} pages recorded", seen.pages.len());
    let hex = |s: &str| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
    for u in &seen.urls {
        let path = u
            .strip_prefix(&server.base)
            .unwrap_or_else(|| panic!("the page fetched {u} from elsewhere"));
        let parts: Vec<&str> = path.split('/').collect();
        let ok = match parts.as_slice() {
            ["", "rate", t] => *t == token,
            ["", "favicon.ico"] => true, // the browser's own request (a 404)
            ["", "assets", f] => ["rate.js", "style.css"].contains(f),
            ["", "api", t, "next" | "answer"] => *t == token,
            ["", "api", t, "item", p] => *t == token && p.parse::<usize>().is_ok(),
            ["", "img", t, f] => *t == token && f.strip_suffix(".png").is_some_and(hex),
            _ => false,
        };
        assert!(ok, "unexpected URL {u}");
    }
    let mut words: Vec<String> = METHODS
        .iter()
        .flat_map(|(m, g)| [m.to_string(), g.to_string()])
        .collect();
    words.push("seed".into());
    let paths: Vec<String> = runs
        .iter()
        .chain([&study])
        .map(|p| p.display().to_string())
        .chain([tmp.path().display().to_string()])
        .collect();
    for page in seen.pages.iter().chain(seen.urls.iter()) {
        for w in &words {
            assert!(!has_word(page, w), "{w:?} shown to the rater in:\n{page}");
        }
        for p in &paths {
            assert!(
                !page.contains(p.as_str()),
                "{p} shown to the rater in:\n{page}"
            );
        }
    }
    // ... nor in the assets the page loads.
    for asset in ["rate.js", "style.css"] {
        let (status, body) = get(&format!("{}/assets/{asset}", server.base)).unwrap();
        assert_eq!(status, 200);
        for w in &words {
            assert!(!has_word(&body, w), "{w:?} in {asset}");
        }
    }
    for f in ["rate.png", "rate-keyboard.png", "thanks.png", "admin.png"] {
        assert!(screenshot_dir().join(f).is_file(), "no screenshot {f}");
    }
    drop(driver);
    drop(server);
}
