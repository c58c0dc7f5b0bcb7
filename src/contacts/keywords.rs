//! Opt-out / opt-in keywords in inbound text (STOP, ARRÊT, BAJA, START…).
//!
//! A keyword counts only when it is the whole message: case, accents and
//! surrounding punctuation, spaces and emoji are ignored, so "Stop!", "  arrêt."
//! and "BAJA 🙏" match, while "don't stop the delivery" does not.

use std::collections::HashSet;

/// What a message asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    OptOut,
    OptIn,
}

/// Default opt-out keywords (several languages).
pub const DEFAULT_OPT_OUT: &[&str] = &[
    "stop",
    "stopall",
    "unsubscribe",
    "unsub",
    "cancel",
    "end",
    "quit",
    "arret",
    "arrete",
    "desabonner",
    "parar",
    "pare",
    "baja",
    "darme de baja",
    "sair",
    "cancelar",
    "descadastrar",
    "abmelden",
    "stopp",
];

/// Default opt-in keywords.
pub const DEFAULT_OPT_IN: &[&str] = &["start", "unstop", "subscribe", "resume", "alta", "voltar"];

/// A configured keyword set.
#[derive(Debug, Clone)]
pub struct Keywords {
    opt_out: HashSet<String>,
    opt_in: HashSet<String>,
    /// Button payloads (exact, case-sensitive): businesses choose them.
    opt_out_payloads: HashSet<String>,
    opt_in_payloads: HashSet<String>,
}

impl Default for Keywords {
    fn default() -> Self {
        Keywords::new(DEFAULT_OPT_OUT, DEFAULT_OPT_IN)
    }
}

/// Folds the accented Latin letters users type into their base letters.
fn fold(c: char) -> char {
    match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' => 'a',
        'ç' | 'ć' | 'č' => 'c',
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ę' | 'ě' => 'e',
        'ì' | 'í' | 'î' | 'ï' | 'ī' => 'i',
        'ñ' | 'ń' | 'ň' => 'n',
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' => 'o',
        'ù' | 'ú' | 'û' | 'ü' | 'ū' | 'ů' => 'u',
        'ý' | 'ÿ' => 'y',
        'ß' => 's',
        'ś' | 'š' => 's',
        'ź' | 'ż' | 'ž' => 'z',
        'ł' => 'l',
        other => other,
    }
}

/// Lower-cases, folds accents, trims anything that is not a letter or digit
/// at both ends, and collapses inner white space.
pub fn normalize(text: &str) -> String {
    let lowered: String = text
        .chars()
        .flat_map(char::to_lowercase)
        .map(fold)
        .collect();
    let trimmed = lowered.trim_matches(|c: char| !c.is_alphanumeric());
    trimmed.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Keywords {
    pub fn new(opt_out: &[&str], opt_in: &[&str]) -> Keywords {
        Keywords {
            opt_out: opt_out
                .iter()
                .map(|k| normalize(k))
                .filter(|k| !k.is_empty())
                .collect(),
            opt_in: opt_in
                .iter()
                .map(|k| normalize(k))
                .filter(|k| !k.is_empty())
                .collect(),
            opt_out_payloads: HashSet::new(),
            opt_in_payloads: HashSet::new(),
        }
    }

    /// Adds quick-reply / interactive payloads that opt out or in.
    pub fn with_payloads(mut self, opt_out: &[String], opt_in: &[String]) -> Keywords {
        self.opt_out_payloads = opt_out.iter().cloned().collect();
        self.opt_in_payloads = opt_in.iter().cloned().collect();
        self
    }

    /// Whether a tapped button's payload is a configured opt-out or opt-in.
    pub fn detect_payload(&self, payload: &str) -> Option<Keyword> {
        if self.opt_out_payloads.contains(payload) {
            Some(Keyword::OptOut)
        } else if self.opt_in_payloads.contains(payload) {
            Some(Keyword::OptIn)
        } else {
            None
        }
    }

    /// The keyword a whole message is, if any. Long messages are never keywords.
    pub fn detect(&self, text: &str) -> Option<Keyword> {
        if text.len() > 64 {
            return None;
        }
        let n = normalize(text);
        if self.opt_out.contains(&n) {
            Some(Keyword::OptOut)
        } else if self.opt_in.contains(&n) {
            Some(Keyword::OptIn)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn configured_lists_and_payloads() {
        let k = Keywords::new(&["halt", "Désabonner"], &["go"])
            .with_payloads(&["OPT_OUT_MARKETING".into()], &["OPT_IN".into()]);
        assert_eq!(k.detect("HALT!"), Some(Keyword::OptOut));
        assert_eq!(k.detect("desabonner"), Some(Keyword::OptOut));
        assert_eq!(
            k.detect("stop"),
            None,
            "defaults replaced by the configured list"
        );
        assert_eq!(k.detect("Go"), Some(Keyword::OptIn));
        assert_eq!(k.detect_payload("OPT_OUT_MARKETING"), Some(Keyword::OptOut));
        assert_eq!(
            k.detect_payload("opt_out_marketing"),
            None,
            "payloads are exact"
        );
        assert_eq!(k.detect_payload("OPT_IN"), Some(Keyword::OptIn));
        assert_eq!(
            Keywords::default().detect_payload("OPT_OUT_MARKETING"),
            None
        );
    }

    #[test]
    fn whole_message_matches() {
        let k = Keywords::default();
        for t in [
            "STOP",
            "stop",
            " Stop! ",
            "ARRÊT",
            "arrêt.",
            "Baja 🙏",
            "PARAR!!!",
            "sair",
            "Unsubscribe",
            "darme  de baja",
        ] {
            assert_eq!(k.detect(t), Some(Keyword::OptOut), "{t}");
        }
        for t in ["START", "unstop", "Start."] {
            assert_eq!(k.detect(t), Some(Keyword::OptIn), "{t}");
        }
        for t in [
            "don't stop",
            "stop sending me promos please",
            "STOP IT",
            "stopped",
            "nonstop",
            "",
            "🙏",
            "start the order",
        ] {
            assert_eq!(k.detect(t), None, "{t}");
        }
    }

    #[test]
    fn custom_lists() {
        let k = Keywords::new(&["NO MÁS"], &["SÍ"]);
        assert_eq!(k.detect("no mas"), Some(Keyword::OptOut));
        assert_eq!(k.detect("Sí!"), Some(Keyword::OptIn));
        assert_eq!(k.detect("stop"), None);
    }

    proptest! {
        /// A keyword inside a sentence is never a match.
        #[test]
        fn no_false_positive_in_sentences(
            before in "[a-z]{1,10}( [a-z]{1,10}){0,3}",
            after in "[a-z]{1,10}( [a-z]{1,10}){0,3}",
            kw in prop::sample::select(DEFAULT_OPT_OUT.to_vec()),
        ) {
            let k = Keywords::default();
            let text = format!("{before} {kw} {after}");
            prop_assert_eq!(k.detect(&text), None);
        }

        /// Case and surrounding punctuation never hide a keyword.
        #[test]
        fn decorated_keywords_match(
            kw in prop::sample::select(DEFAULT_OPT_OUT.to_vec()),
            upper in any::<bool>(),
            pre in "[ .!?¡¿*-]{0,3}",
            post in "[ .!?*-]{0,3}",
        ) {
            let k = Keywords::default();
            let word = if upper { kw.to_uppercase() } else { kw.to_string() };
            let text = format!("{pre}{word}{post}");
            prop_assert_eq!(k.detect(&text), Some(Keyword::OptOut));
        }
    }
}
