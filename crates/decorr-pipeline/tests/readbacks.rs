//! The denoising loop never waits on the device: a generation reads back to the host a fixed
//! number of times whatever its step count (the text embeddings' and the final latents' and
//! image's finiteness checks), plus one per step only where the caller asked for something that
//! needs the host every step (cross-attention maps for figure 3; Attend-and-Excite's thresholds,
//! as diffusers' `.item()`). Read-backs are counted by `decorr_core::readback`, through which
//! the library must read (clippy.toml refuses `into_data`/`into_scalar` there, CI checks it).

use decorr_core::readback;
use decorr_pipeline::{GenerateParams, Guidance, PagParams, StableDiffusion};

mod common;

/// Read-backs made by one generation of two images.
fn reads(sd: &StableDiffusion, p: &GenerateParams) -> usize {
    let before = readback::count();
    sd.generate(p, &[0, 1], &mut |_, _| true).unwrap();
    readback::count() - before
}

#[test]
fn the_loop_reads_nothing_back_per_step() {
    let (_dir, sd) = common::tiny();
    let base = common::quick_params(&sd);
    for steps in [2, 7] {
        let p = GenerateParams {
            steps,
            scheduler: "ddim".parse().unwrap(),
            ..base.clone()
        };
        // cond and uncond embeddings, final latents, decoded image.
        assert_eq!(reads(&sd, &p), 4, "CFG, {steps} steps");
        let pag = GenerateParams {
            guidance: Guidance::Pag(PagParams {
                scale: 3.0,
                ..Default::default()
            }),
            ..p.clone()
        };
        assert_eq!(reads(&sd, &pag), 4, "PAG, {steps} steps");
        let no_cfg = GenerateParams {
            guidance_scale: 1.0,
            ..p.clone()
        };
        assert_eq!(reads(&sd, &no_cfg), 3, "guidance 1, {steps} steps");
        // Figure 3's maps: one read per step, asked for.
        let maps = GenerateParams {
            capture_tokens: vec![2],
            ..p.clone()
        };
        assert_eq!(reads(&sd, &maps), 4 + steps, "maps, {steps} steps");
    }
}
