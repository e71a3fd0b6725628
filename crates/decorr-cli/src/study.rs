//! `decorr study create|serve|report`: the human rating study of the paper's table 4 (the
//! library is decorr-study; this file parses, prints and runs the server's runtime).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use decorr_study::MAX_RESAMPLES;
use decorr_study::create::{MAX_COUNT, MAX_RATERS};
use decorr_study::server::Limits;

#[derive(Args, Debug)]
pub struct StudyArgs {
    #[command(subcommand)]
    command: StudyCommand,
}

#[derive(Subcommand, Debug)]
enum StudyCommand {
    /// Pick the comparisons from the runs' manifests and write STUDY (images without metadata,
    /// study.sqlite with raters, orders and placements).
    Create(CreateArgs),
    /// Serve the rating pages: one link per rater, and an admin page. The study's files are
    /// checked first. No client can hold the server open: a connection that sends no complete
    /// request headers within --header-timeout (idle keep-alive ones too) is closed, a request
    /// not complete within --request-timeout gets a 408, and beyond --max-connections open at
    /// once a new one gets a 503.
    Serve(ServeArgs),
    /// Table 4 and its statistics from the answers so far.
    Report(ReportArgs),
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// Run folders to compare, one per method (`decorr generate --out`, or `decorr compare`'s
    /// DIR/sd, DIR/pag, ...).
    #[arg(long, num_args = 1.., required = true)]
    runs: Vec<PathBuf>,
    /// `{"PROMPT": ["FIRST", "TARGET"]}` (`decorr compare`'s objects.json): prompts of the same
    /// object pair are sampled together. Without it every prompt is its own pair.
    #[arg(long)]
    objects_file: Option<PathBuf>,
    /// Prompts drawn from each object pair (at random, seeded by --seed).
    #[arg(long, default_value_t = 2, value_name = "N",
          value_parser = count(1, MAX_COUNT, "2 is the paper's"))]
    prompts_per_pair: usize,
    /// Seeds drawn for each drawn prompt, among those every method has (seeded by --seed).
    #[arg(long, default_value_t = 5, value_name = "N",
          value_parser = count(1, MAX_COUNT, "5 is the paper's"))]
    seeds_per_prompt: usize,
    /// Seed of every random choice (comparisons, orders, placements), recorded in the study.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Anonymous raters rater-01, rater-02, ... (at most 10000).
    #[arg(long, conflicts_with = "rater", value_name = "N",
          value_parser = count(1, MAX_RATERS, "one per person rating"))]
    raters: Option<usize>,
    /// A named rater; repeat for each (at most 10000).
    #[arg(long)]
    rater: Vec<String>,
    /// Comparisons shown a second time (at the end, methods placed anew) to measure each
    /// rater's consistency.
    #[arg(long, default_value_t = 0, value_name = "K",
          value_parser = count(0, MAX_COUNT, "at most the number of comparisons"))]
    repeat: usize,
    /// The study folder to create.
    #[arg(long, value_parser = crate::flags::out_folder)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// The study folder (`decorr study create --out`).
    study: PathBuf,
    /// Address to listen on; anything but a loopback address exposes the study to the network.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// 0 picks a free port.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Seconds a connection may take to send a request's headers, counted from its start or
    /// from the end of its previous response (so also how long an idle keep-alive connection
    /// stays open); then it is closed.
    #[arg(long, value_name = "SECS", default_value_t = Limits::default().header_timeout.as_secs(),
          value_parser = count_u64(1, MAX_SECS, "10 is plenty on any network"))]
    header_timeout: u64,
    /// Seconds from a request's headers to its response, the body included; a request sent
    /// more slowly gets a 408 and its connection is closed.
    #[arg(long, value_name = "SECS", default_value_t = Limits::default().request_timeout.as_secs(),
          value_parser = count_u64(1, MAX_SECS, "30 is plenty on any network"))]
    request_timeout: u64,
    /// Connections open at once (a browser opens up to 6 per rater); one more is answered 503
    /// (busy) and closed.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_connections,
          value_parser = count(1, MAX_CONNECTIONS, "about 6 per rater at once"))]
    max_connections: usize,
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// The study folder.
    study: PathBuf,
    /// Also write the report's JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The method the others are tested against (Wilcoxon); default `sd`, the pre-trained model.
    #[arg(long, default_value = "sd")]
    baseline: String,
    /// Bootstrap resamples for the 95% intervals of the means (at most 1000000).
    #[arg(long, default_value_t = 10_000, value_name = "N",
          value_parser = count(1, MAX_RESAMPLES, "10000 is usual"))]
    resamples: usize,
}

/// Longest `serve` timeout: an hour.
const MAX_SECS: u64 = 3600;
/// Most `serve --max-connections` (each holds a file descriptor).
const MAX_CONNECTIONS: usize = 100_000;

/// A count flag's parser: a whole number in `min..=max`, or an error giving the bound and the
/// usual value (clap names the flag), never a panic or a huge allocation later.
fn count(
    min: usize,
    max: usize,
    usual: &'static str,
) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |s| count_u64(min as u64, max as u64, usual)(s).map(|v| v as usize)
}

/// [`count`] as a `u64`.
fn count_u64(
    min: u64,
    max: u64,
    usual: &'static str,
) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync + 'static {
    move |s| {
        let t = s.trim();
        let range = format!("give a whole number from {min} to {max} ({usual})");
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{s:?} is not a whole number; {range}"));
        }
        match t.parse::<u64>() {
            Ok(v) if (min..=max).contains(&v) => Ok(v),
            Ok(v) if v < min => Err(format!("{v} is less than {min}; {range}")),
            _ => Err(format!(
                "{t} is more than {max}, the most this takes; {range}"
            )),
        }
    }
}

pub fn run(args: StudyArgs) -> Result<()> {
    match args.command {
        StudyCommand::Create(a) => create(a),
        StudyCommand::Serve(a) => serve(a),
        StudyCommand::Report(a) => report(a),
    }
}

fn create(a: CreateArgs) -> Result<()> {
    let config = decorr_study::create::CreateConfig {
        runs: a.runs,
        objects_file: a.objects_file,
        prompts_per_pair: a.prompts_per_pair,
        seeds_per_prompt: a.seeds_per_prompt,
        rater_names: a.rater,
        raters: a.raters.unwrap_or(0),
        repeat: a.repeat,
        seed: a.seed,
        out: a.out.clone(),
    };
    let made = decorr_study::create::create(&config)?;
    for n in &made.notes {
        eprintln!("note: {n}");
    }
    println!(
        "study {}: {} comparisons of {} methods ({}), {} raters with {} comparisons each; serve \
         it with `decorr study serve {}`",
        a.out.display(),
        made.comparisons,
        made.methods.len(),
        made.methods.join(", "),
        made.raters,
        made.tasks_per_rater,
        a.out.display()
    );
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    let (raters, admin) = decorr_study::server::links(&a.study)?;
    if !a.host.is_loopback() {
        eprintln!(
            "warning: listening on {}, not a loopback address: anyone who can reach this machine \
             and holds a link can rate; the links are the only protection",
            a.host
        );
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the server's runtime")?;
    let addr = SocketAddr::new(a.host, a.port);
    let limits = Limits {
        header_timeout: Duration::from_secs(a.header_timeout),
        request_timeout: Duration::from_secs(a.request_timeout),
        max_connections: a.max_connections,
    };
    runtime.block_on(decorr_study::server::serve(
        &a.study,
        addr,
        limits,
        |bound| {
            let host = match bound.ip() {
                IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            };
            let base = format!("http://{host}:{}", bound.port());
            println!(
                "serving {} on {base} (Ctrl-C stops; answers are saved as given)",
                a.study.display()
            );
            for (name, path) in &raters {
                println!("  {name}: {base}{path}");
            }
            println!("  admin: {base}{admin}");
        },
    ))?;
    Ok(())
}

fn report(a: ReportArgs) -> Result<()> {
    let r = decorr_study::report::build(&a.study, &a.baseline, a.resamples)?;
    let files = decorr_study::report::write(&a.study, &r, a.json.as_deref())?;
    println!("{}", decorr_study::report::markdown(&r));
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}
