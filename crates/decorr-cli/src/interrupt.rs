//! Ctrl-C for the whole process: one handler, installed once, that every long loop polls
//! (fine-tuning after each step, sampling after each denoising step). A second Ctrl-C exits at
//! once; outputs stay whole either way (every file is written atomically).

use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

/// Installs the handler (idempotent).
pub fn install() {
    INSTALL.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if STOP.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: stopping at the next step (Ctrl-C again to quit at once)");
        });
    });
}

/// Whether Ctrl-C was pressed.
pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
