//! Hostile checkpoint files (pickles crafted to exhaust memory or the stack, tensors claiming
//! more bytes than their storage, absurd counts, lying safetensors headers) give a clean error
//! naming the file, never an abort. The cases run in a child process of this test binary whose
//! address space is limited to 1 GiB (`RLIMIT_AS`), so an exponential blow-up or a huge
//! allocation fails the test (the child aborts) instead of taking the machine's memory.

use std::path::Path;
use std::process::Command;

use decorr_convert::ckpt::read_ckpt_bytes;
use decorr_convert::tensor::{read_safetensors, read_safetensors_bytes};
use decorr_convert::{StateDict, read_state_dict};

const CHILD_ENV: &str = "DECORR_HOSTILE_CHILD";
const LIMIT_BYTES: u64 = 1 << 30;
const THIS_TEST: &str = "hostile_files_fail_cleanly_under_a_1_gib_limit";

#[test]
fn hostile_files_fail_cleanly_under_a_1_gib_limit() {
    if std::env::var_os(CHILD_ENV).is_some() {
        let lim = libc::rlimit {
            rlim_cur: LIMIT_BYTES as libc::rlim_t,
            rlim_max: LIMIT_BYTES as libc::rlim_t,
        };
        // SAFETY: setrlimit with a valid, initialised struct.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);
        let n = run_cases();
        println!("HOSTILE CASES PASSED: {n}");
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([THIS_TEST, "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("HOSTILE CASES PASSED"),
        "the child under a 1 GiB address-space limit failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    print!("{stdout}");
}

// ---------------------------------------------------------------- pickle building

/// A protocol-2 pickle under construction.
struct P(Vec<u8>);

impl P {
    fn new() -> Self {
        P(vec![0x80, 0x02])
    }
    fn op(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn int(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&[0x8a, 8]);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn ints(&mut self, vs: &[i64]) -> &mut Self {
        self.op(b"(");
        for v in vs {
            self.int(*v);
        }
        self.op(b"t")
    }
    /// `_rebuild_tensor_v2(storage(key), offset, size, stride, False, {})`.
    fn tensor(&mut self, key: &str, offset: i64, size: &[i64], stride: &[i64]) -> &mut Self {
        self.op(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        self.op(b"(")
            .str("storage")
            .op(b"ctorch\nFloatStorage\n")
            .str(key)
            .str("cpu")
            .int(0)
            .op(b"tQ");
        self.int(offset).ints(size).ints(stride).op(b"\x89}tR")
    }
    fn stop(&mut self) -> Vec<u8> {
        self.0.push(b'.');
        std::mem::take(&mut self.0)
    }
}

/// `(name, storage key, offset, size, stride)` of one tensor.
type Entry<'a> = (&'a str, &'a str, i64, &'a [i64], &'a [i64]);

/// A state dict pickle `{name: tensor}`.
fn state_dict_pickle(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut p = P::new();
    p.op(b"}(");
    for (name, key, offset, size, stride) in entries {
        p.str(name).tensor(key, *offset, size, stride);
    }
    p.op(b"u").stop()
}

/// A PyTorch zip checkpoint (`archive/data.pkl`, `archive/data/<key>`), entries stored.
fn zip_ckpt(pkl: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file("archive/data.pkl", opts).unwrap();
    w.write_all(pkl).unwrap();
    for (key, bytes) in storages {
        w.start_file(format!("archive/data/{key}"), opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// A legacy-format (pre-1.6) file: magic, protocol, system info, object, keys, then per key an
/// element count and the bytes.
fn legacy(object: &[u8], keys: &[&str], storages: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = P::new()
        .op(&[
            0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
        ])
        .stop();
    out.extend(P::new().op(b"M\xe9\x03").stop());
    out.extend(P::new().op(b"}").stop());
    out.extend_from_slice(object);
    let mut k = P::new();
    k.op(b"](");
    for key in keys {
        k.str(key);
    }
    out.extend(k.op(b"e").stop());
    for (numel, bytes) in storages {
        out.extend_from_slice(&numel.to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// The "billion laughs" pickle: ten levels of tuples, each holding ten memo references to the
/// level below (10^10 strings if materialised). `top_dict` wraps it in `{'a': ...}`.
fn billion_laughs(top_dict: bool) -> Vec<u8> {
    let mut p = P::new();
    if top_dict {
        p.op(b"}").str("a");
    }
    p.op(&[b'('; 10]);
    p.str("lol").op(b"q\x63");
    for _ in 0..9 {
        p.op(b"h\x63");
    }
    for level in 0u8..9 {
        p.op(&[b't', b'q', level]);
        for _ in 0..9 {
            p.op(&[b'h', level]);
        }
    }
    p.op(b"t");
    if top_dict {
        p.op(b"s");
    }
    p.stop()
}

// ---------------------------------------------------------------- cases

#[derive(Clone, Copy)]
enum Kind {
    Ckpt,
    Safetensors,
}

enum Expect {
    /// An error whose message holds this.
    Err(&'static str),
    /// Read without error, holding this many tensors (nothing hostile left in it).
    Tensors(usize),
}

struct Case {
    name: &'static str,
    kind: Kind,
    bytes: Vec<u8>,
    expect: Expect,
}

fn cases() -> Vec<Case> {
    use Expect::{Err, Tensors};
    use Kind::{Ckpt, Safetensors};
    let mut v = Vec::new();
    let mut case = |name, kind, bytes, expect| {
        v.push(Case {
            name,
            kind,
            bytes,
            expect,
        })
    };
    let f32s = |n: usize| vec![0u8; 4 * n];

    // Exponential memo re-use: never materialised, so no error beyond "no state dict".
    let laughs = billion_laughs(false);
    assert!(laughs.len() < 700, "{}", laughs.len());
    case(
        "billion_laughs.ckpt",
        Ckpt,
        zip_ckpt(&laughs, &[]),
        Err("top-level object is a tuple, not a dict"),
    );
    case(
        "billion_laughs_in_dict.ckpt",
        Ckpt,
        zip_ckpt(&billion_laughs(true), &[]),
        Tensors(0),
    );
    case(
        "billion_laughs_legacy.pth",
        Ckpt,
        legacy(&billion_laughs(true), &[], &[]),
        Tensors(0),
    );

    // One 1 MiB storage, 20 000 names all bound to one memoised tensor spanning it: 20 GB if
    // every name were materialised. Caught by the budget set by the file's size.
    let mut p = P::new();
    p.op(b"}(")
        .str("t0")
        .tensor("0", 0, &[1 << 18], &[1])
        .op(b"q\x00");
    for i in 1..20_000 {
        p.str(&format!("t{i}")).op(b"h\x00");
    }
    let fanout = p.op(b"u").stop();
    case(
        "tensor_fanout.ckpt",
        Ckpt,
        zip_ckpt(&fanout, &[("0", f32s(1 << 18))]),
        Err("far more data than the file holds"),
    );

    // Deep nesting: 100 000 levels.
    let mut p = P::new();
    p.op(&vec![b'('; 100_000]).op(&vec![b't'; 100_000]);
    case(
        "deep_marks.ckpt",
        Ckpt,
        zip_ckpt(&p.stop(), &[]),
        Err("nests deeper than 1000 levels"),
    );
    let mut p = P::new();
    p.op(b"N").op(&vec![0x85; 100_000]);
    case(
        "deep_tuples.ckpt",
        Ckpt,
        zip_ckpt(&p.stop(), &[]),
        Err("top-level object is a tuple"),
    );
    let mut p = P::new();
    p.op(b"}").str("a").op(&vec![b']'; 100_000]);
    p.op(&vec![b'a'; 99_999]).op(b"s");
    case(
        "deep_lists_in_dict.ckpt",
        Ckpt,
        zip_ckpt(&p.stop(), &[]),
        Tensors(0),
    );
    let mut p = P::new();
    p.op(&vec![b']'; 100_000]).op(&vec![b'a'; 99_999]);
    case(
        "deep_lists_legacy.pth",
        Ckpt,
        legacy(&p.stop(), &[], &[]),
        Err("top-level object is a list"),
    );

    // Tensors claiming more than their storage.
    let ok = state_dict_pickle(&[("w", "0", 0, &[4], &[1])]);
    case(
        "sane.ckpt",
        Ckpt,
        zip_ckpt(&ok, &[("0", f32s(4))]),
        Tensors(1),
    );
    case(
        "size_times_stride_4.6e18.ckpt",
        Ckpt,
        zip_ckpt(
            &state_dict_pickle(&[("w", "0", 0, &[1 << 31, 1 << 31], &[1 << 31, 1])]),
            &[("0", f32s(4))],
        ),
        Err("reaches beyond its storage of 16 bytes"),
    );
    case(
        "stride_0_4.6e18_bytes.ckpt",
        Ckpt,
        zip_ckpt(
            &state_dict_pickle(&[("w", "0", 0, &[1 << 60], &[0])]),
            &[("0", f32s(4))],
        ),
        Err("far more data than the file holds"),
    );
    case(
        "size_stride_overflow.ckpt",
        Ckpt,
        zip_ckpt(
            &state_dict_pickle(&[("w", "0", 0, &[1 << 20, 1 << 20], &[1 << 50, 1 << 50])]),
            &[("0", f32s(4))],
        ),
        Err("reaches beyond its storage"),
    );
    case(
        "offset_beyond_storage.ckpt",
        Ckpt,
        zip_ckpt(
            &state_dict_pickle(&[("w", "0", i64::MAX, &[1], &[1])]),
            &[("0", f32s(4))],
        ),
        Err("reaches beyond its storage"),
    );
    case(
        "rank_100.ckpt",
        Ckpt,
        zip_ckpt(
            &state_dict_pickle(&[("w", "0", 0, &[1; 100], &[1; 100])]),
            &[("0", f32s(4))],
        ),
        Err("at most 64 are accepted"),
    );
    case(
        "missing_storage.ckpt",
        Ckpt,
        zip_ckpt(&ok, &[]),
        Err("archive/data/0"),
    );

    // Lengths read from the file beyond its end.
    let mut p = P::new();
    p.op(b"X\xff\xff\xff\xff");
    case(
        "binunicode_4gib.ckpt",
        Ckpt,
        zip_ckpt(&p.stop(), &[]),
        Err("the pickle ends early"),
    );
    let mut p = P::new();
    p.op(b"\x8d\x00\x00\x00\x00\x00\x00\x00\x80");
    case(
        "binunicode8_huge.ckpt",
        Ckpt,
        zip_ckpt(&p.stop(), &[]),
        Err("the pickle ends early"),
    );
    let mut p = P::new();
    p.op(b"\x8e\xff\xff\xff\xff\xff\xff\xff\xff");
    case(
        "binbytes8_huge.pth",
        Ckpt,
        legacy(&p.stop(), &[], &[]),
        Err("the pickle ends early"),
    );

    // Legacy format with absurd counts.
    case(
        "legacy_sane.pth",
        Ckpt,
        legacy(&ok, &["0"], &[(4, f32s(4))]),
        Tensors(1),
    );
    case(
        "legacy_storage_longer_than_file.pth",
        Ckpt,
        legacy(&ok, &["0"], &[(u64::MAX / 2, f32s(4))]),
        Err("beyond the end of the file"),
    );
    case(
        "legacy_storage_1e18_elements.pth",
        Ckpt,
        legacy(&ok, &["0"], &[(1 << 60, f32s(4))]),
        Err("beyond the end of the file"),
    );
    let many_keys = vec!["0"; 1_000_000];
    case(
        "legacy_million_keys.pth",
        Ckpt,
        legacy(&ok, &many_keys, &[(4, f32s(4))]),
        Err("the file ends before storage `0`"),
    );
    case(
        "legacy_view_beyond_storage.pth",
        Ckpt,
        legacy(
            &state_dict_pickle(&[("w", "0", 0, &[1 << 20], &[1])]),
            &["0"],
            &[(4, f32s(4))],
        ),
        Err("reaches beyond its storage"),
    );

    // Safetensors headers lying about the file.
    let st = |header: &str, data: usize| {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend(vec![0u8; data]);
        b
    };
    let mut huge_header = st("{}", 0);
    huge_header[..8].copy_from_slice(&(1u64 << 62).to_le_bytes());
    case(
        "header_len_2e62.safetensors",
        Safetensors,
        huge_header,
        Err("re-download"),
    );
    let mut long_header = st("{}", 0);
    long_header[..8].copy_from_slice(&1000u64.to_le_bytes());
    case(
        "header_longer_than_file.safetensors",
        Safetensors,
        long_header,
        Err("re-download"),
    );
    case(
        "offsets_beyond_file.safetensors",
        Safetensors,
        st(
            r#"{"w":{"dtype":"F32","shape":[1000000000],"data_offsets":[0,4000000000]}}"#,
            16,
        ),
        Err("re-download"),
    );
    case(
        "offsets_u64_max.safetensors",
        Safetensors,
        st(
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,18446744073709551615]}}"#,
            16,
        ),
        Err("re-download"),
    );
    case(
        "shape_overflow.safetensors",
        Safetensors,
        st(
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,16]}}"#,
            16,
        ),
        Err("re-download"),
    );
    case(
        "sane.safetensors",
        Safetensors,
        st(
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            16,
        ),
        Tensors(1),
    );
    v
}

fn check(case: &Case, how: &str, path: &Path, got: Result<StateDict, String>) {
    let file = path.file_name().unwrap().to_string_lossy();
    match (&case.expect, got) {
        (Expect::Err(needle), Err(e)) => {
            assert!(e.contains(needle), "{} ({how}): {e}", case.name);
            assert!(
                e.contains(&*file),
                "{} ({how}) names no file: {e}",
                case.name
            );
            assert!(
                e.contains("re-download"),
                "{} ({how}) says nothing to do: {e}",
                case.name
            );
        }
        (Expect::Tensors(n), Ok(sd)) => assert_eq!(sd.len(), *n, "{} ({how})", case.name),
        (Expect::Err(needle), Ok(sd)) => panic!(
            "{} ({how}): read {} tensors, expected an error with `{needle}`",
            case.name,
            sd.len()
        ),
        (Expect::Tensors(_), Err(e)) => panic!("{} ({how}): {e}", case.name),
    }
}

fn run_cases() -> usize {
    let tmp = tempfile::tempdir().unwrap();
    let all = cases();
    for case in &all {
        let start = std::time::Instant::now();
        let path = tmp.path().join(case.name);
        std::fs::write(&path, &case.bytes).unwrap();
        let s = |r: Result<StateDict, decorr_convert::ConvertError>| r.map_err(|e| e.to_string());
        // Through the format sniffing of every single-file read, and from memory.
        check(case, "read_state_dict", &path, s(read_state_dict(&path)));
        match case.kind {
            Kind::Ckpt => check(
                case,
                "read_ckpt_bytes",
                &path,
                s(read_ckpt_bytes(&case.bytes, &path)),
            ),
            Kind::Safetensors => {
                check(case, "read_safetensors", &path, s(read_safetensors(&path)));
                check(
                    case,
                    "read_safetensors_bytes",
                    &path,
                    s(read_safetensors_bytes(&case.bytes, &path)),
                );
                // decorr-core's reader of reference tensors: an error, not a panic.
                let core = decorr_core::weights::read_tensors_f32(&path);
                match case.expect {
                    Expect::Err(_) => {
                        let e = core.unwrap_err().to_string();
                        assert!(e.contains(case.name), "{}: {e}", case.name);
                    }
                    Expect::Tensors(n) => assert_eq!(core.unwrap().len(), n),
                }
            }
        }
        println!(
            "{:<40} {:>9} bytes  ok  {:.2}s",
            case.name,
            case.bytes.len(),
            start.elapsed().as_secs_f64()
        );
    }
    all.len()
}
