//! `decorr study create|serve|report`: the human rating study of the paper's table 4 (the
//! library is decorr-study; this file parses, prints and runs the server's runtime).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

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
    /// Serve the rating pages: one link per rater, and an admin page.
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
    #[arg(long, default_value_t = 2)]
    prompts_per_pair: usize,
    #[arg(long, default_value_t = 5)]
    seeds_per_prompt: usize,
    /// Seed of every random choice (comparisons, orders, placements), recorded in the study.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Anonymous raters rater-01, rater-02, ...
    #[arg(long, conflicts_with = "rater")]
    raters: Option<usize>,
    /// A named rater; repeat for each.
    #[arg(long)]
    rater: Vec<String>,
    /// Comparisons shown a second time (at the end, methods placed anew) to measure each
    /// rater's consistency.
    #[arg(long, default_value_t = 0)]
    repeat: usize,
    /// The study folder to create.
    #[arg(long)]
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
    /// Bootstrap resamples for the 95% intervals of the means.
    #[arg(long, default_value_t = 10_000)]
    resamples: usize,
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
    runtime.block_on(decorr_study::server::serve(&a.study, addr, |bound| {
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
    }))?;
    Ok(())
}

fn report(a: ReportArgs) -> Result<()> {
    if a.resamples == 0 {
        bail!("--resamples must be at least 1");
    }
    let r = decorr_study::report::build(&a.study, &a.baseline, a.resamples)?;
    let files = decorr_study::report::write(&a.study, &r, a.json.as_deref())?;
    println!("{}", decorr_study::report::markdown(&r));
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}
