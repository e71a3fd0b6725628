//! The hub client against a fake hub on loopback: a normal download lands in the cache layout,
//! and a server that answers a path-like ETag or commit, or bytes that do not match their
//! announced hash, is refused with nothing written outside (or inside) the cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use decorr_core::hub::Hub;
use sha2::{Digest, Sha256};
use tiny_http::{Header, Response, Server};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const BODY: &[u8] = b"{\"sample_size\": 8}";

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// What the fake hub answers to the metadata request (HEAD) of every file.
#[derive(Clone)]
struct Answer {
    commit: String,
    etag: String,
    /// Redirect the bytes to `/cdn/...` (an absolute URL), as the hub does for LFS files.
    redirect: bool,
    body: Vec<u8>,
}

struct FakeHub {
    endpoint: String,
    requests: Arc<AtomicUsize>,
}

fn serve(answer: Answer) -> FakeHub {
    let server = Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    let base = endpoint.clone();
    std::thread::spawn(move || {
        for req in server.incoming_requests() {
            count.fetch_add(1, Ordering::SeqCst);
            let h = |k: &str, v: &str| Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap();
            let url = req.url().to_string();
            let resp = if url.starts_with("/cdn/") {
                Response::from_data(answer.body.clone())
            } else if req.method() == &tiny_http::Method::Head {
                let mut r = Response::from_data(Vec::new())
                    .with_header(h("X-Repo-Commit", &answer.commit))
                    .with_header(h("ETag", &format!("\"{}\"", answer.etag)));
                if answer.redirect {
                    r = r
                        .with_status_code(302)
                        .with_header(h("Location", &format!("{base}/cdn{url}")));
                }
                r
            } else {
                Response::from_data(answer.body.clone())
            };
            let _ = req.respond(resp);
        }
    });
    FakeHub { endpoint, requests }
}

/// Every file under `root` (links not followed).
fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

fn good() -> Answer {
    Answer {
        commit: COMMIT.into(),
        etag: sha256(BODY),
        redirect: false,
        body: BODY.to_vec(),
    }
}

#[test]
fn download_lands_in_the_cache_layout_and_is_reused() {
    for redirect in [false, true] {
        let hub = serve(Answer { redirect, ..good() });
        let root = tempfile::tempdir().unwrap();
        let cache = root.path().join("hub");
        let client = Hub::new(&hub.endpoint, None, cache.clone());
        let p = client.get("org/tiny", "main", "unet/config.json").unwrap();
        let repo = cache.join("models--org--tiny");
        assert_eq!(p, repo.join(format!("snapshots/{COMMIT}/unet/config.json")));
        assert_eq!(std::fs::read(&p).unwrap(), BODY);
        assert!(
            std::fs::symlink_metadata(&p)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            std::fs::read_to_string(repo.join("refs/main")).unwrap(),
            COMMIT
        );
        assert!(repo.join("blobs").join(sha256(BODY)).is_file());
        let n = hub.requests.load(Ordering::SeqCst);
        assert_eq!(
            n, 2,
            "HEAD, then GET of the resolve URL or of the CDN address"
        );
        // The second time the cache answers; the server is not asked.
        assert_eq!(
            client.get("org/tiny", "main", "unet/config.json").unwrap(),
            p
        );
        assert_eq!(hub.requests.load(Ordering::SeqCst), n);
        // No temp file is left in the blobs folder.
        assert_eq!(std::fs::read_dir(repo.join("blobs")).unwrap().count(), 1);
    }
}

#[test]
fn path_like_etag_or_commit_is_refused_and_nothing_is_written() {
    let cases = [
        Answer {
            etag: "../../../../evil".into(),
            ..good()
        },
        Answer {
            etag: "/tmp/evil".into(),
            ..good()
        },
        Answer {
            commit: "../../../evil".into(),
            ..good()
        },
        Answer {
            commit: format!("{COMMIT}/../../x"),
            ..good()
        },
    ];
    for answer in cases {
        let hub = serve(answer.clone());
        let root = tempfile::tempdir().unwrap();
        let cache = root.path().join("a/b/hub");
        std::fs::create_dir_all(&cache).unwrap();
        let client = Hub::new(&hub.endpoint, None, cache.clone());
        let err = client
            .get("org/tiny", "main", "unet/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refusing") && err.contains("not a"),
            "{}/{}: {err}",
            answer.commit,
            answer.etag
        );
        // Only the metadata request was made: no bytes were fetched, no file written anywhere.
        assert_eq!(hub.requests.load(Ordering::SeqCst), 1);
        assert_eq!(files_under(root.path()), Vec::<PathBuf>::new());
    }
}

#[test]
fn bytes_that_do_not_match_their_hash_are_refused() {
    let hub = serve(Answer {
        etag: sha256(b"something else"),
        ..good()
    });
    let root = tempfile::tempdir().unwrap();
    let client = Hub::new(&hub.endpoint, None, root.path().to_path_buf());
    let err = client
        .get("org/tiny", "main", "unet/config.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("SHA-256"), "{err}");
    assert_eq!(files_under(root.path()), Vec::<PathBuf>::new());
}

#[test]
fn bad_revision_or_repo_is_refused_before_any_request() {
    let hub = serve(good());
    let root = tempfile::tempdir().unwrap();
    let client = Hub::new(&hub.endpoint, None, root.path().to_path_buf());
    for (repo, rev) in [
        ("org/tiny", "../../x"),
        ("org/tiny", "/abs"),
        ("../org", "main"),
        ("org/tiny/../../x", "main"),
    ] {
        let err = client
            .get(repo, rev, "config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--revision") || err.contains("--model"),
            "{err}"
        );
    }
    assert_eq!(hub.requests.load(Ordering::SeqCst), 0);
}
