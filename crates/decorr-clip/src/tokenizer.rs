//! CLIP's byte-level BPE tokenizer, built with the `tokenizers` crate exactly as transformers'
//! `CLIPTokenizerFast` is (NFC, whitespace collapse, lower-case, CLIP's split regex, `</w>` word
//! suffix), from an SD repo's `vocab.json` + `merges.txt`, a `tokenizer.json`, or the vocabulary
//! embedded from `assets/clip/`. Every prompt word keeps its token span so a target word can be
//! resolved to a token index.

use std::ops::Range;
use std::path::Path;
use std::str::FromStr;

use tokenizers::Tokenizer;

use crate::ClipError;

/// Sequence length of SD's text encoder: BOS + 75 content tokens + EOS.
pub const MAX_LEN: usize = 77;
pub const BOS_TOKEN: &str = "<|startoftext|>";
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// The pipeline of transformers' `CLIPTokenizerFast` `tokenizer.json`, minus vocabulary and merges.
const PIPELINE: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [
    {"id": 49406, "content": "<|startoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 49407, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": {"type": "Sequence", "normalizers": [
    {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}, {"type": "Lowercase"}]},
  "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"}, "behavior": "Removed", "invert": true},
    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
  "post_processor": null,
  "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
  "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "",
    "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
    "vocab": {}, "merges": []}
}"#;

/// The CLIP vocabulary of SD 1.x/2.x, embedded (see `assets/clip/PROVENANCE.md`).
const EMBEDDED_VOCAB: &str = include_str!("../../../assets/clip/vocab.json");
const EMBEDDED_MERGES: &str = include_str!("../../../assets/clip/merges.txt");

/// A tokenizer file's text: a regular file of at most 16 MiB (`decorr_core::input`).
fn read_file(path: &Path) -> Result<String, ClipError> {
    decorr_core::input::read_text(path, "a tokenizer file")
        .map_err(|e| ClipError::Tokenizer(e.to_string()))
}

/// The message for a tokenizer folder `dir` that holds `has` but not `lacks`: the two belong
/// together, and the embedded vocabulary is no stand-in for a checkpoint's own (added tokens).
pub(crate) fn partial(dir: &str, has: &str, lacks: &str) -> String {
    format!(
        "{dir} holds {has} but no {lacks}; a tokenizer needs vocab.json and merges.txt together \
         (or a tokenizer.json): copy the checkpoint's whole tokenizer/ folder. The embedded CLIP \
         vocabulary is used only where there is no tokenizer/ at all, since a checkpoint's own \
         may add tokens"
    )
}

/// A prompt word and the tokens it became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    /// The word as written in the prompt.
    pub text: String,
    /// Byte range in the prompt.
    pub bytes: Range<usize>,
    /// Token indices in the padded sequence (BOS is index 0).
    pub tokens: Range<usize>,
}

/// A prompt turned into SD's 77 ids, with the bookkeeping the analysis needs.
#[derive(Debug, Clone)]
pub struct Tokenized {
    pub prompt: String,
    /// Always [`MAX_LEN`] ids: BOS, content, EOS, padding (EOS, or the checkpoint's pad token).
    pub ids: Vec<u32>,
    /// BPE token strings of the real tokens (BOS .. first EOS inclusive, as METHOD.md counts).
    pub tokens: Vec<String>,
    /// The prompt's words (runs of letters/digits, with inner apostrophes) and their spans.
    pub words: Vec<Word>,
    /// Content tokens dropped because the prompt exceeds 75 tokens.
    pub truncated: usize,
}

impl Tokenized {
    /// Index of the first EOS: the real tokens are `0..=eos_index()`.
    pub fn eos_index(&self) -> usize {
        self.tokens.len() - 1
    }

    /// The word a token belongs to, if any (BOS, EOS and punctuation have none).
    pub fn word_of(&self, token: usize) -> Option<&Word> {
        self.words.iter().find(|w| w.tokens.contains(&token))
    }

    /// A token's text for people: byte-level symbols decoded to UTF-8 (lossy for a token that
    /// holds part of a character), the `</w>` end-of-word marker removed.
    pub fn token_text(&self, token: usize) -> String {
        let t = self.tokens[token].trim_end_matches("</w>");
        if t.starts_with("<|") {
            return t.to_string();
        }
        let bytes: Vec<u8> = t.chars().filter_map(byte_of_symbol).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// CLIP tokenizer producing SD's fixed-length id sequences.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    /// Fills the sequence after EOS: EOS itself for SD 1.x, `!` (id 0) for SD 2.x, whose
    /// tokenizer names that pad token. The UNet sees all 77 positions, so it matters.
    pad: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClipTokenizer(vocab {})",
            self.inner.get_vocab_size(true)
        )
    }
}

impl ClipTokenizer {
    /// The embedded vocabulary: works with no files and no network.
    pub fn embedded() -> Self {
        Self::from_vocab_merges(EMBEDDED_VOCAB, EMBEDDED_MERGES)
            .expect("the embedded CLIP vocabulary is valid")
    }

    /// From the texts of `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(vocab_json: &str, merges_txt: &str) -> Result<Self, ClipError> {
        let vocab: serde_json::Value = serde_json::from_str(vocab_json)
            .map_err(|e| ClipError::Tokenizer(format!("vocab.json is not valid JSON: {e}")))?;
        if !vocab.is_object() {
            return Err(ClipError::Tokenizer(
                "vocab.json must be an object token -> id".into(),
            ));
        }
        let mut merges = Vec::new();
        for (n, line) in merges_txt.lines().enumerate() {
            if line.starts_with("#version") || line.trim().is_empty() {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merges.push(serde_json::json!([a, b])),
                _ => {
                    return Err(ClipError::Tokenizer(format!(
                        "merges.txt line {}: expected two symbols separated by one space, got {line:?}",
                        n + 1
                    )));
                }
            }
        }
        let mut json: serde_json::Value = serde_json::from_str(PIPELINE).expect("valid template");
        let specials = [BOS_TOKEN, EOS_TOKEN];
        for (i, s) in specials.iter().enumerate() {
            let id = vocab.get(*s).and_then(|v| v.as_u64()).ok_or_else(|| {
                ClipError::Tokenizer(format!(
                    "vocab.json has no id for {s}; is it a CLIP vocabulary?"
                ))
            })?;
            json["added_tokens"][i]["id"] = id.into();
        }
        json["model"]["vocab"] = vocab;
        json["model"]["merges"] = merges.into();
        let inner = Tokenizer::from_str(&json.to_string())
            .map_err(|e| ClipError::Tokenizer(format!("cannot build the BPE model: {e}")))?;
        Self::wrap(inner)
    }

    /// From a `tokenizer.json` (as written by transformers' `save_pretrained`): a regular file
    /// of at most 16 MiB of text.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, ClipError> {
        let text = read_file(path)?;
        Self::from_tokenizer_json_str(&text, &path.display().to_string())
    }

    /// From the text of a `tokenizer.json`; `name` says where it came from, for messages.
    pub fn from_tokenizer_json_str(json: &str, name: &str) -> Result<Self, ClipError> {
        let inner = Tokenizer::from_str(json)
            .map_err(|e| ClipError::Tokenizer(format!("cannot read tokenizer {name}: {e}")))?;
        Self::wrap(inner)
    }

    /// From a tokenizer folder: `vocab.json` + `merges.txt` (what SD repos ship), else
    /// `tokenizer.json`. A folder with only one of `vocab.json` and `merges.txt` is an error
    /// naming the missing one, and a file there that is no regular file (a FIFO, a device) is
    /// refused by name rather than skipped.
    pub fn from_dir(dir: &Path) -> Result<Self, ClipError> {
        let there = |name: &str| decorr_core::input::exists_at_all(&dir.join(name));
        let (v, m) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if there("vocab.json") && there("merges.txt") {
            return Self::from_vocab_merges(&read_file(&v)?, &read_file(&m)?);
        }
        if there("tokenizer.json") {
            return Self::from_tokenizer_json(&dir.join("tokenizer.json"));
        }
        Err(ClipError::Tokenizer(
            match (there("vocab.json"), there("merges.txt")) {
                (true, _) => partial(&dir.display().to_string(), "vocab.json", "merges.txt"),
                (_, true) => partial(&dir.display().to_string(), "merges.txt", "vocab.json"),
                _ => format!(
                    "{} holds neither vocab.json + merges.txt nor tokenizer.json",
                    dir.display()
                ),
            },
        ))
    }

    fn wrap(mut inner: Tokenizer) -> Result<Self, ClipError> {
        // Ids are added by `encode` itself, so no post-processor, padding or truncation here.
        inner.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| ClipError::Tokenizer(e.to_string()))?;
        let id = |s: &str| {
            inner
                .token_to_id(s)
                .ok_or_else(|| ClipError::Tokenizer(format!("tokenizer has no {s} token")))
        };
        let (bos, eos) = (id(BOS_TOKEN)?, id(EOS_TOKEN)?);
        Ok(ClipTokenizer {
            inner,
            bos,
            eos,
            pad: eos,
        })
    }

    /// Pads with `token` instead of EOS (a checkpoint's `pad_token`, e.g. SD 2's and SDXL
    /// `tokenizer_2`'s `!`). transformers makes a pad token special, so it is also split out of
    /// prompts before BPE, here as there: with `!`, "Mars!" gives `mars</w>` and `!` (id 0),
    /// not `!</w>` (256), and "?!" gives `?</w>`, `!`.
    pub fn with_pad_token(mut self, token: &str) -> Result<Self, ClipError> {
        self.pad = self.inner.token_to_id(token).ok_or_else(|| {
            ClipError::Tokenizer(format!(
                "the pad token {token:?} of the tokenizer config is not in its vocabulary"
            ))
        })?;
        if self.pad != self.eos && self.pad != self.bos {
            self.inner
                .add_special_tokens([tokenizers::AddedToken::from(token, true)])
                .map_err(|e| {
                    ClipError::Tokenizer(format!("cannot make pad token {token:?} special: {e}"))
                })?;
        }
        Ok(self)
    }

    /// Adds `tokens` as whole tokens after the vocabulary (ids `vocab_size()`, `+1`, ...), as
    /// transformers' `add_tokens` does for textual-inversion and Custom Diffusion modifiers such
    /// as `<new1>`. Returns their ids.
    pub fn add_tokens(&mut self, tokens: &[&str]) -> Result<Vec<u32>, ClipError> {
        let mut ids = Vec::new();
        for &t in tokens {
            if self.inner.token_to_id(t).is_some() {
                return Err(ClipError::Tokenizer(format!(
                    "the tokenizer already has a token {t:?}; it cannot be added again"
                )));
            }
            let next = self.vocab_size() as u32;
            self.inner
                .add_tokens([tokenizers::AddedToken::from(t.to_string(), false)])
                .map_err(|e| ClipError::Tokenizer(format!("cannot add {t:?}: {e}")))?;
            match self.inner.token_to_id(t) {
                Some(id) if id == next => ids.push(id),
                other => {
                    return Err(ClipError::Tokenizer(format!(
                        "adding {t:?} gave id {other:?}, expected {next}"
                    )));
                }
            }
        }
        Ok(ids)
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokenize `prompt` into SD's 77 ids. Longer prompts are truncated to 75 content tokens;
    /// the count is in [`Tokenized::truncated`] and logged as a warning.
    pub fn encode(&self, prompt: &str) -> Result<Tokenized, ClipError> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| ClipError::Tokenizer(format!("cannot tokenize {prompt:?}: {e}")))?;
        let content = MAX_LEN - 2;
        let n = enc.get_ids().len();
        let keep = n.min(content);
        let truncated = n - keep;
        if truncated > 0 {
            log::warn!(
                "prompt has {n} tokens, more than the {content} the text encoder takes: the last \
                 {truncated} were cut"
            );
        }
        let mut ids = Vec::with_capacity(MAX_LEN);
        ids.push(self.bos);
        ids.extend_from_slice(&enc.get_ids()[..keep]);
        ids.push(self.eos);
        let mut tokens = vec![BOS_TOKEN.to_string()];
        tokens.extend(enc.get_tokens()[..keep].iter().cloned());
        tokens.push(EOS_TOKEN.to_string());
        ids.resize(MAX_LEN, self.pad);
        // The real tokens end at the *first* EOS (METHOD.md), which is earlier than the appended
        // one when the prompt itself spells `<|endoftext|>`.
        let first_eos = ids
            .iter()
            .position(|&i| i == self.eos)
            .expect("EOS was appended");
        if first_eos + 1 < tokens.len() {
            log::warn!(
                "the prompt contains {EOS_TOKEN}: the {} token(s) after it are not real tokens for \
                 the analysis",
                tokens.len() - first_eos - 1
            );
            tokens.truncate(first_eos + 1);
        }

        let offsets = &enc.get_offsets()[..keep];
        let words = split_words(prompt)
            .into_iter()
            .filter_map(|bytes| {
                // Token i of the content is at index i + 1 of the sequence (after BOS).
                let hit: Vec<usize> = offsets
                    .iter()
                    .enumerate()
                    .filter(|(_, (s, e))| *s < bytes.end && *e > bytes.start)
                    .map(|(i, _)| i + 1)
                    .collect();
                let (first, last) = (*hit.first()?, *hit.last()?);
                if last >= first_eos {
                    return None;
                }
                Some(Word {
                    text: prompt[bytes.clone()].to_string(),
                    bytes,
                    tokens: first..last + 1,
                })
            })
            .collect();
        Ok(Tokenized {
            prompt: prompt.to_string(),
            ids,
            tokens,
            words,
            truncated,
        })
    }
}

/// The byte that CLIP's byte-level alphabet writes as `c` (printable bytes stand for
/// themselves, the others were shifted to code points 256 and up, in byte order).
fn byte_of_symbol(c: char) -> Option<u8> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let cp = u32::from(c);
    if cp < 256 {
        return printable(cp).then_some(cp as u8);
    }
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth((cp - 256) as usize)
        .map(|b| b as u8)
}

/// Byte ranges of the words of `text`: runs of letters and digits, with apostrophes inside.
pub fn split_words(text: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    for (k, &(i, c)) in chars.iter().enumerate() {
        let inner_apostrophe = (c == '\'' || c == '’')
            && start.is_some()
            && chars.get(k + 1).is_some_and(|(_, n)| n.is_alphanumeric());
        if c.is_alphanumeric() || inner_apostrophe {
            start.get_or_insert(i);
        } else if let Some(s) = start.take() {
            out.push(s..i);
        }
    }
    if let Some(s) = start {
        out.push(s..text.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_keep_inner_apostrophes_and_split_on_punctuation() {
        let t = "don't stop-believing, café 3.14";
        let w: Vec<&str> = split_words(t).into_iter().map(|r| &t[r]).collect();
        assert_eq!(w, ["don't", "stop", "believing", "café", "3", "14"]);
    }

    #[test]
    fn token_text_decodes_byte_level_symbols() {
        let tok = ClipTokenizer::embedded().encode("café naïve 🚂").unwrap();
        let texts: Vec<String> = (0..tok.tokens.len()).map(|i| tok.token_text(i)).collect();
        assert_eq!(texts.first().map(String::as_str), Some(BOS_TOKEN));
        assert!(texts.contains(&"café".to_string()), "{texts:?}");
        assert!(texts.contains(&"🚂".to_string()), "{texts:?}");
        let word = tok.words.iter().find(|w| w.text == "naïve").unwrap();
        assert!(word.tokens.len() > 1);
    }

    #[test]
    fn long_prompts_are_cut_to_77_with_the_count() {
        let prompt = "train ".repeat(80);
        let tok = ClipTokenizer::embedded().encode(&prompt).unwrap();
        assert_eq!(tok.ids.len(), MAX_LEN);
        assert_eq!(tok.truncated, 5);
        assert_eq!(tok.ids[76], ClipTokenizer::embedded().eos_id());
        assert_eq!(tok.words.len(), 75, "only kept tokens belong to words");
    }

    #[test]
    fn sd2_pad_token_fills_after_eos() {
        // SD 2.x's tokenizer pads with "!", id 0 of the CLIP vocabulary, as transformers'
        // CLIPTokenizer(pad_token="!") does with padding="max_length".
        let tok = ClipTokenizer::embedded().with_pad_token("!").unwrap();
        assert_eq!(tok.pad_id(), 0);
        let t = tok.encode("a red cube").unwrap();
        let eos = t.eos_index();
        assert_eq!(t.ids[eos], tok.eos_id());
        assert!(t.ids[eos + 1..].iter().all(|&i| i == 0), "{:?}", t.ids);
        let plain = ClipTokenizer::embedded().encode("a red cube").unwrap();
        assert_eq!(plain.ids[..=eos], t.ids[..=eos]);
        assert!(ClipTokenizer::embedded().with_pad_token("<nope>").is_err());
        // The pad token is special, as transformers makes it: split out before BPE (ids from
        // transformers 5.24's CLIPTokenizer with pad_token="!").
        let t = tok.encode("Mars!").unwrap();
        assert_eq!(t.ids[..4], [49406, 7496, 0, 49407]);
        assert_eq!(
            t.tokens,
            ["<|startoftext|>", "mars</w>", "!", "<|endoftext|>"]
        );
        assert_eq!(t.words.len(), 1);
        assert_eq!(tok.encode("?!").unwrap().ids[..4], [49406, 286, 0, 49407]);
        // "!" keeps its id 0: tokens added after it still start at the vocabulary's end.
        let mut grown = tok.clone();
        assert_eq!(grown.add_tokens(&["<new1>"]).unwrap(), [49408]);
        assert_eq!(
            ClipTokenizer::embedded().encode("Mars!").unwrap().ids[..4],
            [49406, 7496, 256, 49407]
        );
    }

    #[test]
    fn bad_vocabulary_files_are_errors() {
        assert!(ClipTokenizer::from_vocab_merges("[1]", "").is_err());
        let e = ClipTokenizer::from_vocab_merges("{\"a\": 0}", "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("<|startoftext|>"), "{e}");
        let e = ClipTokenizer::from_vocab_merges(
            "{\"<|startoftext|>\": 0, \"<|endoftext|>\": 1}",
            "#version: 0.2\na b c\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
