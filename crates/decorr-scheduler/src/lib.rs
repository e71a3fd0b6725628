//! Diffusion schedulers (DDIM, PNDM, Euler, Euler ancestral, DPM-Solver++ 2M) built from a
//! checkpoint's `scheduler/scheduler_config.json`.
//!
//! Not implemented yet: laid out for issue 4. It exports nothing.
