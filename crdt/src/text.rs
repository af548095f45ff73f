//! Validation of everything people type or import: bounded, valid text
//! without control characters, card user ids of exactly 13 digits, and the
//! guard that keeps the 12-digit Individual Number out of the system.
//!
//! Names are stored exactly as given (vendor characters in the Private Use
//! Area, variation selectors and all); matching and search use a separate
//! folded key from [`search_key`].

use std::fmt;
use unicode_normalization::UnicodeNormalization;

/// A validation failure, naming the field and saying what was wrong.
/// Never carries the offending text itself when it may be an Individual
/// Number; otherwise at most a short prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("{field}: must not be empty")]
    Empty { field: &'static str },
    #[error("{field}: longer than {max} characters")]
    TooLong { field: &'static str, max: usize },
    #[error("{field}: control characters (U+{code:04X}) are not allowed")]
    Control { field: &'static str, code: u32 },
    #[error("{field}: rejected: individual-number-shaped input")]
    IndividualNumber { field: &'static str },
    #[error("{field}: ID must be 13 digits")]
    CardUserId { field: &'static str },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl TextError {
    pub fn field(&self) -> &'static str {
        match self {
            TextError::Empty { field }
            | TextError::TooLong { field, .. }
            | TextError::Control { field, .. }
            | TextError::IndividualNumber { field }
            | TextError::CardUserId { field }
            | TextError::Invalid { field, .. } => field,
        }
    }
}

/// Does this string of exactly 12 ASCII digits pass the Individual Number
/// check digit? (Product brief, "Rules from law".)
pub fn is_individual_number(digits: &str) -> bool {
    let b = digits.as_bytes();
    if b.len() != 12 || !b.iter().all(u8::is_ascii_digit) {
        return false;
    }
    // P_n is the n-th digit from the right of the first eleven digits.
    let sum: u32 = (1..=11)
        .map(|n| {
            let p = (b[11 - n] - b'0') as u32;
            let q = if n <= 6 { n as u32 + 1 } else { n as u32 - 5 };
            p * q
        })
        .sum();
    let r = sum % 11;
    let check = if r <= 1 { 0 } else { 11 - r };
    check == (b[11] - b'0') as u32
}

/// Does the text contain, as a run of exactly twelve digits (ASCII or
/// full-width, possibly separated by spaces or hyphens as people write
/// them), a number that passes the Individual Number check digit?
pub fn contains_individual_number(text: &str) -> bool {
    let folded: String = text.nfkc().collect();
    let chars: Vec<char> = folded.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() || (i > 0 && chars[i - 1].is_ascii_digit()) {
            i += 1;
            continue;
        }
        // Collect a digit run allowing single separators between digits.
        let mut digits = String::new();
        let mut j = i;
        while j < chars.len() {
            let c = chars[j];
            if c.is_ascii_digit() {
                digits.push(c);
                j += 1;
            } else if (c == ' ' || c == '-')
                && j + 1 < chars.len()
                && chars[j + 1].is_ascii_digit()
                && !digits.is_empty()
            {
                j += 1;
            } else {
                break;
            }
        }
        if digits.len() == 12 && is_individual_number(&digits) {
            return true;
        }
        // Also the plain run without separators, e.g. "123456789012-3".
        i = j.max(i + 1);
    }
    false
}

/// Validates free text: trims nothing, rejects empty (when `required`),
/// over-long (in characters), control characters including CR, LF, NUL,
/// U+2028/2029, and any embedded Individual Number.
pub fn check_text(
    field: &'static str,
    s: &str,
    max_chars: usize,
    required: bool,
) -> Result<(), TextError> {
    if s.is_empty() {
        return if required {
            Err(TextError::Empty { field })
        } else {
            Ok(())
        };
    }
    if s.chars().count() > max_chars {
        return Err(TextError::TooLong {
            field,
            max: max_chars,
        });
    }
    if let Some(c) = s
        .chars()
        .find(|c| c.is_control() || matches!(*c, '\u{2028}' | '\u{2029}'))
    {
        return Err(TextError::Control {
            field,
            code: c as u32,
        });
    }
    if contains_individual_number(s) {
        return Err(TextError::IndividualNumber { field });
    }
    Ok(())
}

/// A municipal card application user ID: exactly 13 ASCII digits after
/// the documented normalisation (NFKC, so full-width digits become ASCII,
/// and surrounding white space trimmed). Keys residents across card
/// reissues; never the card serial.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CardUserId(String);

impl CardUserId {
    pub fn parse(input: &str) -> Result<Self, TextError> {
        let field = "card_user_id";
        let norm: String = input.nfkc().collect::<String>().trim().to_string();
        if norm.len() == 12
            && norm.bytes().all(|b| b.is_ascii_digit())
            && is_individual_number(&norm)
        {
            return Err(TextError::IndividualNumber { field });
        }
        if norm.len() != 13 || !norm.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TextError::CardUserId { field });
        }
        Ok(CardUserId(norm))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for CardUserId {
    type Error = TextError;
    fn try_from(s: String) -> Result<Self, TextError> {
        CardUserId::parse(&s)
    }
}
impl From<CardUserId> for String {
    fn from(c: CardUserId) -> String {
        c.0
    }
}
impl fmt::Debug for CardUserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Card user IDs are identifiers, not names; shown in full for support.
        write!(f, "CardUserId({})", self.0)
    }
}
impl fmt::Display for CardUserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The folded key used for name and kana search: NFKC (half-width katakana
/// and full-width Latin become their standard forms), hiragana folded to
/// katakana, Latin lower-cased, white space removed.
pub fn search_key(s: &str) -> String {
    s.nfkc()
        .filter(|c| !c.is_whitespace())
        .map(|c| match c {
            // Hiragana U+3041..U+3096 map to katakana at +0x60.
            '\u{3041}'..='\u{3096}' => char::from_u32(c as u32 + 0x60).unwrap_or(c),
            _ => c,
        })
        .flat_map(char::to_lowercase)
        .collect()
}

/// Does the name contain characters a reviewer should look at: Private
/// Use Area (vendor 外字), the geta mark substitute 〓, bidi controls or
/// zero-width characters? Stored as-is; flagged for review.
pub fn needs_review(s: &str) -> bool {
    s.chars().any(|c| {
        matches!(c as u32, 0xE000..=0xF8FF | 0xF0000..=0xFFFFD | 0x100000..=0x10FFFD)
            || c == '〓'
            || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
    })
}

/// Validates an e-mail address at entry time (I-26): one `@`, no white
/// space or control characters, at most 254 bytes, a dotted domain.
/// IDN domains are accepted here; the SMTP driver converts them to punycode.
pub fn check_email(field: &'static str, s: &str) -> Result<(), TextError> {
    let invalid = |reason: &str| TextError::Invalid {
        field,
        reason: reason.to_string(),
    };
    if s.len() > 254 {
        return Err(invalid("e-mail address longer than 254 bytes"));
    }
    if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid(
            "e-mail address contains white space or control characters",
        ));
    }
    let (local, domain) = s
        .split_once('@')
        .ok_or_else(|| invalid("e-mail address has no @"))?;
    if local.is_empty() || local.len() > 64 || domain.contains('@') || local.contains('"') {
        return Err(invalid(
            "e-mail local part is empty, too long, quoted or has a second @",
        ));
    }
    if !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
        || domain.contains("..")
    {
        return Err(invalid("e-mail domain must be a dotted name"));
    }
    if contains_individual_number(s) {
        return Err(TextError::IndividualNumber { field });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a number that passes the check digit from eleven digits.
    fn with_check(eleven: &str) -> String {
        (0..10)
            .map(|d| format!("{eleven}{d}"))
            .find(|s| is_individual_number(s))
            .unwrap()
    }

    #[test]
    fn check_digit_matches_the_formula() {
        // Exactly one check digit fits each eleven-digit prefix.
        for prefix in ["12345678901", "00000000000", "98765432109", "11111111111"] {
            let ok = (0..10)
                .filter(|d| is_individual_number(&format!("{prefix}{d}")))
                .count();
            assert_eq!(ok, 1, "{prefix}");
        }
        // Worked example: 12345678901 -> sum of P_n*Q_n.
        let n = with_check("12345678901");
        assert_eq!(n.len(), 12);
        assert!(!is_individual_number("12345678901"));
        assert!(!is_individual_number("1234567890123"));
    }

    #[test]
    fn individual_numbers_are_found_in_free_text() {
        let n = with_check("40123456789");
        assert!(contains_individual_number(&n));
        assert!(contains_individual_number(&format!("note: {n} please")));
        let spaced = format!("{} {} {}", &n[..4], &n[4..8], &n[8..]);
        assert!(contains_individual_number(&spaced));
        let wide: String = n
            .chars()
            .map(|c| char::from_u32(c as u32 - '0' as u32 + '０' as u32).unwrap())
            .collect();
        assert!(contains_individual_number(&wide));
        // 13 digits (a card user id) are not a 12-digit number.
        assert!(!contains_individual_number(&format!("{n}5")));
        assert!(check_text("note", &format!("x{n}"), 100, true).is_err());
        let err = check_text("note", &n, 100, true).unwrap_err();
        assert!(!err.to_string().contains(&n));
    }

    #[test]
    fn card_user_ids() {
        assert!(CardUserId::parse("1234567890123").is_ok());
        assert_eq!(
            CardUserId::parse("１２３４５６７８９０１２３")
                .unwrap()
                .as_str(),
            "1234567890123"
        );
        assert_eq!(
            CardUserId::parse(" 1234567890123 ").unwrap().as_str(),
            "1234567890123"
        );
        for bad in [
            "",
            "123456789012a",
            "+234567890123",
            "12345 67890123",
            "12345678901234",
            "abc",
        ] {
            assert_eq!(
                CardUserId::parse(bad),
                Err(TextError::CardUserId {
                    field: "card_user_id"
                }),
                "{bad:?}"
            );
        }
        let n = with_check("55555555555");
        assert_eq!(
            CardUserId::parse(&n),
            Err(TextError::IndividualNumber {
                field: "card_user_id"
            })
        );
    }

    #[test]
    fn text_rules() {
        assert!(check_text("name", "山田 太郎", 100, true).is_ok());
        assert!(check_text("name", "", 100, true).is_err());
        assert!(check_text("name", &"あ".repeat(101), 100, true).is_err());
        for bad in ["a\0b", "a\nb", "a\rb", "a\u{7}b", "a\u{2028}b"] {
            assert!(
                matches!(
                    check_text("name", bad, 100, true),
                    Err(TextError::Control { .. })
                ),
                "{bad:?}"
            );
        }
        // Vendor characters are kept, only flagged.
        assert!(check_text("name", "\u{E001}田", 100, true).is_ok());
        assert!(needs_review("\u{E001}田"));
        assert!(needs_review("abc\u{202E}"));
        assert!(!needs_review("山田"));
    }

    #[test]
    fn kana_search_key_folds_width_and_script() {
        assert_eq!(search_key("やまだ"), search_key("ヤマダ"));
        assert_eq!(search_key("ﾔﾏﾀﾞ"), search_key("ヤマダ"));
        assert_eq!(search_key("ＹＡＭＡＤＡ Taro"), "yamadataro");
    }

    #[test]
    fn emails() {
        assert!(check_email("email", "hanako@example.jp").is_ok());
        assert!(check_email("email", "花子@例え.jp").is_ok());
        for bad in [
            "no-at",
            "a@b",
            "a@@b.jp",
            "a b@c.jp",
            "a@c.jp\r\nBcc: x@y.jp",
            "\"q\"@c.jp",
            &format!("{}@c.jp", "a".repeat(260)),
        ] {
            assert!(check_email("email", bad).is_err(), "{bad:?}");
        }
    }
}
