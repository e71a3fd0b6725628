//! The two modifier tokens (`<new1>`, `<new2>`): where they go in the prompt, the captions of
//! training, and the text encoder's token table and tokenizer extended by them.

use burn::module::Param;
use burn::tensor::{Int, Tensor, TensorData};
use decorr_clip::tokenizer::split_words;
use decorr_clip::{ClipTextModel, ClipTokenizer};
use serde::{Deserialize, Serialize};

use crate::DisenDiffError;

/// The modifier tokens, in object order (diffusers' Custom Diffusion names).
pub const MODIFIERS: [&str; 2] = ["<new1>", "<new2>"];

/// The rows of CLIP's table the modifiers start from (`pll`, `ktn`: rare tokens, as Custom
/// Diffusion initialises them; BASELINES.md "Trained").
pub const INIT_ROWS: [usize; 2] = [47629, 42170];

/// The target images' caption template (BASELINES.md "Data").
pub const TEMPLATE: &str = "photo of a ";

/// The prompt with the modifiers placed, and what training and sampling need from it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Placement {
    /// The prompt as given.
    pub prompt: String,
    /// The two object words, as they appear in the prompt.
    pub objects: [String; 2],
    /// The prompt with `<new1>` right before the first object's word and `<new2>` before the
    /// second's (at a word's first occurrence): the class token is then the token after its
    /// modifier, as `L_attn` reads it (our choice; BASELINES.md ambiguity 3). Sampling uses this
    /// prompt.
    pub sampling_prompt: String,
    /// The target images' caption: [`TEMPLATE`] + the sampling prompt.
    pub caption: String,
}

/// Places the modifiers before `objects` (two words of `prompt`, each one BPE token). Errors
/// name the object and what to change.
pub fn place_modifiers(
    tokenizer: &ClipTokenizer,
    prompt: &str,
    objects: &[String],
) -> Result<Placement, DisenDiffError> {
    let [a, b] = objects else {
        return Err(DisenDiffError::Objects(format!(
            "DisenDiff takes exactly two objects (--objects A,B), got {}",
            objects.len()
        )));
    };
    if a.eq_ignore_ascii_case(b) {
        return Err(DisenDiffError::Objects(format!(
            "the two objects are the same word `{a}`; give two different objects"
        )));
    }
    for m in MODIFIERS {
        if prompt.contains(m) {
            return Err(DisenDiffError::Objects(format!(
                "the prompt already contains {m}; give the plain prompt, the modifiers are placed \
                 for you"
            )));
        }
    }
    let words = split_words(prompt);
    let mut starts = Vec::new();
    for object in [a, b] {
        let tok = tokenizer.encode(object)?;
        let n = tok.eos_index() - 1;
        if n != 1 || object.trim() != object || object.is_empty() {
            return Err(DisenDiffError::Objects(format!(
                "object `{object}` is {n} BPE tokens ({}); DisenDiff reads the class word's map \
                 at one token, so each object must be a single token: pick a one-token synonym",
                tok.tokens[1..=n].join(" ")
            )));
        }
        let found = words
            .iter()
            .find(|w| prompt[(*w).clone()].eq_ignore_ascii_case(object))
            .ok_or_else(|| {
                let list: Vec<&str> = words.iter().map(|w| &prompt[w.clone()]).collect();
                DisenDiffError::Objects(format!(
                    "object `{object}` is not a word of the prompt {prompt:?} (its words: {})",
                    list.join(", ")
                ))
            })?;
        starts.push(found.start);
    }
    if starts[0] == starts[1] {
        return Err(DisenDiffError::Objects(
            "the two objects are the same word of the prompt".into(),
        ));
    }
    let mut placed = prompt.to_string();
    // Insert the later one first so the earlier offset stays valid.
    let mut order = [(starts[0], MODIFIERS[0]), (starts[1], MODIFIERS[1])];
    order.sort_by_key(|&(s, _)| std::cmp::Reverse(s));
    for (s, m) in order {
        placed.insert_str(s, &format!("{m} "));
    }
    let placement = Placement {
        prompt: prompt.to_string(),
        objects: [
            prompt_word(prompt, starts[0]),
            prompt_word(prompt, starts[1]),
        ],
        caption: format!("{TEMPLATE}{placed}"),
        sampling_prompt: placed,
    };
    Ok(placement)
}

fn prompt_word(prompt: &str, start: usize) -> String {
    split_words(prompt)
        .into_iter()
        .find(|w| w.start == start)
        .map(|w| prompt[w].to_string())
        .unwrap_or_default()
}

/// Inserts the modifiers of `placement` into another prompt that names the same objects (for
/// sampling a prompt other than the training one); `None` if an object is missing from it.
pub fn place_in(tokenizer: &ClipTokenizer, prompt: &str, objects: &[String; 2]) -> Option<String> {
    place_modifiers(tokenizer, prompt, objects)
        .ok()
        .map(|p| p.sampling_prompt)
}

/// Positions of the two modifiers in a caption's ids: `Some((p1, p2))` when it has exactly one
/// of each, `None` when it has neither (a regularisation caption). Anything else is refused:
/// BASELINES leaves it undefined (fixture README, choice 6).
pub fn modifier_positions(
    ids: &[u32],
    modifier_ids: [u32; 2],
) -> Result<Option<(usize, usize)>, DisenDiffError> {
    let at = |m: u32| -> Vec<usize> {
        ids.iter()
            .enumerate()
            .filter(|&(_, &i)| i == m)
            .map(|(p, _)| p)
            .collect()
    };
    let (a, b) = (at(modifier_ids[0]), at(modifier_ids[1]));
    match (a.as_slice(), b.as_slice()) {
        ([], []) => Ok(None),
        ([p1], [p2]) if p1 + 1 < ids.len() && p2 + 1 < ids.len() => Ok(Some((*p1, *p2))),
        _ => Err(DisenDiffError::Objects(format!(
            "a caption holds <new1> {} time(s) and <new2> {} time(s); each caption needs both \
             once, or neither",
            a.len(),
            b.len()
        ))),
    }
}

/// `tokenizer` with the modifiers added; their ids must follow the text encoder's table.
pub fn extend_tokenizer(
    tokenizer: &ClipTokenizer,
    table_rows: usize,
) -> Result<(ClipTokenizer, [u32; 2]), DisenDiffError> {
    if tokenizer.vocab_size() != table_rows {
        return Err(DisenDiffError::Base(format!(
            "the tokenizer has {} tokens but the text encoder's table {table_rows} rows; the \
             modifiers need the two to agree (is the tokenizer from another model?)",
            tokenizer.vocab_size()
        )));
    }
    let mut t = tokenizer.clone();
    let ids = t.add_tokens(&MODIFIERS)?;
    Ok((t, [ids[0], ids[1]]))
}

/// The text encoder with `rows` (`[2, hidden]`) appended to its token table.
pub fn extend_table(mut model: ClipTextModel, rows: Tensor<2>) -> ClipTextModel {
    let table = model.embeddings.token_embedding.weight.val();
    let dtype = table.dtype();
    let grown = Tensor::cat(vec![table, rows.cast(dtype)], 0);
    model.embeddings.token_embedding.weight = Param::from_tensor(grown).set_require_grad(false);
    model
}

/// Rows [`INIT_ROWS`] of the text encoder's table: the modifiers' initial embeddings.
pub fn initial_rows(model: &ClipTextModel) -> Result<Tensor<2>, DisenDiffError> {
    let table = model.embeddings.token_embedding.weight.val();
    let rows = table.dims()[0];
    if INIT_ROWS.iter().any(|&r| r >= rows) {
        return Err(DisenDiffError::Base(format!(
            "the text encoder's table has {rows} rows; the modifiers start from rows {INIT_ROWS:?} \
             of CLIP's 49408-token vocabulary"
        )));
    }
    let idx: Vec<i64> = INIT_ROWS.iter().map(|&r| r as i64).collect();
    let index = Tensor::<1, Int>::from_data(TensorData::new(idx, [2]), &table.device());
    Ok(table.select(0, index))
}
