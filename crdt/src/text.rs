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
    /// The value holds an Individual Number (or something shaped like
    /// one); the value itself is never kept, shown or logged.
    #[error("{field}: 個人番号（マイナンバー）の形式の値は受け付けません / rejected: individual-number-shaped input")]
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
/// check digit? (Product brief, "Rules from law".) The check-digit
/// arithmetic only; [`contains_individual_number`] decides whether a text
/// holds such a number.
pub fn is_individual_number(digits: &str) -> bool {
    let b = digits.as_bytes();
    if b.len() != 12 || !b.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let d: Vec<u8> = b.iter().map(|c| c - b'0').collect();
    check_digit_ok(&d)
}

/// The check digit rule on twelve digit values (0..=9): P_n is the n-th
/// digit from the right of the first eleven, Q_n = n + 1 for n <= 6 and
/// n - 5 for n >= 7; the check digit is 11 - (sum mod 11), or 0 when the
/// remainder is 0 or 1.
fn check_digit_ok(d: &[u8]) -> bool {
    debug_assert_eq!(d.len(), 12);
    let sum: u32 = (1..=11)
        .map(|n| {
            let p = u32::from(d[11 - n]);
            let q = if n <= 6 { n as u32 + 1 } else { n as u32 - 5 };
            p * q
        })
        .sum();
    let r = sum % 11;
    let check = if r <= 1 { 0 } else { 11 - r };
    check == u32::from(d[11])
}

/// What one character (after NFKC) is to the Individual Number guard.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    /// A decimal digit in any script people might type it in.
    Digit(u8),
    /// White space or a comma: separates the words of a number
    /// ("1234 5678 9012"), and a number may start at any word.
    Space,
    /// Hyphens, dashes, the long-vowel mark, dots, middle dots, slashes,
    /// underscores and tildes: separate digit groups within a word
    /// ("1234-5678-9012").
    Sep,
    /// Zero-width, bidi, variation selectors, combining marks and other
    /// default-ignorable characters: invisible, so they are skipped as if
    /// absent ("1234\u{200B}5678…").
    Invisible,
    /// Anything else ends a number.
    Other,
}

/// The first code point of each run of ten decimal digits (Unicode
/// general category Nd) that NFKC leaves alone: Arabic-Indic, Extended
/// Arabic-Indic, Devanagari, Bengali, Gurmukhi, Gujarati, Oriya, Tamil,
/// Telugu, Kannada, Malayalam, Thai, Lao, Tibetan, Myanmar, Khmer,
/// Mongolian. (Full-width, mathematical, circled and super/subscript
/// digits become ASCII under NFKC.)
const DIGIT_ZEROS: [u32; 17] = [
    0x0660, 0x06F0, 0x0966, 0x09E6, 0x0A66, 0x0AE6, 0x0B66, 0x0BE6, 0x0C66, 0x0CE6, 0x0D66, 0x0E50,
    0x0ED0, 0x0F20, 0x1040, 0x17E0, 0x1810,
];

fn classify(c: char) -> Class {
    let u = c as u32;
    if c.is_ascii_digit() {
        return Class::Digit(c as u8 - b'0');
    }
    if c.is_ascii() {
        return match c {
            ',' => Class::Space,
            c if c.is_ascii_whitespace() => Class::Space,
            '-' | '.' | '/' | '\\' | '_' | '~' => Class::Sep,
            _ => Class::Other,
        };
    }
    // Kanji numerals as written in vertical text and on forms.
    let kanji = match c {
        '〇' | '零' => Some(0),
        '一' => Some(1),
        '二' => Some(2),
        '三' => Some(3),
        '四' => Some(4),
        '五' => Some(5),
        '六' => Some(6),
        '七' => Some(7),
        '八' => Some(8),
        '九' => Some(9),
        _ => None,
    };
    if let Some(d) = kanji {
        return Class::Digit(d);
    }
    if let Some(z) = DIGIT_ZEROS.iter().find(|z| (**z..**z + 10).contains(&u)) {
        return Class::Digit((u - z) as u8);
    }
    match u {
        // Default-ignorable code points (soft hyphen, combining grapheme
        // joiner, Arabic letter mark, Hangul fillers, Khmer inherent
        // vowels, Mongolian selectors, zero-width and bidi controls, word
        // joiner and invisible operators, variation selectors, BOM, tags)
        // and the other format characters.
        0x00AD
        | 0x034F
        | 0x061C
        | 0x115F
        | 0x1160
        | 0x17B4
        | 0x17B5
        | 0x180B..=0x180F
        | 0x200B..=0x200F
        | 0x202A..=0x202E
        | 0x2060..=0x206F
        | 0x3164
        | 0xFE00..=0xFE0F
        | 0xFEFF
        | 0xFFA0
        | 0xFFF0..=0xFFFB
        | 0x1BCA0..=0x1BCA3
        | 0x1D173..=0x1D17A
        | 0xE0000..=0xE0FFF
        | 0x0600..=0x0605
        | 0x06DD
        | 0x070F
        | 0x08E2
        | 0x110BD
        | 0x110CD => Class::Invisible,
        // Combining marks (diacritics, enclosing keycaps, half marks) sit
        // on the digit before them.
        0x0300..=0x036F
        | 0x1AB0..=0x1AFF
        | 0x1DC0..=0x1DFF
        | 0x20D0..=0x20FF
        | 0xFE20..=0xFE2F
        | 0x3099
        | 0x309A => Class::Invisible,
        // Ideographic comma and full stop, middle dots, dashes, minus
        // signs, the long-vowel mark, wave dash, fraction and division
        // slashes.
        0x3001 | 0xFF64 => Class::Space,
        0x3002
        | 0xFF61
        | 0x00B7
        | 0x30FB
        | 0x2022
        | 0x2027
        | 0x2219
        | 0x22C5
        | 0x2010..=0x2015
        | 0x2212
        | 0x2043
        | 0x30FC
        | 0xFE58
        | 0xFE63
        | 0x301C
        | 0x3030
        | 0x2044
        | 0x2215
        | 0x29F8
        | 0x29F9 => Class::Sep,
        _ if c.is_whitespace() => Class::Space,
        _ => Class::Other,
    }
}

/// Digits of one run of words (groups joined by separators), with the
/// start of each word.
#[derive(Default)]
struct Run {
    digits: Vec<u8>,
    word_starts: Vec<usize>,
    in_word: bool,
}

impl Run {
    /// Does any sequence of whole consecutive words of this run hold
    /// exactly twelve digits that pass the check digit?
    fn holds_number(&self) -> bool {
        let ends = self
            .word_starts
            .iter()
            .skip(1)
            .copied()
            .chain([self.digits.len()]);
        let bounds: Vec<(usize, usize)> = self.word_starts.iter().copied().zip(ends).collect();
        for (i, &(start, _)) in bounds.iter().enumerate() {
            for &(_, end) in &bounds[i..] {
                match (end - start).cmp(&12) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Equal => {
                        if check_digit_ok(&self.digits[start..end]) {
                            return true;
                        }
                    }
                    std::cmp::Ordering::Greater => {}
                }
                break;
            }
        }
        false
    }

    fn clear(&mut self) {
        self.digits.clear();
        self.word_starts.clear();
        self.in_word = false;
    }
}

/// The one place that decides whether a text holds an Individual Number.
/// Every id, name, note, CSV cell and API string goes through it (via
/// [`check_text`], [`check_email`], [`CardUserId::parse`] and
/// `ids::check_id_str`).
///
/// The text is read after NFKC (full-width, circled, mathematical and
/// super/subscript digits become ASCII; ideographic space becomes a
/// space), with kanji numerals and other scripts' decimal digits read as
/// digits and invisible characters (zero-width, bidi, variation
/// selectors, combining marks) skipped. Digits joined by separators form
/// *words* ("1234-5678"), words joined by white space or commas form a
/// *run*, anything else ends a run. A text holds a number when some
/// sequence of whole consecutive words of a run has exactly twelve digits
/// that pass the check digit: "1234 5678 9018", "１２３４－５６７８－９０１８",
/// "1234\u{200B}56789018" and "2024/01/15 123456789018" all do. A digit
/// group of any other length is never split, so a 13-digit card user ID
/// (one group) never matches, and neither does a phone number or a date.
pub fn contains_individual_number(text: &str) -> bool {
    // Ids and most text are ASCII, where NFKC changes nothing: no digit,
    // no number.
    if text.is_ascii() {
        if !text.bytes().any(|b| b.is_ascii_digit()) {
            return false;
        }
        scan(text.chars())
    } else if text.chars().all(nfkc_inert) {
        // Japanese names, addresses and notes: NFKC would give the same
        // text (or, for the ideographic space, a space, which is the
        // same class), so it is skipped; normalising every imported
        // string was a large part of the guard's cost.
        scan(text.chars())
    } else {
        scan(text.nfkc())
    }
}

/// Characters NFKC leaves as they are and never combines with a
/// neighbour, or that it maps to a character of the same [`Class`]:
/// ASCII, hiragana, katakana (without the voiced-mark and iteration
/// characters), the CJK unified ideographs (kanji numerals among them are
/// digits either way), the ideographic comma and full stop, and the
/// ideographic space (NFKC: a space), 々, 〆 and 〇. The test
/// `inert_characters_are_what_nfkc_leaves_alone` checks every one.
fn nfkc_inert(c: char) -> bool {
    c.is_ascii()
        || matches!(c as u32, 0x3000..=0x3002 | 0x3005..=0x3007 | 0x3041..=0x3096 | 0x30A1..=0x30FA | 0x4E00..=0x9FFF)
}

fn scan(chars: impl Iterator<Item = char>) -> bool {
    let mut run = Run::default();
    for c in chars {
        match classify(c) {
            Class::Digit(d) => {
                if !run.in_word {
                    run.word_starts.push(run.digits.len());
                    run.in_word = true;
                }
                run.digits.push(d);
            }
            Class::Sep | Class::Invisible => {}
            Class::Space => run.in_word = false,
            Class::Other => {
                if run.holds_number() {
                    return true;
                }
                run.clear();
            }
        }
    }
    run.holds_number()
}

/// Field names [`json_individual_number`] may report (anything else is
/// reported as `request`): a name from the request itself could be the
/// number.
const FIELD_NAMES: [&str; 36] = [
    "person_id",
    "person_ids",
    "household_id",
    "shelter_id",
    "to_shelter",
    "from_shelter",
    "contact_id",
    "event_id",
    "op_id",
    "name",
    "kana",
    "note",
    "address",
    "reason",
    "text",
    "email",
    "relation",
    "location",
    "needs",
    "district",
    "insurer",
    "symbol",
    "number",
    "what",
    "scope",
    "card_user_id",
    "birth_date",
    "q",
    "update",
    "add",
    "edit",
    "remove",
    "contacts",
    "households",
    "members",
    "records",
];

/// Every string and object key of a JSON value through
/// [`contains_individual_number`]: the guard for API bodies, whatever
/// fields they have now or gain later. Returns the field the first one
/// was found in (the nearest enclosing known field name, else
/// `request`), never the value. [`find_individual_number`] over the
/// value.
pub fn json_individual_number(v: &serde_json::Value) -> Option<&'static str> {
    find_individual_number(v)
}

/// The Individual-Number guard over anything serializable, as if it
/// were first turned into JSON and every string, object key and number
/// of that JSON were checked: struct fields and map keys are keys, enum
/// variants are keys (or strings for unit variants), numbers are checked
/// as their decimal text. Returns the field the first one was found in
/// (the nearest enclosing known field name, else `request`), never the
/// value.
///
/// Why not `serde_json::to_value` and a walk over the tree: an import
/// batch of 5,000 records built and freed a JSON tree of every string
/// of every record just to read each string once (a tenth of the CPU of
/// a bulk import). This walks the value's own `Serialize` and copies
/// nothing.
pub fn find_individual_number<T: serde::Serialize + ?Sized>(v: &T) -> Option<&'static str> {
    match v.serialize(guard::Walk::new("request")) {
        Err(guard::Stop::Found(field)) => Some(field),
        // A value that does not serialize has no JSON form either: the
        // tree walk saw nothing in it.
        Err(guard::Stop::Unserializable) | Ok(()) => None,
    }
}

/// The serializer behind [`find_individual_number`]: it produces
/// nothing and stops at the first Individual Number.
mod guard {
    use super::{contains_individual_number, FIELD_NAMES};
    use serde::ser::{self, Serialize};

    #[derive(Debug)]
    pub(super) enum Stop {
        Found(&'static str),
        Unserializable,
    }

    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Stop::Found(field) => write!(f, "individual number in {field}"),
                Stop::Unserializable => f.write_str("not serializable"),
            }
        }
    }

    impl std::error::Error for Stop {}

    impl ser::Error for Stop {
        fn custom<T: std::fmt::Display>(_: T) -> Self {
            Stop::Unserializable
        }
    }

    /// The known field name `k` is, if any.
    fn known(k: &str) -> Option<&'static str> {
        FIELD_NAMES.iter().find(|n| **n == k).copied()
    }

    fn text(s: &str, field: &'static str) -> Result<(), Stop> {
        if contains_individual_number(s) {
            Err(Stop::Found(field))
        } else {
            Ok(())
        }
    }

    /// A whole number as JSON writes it. Fewer than eleven or more than
    /// twelve digits are one digit group that cannot be twelve digits,
    /// so only 12-digit values are written out and scanned.
    fn whole(magnitude: u128, negative: bool, field: &'static str) -> Result<(), Stop> {
        if !(100_000_000_000..1_000_000_000_000).contains(&magnitude) {
            return Ok(());
        }
        let s = if negative {
            format!("-{magnitude}")
        } else {
            magnitude.to_string()
        };
        text(&s, field)
    }

    /// Floating point as `serde_json` writes it into a tree.
    fn float<F: Serialize>(v: F, field: &'static str) -> Result<(), Stop> {
        match serde_json::to_value(v) {
            Ok(serde_json::Value::Number(n)) => text(&n.to_string(), field),
            _ => Ok(()),
        }
    }

    /// One value, inside `field`. As a map key (`key` set), a string
    /// also names the field its value is in.
    pub(super) struct Walk<'a> {
        field: &'static str,
        key: Option<&'a mut Option<&'static str>>,
    }

    impl Walk<'_> {
        pub(super) fn new(field: &'static str) -> Walk<'static> {
            Walk { field, key: None }
        }
    }

    /// A variant name as JSON's one-entry object around its content:
    /// checked as a key, and names the field of the content when known.
    fn variant(field: &'static str, name: &'static str) -> Result<&'static str, Stop> {
        text(name, field)?;
        Ok(known(name).unwrap_or(field))
    }

    /// Arrays, objects and variants with content.
    pub(super) struct Compound {
        field: &'static str,
        /// The field of the next map value (from its key).
        next: &'static str,
    }

    impl Compound {
        fn new(field: &'static str) -> Compound {
            Compound { field, next: field }
        }
        fn element<T: Serialize + ?Sized>(&self, v: &T) -> Result<(), Stop> {
            v.serialize(Walk::new(self.field))
        }
        fn entry<T: Serialize + ?Sized>(&self, name: &'static str, v: &T) -> Result<(), Stop> {
            text(name, self.field)?;
            v.serialize(Walk::new(known(name).unwrap_or(self.field)))
        }
    }

    impl<'a> ser::Serializer for Walk<'a> {
        type Ok = ();
        type Error = Stop;
        type SerializeSeq = Compound;
        type SerializeTuple = Compound;
        type SerializeTupleStruct = Compound;
        type SerializeTupleVariant = Compound;
        type SerializeMap = Compound;
        type SerializeStruct = Compound;
        type SerializeStructVariant = Compound;

        fn serialize_bool(self, _: bool) -> Result<(), Stop> {
            Ok(())
        }
        fn serialize_i8(self, _: i8) -> Result<(), Stop> {
            Ok(())
        }
        fn serialize_i16(self, _: i16) -> Result<(), Stop> {
            Ok(())
        }
        fn serialize_i32(self, _: i32) -> Result<(), Stop> {
            Ok(())
        }
        fn serialize_i64(self, v: i64) -> Result<(), Stop> {
            whole(u128::from(v.unsigned_abs()), v < 0, self.field)
        }
        fn serialize_i128(self, v: i128) -> Result<(), Stop> {
            whole(v.unsigned_abs(), v < 0, self.field)
        }
        fn serialize_u8(self, _: u8) -> Result<(), Stop> {
            Ok(())
        }
        fn serialize_u16(self, _: u16) -> Result<(), Stop> {
            Ok(())
        }
        fn serialize_u32(self, _: u32) -> Result<(), Stop> {
            Ok(())
        }
        fn serialize_u64(self, v: u64) -> Result<(), Stop> {
            whole(u128::from(v), false, self.field)
        }
        fn serialize_u128(self, v: u128) -> Result<(), Stop> {
            whole(v, false, self.field)
        }
        fn serialize_f32(self, v: f32) -> Result<(), Stop> {
            float(v, self.field)
        }
        fn serialize_f64(self, v: f64) -> Result<(), Stop> {
            float(v, self.field)
        }
        fn serialize_char(self, v: char) -> Result<(), Stop> {
            // One character is never twelve digits (NFKC makes at most
            // two of one, as in ⑳), but as a key it may name a field.
            if let Some(k) = self.key {
                *k = known(v.encode_utf8(&mut [0; 4]));
            }
            Ok(())
        }
        fn serialize_str(self, v: &str) -> Result<(), Stop> {
            text(v, self.field)?;
            if let Some(k) = self.key {
                *k = known(v);
            }
            Ok(())
        }
        fn serialize_bytes(self, _: &[u8]) -> Result<(), Stop> {
            // JSON writes bytes as an array of numbers below 256.
            Ok(())
        }
        fn serialize_none(self) -> Result<(), Stop> {
            Ok(())
        }
        fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<(), Stop> {
            v.serialize(self)
        }
        fn serialize_unit(self) -> Result<(), Stop> {
            Ok(())
        }
        fn serialize_unit_struct(self, _: &'static str) -> Result<(), Stop> {
            Ok(())
        }
        fn serialize_unit_variant(
            self,
            _: &'static str,
            _: u32,
            name: &'static str,
        ) -> Result<(), Stop> {
            self.serialize_str(name)
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            v: &T,
        ) -> Result<(), Stop> {
            v.serialize(self)
        }
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            name: &'static str,
            v: &T,
        ) -> Result<(), Stop> {
            v.serialize(Walk::new(variant(self.field, name)?))
        }
        fn serialize_seq(self, _: Option<usize>) -> Result<Compound, Stop> {
            Ok(Compound::new(self.field))
        }
        fn serialize_tuple(self, _: usize) -> Result<Compound, Stop> {
            Ok(Compound::new(self.field))
        }
        fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Compound, Stop> {
            Ok(Compound::new(self.field))
        }
        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            name: &'static str,
            _: usize,
        ) -> Result<Compound, Stop> {
            Ok(Compound::new(variant(self.field, name)?))
        }
        fn serialize_map(self, _: Option<usize>) -> Result<Compound, Stop> {
            Ok(Compound::new(self.field))
        }
        fn serialize_struct(self, _: &'static str, _: usize) -> Result<Compound, Stop> {
            Ok(Compound::new(self.field))
        }
        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            name: &'static str,
            _: usize,
        ) -> Result<Compound, Stop> {
            Ok(Compound::new(variant(self.field, name)?))
        }
    }

    impl ser::SerializeSeq for Compound {
        type Ok = ();
        type Error = Stop;
        fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Stop> {
            self.element(v)
        }
        fn end(self) -> Result<(), Stop> {
            Ok(())
        }
    }

    impl ser::SerializeTuple for Compound {
        type Ok = ();
        type Error = Stop;
        fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Stop> {
            self.element(v)
        }
        fn end(self) -> Result<(), Stop> {
            Ok(())
        }
    }

    impl ser::SerializeTupleStruct for Compound {
        type Ok = ();
        type Error = Stop;
        fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Stop> {
            self.element(v)
        }
        fn end(self) -> Result<(), Stop> {
            Ok(())
        }
    }

    impl ser::SerializeTupleVariant for Compound {
        type Ok = ();
        type Error = Stop;
        fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Stop> {
            self.element(v)
        }
        fn end(self) -> Result<(), Stop> {
            Ok(())
        }
    }

    impl ser::SerializeMap for Compound {
        type Ok = ();
        type Error = Stop;
        fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), Stop> {
            let mut name = None;
            k.serialize(Walk {
                field: self.field,
                key: Some(&mut name),
            })?;
            self.next = name.unwrap_or(self.field);
            Ok(())
        }
        fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Stop> {
            v.serialize(Walk::new(self.next))
        }
        fn end(self) -> Result<(), Stop> {
            Ok(())
        }
    }

    impl ser::SerializeStruct for Compound {
        type Ok = ();
        type Error = Stop;
        fn serialize_field<T: Serialize + ?Sized>(
            &mut self,
            name: &'static str,
            v: &T,
        ) -> Result<(), Stop> {
            self.entry(name, v)
        }
        fn end(self) -> Result<(), Stop> {
            Ok(())
        }
    }

    impl ser::SerializeStructVariant for Compound {
        type Ok = ();
        type Error = Stop;
        fn serialize_field<T: Serialize + ?Sized>(
            &mut self,
            name: &'static str,
            v: &T,
        ) -> Result<(), Stop> {
            self.entry(name, v)
        }
        fn end(self) -> Result<(), Stop> {
            Ok(())
        }
    }
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
    // First, so the answer names the real problem even when the text
    // is also too long or has control characters in it.
    if contains_individual_number(s) {
        return Err(TextError::IndividualNumber { field });
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
        if contains_individual_number(input) {
            return Err(TextError::IndividualNumber { field });
        }
        let norm: String = input.nfkc().collect::<String>().trim().to_string();
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
    if contains_individual_number(s) {
        return Err(TextError::IndividualNumber { field });
    }
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

    /// The twelve digits of a valid Individual Number from eleven.
    fn complete(eleven: &[u8]) -> Vec<u8> {
        let s: String = eleven.iter().map(|d| char::from(b'0' + d)).collect();
        with_check(&s).bytes().map(|b| b - b'0').collect()
    }

    /// One digit as people (or someone hiding it) might write it.
    fn digit_form(d: u8, form: u8) -> String {
        let d32 = u32::from(d);
        let c = |u: u32| char::from_u32(u).unwrap().to_string();
        match form % 9 {
            0 => c('0' as u32 + d32),
            1 => c(0xFF10 + d32), // full-width
            2 => "〇一二三四五六七八九"
                .chars()
                .nth(d as usize)
                .unwrap()
                .to_string(),
            3 => c(0x0660 + d32),  // Arabic-Indic
            4 => c(0x1D7CE + d32), // mathematical bold
            5 => match d {
                0 => c(0x24EA),           // circled zero
                _ => c(0x2460 + d32 - 1), // circled
            },
            6 => match d {
                1 => c(0xB9),
                2 => c(0xB2),
                3 => c(0xB3),
                _ => c(0x2070 + d32), // superscript
            },
            7 => format!("{}\u{20E3}", d), // keycap
            _ => c(0x0966 + d32),          // Devanagari
        }
    }

    /// What may stand between two digits of a disguised number.
    const BETWEEN: [&str; 24] = [
        "",
        "",
        "",
        " ",
        "-",
        ".",
        "/",
        "　",
        "－",
        "ー",
        "・",
        " - ",
        "\u{200B}",
        "\u{2060}",
        "\u{FEFF}",
        "\u{00AD}",
        "\u{00A0}",
        "／",
        "．",
        "_",
        "\u{200D} ",
        "‐",
        "\u{202E}",
        "\u{FE0F}",
    ];
    /// Text before and after it (never glued to its digits: a digit
    /// right next to it makes a different, longer number).
    const PREFIX: [&str; 8] = [
        "",
        "My Number: ",
        "番号は",
        "note ",
        "2024/01/15 ",
        "Tel 03-1234-5678 / ",
        "x",
        "（",
    ];
    const SUFFIX: [&str; 7] = ["", " です", " thanks", "。", "!", " 2024-01-15", "）"];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Every valid number, in every disguise, is caught, and every
        /// checked field rejects it without echoing it.
        #[test]
        fn every_disguise_is_caught(
            eleven in proptest::collection::vec(0u8..10, 11),
            forms in proptest::collection::vec(0u8..9, 12),
            gaps in proptest::collection::vec(0usize..BETWEEN.len(), 13),
            pre in 0usize..PREFIX.len(),
            suf in 0usize..SUFFIX.len(),
        ) {
            let digits = complete(&eleven);
            let mut text = PREFIX[pre].to_string();
            // Invisible characters may also come first and last.
            if gaps[0] % 2 == 0 {
                text.push('\u{200B}');
            }
            for (i, d) in digits.iter().enumerate() {
                if i > 0 {
                    text.push_str(BETWEEN[gaps[i]]);
                }
                text.push_str(&digit_form(*d, forms[i]));
            }
            if gaps[12] % 2 == 0 {
                text.push('\u{FEFF}');
            }
            text.push_str(SUFFIX[suf]);
            proptest::prop_assert!(contains_individual_number(&text), "{text:?}");
            let err = check_text("note", &text, 1000, true).unwrap_err();
            proptest::prop_assert_eq!(&err, &TextError::IndividualNumber { field: "note" });
            let plain: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
            proptest::prop_assert!(!err.to_string().contains(&plain));
            proptest::prop_assert!(CardUserId::parse(&text).is_err());
        }

        /// 13-digit card user IDs pass, in any width and with invisible
        /// characters in them, even when their first twelve digits would
        /// pass the check digit.
        #[test]
        fn card_ids_pass(
            twelve_first in proptest::bool::ANY,
            eleven in proptest::collection::vec(0u8..10, 11),
            last in 0u8..10,
            wide in proptest::bool::ANY,
            zw in 0usize..14,
        ) {
            let mut digits = if twelve_first { complete(&eleven) } else {
                let mut d = eleven.clone(); d.push(last); d
            };
            digits.push(last);
            let ascii: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
            let mut text: String = digits
                .iter()
                .map(|d| digit_form(*d, if wide { 1 } else { 0 }))
                .collect();
            if zw < 13 {
                let at = text.char_indices().nth(zw).map(|(i, _)| i).unwrap_or(0);
                text.insert(at, '\u{200B}');
            }
            proptest::prop_assert!(!contains_individual_number(&text), "{text:?}");
            let s = format!("card {ascii} ok");
            proptest::prop_assert!(!contains_individual_number(&s));
            let card = CardUserId::parse(&ascii).unwrap();
            proptest::prop_assert_eq!(card.as_str(), ascii.as_str());
            let s = format!("カード {text}");
            proptest::prop_assert!(check_text("note", &s, 100, true).is_ok());
        }

        /// Ordinary text passes: names, addresses, phone numbers, dates,
        /// postal codes, card ids and uuids with words between them.
        #[test]
        fn ordinary_text_passes(parts in proptest::collection::vec((0usize..8, 0u64..u64::MAX), 1..8)) {
            let words = ["山田 太郎", "やまだ はなこ", "新潟県三条市旭町", "様", "Tel", "住所", "生年月日", "メモ: 薬あり"];
            let mut text = String::new();
            for (kind, n) in parts {
                let num = match kind {
                    0 => format!("0{}-{:04}-{:04}", 90 + n % 3, n % 10_000, (n / 10_000) % 10_000), // mobile, 11
                    1 => format!("0{}-{}-{:04}", 25 + n % 70, 10 + n % 90, (n / 100) % 10_000), // landline, 10
                    2 => format!("{}-{:02}-{:02}", 1900 + n % 125, 1 + n % 12, 1 + n % 28),
                    3 => format!("〒{:03}-{:04}", n % 1000, (n / 1000) % 10_000),
                    4 => format!("{:013}", n % 10_000_000_000_000),
                    5 => format!("{}-{}-{}", 1 + n % 9, 1 + n % 30, 1 + n % 20),
                    // A hex code: at most eight digits (a longer one can hold
                    // twelve that pass the check digit, and is refused).
                    6 => format!("{:08x}", n as u32),
                    _ => format!("{}", n % 100_000),
                };
                text.push_str(&num);
                text.push(' ');
                text.push_str(words[(n % 8) as usize]);
                text.push(' ');
            }
            proptest::prop_assert!(!contains_individual_number(&text), "{text:?}");
        }
    }

    #[test]
    fn guard_examples() {
        let n = with_check("12345678901");
        let wide: String = n.chars().map(|c| digit_form(c as u8 - b'0', 1)).collect();
        for caught in [
            format!("{} {} {}", &n[..4], &n[4..8], &n[8..]),
            format!("{}-{}-{}", &n[..4], &n[4..8], &n[8..]),
            format!("{}.{}.{}", &n[..4], &n[4..8], &n[8..]),
            format!("{}/{}/{}", &n[..4], &n[4..8], &n[8..]),
            format!("{}\u{200B}{}", &n[..6], &n[6..]),
            format!("2024/01/15 {n}"),
            format!("2024-01-15 {} {}", &n[..6], &n[6..]),
            format!("p-{n}"),
            format!("{n}-x"),
            wide,
        ] {
            assert!(contains_individual_number(&caught), "{caught:?}");
        }
        for passes in [
            "1234567890123".to_string(),
            format!("{n}5"),
            format!("5{n}"),
            "2024-01-15 2024-01-20".into(),
            "025-123-4567 / 090-1234-5678".into(),
            "2-3-1 0256-34-5511".into(),
            "550e8400-e29b-41d4-a716-446655440000".into(),
            "一二三".into(),
            "op-1700000000000-7".into(),
        ] {
            assert!(!contains_individual_number(&passes), "{passes:?}");
        }
    }

    #[test]
    fn inert_characters_are_what_nfkc_leaves_alone() {
        let inert: Vec<char> = (0..=0x10FFFFu32)
            .filter_map(char::from_u32)
            .filter(|c| nfkc_inert(*c))
            .collect();
        for &c in &inert {
            let n: String = c.to_string().nfkc().collect();
            match c {
                // The one mapped character: a space, the same class.
                '\u{3000}' => assert_eq!(n, " "),
                c => assert_eq!(n, c.to_string(), "U+{:04X}", c as u32),
            }
        }
        // Neighbours never combine: NFKC of a pair is the pair (each
        // inert character next to a spread of others).
        for (i, &a) in inert.iter().enumerate().step_by(97) {
            let b = inert[(i * 7919) % inert.len()];
            let pair: String = [a, b].iter().collect();
            let n: String = pair.nfkc().collect();
            assert_eq!(
                n.chars().count(),
                2,
                "U+{:04X} U+{:04X}",
                a as u32,
                b as u32
            );
        }
        // The fast path gives the answer the full path gives.
        let n = with_check("98765432109");
        for s in [
            format!("山田　{}", n),
            format!("やまだ{}　{}", &n[..4], &n[4..]),
            format!("三条市{}-{}-{}番地", &n[..4], &n[4..8], &n[8..]),
            format!("{}{}", n, "一"),
            "一二三四五六七八九〇一二".to_string(),
            "〇九〇一二三四五六七八九".to_string(),
            "カタカナ　ひらがな　漢字、。".to_string(),
        ] {
            assert!(s.chars().all(nfkc_inert), "{s}");
            assert_eq!(contains_individual_number(&s), scan(s.nfkc()), "{s}");
        }
    }

    /// The serializer walk answers as the walk over a JSON tree did: the
    /// same values found, in the same fields, for commands of every shape.
    #[test]
    fn typed_requests_are_guarded_like_their_json() {
        fn tree(v: &serde_json::Value, field: &'static str) -> Option<&'static str> {
            use serde_json::Value;
            match v {
                Value::String(s) => contains_individual_number(s).then_some(field),
                Value::Array(items) => items.iter().find_map(|i| tree(i, field)),
                Value::Object(map) => map.iter().find_map(|(k, v)| {
                    if contains_individual_number(k) {
                        return Some(field);
                    }
                    tree(
                        v,
                        FIELD_NAMES
                            .iter()
                            .find(|n| **n == k)
                            .copied()
                            .unwrap_or(field),
                    )
                }),
                Value::Number(n) => contains_individual_number(&n.to_string()).then_some(field),
                _ => None,
            }
        }
        #[derive(serde::Serialize)]
        #[serde(rename_all = "snake_case")]
        enum Cmd {
            Note { person_id: String, note: String },
            Edit(Vec<(String, String)>),
            Remove(String),
            Count(u64, i64),
            Plain,
        }
        #[derive(serde::Serialize)]
        struct Req {
            op_id: String,
            cmd: Cmd,
            extra: std::collections::BTreeMap<String, Option<String>>,
            wall_ms: u64,
            ratio: f64,
        }
        let n = with_check("40123456789");
        let spaced = format!("{} {} {}", &n[..4], &n[4..8], &n[8..]);
        let num: u64 = n.parse().unwrap();
        let req = |cmd: Cmd, extra: &[(&str, &str)], wall_ms: u64, op_id: &str| Req {
            op_id: op_id.into(),
            cmd,
            extra: extra
                .iter()
                .map(|(k, v)| (k.to_string(), Some(v.to_string())))
                .collect(),
            wall_ms,
            ratio: 0.3,
        };
        let note = |note: &str| Cmd::Note {
            person_id: "p1".into(),
            note: note.into(),
        };
        let cases = [
            req(note("ok"), &[], 1_790_000_000_000, "op-1"),
            req(note(&spaced), &[], 1, "op-1"),
            req(note("ok"), &[], 1, &n),
            req(note("ok"), &[], num, "op-1"),
            req(Cmd::Edit(vec![("a".into(), n.clone())]), &[], 1, "op-1"),
            req(Cmd::Remove(n.clone()), &[], 1, "op-1"),
            req(Cmd::Count(num, 5), &[], 1, "op-1"),
            req(Cmd::Count(5, -(num as i64)), &[], 1, "op-1"),
            req(Cmd::Plain, &[("address", &spaced)], 1, "op-1"),
            req(Cmd::Plain, &[(&n, "x")], 1, "op-1"),
            req(
                Cmd::Plain,
                &[("name", "山田　太郎"), ("q", "1234567890123")],
                1,
                "o",
            ),
        ];
        let mut found = 0;
        for (i, c) in cases.iter().enumerate() {
            let json = serde_json::to_value(c).unwrap();
            let want = tree(&json, "request");
            assert_eq!(find_individual_number(c), want, "case {i}");
            assert_eq!(json_individual_number(&json), want, "case {i}");
            found += usize::from(want.is_some());
        }
        assert_eq!(found, 9);
        // Variant names name the field of their content.
        assert_eq!(find_individual_number(&cases[4]), Some("edit"));
        assert_eq!(find_individual_number(&cases[5]), Some("remove"));
    }

    #[test]
    fn requests_are_guarded_without_echo() {
        let n = with_check("98765432109");
        let body =
            serde_json::json!({"person_id": "p1", "update": {"edit": [["allergy", n, "x"]]}});
        assert_eq!(json_individual_number(&body), Some("edit"));
        let body = serde_json::json!({"name": "山田", "note": format!("{} {}", &n[..4], &n[4..])});
        assert_eq!(json_individual_number(&body), Some("note"));
        let body = serde_json::json!({ n.clone(): 1 });
        assert_eq!(json_individual_number(&body), Some("request"));
        let body = serde_json::json!({"count": n.parse::<u64>().unwrap()});
        assert_eq!(json_individual_number(&body), Some("request"));
        let ok =
            serde_json::json!({"card_user_id": "1234567890123", "n": 5, "ids": ["p-1", "h-2"]});
        assert_eq!(json_individual_number(&ok), None);
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

/// `prefix` and `words` random 64-bit words in hex, redrawn while the hex
/// spells a checked twelve-digit number (every node would refuse such an
/// id as an Individual Number).
pub fn random_id(prefix: &str, words: usize, rng: &mut dyn rand_core::RngCore) -> String {
    loop {
        let mut id = prefix.to_string();
        for _ in 0..words {
            id.push_str(&format!("{:016x}", rng.next_u64()));
        }
        if !contains_individual_number(&id) {
            return id;
        }
    }
}
