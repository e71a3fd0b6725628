//! How long-running work reports back: the binaries draw progress bars and print lines, this
//! crate only calls a [`Progress`]. Every method has a default that does nothing, so a caller
//! implements what it shows; [`Silent`] shows nothing.

/// Progress and messages of a run, and the way to stop it (Ctrl-C).
pub trait Progress {
    /// A status line (what was skipped, reused, made again; where to look); the CLI prints it to
    /// stderr.
    fn note(&mut self, _line: &str) {}
    /// A result line (per-epoch numbers, the focus of a prompt); the CLI prints it to stdout.
    fn line(&mut self, _line: &str) {}
    /// A piece of work of `total` units (`unit`: "images", "steps") starts; `label` names it.
    fn begin(&mut self, _label: &str, _total: u64, _unit: &str) {}
    /// `n` more units done.
    fn advance(&mut self, _n: u64) {}
    /// A short message beside the current piece of work ("step 3/50", "L_train 0.012").
    fn message(&mut self, _msg: &str) {}
    /// The current piece of work ended.
    fn end(&mut self) {}
    /// A batch of images was generated, in these times (`decorr generate --timings`).
    fn timings(&mut self, _t: &decorr_pipeline::Timings) {}
    /// Whether the user asked to stop: polled after every denoising and every training step.
    fn should_stop(&self) -> bool {
        false
    }
}

/// Shows nothing and never stops.
pub struct Silent;

impl Progress for Silent {}
