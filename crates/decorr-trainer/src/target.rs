//! The target token `t` of METHOD.md: a word of the prompt maps to its **last** BPE token (our
//! choice: under causal attention it has seen the whole word); a repeated word takes an
//! occurrence number; a raw token index is accepted as is.

use decorr_clip::Tokenized;
use decorr_clip::tokenizer::split_words;

use crate::MethodError;

/// How the user names the object that goes missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// A word (or several consecutive words) of the prompt, case-insensitive; `occurrence` is
    /// 1-based and required to disambiguate only when the word repeats (default: 1).
    Word {
        word: String,
        occurrence: Option<usize>,
    },
    /// A token index in the padded sequence (BOS is 0).
    Index(usize),
}

impl TargetSpec {
    pub fn word(word: impl Into<String>) -> Self {
        TargetSpec::Word {
            word: word.into(),
            occurrence: None,
        }
    }
}

/// As the user writes it: `train`, `train#2`, `@6` (what [`FromStr`](std::str::FromStr) reads).
impl std::fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetSpec::Word {
                word,
                occurrence: None,
            } => f.write_str(word),
            TargetSpec::Word {
                word,
                occurrence: Some(n),
            } => write!(f, "{word}#{n}"),
            TargetSpec::Index(i) => write!(f, "@{i}"),
        }
    }
}

impl std::str::FromStr for TargetSpec {
    type Err = std::convert::Infallible;
    /// `train`, `train#2` (second occurrence), `@6` (raw token index).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(i) = s.strip_prefix('@').and_then(|i| i.parse().ok()) {
            return Ok(TargetSpec::Index(i));
        }
        if let Some((w, n)) = s.rsplit_once('#')
            && let Ok(n) = n.parse()
        {
            return Ok(TargetSpec::Word {
                word: w.to_string(),
                occurrence: Some(n),
            });
        }
        Ok(TargetSpec::word(s))
    }
}

/// Resolve `spec` to the token index `t`, checking that `S = {1, ..., t-1}` is not empty.
pub fn resolve_target(tok: &Tokenized, spec: &TargetSpec) -> Result<usize, MethodError> {
    let t = resolve_token(tok, spec)?;
    if t == 1 {
        let name = match spec {
            TargetSpec::Word { word, .. } => word.clone(),
            TargetSpec::Index(_) => tok.token_text(1),
        };
        return Err(MethodError::NothingPrecedes(name));
    }
    Ok(t)
}

/// Resolve `spec` to a content token of the prompt (any of `1..=last`, the first one too): what
/// names a word whose cross-attention is shown, where nothing needs to precede it.
pub fn resolve_token(tok: &Tokenized, spec: &TargetSpec) -> Result<usize, MethodError> {
    let last = tok.eos_index().saturating_sub(1);
    if last == 0 {
        return Err(MethodError::EmptyPrompt);
    }
    let t = match spec {
        TargetSpec::Index(i) => {
            if *i == 0 || *i > last {
                return Err(MethodError::IndexOutOfRange { index: *i, last });
            }
            *i
        }
        TargetSpec::Word { word, occurrence } => {
            let wanted: Vec<String> = split_words(word)
                .into_iter()
                .map(|r| word[r].to_lowercase())
                .collect();
            let words: Vec<String> = tok.words.iter().map(|w| w.text.to_lowercase()).collect();
            let not_found = || MethodError::TargetNotInPrompt {
                target: word.clone(),
                words: tok
                    .words
                    .iter()
                    .map(|w| w.text.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            if wanted.is_empty() {
                return Err(not_found());
            }
            let hits: Vec<usize> = (0..words.len())
                .filter(|&i| words[i..].starts_with(&wanted))
                .map(|i| i + wanted.len() - 1)
                .collect();
            if hits.is_empty() {
                // A word the 75-token cut dropped is in the prompt, just not in what CLIP sees.
                if tok.truncated > 0 {
                    let all: Vec<String> = split_words(&tok.prompt)
                        .into_iter()
                        .map(|r| tok.prompt[r].to_lowercase())
                        .collect();
                    if (0..all.len()).any(|i| all[i..].starts_with(&wanted)) {
                        return Err(MethodError::TargetCut {
                            target: word.clone(),
                            total: tok.eos_index() - 1 + tok.truncated,
                            cut: tok.truncated,
                        });
                    }
                }
                return Err(not_found());
            }
            let k = occurrence.unwrap_or(1);
            if k == 0 || k > hits.len() {
                return Err(MethodError::OccurrenceOutOfRange {
                    target: word.clone(),
                    count: hits.len(),
                    asked: k,
                });
            }
            tok.words[hits[k - 1]].tokens.end - 1
        }
    };
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use decorr_clip::ClipTokenizer;

    fn resolve(prompt: &str, spec: TargetSpec) -> Result<usize, MethodError> {
        let tok = ClipTokenizer::embedded().encode(prompt).unwrap();
        resolve_target(&tok, &spec)
    }

    fn word(w: &str, occurrence: Option<usize>) -> TargetSpec {
        TargetSpec::Word {
            word: w.into(),
            occurrence,
        }
    }

    #[test]
    fn paper_prompts() {
        // <bos> rusty tracks with an old train <eos>
        assert_eq!(
            resolve("rusty tracks with an old train", word("train", None)).unwrap(),
            6
        );
        assert_eq!(
            resolve("rusty tracks with an old train", word("Tracks", None)).unwrap(),
            2
        );
        assert_eq!(
            resolve("an old train with rusty tracks", word("tracks", None)).unwrap(),
            6
        );
        assert_eq!(
            resolve("an old train with rusty tracks", word("old train", None)).unwrap(),
            3
        );
    }

    /// A word past the 75-token cut is named as cut, not as missing from the prompt.
    #[test]
    fn a_word_after_the_cut_is_reported_as_cut() {
        let prompt = format!("{} and a boat", "a cat ".repeat(40));
        let tok = ClipTokenizer::embedded().encode(&prompt).unwrap();
        assert!(tok.truncated > 0);
        let err = resolve_target(&tok, &TargetSpec::word("boat")).unwrap_err();
        assert!(
            matches!(err, MethodError::TargetCut { cut, total, .. }
            if cut == tok.truncated && total == 83),
            "{err}"
        );
        assert!(err.to_string().contains("shorten the prompt"), "{err}");
        let err = resolve_target(&tok, &TargetSpec::word("horse")).unwrap_err();
        assert!(
            matches!(err, MethodError::TargetNotInPrompt { .. }),
            "{err}"
        );
    }

    #[test]
    fn multi_token_word_maps_to_its_last_token() {
        let tok = ClipTokenizer::embedded()
            .encode("a red xylophonist plays")
            .unwrap();
        let w = tok.words.iter().find(|w| w.text == "xylophonist").unwrap();
        assert!(
            w.tokens.len() > 1,
            "needs a word that BPE splits: {:?}",
            tok.tokens
        );
        let t = resolve_target(&tok, &TargetSpec::word("xylophonist")).unwrap();
        assert_eq!(t, w.tokens.end - 1);
        assert!(tok.tokens[t].ends_with("</w>"));
    }

    #[test]
    fn repeated_word_takes_an_occurrence() {
        let p = "a cat and a dog and a cat";
        assert_eq!(resolve(p, word("cat", None)).unwrap(), 2);
        assert_eq!(resolve(p, word("cat", Some(2))).unwrap(), 8);
        let err = resolve(p, word("cat", Some(3))).unwrap_err().to_string();
        assert!(
            err.contains("2 time(s)") && err.contains("occurrence 3"),
            "{err}"
        );
        // No flag is named here: finetune writes `cat#3`, analyze `--occurrence 3`.
        assert!(!err.contains("--"), "{err}");
    }

    #[test]
    fn spec_syntax() {
        assert_eq!(
            "train".parse::<TargetSpec>().unwrap(),
            TargetSpec::word("train")
        );
        assert_eq!(
            "cat#2".parse::<TargetSpec>().unwrap(),
            TargetSpec::Word {
                word: "cat".into(),
                occurrence: Some(2)
            }
        );
        assert_eq!("@6".parse::<TargetSpec>().unwrap(), TargetSpec::Index(6));
        assert_eq!(
            "c#d".parse::<TargetSpec>().unwrap(),
            TargetSpec::word("c#d")
        );
    }

    #[test]
    fn punctuation_does_not_hide_a_word() {
        assert_eq!(
            resolve("tracks, and a train!", word("train", None)).unwrap(),
            5
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let err = resolve("rusty tracks with an old train", word("plane", None)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("plane") && msg.contains("rusty, tracks, with, an, old, train"),
            "{msg}"
        );
        let err = resolve("rusty tracks with an old train", word("rusty", None)).unwrap_err();
        assert!(matches!(err, MethodError::NothingPrecedes(_)), "{err}");
        let err = resolve("rusty tracks", TargetSpec::Index(1)).unwrap_err();
        assert!(matches!(err, MethodError::NothingPrecedes(_)), "{err}");
        // A token to look at (cross-attention maps) may be the first one.
        let tok = ClipTokenizer::embedded()
            .encode("rusty tracks with an old train")
            .unwrap();
        assert_eq!(resolve_token(&tok, &word("rusty", None)).unwrap(), 1);
        assert_eq!(resolve_token(&tok, &TargetSpec::Index(1)).unwrap(), 1);
        assert!(resolve_token(&tok, &word("plane", None)).is_err());
        let err = resolve("rusty tracks", TargetSpec::Index(3)).unwrap_err();
        assert!(err.to_string().contains("1..=2"), "{err}");
        assert!(matches!(
            resolve("", TargetSpec::Index(1)),
            Err(MethodError::EmptyPrompt)
        ));
        assert!(matches!(
            resolve("train", word("", None)),
            Err(MethodError::TargetNotInPrompt { .. })
        ));
    }
}
