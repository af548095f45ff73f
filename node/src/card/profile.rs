//! The card profile: where on a municipal card the user ID lives.
//!
//! The layout of the municipal card application is not public and differs
//! by municipality, so it is configuration. A profile names the application
//! (AID), the elementary file, the offset and length inside it and the text
//! encoding; the default is a clearly synthetic layout that our own card
//! emulator implements: application `F0 4B 49 5A 55 4E 41 01` (`F0` is the
//! proprietary-AID range, then "KIZUNA" and a version byte), EF `00 01`, 13
//! ASCII digits at offset 0, no PIN. In TOML, byte strings are hex, with
//! optional spaces or colons:
//!
//! ```toml
//! aid = "F0 4B 49 5A 55 4E 41 01"
//! file_id = "0001"
//! offset = 0
//! length = 13
//! encoding = "ascii"
//! ```
//!
//! [`CardProfile::validate`] refuses profiles that cannot work (bad AID
//! length, the MF or a reserved file ID, an offset beyond what READ BINARY
//! can address, a length that cannot hold 13 digits) and, as defence in
//! depth before the APDU guard, any AID of the My Number card.

use serde::{Deserialize, Serialize};
use std::fmt;

use super::apdu::ApduGuard;
use super::id::USER_ID_DIGITS;

/// The synthetic default application identifier.
pub const DEFAULT_AID: [u8; 8] = [0xF0, 0x4B, 0x49, 0x5A, 0x55, 0x4E, 0x41, 0x01];
/// The default elementary file holding the user ID.
pub const DEFAULT_FILE_ID: [u8; 2] = [0x00, 0x01];

/// Text encoding of the user ID on the card.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Exactly `length` bytes, each an ASCII digit; nothing is trimmed.
    Ascii,
    /// Strict UTF-8 (invalid bytes are an error, never U+FFFD), then the
    /// documented normalisation of [`super::id::UserId::normalize`]
    /// (full-width digits, surrounding spaces).
    Utf8,
}

impl Encoding {
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Ascii => "ASCII",
            Encoding::Utf8 => "UTF-8",
        }
    }
}

/// Where the user ID is stored on the card. Construct with
/// [`CardProfile::default`] or deserialize (which validates).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawProfile", into = "RawProfile")]
pub struct CardProfile {
    pub aid: Vec<u8>,
    pub file_id: [u8; 2],
    pub offset: u16,
    pub length: u8,
    pub encoding: Encoding,
}

impl Default for CardProfile {
    fn default() -> Self {
        CardProfile {
            aid: DEFAULT_AID.to_vec(),
            file_id: DEFAULT_FILE_ID,
            offset: 0,
            length: USER_ID_DIGITS as u8,
            encoding: Encoding::Ascii,
        }
    }
}

impl fmt::Debug for CardProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CardProfile")
            .field("aid", &hex(&self.aid))
            .field("file_id", &hex(&self.file_id))
            .field("offset", &self.offset)
            .field("length", &self.length)
            .field("encoding", &self.encoding)
            .finish()
    }
}

/// Why a profile was refused; each names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("card profile `{field}`: invalid hex: {reason}")]
    BadHex { field: &'static str, reason: String },
    #[error("card profile `aid`: {len} bytes, allowed 5..=16")]
    AidLength { len: usize },
    #[error("card profile `aid`: this is (or could select) a My Number card application, which Kizuna must never select")]
    ForbiddenAid,
    #[error("card profile `file_id`: {value} is reserved (3F00 is the MF, FFFF is reserved by ISO 7816-4)")]
    ReservedFileId { value: String },
    #[error("card profile `file_id`: expected 2 bytes, got {len}")]
    FileIdLength { len: usize },
    #[error("card profile `offset`: {offset} is above 32767, the largest READ BINARY offset")]
    OffsetRange { offset: u16 },
    #[error(
        "card profile `length`: {length} is not allowed for {encoding} (allowed {min}..={max})"
    )]
    LengthRange {
        length: u8,
        encoding: &'static str,
        min: u8,
        max: u8,
    },
    #[error("card profile `offset` + `length`: {end} exceeds 32768")]
    EndRange { end: u32 },
}

impl CardProfile {
    pub fn validate(&self) -> Result<(), ProfileError> {
        if !(5..=16).contains(&self.aid.len()) {
            return Err(ProfileError::AidLength {
                len: self.aid.len(),
            });
        }
        if ApduGuard::is_forbidden_aid(&self.aid) {
            return Err(ProfileError::ForbiddenAid);
        }
        if self.file_id == [0x3F, 0x00] || self.file_id == [0xFF, 0xFF] {
            return Err(ProfileError::ReservedFileId {
                value: hex(&self.file_id),
            });
        }
        if self.offset > 0x7FFF {
            return Err(ProfileError::OffsetRange {
                offset: self.offset,
            });
        }
        let digits = USER_ID_DIGITS as u8;
        // UTF-8 full-width digits take 3 bytes each; allow a few spaces around.
        let (min, max) = match self.encoding {
            Encoding::Ascii => (digits, digits),
            Encoding::Utf8 => (digits, digits * 3 + 6),
        };
        if !(min..=max).contains(&self.length) {
            return Err(ProfileError::LengthRange {
                length: self.length,
                encoding: self.encoding.name(),
                min,
                max,
            });
        }
        let end = u32::from(self.offset) + u32::from(self.length);
        if end > 0x8000 {
            return Err(ProfileError::EndRange { end });
        }
        Ok(())
    }

    /// Parses a TOML document holding exactly the profile keys.
    pub fn from_toml(text: &str) -> Result<CardProfile, toml::de::Error> {
        toml::from_str(text)
    }

    /// `00 A4 04 0C Lc AID`: select the application by name, no FCI.
    pub fn select_app_apdu(&self) -> Vec<u8> {
        let mut apdu = vec![0x00, 0xA4, 0x04, 0x0C, self.aid.len() as u8];
        apdu.extend_from_slice(&self.aid);
        apdu
    }

    /// `00 A4 02 0C 02 FID`: select the EF under the current DF, no FCI.
    pub fn select_file_apdu(&self) -> Vec<u8> {
        vec![
            0x00,
            0xA4,
            0x02,
            0x0C,
            0x02,
            self.file_id[0],
            self.file_id[1],
        ]
    }

    /// `00 B0 OFFhi OFFlo Le`.
    pub fn read_binary_apdu(&self) -> Vec<u8> {
        let [hi, lo] = self.offset.to_be_bytes();
        vec![0x00, 0xB0, hi, lo, self.length]
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    aid: String,
    file_id: String,
    #[serde(default)]
    offset: u16,
    #[serde(default = "default_length")]
    length: u8,
    #[serde(default = "default_encoding")]
    encoding: Encoding,
}

fn default_length() -> u8 {
    USER_ID_DIGITS as u8
}
fn default_encoding() -> Encoding {
    Encoding::Ascii
}

impl TryFrom<RawProfile> for CardProfile {
    type Error = ProfileError;
    fn try_from(raw: RawProfile) -> Result<Self, ProfileError> {
        let aid = parse_hex("aid", &raw.aid)?;
        let fid = parse_hex("file_id", &raw.file_id)?;
        let file_id: [u8; 2] = fid
            .as_slice()
            .try_into()
            .map_err(|_| ProfileError::FileIdLength { len: fid.len() })?;
        let profile = CardProfile {
            aid,
            file_id,
            offset: raw.offset,
            length: raw.length,
            encoding: raw.encoding,
        };
        profile.validate()?;
        Ok(profile)
    }
}

impl From<CardProfile> for RawProfile {
    fn from(p: CardProfile) -> RawProfile {
        RawProfile {
            aid: hex(&p.aid),
            file_id: hex(&p.file_id),
            offset: p.offset,
            length: p.length,
            encoding: p.encoding,
        }
    }
}

/// Upper-case hex without separators.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// Parses hex with optional spaces or colons between bytes.
pub fn parse_hex(field: &'static str, s: &str) -> Result<Vec<u8>, ProfileError> {
    let digits: Vec<u8> = s.bytes().filter(|b| !matches!(b, b' ' | b':')).collect();
    if !digits.len().is_multiple_of(2) {
        return Err(ProfileError::BadHex {
            field,
            reason: "odd number of hex digits".into(),
        });
    }
    digits
        .chunks(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).map_err(|_| ProfileError::BadHex {
                field,
                reason: "non-ASCII character".into(),
            })?;
            u8::from_str_radix(text, 16).map_err(|_| ProfileError::BadHex {
                field,
                reason: format!("{text:?} is not a hex byte"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_builds_the_documented_apdus() {
        let p = CardProfile::default();
        p.validate().unwrap();
        assert_eq!(hex(&p.select_app_apdu()), "00A4040C08F04B495A554E4101");
        assert_eq!(hex(&p.select_file_apdu()), "00A4020C020001");
        assert_eq!(hex(&p.read_binary_apdu()), "00B000000D");
    }

    #[test]
    fn toml_round_trip_and_validation() {
        let p = CardProfile::from_toml(
            "aid = \"F0:4B:49:5A:55:4E:41:01\"\nfile_id = \"00 01\"\noffset = 16\n",
        )
        .unwrap();
        assert_eq!(p.offset, 16);
        assert_eq!(p.aid, DEFAULT_AID);
        let text = toml::to_string(&p).unwrap();
        assert_eq!(CardProfile::from_toml(&text).unwrap(), p);

        let err = |t: &str| CardProfile::from_toml(t).unwrap_err().to_string();
        assert!(err("aid = \"F04B\"\nfile_id = \"0001\"").contains("5..=16"));
        assert!(err("aid = \"F04B495A554E41XX\"\nfile_id = \"0001\"").contains("hex"));
        assert!(err("aid = \"F04B495A554E4101\"\nfile_id = \"3F00\"").contains("reserved"));
        assert!(err("aid = \"F04B495A554E4101\"\nfile_id = \"000102\"").contains("2 bytes"));
        assert!(
            err("aid = \"F04B495A554E4101\"\nfile_id = \"0001\"\nlength = 12").contains("length")
        );
        assert!(
            err("aid = \"F04B495A554E4101\"\nfile_id = \"0001\"\noffset = 40000")
                .contains("offset")
        );
        assert!(
            err("aid = \"F04B495A554E4101\"\nfile_id = \"0001\"\npin = \"1234\"").contains("pin")
        );
        // My Number card applications, full or as a partial-name prefix.
        assert!(err("aid = \"D3921000310001010408\"\nfile_id = \"0001\"").contains("My Number"));
        assert!(err("aid = \"D3921000310001010402\"\nfile_id = \"0001\"").contains("My Number"));
        assert!(err("aid = \"D392100031\"\nfile_id = \"0001\"").contains("My Number"));
        assert!(err("aid = \"D392F000260100000001\"\nfile_id = \"0001\"").contains("My Number"));
    }
}
