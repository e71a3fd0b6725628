//! BERTScore (Zhang et al. 2020) with the `bert_score` package's exact recipe (being written).

use burn::tensor::{Int, Tensor};

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
