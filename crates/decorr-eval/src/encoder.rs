//! The encoder side of BERTScore: the model trait ([`LayerEncoder`], implemented by BERT and
//! DeBERTa), the tokenizer trait ([`SentenceEncoder`]) with its `tokenizer.json` implementation
//! ([`HfSentenceEncoder`]), the special-token ids bert_score weighs apart ([`SpecialTokens`]) and
//! Python's `str.strip` as `sent_encode` applies it.
//!
//! Apart from [`crate::bertscore`] so that the models ([`crate::bert`], [`crate::deberta`]) can
//! implement and use these without depending on the scorer, which loads them.

use burn::tensor::{Int, Tensor};
use tokenizers::Tokenizer;

use crate::EvalError;

/// A transformer whose chosen layer's hidden states BERTScore matches greedily. BERT
/// ([`crate::bert::BertModel`]) and DeBERTa ([`crate::deberta::DebertaModel`]) implement it.
pub trait LayerEncoder {
    /// Hidden states numbered as transformers' `hidden_states` tuple (0 = embedding output,
    /// `num_layers()` = last layer), shape `[batch, seq, hidden]`. `attention_mask` is 1 for
    /// real tokens and 0 for padding. Layers after `layer` need not be computed.
    fn hidden_state(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
        layer: usize,
    ) -> Tensor<3>;

    /// Number of transformer layers.
    fn num_layers(&self) -> usize;
}

/// What bert_score's `sent_encode` does for one tokenizer family: a sentence to token ids with
/// the specials added and truncated to the model's maximum length.
pub trait SentenceEncoder {
    fn encode(&self, sentence: &str) -> Result<Vec<u32>, EvalError>;
}

/// Ids of the special tokens bert_score treats specially.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `tokenizer.cls_token_id`: weight 0 when idf is off.
    pub cls: u32,
    /// `tokenizer.sep_token_id`: weight 0 when idf is off.
    pub sep: u32,
    /// `tokenizer.pad_token_id`: fills padded positions (masked out of attention).
    pub pad: u32,
}

/// `sent_encode` through a `tokenizers` tokenizer whose post-processor adds the specials (BERT's
/// `[CLS] ... [SEP]`; a GPT-2/RoBERTa-style tokenizer needs `add_prefix_space` set in its
/// pre-tokenizer, as bert_score passes it). The file's own padding is removed and truncation is
/// set to `max_length` tokens, specials included (`truncation=True, max_length=model_max_length`).
pub struct HfSentenceEncoder {
    tokenizer: Tokenizer,
    prefix_space: bool,
}

impl HfSentenceEncoder {
    pub fn new(mut tokenizer: Tokenizer, max_length: usize) -> Result<Self, EvalError> {
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| EvalError::Tokenizer(format!("cannot truncate to {max_length}: {e}")))?;
        Ok(HfSentenceEncoder {
            tokenizer,
            prefix_space: false,
        })
    }

    /// Encode with a leading space, as bert_score's GPT-2/RoBERTa branch does
    /// (`add_prefix_space=True`). It took that branch for DeBERTa under transformers < 4.24,
    /// whose `DebertaTokenizer` subclassed `GPT2Tokenizer`; from 4.24 on it does not.
    pub fn with_prefix_space(mut self, on: bool) -> Self {
        self.prefix_space = on;
        self
    }
}

impl SentenceEncoder for HfSentenceEncoder {
    fn encode(&self, sentence: &str) -> Result<Vec<u32>, EvalError> {
        // An empty (stripped) sentence is `build_inputs_with_special_tokens([])`: the specials
        // alone, which is what the post-processor makes of "".
        let stripped = python_strip(sentence);
        let text = if self.prefix_space && !stripped.is_empty() {
            std::borrow::Cow::Owned(format!(" {stripped}"))
        } else {
            std::borrow::Cow::Borrowed(stripped)
        };
        let enc = self
            .tokenizer
            .encode(text.as_ref(), true)
            .map_err(|e| EvalError::Tokenizer(format!("cannot tokenize {sentence:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }
}

/// Python's `str.strip()`: Unicode whitespace plus the separators U+001C..U+001F.
pub(crate) fn python_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_strip_matches_str_strip() {
        assert_eq!(python_strip(" \t\u{a0}a b\u{1f}\n\u{3000}"), "a b");
        assert_eq!(python_strip(" \n "), "");
    }
}
