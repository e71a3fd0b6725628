//! The attention analysis of the paper's section 4.2: the head-averaged self-attention map `A`
//! of one encoder layer over the real tokens (BOS .. first EOS), each token's row against its
//! own entry (tables 1 and 2), and the suspected unidirectional correlations: a content token
//! that attends more to an earlier content token (BOS excluded) than to itself.

use burn::tensor::{Device, Int, Tensor, TensorData};
use decorr_clip::{ClipTextModel, ForwardOptions, Tokenized, head_average};
use serde::Serialize;

use crate::MethodError;

/// One real token of the prompt.
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    pub index: usize,
    pub id: u32,
    /// BPE token, `</w>` removed.
    pub text: String,
    /// The prompt word the token belongs to, if any.
    pub word: Option<String>,
}

/// One entry of a token's attention row, compared with the token's attention to itself.
#[derive(Debug, Clone, Serialize)]
pub struct RowEntry {
    /// Key token index `j`.
    pub index: usize,
    pub text: String,
    /// `A[i, j]`.
    pub attention: f32,
    /// `A[i, i]`.
    pub to_self: f32,
    /// `A[i, j] / A[i, i]`.
    pub ratio: f32,
}

/// A suspected unidirectional correlation: `A[token, earlier] > A[token, token]`.
#[derive(Debug, Clone, Serialize)]
pub struct Suspect {
    pub token: usize,
    pub token_text: String,
    pub earlier: usize,
    pub earlier_text: String,
    pub attention_to_earlier: f32,
    pub attention_to_self: f32,
    pub ratio: f32,
}

/// `A` of one layer for one prompt, with the token table and the ranked suspects.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionAnalysis {
    pub prompt: String,
    pub layer: usize,
    pub tokens: Vec<TokenInfo>,
    /// Head-averaged probabilities, `n x n` over tokens `0..=first EOS`; rows are queries.
    pub attention: Vec<Vec<f32>>,
    /// Ranked by `ratio`, largest first.
    pub suspects: Vec<Suspect>,
}

impl AttentionAnalysis {
    /// Row `i` against the diagonal, for the earlier content tokens `1..i` (BOS excluded) and
    /// `i` itself last (ratio 1): the layout of the paper's tables 1 and 2.
    pub fn row(&self, i: usize) -> Vec<RowEntry> {
        let to_self = self.attention[i][i];
        (1..=i)
            .map(|j| RowEntry {
                index: j,
                text: self.tokens[j].text.clone(),
                attention: self.attention[i][j],
                to_self,
                ratio: self.attention[i][j] / to_self,
            })
            .collect()
    }

    /// `c = argmax_{s in 1..t} A[t, s]` (ties: the earliest), or `None` when `t < 2`.
    pub fn corr(&self, t: usize) -> Option<usize> {
        argmax_before(&self.attention[t], t)
    }

    /// The content token indices `1..eos`.
    pub fn content(&self) -> std::ops::Range<usize> {
        1..self.tokens.len() - 1
    }
}

/// `argmax_{s in 1..t} row[s]`, earliest on ties.
pub fn argmax_before(row: &[f32], t: usize) -> Option<usize> {
    (1..t).fold(None, |best: Option<usize>, s| match best {
        Some(b) if row[b] >= row[s] => Some(b),
        _ => Some(s),
    })
}

/// Run the encoder up to `layer` and return its head-averaged attention over the real tokens.
/// Only the real tokens are fed: under causal attention the padding after them cannot change
/// their rows, so the map equals the 77-token pass's corner.
pub fn attention_map(
    model: &ClipTextModel,
    tok: &Tokenized,
    layer: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>, MethodError> {
    let n_layers = model.num_layers();
    if layer >= n_layers {
        return Err(MethodError::LayerOutOfRange {
            layer,
            last: n_layers - 1,
        });
    }
    model.check_ids(&tok.ids)?;
    let n = tok.eos_index() + 1;
    let ids: Vec<i64> = tok.ids[..n].iter().map(|&i| i as i64).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), device);
    let opts = ForwardOptions {
        attention_layers: vec![layer],
        stop_at_attention: Some(layer),
        ..Default::default()
    };
    let out = model.forward_with(input, &opts);
    let probs = out.attention(layer).expect("requested layer").clone();
    let flat = head_average(probs)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data");
    Ok(flat.chunks(n).map(|r| r.to_vec()).collect())
}

/// `Err` when the map of `layer` for `prompt` holds a NaN or an infinity (ratios and suspects
/// computed from it would be NaN).
pub fn check_finite_map(map: &[Vec<f32>], layer: usize, prompt: &str) -> Result<(), MethodError> {
    if map.iter().flatten().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(MethodError::NonFiniteAttention {
            layer,
            prompt: format!(" for {prompt:?}"),
        })
    }
}

/// Analyse `tok` at `layer`: the map, the token table and the suspects.
pub fn analyze(
    model: &ClipTextModel,
    tok: &Tokenized,
    layer: usize,
    device: &Device,
) -> Result<AttentionAnalysis, MethodError> {
    if tok.eos_index() < 2 {
        return Err(MethodError::EmptyPrompt);
    }
    let attention = attention_map(model, tok, layer, device)?;
    check_finite_map(&attention, layer, &tok.prompt)?;
    let tokens: Vec<TokenInfo> = (0..attention.len())
        .map(|i| TokenInfo {
            index: i,
            id: tok.ids[i],
            text: tok.token_text(i),
            word: tok.word_of(i).map(|w| w.text.clone()),
        })
        .collect();
    let suspects = find_suspects(&attention, &tokens);
    Ok(AttentionAnalysis {
        prompt: tok.prompt.clone(),
        layer,
        tokens,
        attention,
        suspects,
    })
}

/// Every pair of content tokens `j < i` with `A[i, j] > A[i, i]`, largest ratio first.
pub fn find_suspects(a: &[Vec<f32>], tokens: &[TokenInfo]) -> Vec<Suspect> {
    let n = a.len();
    let mut out = Vec::new();
    for i in 2..n.saturating_sub(1) {
        for j in 1..i {
            if a[i][j] > a[i][i] {
                out.push(Suspect {
                    token: i,
                    token_text: tokens[i].text.clone(),
                    earlier: j,
                    earlier_text: tokens[j].text.clone(),
                    attention_to_earlier: a[i][j],
                    attention_to_self: a[i][i],
                    ratio: a[i][j] / a[i][i],
                });
            }
        }
    }
    out.sort_by(|x, y| y.ratio.total_cmp(&x.ratio));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize) -> Vec<TokenInfo> {
        (0..n)
            .map(|i| TokenInfo {
                index: i,
                id: i as u32,
                text: format!("t{i}"),
                word: None,
            })
            .collect()
    }

    /// Rows sum to 1 over j <= i; BOS (column 0) and EOS (last row) never make a suspect.
    #[test]
    fn suspects_exclude_bos_and_eos_and_rank_by_ratio() {
        let a = vec![
            vec![1.0, 0.0, 0.0, 0.0, 0.0],
            vec![0.9, 0.1, 0.0, 0.0, 0.0],
            vec![0.8, 0.15, 0.05, 0.0, 0.0],  // 2 -> 1: ratio 3
            vec![0.7, 0.06, 0.14, 0.1, 0.0],  // 3 -> 2: ratio 1.4; 3 -> 1 no
            vec![0.5, 0.4, 0.05, 0.04, 0.01], // EOS row: ignored
        ];
        let s = find_suspects(&a, &tokens(5));
        let pairs: Vec<(usize, usize)> = s.iter().map(|s| (s.token, s.earlier)).collect();
        assert_eq!(pairs, vec![(2, 1), (3, 2)]);
        assert!((s[0].ratio - 3.0).abs() < 1e-6);
    }

    #[test]
    fn non_finite_maps_are_refused_naming_layer_and_prompt() {
        let ok = vec![vec![1.0, 0.0], vec![0.5, 0.5]];
        check_finite_map(&ok, 11, "a cat").unwrap();
        let bad = vec![vec![1.0, 0.0], vec![f32::NAN, 0.5]];
        let e = check_finite_map(&bad, 11, "a cat").unwrap_err().to_string();
        assert!(e.contains("layer 11") && e.contains("\"a cat\""), "{e}");
    }

    /// A model whose weights turned NaN (in memory here; such files are refused at load) gives
    /// an error instead of a NaN table and no suspects.
    #[test]
    fn analyze_refuses_a_non_finite_map() {
        use burn::module::Param;
        use decorr_clip::{ClipTextConfig, ClipTokenizer};
        let device = Device::flex();
        let config = ClipTextConfig {
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            ..ClipTextConfig::sd15()
        };
        let mut model = ClipTextModel::new(&config, &device);
        model.embeddings.position_embedding.weight =
            Param::from_tensor(Tensor::full([77, 8], f32::NAN, &device));
        let tok = ClipTokenizer::embedded()
            .encode("rusty tracks with an old train")
            .unwrap();
        let e = analyze(&model, &tok, 1, &device).unwrap_err();
        assert!(
            matches!(e, MethodError::NonFiniteAttention { layer: 1, .. }),
            "{e}"
        );
    }

    #[test]
    fn argmax_skips_bos_and_prefers_earliest() {
        let row = [0.9, 0.02, 0.05, 0.05, 0.01];
        assert_eq!(argmax_before(&row, 4), Some(2));
        assert_eq!(argmax_before(&row, 2), Some(1));
        assert_eq!(argmax_before(&row, 1), None);
    }
}
