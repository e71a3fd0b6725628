//! PNG output with the generation parameters inside: a `parameters` text chunk in the form common
//! SD front-ends read ("prompt / Negative prompt: ... / Steps: ..., Sampler: ..."), and a `decorr`
//! chunk with our JSON record. Callers write the bytes with `decorr_core::io::write_atomic`, so a
//! file that exists is complete (resumable runs rely on that).

use std::path::Path;

use crate::{GenerateParams, PipelineError};

/// The `parameters` text of one image.
pub fn parameters_text(p: &GenerateParams, seed: u64, model: &str) -> String {
    let mut s = p.prompt.clone();
    if !p.negative_prompt.is_empty() {
        s.push_str(&format!("\nNegative prompt: {}", p.negative_prompt));
    }
    s.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {model}",
        p.steps,
        p.scheduler.name(),
        p.guidance_scale,
        p.width,
        p.height
    ));
    s
}

/// PNG bytes of an RGB8 image with `text` chunks (keyword, value).
pub fn encode_rgb8(
    width: usize,
    height: usize,
    rgb: &[u8],
    text: &[(&str, &str)],
) -> Result<Vec<u8>, PipelineError> {
    let err = |e: png::EncodingError| PipelineError::Input(format!("PNG encoding failed: {e}"));
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            // iTXt keeps UTF-8 prompts intact (tEXt is Latin-1).
            enc.add_itxt_chunk(k.to_string(), v.to_string())
                .map_err(err)?;
        }
        let mut w = enc.write_header().map_err(err)?;
        w.write_image_data(rgb).map_err(err)?;
    }
    Ok(out)
}

/// The text chunks of a PNG file (tEXt, zTXt and iTXt), keyword to text.
pub fn read_text_chunks(path: &Path) -> Result<Vec<(String, String)>, PipelineError> {
    let file = std::fs::File::open(path).map_err(|source| decorr_core::CoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder
        .read_info()
        .map_err(|e| PipelineError::Input(format!("{} is not a PNG: {e}", path.display())))?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.utf8_text {
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    Ok(out)
}
