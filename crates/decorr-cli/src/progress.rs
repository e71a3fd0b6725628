//! The terminal side of [`decorr_runs::Progress`]: a progress bar per piece of work (hidden with
//! `--quiet` or when stderr is no terminal), status lines on stderr, result lines on stdout, and
//! Ctrl-C as the stop request.

use decorr_runs::Progress;
use indicatif::{ProgressBar, ProgressStyle};

pub struct Bar {
    bar: ProgressBar,
    quiet: bool,
    /// The phase times of every generated batch, in order.
    pub timings: Vec<decorr_pipeline::Timings>,
}

impl Bar {
    /// Also installs the Ctrl-C handler that [`Progress::should_stop`] reads.
    pub fn new(quiet: bool) -> Self {
        crate::interrupt::install();
        Bar::plain(quiet)
    }

    /// Without the Ctrl-C handler: for work that does not poll for a stop (Ctrl-C then ends
    /// the process at once, as by default).
    pub fn plain(quiet: bool) -> Self {
        Bar {
            bar: ProgressBar::hidden(),
            quiet,
            timings: Vec::new(),
        }
    }
}

impl Progress for Bar {
    fn note(&mut self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.suspend(|| eprintln!("{line}"));
        }
    }

    fn line(&mut self, line: &str) {
        // A hidden bar (--quiet, or no terminal) swallows its println.
        if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn begin(&mut self, label: &str, total: u64, unit: &str) {
        self.bar.finish_and_clear();
        self.bar = if self.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(total).with_style(
                ProgressStyle::with_template(&format!(
                    "{{prefix}} {{bar:30}} {{pos}}/{{len}} {unit} {{elapsed_precise}} eta {{eta}} {{msg}}"
                ))
                .expect("valid template"),
            )
        };
        self.bar.set_prefix(label.to_string());
    }

    fn timings(&mut self, t: &decorr_pipeline::Timings) {
        self.timings.push(t.clone());
    }

    fn advance(&mut self, n: u64) {
        self.bar.inc(n);
    }

    fn message(&mut self, msg: &str) {
        self.bar.set_message(msg.to_string());
    }

    fn end(&mut self) {
        self.bar.finish_and_clear();
        self.bar = ProgressBar::hidden();
    }

    fn should_stop(&self) -> bool {
        crate::interrupt::requested()
    }
}
