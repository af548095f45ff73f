//! The resident's user ID as read from a card or typed by an operator, and
//! the Individual Number check that keeps My Numbers out of Kizuna.
//!
//! A [`UserId`] is exactly 13 ASCII digits. [`UserId::parse`] accepts only
//! that; [`UserId::normalize`] first applies the documented normalisation for
//! human input (trim leading and trailing ASCII spaces, tabs and the
//! ideographic space U+3000; map full-width digits U+FF10..U+FF19 to ASCII,
//! which is what NFKC does to them) and nothing else. A 12-digit string that
//! passes the Individual Number check digit ([`is_individual_number`]) is
//! rejected with [`UserIdError::IndividualNumberShaped`], which carries no
//! digits, so the value can never reach a log or a message through the error.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Number of digits in a Kizuna user ID.
pub const USER_ID_DIGITS: usize = 13;

/// Why a value is not a user ID. No variant carries the input itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UserIdError {
    #[error("IDが空です / ID is empty")]
    Empty,
    #[error("IDは13桁の数字です（{len}文字） / ID must be 13 digits (got {len} characters)")]
    WrongLength { len: usize },
    #[error(
        "IDは13桁の数字です（数字以外の文字） / ID must be 13 digits (found a non-digit character)"
    )]
    NotDigits,
    /// A 12-digit value with a valid Individual Number check digit.
    #[error("個人番号の形式の入力は受け付けません / rejected: individual-number-shaped input")]
    IndividualNumberShaped,
    /// Card bytes outside the profile's encoding (e.g. non-ASCII bytes for
    /// an ASCII profile, invalid UTF-8). Never replaced with U+FFFD.
    #[error("カードのIDの文字コードが不正です / The ID on the card is not valid {encoding} text")]
    BadEncoding { encoding: &'static str },
}

impl UserIdError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            UserIdError::Empty => "id-empty",
            UserIdError::WrongLength { .. } => "id-wrong-length",
            UserIdError::NotDigits => "id-not-digits",
            UserIdError::IndividualNumberShaped => "id-individual-number-shaped",
            UserIdError::BadEncoding { .. } => "id-bad-encoding",
        }
    }
}

/// A validated 13-digit user ID. IDs may be logged; names never are.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

impl UserId {
    /// Accepts exactly 13 ASCII digits, nothing else.
    pub fn parse(s: &str) -> Result<UserId, UserIdError> {
        if s.is_empty() {
            return Err(UserIdError::Empty);
        }
        if is_individual_number(s) {
            return Err(UserIdError::IndividualNumberShaped);
        }
        let len = s.chars().count();
        if !s.chars().all(|c| c.is_ascii_digit()) {
            // Check characters before length so "12345678901a3" says
            // "non-digit" rather than a confusing length.
            return Err(UserIdError::NotDigits);
        }
        if len != USER_ID_DIGITS {
            return Err(UserIdError::WrongLength { len });
        }
        Ok(UserId(s.to_owned()))
    }

    /// The documented normalisation for human input, then [`UserId::parse`].
    pub fn normalize(input: &str) -> Result<UserId, UserIdError> {
        let trimmed = input.trim_matches(|c| matches!(c, ' ' | '\t' | '\u{3000}'));
        let mapped: String = trimmed
            .chars()
            .map(|c| match c {
                '\u{FF10}'..='\u{FF19}' => char::from(b'0' + (c as u32 - 0xFF10) as u8),
                other => other,
            })
            .collect();
        UserId::parse(&mapped)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserId {
    type Error = UserIdError;
    fn try_from(s: String) -> Result<Self, UserIdError> {
        UserId::parse(&s)
    }
}
impl From<UserId> for String {
    fn from(u: UserId) -> String {
        u.0
    }
}
impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({})", self.0)
    }
}

/// The Individual Number check (12 digits with a valid check digit) is the
/// core's, so card input and every other field share one definition.
pub use crdt::text::is_individual_number;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_digit_known_example() {
        // Worked by hand: 1·2+0·3+9·4+8·5+7·6+6·7+5·2+4·3+3·4+2·5+1·6 = 212,
        // 212 mod 11 = 3, d = 8.
        assert!(is_individual_number("123456789018"));
        for d in 0..=9u8 {
            if d != 8 {
                let s = format!("12345678901{d}");
                assert!(!is_individual_number(&s), "{s}");
            }
        }
        // Remainder 0 or 1 gives d = 0.
        assert!(is_individual_number("000000000000"));
        assert!(!is_individual_number("12345678901"));
        assert!(!is_individual_number("1234567890180"));
        assert!(!is_individual_number("12345678901a"));
        assert!(!is_individual_number("１２３４５６７８９０１８"));
    }

    #[test]
    fn exactly_one_check_digit_per_prefix() {
        for prefix in ["00000000001", "98765432109", "31415926535", "27182818284"] {
            let valid = (0..=9)
                .filter(|d| is_individual_number(&format!("{prefix}{d}")))
                .count();
            assert_eq!(valid, 1, "{prefix}");
        }
    }

    #[test]
    fn parse_and_normalize() {
        assert_eq!(
            UserId::parse("1234567890123").unwrap().as_str(),
            "1234567890123"
        );
        assert_eq!(UserId::parse(""), Err(UserIdError::Empty));
        assert_eq!(
            UserId::parse("123"),
            Err(UserIdError::WrongLength { len: 3 })
        );
        assert_eq!(
            UserId::parse("12345678901234"),
            Err(UserIdError::WrongLength { len: 14 })
        );
        assert_eq!(UserId::parse("123456789012a"), Err(UserIdError::NotDigits));
        assert_eq!(UserId::parse("+234567890123"), Err(UserIdError::NotDigits));
        assert_eq!(UserId::parse(" 1234567890123"), Err(UserIdError::NotDigits));
        assert_eq!(
            UserId::parse("123456789018"),
            Err(UserIdError::IndividualNumberShaped)
        );
        assert_eq!(
            UserId::parse("123456789017"),
            Err(UserIdError::WrongLength { len: 12 })
        );
        assert_eq!(
            UserId::parse("１２３４５６７８９０１２３"),
            Err(UserIdError::NotDigits)
        );
        assert_eq!(
            UserId::normalize("\u{3000} １２３４５６７８９０１２３\t")
                .unwrap()
                .as_str(),
            "1234567890123"
        );
        assert_eq!(
            UserId::normalize("１２３４５６７８９０１８"),
            Err(UserIdError::IndividualNumberShaped)
        );
        // Not documented, so not normalised: inner spaces, hyphens, Arabic-Indic digits.
        assert!(UserId::normalize("123456 7890123").is_err());
        assert!(UserId::normalize("123456-7890123").is_err());
        assert!(UserId::normalize("١٢٣٤٥٦٧٨٩٠١٢٣").is_err());
    }

    #[test]
    fn errors_never_echo_digits() {
        let e = UserId::parse("123456789018").unwrap_err();
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("123456789018"));
        assert!(!shown.chars().any(|c| c.is_ascii_digit()));
    }
}
