//! Word segmentation for search. Latin-script (and any other space-separated) text splits into
//! lower-cased words; Chinese, Japanese and Korean runs, which have no spaces, split into
//! overlapping pairs of characters, so `预算` is found inside `我们下周讨论季度预算的分配方案`
//! without a dictionary, in every CJK language alike.

use tantivy::tokenizer::{Token, TokenStream, Tokenizer};

/// Longest word indexed, in bytes; longer runs are cut (they are rarely searched for).
const MAX_WORD_BYTES: usize = 64;

/// Whether `c` belongs to a script written without spaces between words.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF     // Hiragana, Katakana
        | 0x31F0..=0x31FF   // Katakana extensions
        | 0x3400..=0x4DBF   // CJK extension A
        | 0x4E00..=0x9FFF   // CJK unified ideographs
        | 0xF900..=0xFAFF   // CJK compatibility ideographs
        | 0xFF66..=0xFF9F   // half-width Katakana
        | 0x1100..=0x11FF   // Hangul Jamo
        | 0x3130..=0x318F   // Hangul compatibility Jamo
        | 0xAC00..=0xD7AF   // Hangul syllables
        | 0x20000..=0x2FA1F // CJK extensions B and on
    )
}

/// One run of the text: a word, or the character pairs of a CJK run (searched as a phrase).
#[derive(Debug, PartialEq, Eq)]
pub struct Segment {
    /// The tokens, in order.
    pub tokens: Vec<String>,
    /// Byte range of the run in the text.
    pub range: (usize, usize),
}

/// Splits `text` into segments of tokens.
pub fn segments(text: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if is_cjk(c) {
            let mut run = Vec::new();
            while let Some(&(at, c)) = chars.peek().filter(|(_, c)| is_cjk(*c)) {
                run.push((at, c));
                chars.next();
            }
            let end = run.last().map_or(start, |(at, c)| at + c.len_utf8());
            let tokens = if run.len() == 1 {
                vec![run[0].1.to_string()]
            } else {
                run.windows(2).map(|pair| [pair[0].1, pair[1].1].iter().collect()).collect()
            };
            out.push(Segment { tokens, range: (start, end) });
        } else if c.is_alphanumeric() {
            let mut word = String::new();
            let mut end = start;
            while let Some(&(at, c)) =
                chars.peek().filter(|(_, c)| c.is_alphanumeric() && !is_cjk(*c))
            {
                if word.len() < MAX_WORD_BYTES {
                    word.extend(c.to_lowercase());
                }
                end = at + c.len_utf8();
                chars.next();
            }
            out.push(Segment { tokens: vec![word], range: (start, end) });
        } else {
            chars.next();
        }
    }
    out
}

/// The tantivy tokenizer over [`segments`].
#[derive(Clone, Default)]
pub struct PlazaTokenizer;

/// The tokens of one text.
pub struct PlazaTokenStream {
    tokens: Vec<Token>,
    next: usize,
}

impl Tokenizer for PlazaTokenizer {
    type TokenStream<'a> = PlazaTokenStream;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> PlazaTokenStream {
        let mut tokens = Vec::new();
        for segment in segments(text) {
            for text in segment.tokens {
                tokens.push(Token {
                    offset_from: segment.range.0,
                    offset_to: segment.range.1,
                    position: tokens.len(),
                    text,
                    position_length: 1,
                });
            }
        }
        PlazaTokenStream { tokens, next: 0 }
    }
}

impl TokenStream for PlazaTokenStream {
    fn advance(&mut self) -> bool {
        if self.next < self.tokens.len() {
            self.next += 1;
            true
        } else {
            false
        }
    }

    fn token(&self) -> &Token {
        &self.tokens[self.next.saturating_sub(1)]
    }

    fn token_mut(&mut self) -> &mut Token {
        let at = self.next.saturating_sub(1);
        &mut self.tokens[at]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> Vec<Vec<String>> {
        segments(text).into_iter().map(|s| s.tokens).collect()
    }

    #[test]
    fn words_and_character_pairs() {
        assert_eq!(tokens("Hello, World-2!"), [["hello"], ["world"], ["2"]]);
        assert_eq!(tokens("季度预算"), vec![vec!["季度", "度预", "预算"]]);
        assert_eq!(tokens("讨论Q3预算"), vec![vec!["讨论"], vec!["q3"], vec!["预算"]]);
        assert_eq!(tokens("会 議"), [["会"], ["議"]]);
        assert_eq!(tokens("회의실 예약"), vec![vec!["회의", "의실"], vec!["예약"]]);
    }
}
