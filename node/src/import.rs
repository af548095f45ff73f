//! Registry CSV import: decode, parse and validate the whole file first,
//! then hand households to the engine in batches.
//!
//! # File format
//!
//! One row per person, comma-separated, RFC 4180 quoting (`"a,b"`, `""`
//! for a quote; a field may not span lines). The first row is a header
//! naming exactly these columns, in this order:
//!
//! `household_id,address,person_id,name,kana,birth_date,card_user_id`
//!
//! - `household_id`, `person_id`: IDs (`A-Z a-z 0-9 . - _`, ≤ 64 bytes).
//!   Rows of one household may be anywhere in the file; they must agree on
//!   `address`.
//! - `name`, `kana`: ≤ 100 characters, stored exactly as given.
//! - `birth_date`: `YYYY-MM-DD`, or a Japanese era date such as
//!   `昭和25年4月1日` / `令和元年5月1日` (明治, 大正, 昭和, 平成, 令和; digits
//!   ASCII or full-width), checked against the era's first and last day.
//! - `card_user_id`: empty, or the 13-digit municipal card user ID.
//!
//! Encodings: UTF-8 with or without BOM, or CP932 (Shift_JIS); `auto`
//! takes UTF-8 when the whole file is valid UTF-8, else CP932. Bytes
//! invalid in the chosen encoding are an error on their line, never
//! replaced.
//!
//! Every bad row is reported with its line number; a 12-digit Individual
//! Number-shaped value anywhere rejects the row without echoing it. If any
//! row is bad nothing is imported.
//!
//! [`import_file`] is the whole `kizuna registry import`: parse, then open
//! the data directory as its hq node ([`crate::run::open_hq`]) and commit
//! one `ImportHouseholds` command per batch through the engine thread.

use crate::console::{progress, Exit};
use crate::driver::Driver;
use anyhow::Context;
use crdt::api::{Command, Operator, Reply};
use crdt::model::{Household, Member, Validate, MAX_MEMBERS};
use crdt::text::{contains_individual_number, CardUserId};
use std::collections::{BTreeMap, HashMap};

pub const COLUMNS: [&str; 7] = [
    "household_id",
    "address",
    "person_id",
    "name",
    "kana",
    "birth_date",
    "card_user_id",
];
/// Households per `ImportHouseholds` command (one durable commit each).
pub const BATCH_HOUSEHOLDS: usize = 5_000;
/// Files larger than this are refused before decoding.
pub const MAX_FILE_BYTES: usize = 512 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Encoding {
    Utf8,
    Cp932,
    Auto,
}

/// One problem, on one line (1-based; 0 = the file as a whole).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowError {
    pub line: usize,
    pub reason: String,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "line {}: {}", self.line, self.reason)
        }
    }
}

/// The validated content of a file.
#[derive(Debug)]
pub struct Registry {
    pub encoding: Encoding,
    /// In order of first appearance.
    pub households: Vec<Household>,
    pub persons: usize,
}

/// Decodes into lines (without terminators), each checked in the chosen
/// encoding.
pub fn decode(bytes: &[u8], enc: Encoding) -> Result<(Encoding, Vec<String>), Vec<RowError>> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err(vec![RowError {
            line: 0,
            reason: format!("file larger than {MAX_FILE_BYTES} bytes"),
        }]);
    }
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let enc = match enc {
        Encoding::Auto if std::str::from_utf8(bytes).is_ok() => Encoding::Utf8,
        Encoding::Auto => Encoding::Cp932,
        e => e,
    };
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    // 0x0A never occurs inside a CP932 multi-byte character.
    let mut raw: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    if raw.last().is_some_and(|l| l.is_empty()) {
        raw.pop();
    }
    for (i, l) in raw.into_iter().enumerate() {
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        let s = match enc {
            Encoding::Cp932 => encoding_rs::SHIFT_JIS
                .decode_without_bom_handling_and_without_replacement(l)
                .map(|c| c.into_owned()),
            _ => std::str::from_utf8(l).ok().map(str::to_string),
        };
        match s {
            Some(s) => lines.push(s),
            None => {
                errors.push(RowError {
                    line: i + 1,
                    reason: format!(
                        "invalid {} bytes",
                        if enc == Encoding::Cp932 {
                            "CP932"
                        } else {
                            "UTF-8"
                        }
                    ),
                });
                lines.push(String::new());
            }
        }
    }
    if errors.is_empty() {
        Ok((enc, lines))
    } else {
        Err(errors)
    }
}

/// Splits one CSV line (RFC 4180 quoting, no embedded newlines).
pub fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    cur.push('"');
                } else {
                    quoted = false;
                    match chars.peek() {
                        None | Some(',') => {}
                        Some(_) => return Err("text after a closing quote".into()),
                    }
                }
            } else {
                cur.push(c);
            }
        } else if c == ',' {
            out.push(std::mem::take(&mut cur));
            at_start = true;
            continue;
        } else if c == '"' && at_start {
            quoted = true;
        } else if c == '"' {
            return Err("quote inside an unquoted field".into());
        } else {
            cur.push(c);
        }
        at_start = false;
    }
    if quoted {
        return Err("unterminated quote (fields may not span lines)".into());
    }
    out.push(cur);
    Ok(out)
}

struct Era {
    name: &'static str,
    start: (u32, u32, u32),
    end: Option<(u32, u32, u32)>,
}

const ERAS: [Era; 5] = [
    Era {
        name: "明治",
        start: (1868, 1, 25),
        end: Some((1912, 7, 29)),
    },
    Era {
        name: "大正",
        start: (1912, 7, 30),
        end: Some((1926, 12, 24)),
    },
    Era {
        name: "昭和",
        start: (1926, 12, 25),
        end: Some((1989, 1, 7)),
    },
    Era {
        name: "平成",
        start: (1989, 1, 8),
        end: Some((2019, 4, 30)),
    },
    Era {
        name: "令和",
        start: (2019, 5, 1),
        end: None,
    },
];

fn ascii_digits(s: &str) -> Option<u32> {
    let d: String = s
        .chars()
        .map(|c| match c {
            '０'..='９' => char::from_u32(c as u32 - '０' as u32 + '0' as u32).unwrap_or(c),
            c => c,
        })
        .collect();
    if d.is_empty() || d.len() > 4 || !d.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    d.parse().ok()
}

/// `YYYY-MM-DD` or an era date → `YYYY-MM-DD`, checked to exist (and to
/// fall inside the era).
pub fn parse_birth_date(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_ascii() {
        crdt::model::check_date("birth_date", s).map_err(|e| e.to_string())?;
        return Ok(s.to_string());
    }
    let bad = || "birth_date: expected YYYY-MM-DD or an era date like 昭和25年4月1日".to_string();
    let era = ERAS
        .iter()
        .find(|e| s.starts_with(e.name))
        .ok_or_else(bad)?;
    let rest = &s[era.name.len()..];
    let (y, rest) = rest.split_once('年').ok_or_else(bad)?;
    let (m, rest) = rest.split_once('月').ok_or_else(bad)?;
    let d = rest.strip_suffix('日').ok_or_else(bad)?;
    let ey = if y == "元" {
        1
    } else {
        ascii_digits(y).ok_or_else(bad)?
    };
    let (m, d) = (
        ascii_digits(m).ok_or_else(bad)?,
        ascii_digits(d).ok_or_else(bad)?,
    );
    if ey == 0 {
        return Err(format!(
            "birth_date: {}0年 does not exist (the first year is 元年)",
            era.name
        ));
    }
    let y = era.start.0 + ey - 1;
    let iso = format!("{y:04}-{m:02}-{d:02}");
    crdt::model::check_date("birth_date", &iso).map_err(|e| e.to_string())?;
    let ymd = (y, m, d);
    if ymd < era.start || era.end.is_some_and(|e| ymd > e) {
        return Err(format!(
            "birth_date: {} is outside the {} era ({}-{:02}-{:02} to {})",
            s,
            era.name,
            era.start.0,
            era.start.1,
            era.start.2,
            era.end
                .map(|e| format!("{}-{:02}-{:02}", e.0, e.1, e.2))
                .unwrap_or_else(|| "today".into())
        ));
    }
    Ok(iso)
}

/// Parses and validates the decoded lines. All errors are collected.
pub fn parse_lines(
    lines: &[String],
    now_wall_ms: u64,
) -> Result<(Vec<Household>, usize), Vec<RowError>> {
    let mut errors = Vec::new();
    let Some(header) = lines.first() else {
        return Err(vec![RowError {
            line: 0,
            reason: "empty file".into(),
        }]);
    };
    match split_csv(header) {
        Ok(h) if h.iter().map(|s| s.trim()).eq(COLUMNS.iter().copied()) => {}
        _ => {
            return Err(vec![RowError {
                line: 1,
                reason: format!("header must be exactly: {}", COLUMNS.join(",")),
            }])
        }
    }
    let mut households: Vec<Household> = Vec::new();
    let mut hh_index: HashMap<String, (usize, usize)> = HashMap::new(); // id → (index, first line)
    let mut persons: HashMap<String, usize> = HashMap::new();
    let mut cards: HashMap<String, usize> = HashMap::new();
    let mut count = 0;
    for (i, line) in lines.iter().enumerate().skip(1) {
        let ln = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let mut err = |reason: String| errors.push(RowError { line: ln, reason });
        // Checked on the raw line before anything else: never echoed.
        if contains_individual_number(line) {
            err("rejected: individual-number-shaped input".into());
            continue;
        }
        let f = match split_csv(line) {
            Ok(f) => f,
            Err(r) => {
                err(r);
                continue;
            }
        };
        if f.len() != COLUMNS.len() {
            err(format!(
                "expected {} columns, found {}",
                COLUMNS.len(),
                f.len()
            ));
            continue;
        }
        let birth_date = match parse_birth_date(&f[5]) {
            Ok(d) => d,
            Err(r) => {
                err(r);
                continue;
            }
        };
        if let Err(e) = crdt::model::check_birth_date("birth_date", &birth_date, now_wall_ms) {
            err(e.to_string());
            continue;
        }
        let card = match f[6].trim() {
            "" => None,
            c => match CardUserId::parse(c) {
                Ok(c) => Some(c),
                Err(e) => {
                    err(e.to_string());
                    continue;
                }
            },
        };
        let member = Member {
            person_id: f[2].clone(),
            name: f[3].clone(),
            kana: f[4].clone(),
            birth_date,
            card_user_id: card.clone(),
        };
        if let Err(e) = member.validate() {
            err(e.to_string());
            continue;
        }
        let probe = Household {
            household_id: f[0].clone(),
            address: f[1].clone(),
            members: vec![member.clone()],
        };
        if let Err(e) = probe.validate() {
            err(e.to_string());
            continue;
        }
        if let Some(first) = persons.get(&member.person_id) {
            err(format!(
                "duplicate person_id {} (first on line {first})",
                member.person_id
            ));
            continue;
        }
        if let Some(c) = &card {
            if let Some(first) = cards.get(c.as_str()) {
                err(format!("duplicate card_user_id (first on line {first})"));
                continue;
            }
        }
        match hh_index.get(&probe.household_id) {
            Some(&(idx, first)) => {
                let h = &mut households[idx];
                if h.address != probe.address {
                    err(format!(
                        "household {} has a different address than on line {first}",
                        h.household_id
                    ));
                    continue;
                }
                if h.members.len() >= MAX_MEMBERS {
                    err(format!(
                        "household {} has more than {MAX_MEMBERS} members",
                        h.household_id
                    ));
                    continue;
                }
                h.members.push(member.clone());
            }
            None => {
                hh_index.insert(probe.household_id.clone(), (households.len(), ln));
                households.push(probe);
            }
        }
        persons.insert(member.person_id, ln);
        if let Some(c) = card {
            cards.insert(c.as_str().to_string(), ln);
        }
        count += 1;
    }
    if errors.is_empty() && households.is_empty() {
        errors.push(RowError {
            line: 0,
            reason: "no rows after the header".into(),
        });
    }
    if errors.is_empty() {
        Ok((households, count))
    } else {
        Err(errors)
    }
}

/// Decode, parse and validate a whole file.
pub fn parse_file(
    bytes: &[u8],
    enc: Encoding,
    now_wall_ms: u64,
) -> Result<Registry, Vec<RowError>> {
    let (encoding, lines) = decode(bytes, enc)?;
    let (households, persons) = parse_lines(&lines, now_wall_ms)?;
    Ok(Registry {
        encoding,
        households,
        persons,
    })
}

/// Batches of at most [`BATCH_HOUSEHOLDS`].
pub fn batches(households: &[Household]) -> Vec<&[Household]> {
    households.chunks(BATCH_HOUSEHOLDS).collect()
}

/// A stable op id per (file content, batch): re-running the same import
/// replays recorded results instead of writing twice.
pub fn batch_op_id(file: &[u8], batch: usize) -> String {
    let h = blake3::hash(file).to_hex();
    format!("import-{}-{batch}", &h[..24])
}

/// Counts per household id, for reports.
pub fn summary(h: &[Household]) -> BTreeMap<&'static str, usize> {
    BTreeMap::from([
        ("households", h.len()),
        ("persons", h.iter().map(|x| x.members.len()).sum()),
    ])
}

/// Validates and imports a registry file into the hq data directory
/// `data_dir` (a fresh one needs `node_id`); returns the summary line.
/// Bad rows are printed to stderr, one per line, and import nothing.
pub fn import_file(
    data_dir: &std::path::Path,
    file: &std::path::Path,
    enc: Encoding,
    node_id: Option<&str>,
) -> Result<String, Exit> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let reg = match parse_file(&bytes, enc, crate::run::wall_ms()) {
        Ok(r) => r,
        Err(errors) => {
            for e in &errors {
                eprintln!("{}:{e}", file.display());
            }
            return Err(Exit::bad_input(format!(
                "{}: {} bad row(s); nothing was imported",
                file.display(),
                errors.len()
            )));
        }
    };
    let (lock, store, ecfg) = crate::run::open_hq(data_dir, node_id)?;
    let driver = Driver::start(store, ecfg)?;
    let batches = batches(&reg.households);
    let pb = progress(reg.households.len() as u64, "importing households");
    let mut landed = 0usize;
    let mut failure = None;
    for (i, b) in batches.iter().enumerate() {
        let r = driver.command_blocking(
            batch_op_id(&bytes, i),
            Operator("registry-import".into()),
            Command::ImportHouseholds {
                households: b.to_vec(),
            },
        );
        match r {
            Ok(Reply::Imported { .. }) | Ok(_) => {
                landed += 1;
                pb.inc(b.len() as u64);
            }
            Err(e) => {
                failure = Some((i, e));
                break;
            }
        }
    }
    pb.finish_and_clear();
    driver.shutdown()?;
    drop(lock);
    match failure {
        None => Ok(format!(
            "imported {} households, {} persons ({:?}, {} batch(es))",
            reg.households.len(),
            reg.persons,
            reg.encoding,
            batches.len()
        )),
        Some((i, e)) => Err(Exit {
            code: 1,
            message: format!(
                "batch {} of {} failed: {e} ({}); batches 1..={landed} were committed and the rest were not. \
                 Re-running the same file is safe: committed batches are recognised by their op id and not written twice",
                i + 1,
                batches.len(),
                e.code()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_790_000_000_000; // 2026-09

    #[test]
    fn era_boundaries() {
        assert_eq!(parse_birth_date("平成31年4月30日").unwrap(), "2019-04-30");
        assert!(parse_birth_date("平成31年5月1日").is_err());
        assert_eq!(parse_birth_date("令和元年5月1日").unwrap(), "2019-05-01");
        assert!(parse_birth_date("令和元年4月30日").is_err());
        assert!(parse_birth_date("令和0年5月1日").is_err());
        assert!(parse_birth_date("令和2年2月30日").is_err());
        assert!(parse_birth_date("2020-02-30").is_err());
        assert_eq!(parse_birth_date("昭和25年4月1日").unwrap(), "1950-04-01");
        assert_eq!(
            parse_birth_date("昭和６４年１月７日").unwrap(),
            "1989-01-07"
        );
        assert!(parse_birth_date("昭和64年1月8日").is_err());
        assert_eq!(parse_birth_date("平成元年1月8日").unwrap(), "1989-01-08");
        assert_eq!(parse_birth_date("大正元年7月30日").unwrap(), "1912-07-30");
        assert!(parse_birth_date("明治45年7月30日").is_err());
        assert!(parse_birth_date("慶応3年1月1日").is_err());
        assert!(parse_birth_date("昭和25年4月1").is_err());
    }

    #[test]
    fn csv_split() {
        assert_eq!(
            split_csv("a,\"b,c\",\"d\"\"e\",").unwrap(),
            ["a", "b,c", "d\"e", ""]
        );
        assert!(split_csv("a,\"b").is_err());
        assert!(split_csv("a,b\"c").is_err());
    }

    fn file(rows: &[&str]) -> Vec<String> {
        std::iter::once(COLUMNS.join(","))
            .chain(rows.iter().map(|s| s.to_string()))
            .collect()
    }

    #[test]
    fn good_rows_group_households() {
        let (h, n) = parse_lines(
            &file(&[
                "h1,新潟県三条市1-1,p1,山田 太郎,ヤマダ タロウ,昭和25年4月1日,1234567890123",
                "h2,三条市2-2,p3,佐藤 花子,サトウ ハナコ,1990-01-02,",
                "h1,新潟県三条市1-1,p2,山田 花子,ヤマダ ハナコ,1952-05-06,",
            ]),
            NOW,
        )
        .unwrap();
        assert_eq!(n, 3);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].members.len(), 2);
        assert_eq!(h[0].members[0].birth_date, "1950-04-01");
    }

    #[test]
    fn bad_rows_are_all_reported_with_lines() {
        // 123456789018 passes the Individual Number check digit.
        assert!(crdt::text::is_individual_number("123456789018"));
        let errs = parse_lines(
            &file(&[
                "h1,a,p1,山田,ヤマダ,1950-01-01,",
                "h1,a,p2,山田,ヤマダ,1950-01-01",
                "h1,a,p1,山田,ヤマダ,1950-01-01,",
                "h2,a,p3,山田 123456789018,ヤマダ,1950-01-01,",
                "h3,a,p4,山田,ヤマダ,平成31年5月1日,",
                "h3,a,p5,山田,ヤマダ,1950-01-01,12345",
                "h1,b,p6,山田,ヤマダ,1950-01-01,",
                "h4,a,p7,,ヤマダ,1950-01-01,",
            ]),
            NOW,
        )
        .unwrap_err();
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, [3, 4, 5, 6, 7, 8, 9]);
        assert!(errs[0].reason.contains("columns"));
        assert!(errs[1].reason.contains("duplicate person_id"));
        assert!(errs[2].reason.contains("individual-number"));
        let all = errs.iter().map(|e| e.to_string()).collect::<String>();
        assert!(!all.contains("123456789018"));
    }

    #[test]
    fn encodings() {
        let text = format!("{}\nh1,a,p1,山田,ヤマダ,1950-01-01,\n", COLUMNS.join(","));
        let (sj, _, _) = encoding_rs::SHIFT_JIS.encode(&text);
        let r = parse_file(&sj, Encoding::Auto, NOW).unwrap();
        assert_eq!(r.encoding, Encoding::Cp932);
        assert_eq!(r.households[0].members[0].name, "山田");
        let mut bom = b"\xEF\xBB\xBF".to_vec();
        bom.extend_from_slice(text.as_bytes());
        assert_eq!(
            parse_file(&bom, Encoding::Auto, NOW).unwrap().encoding,
            Encoding::Utf8
        );
        let e = parse_file(&sj, Encoding::Utf8, NOW).unwrap_err();
        assert_eq!(e[0].line, 2);
        let mut bad = text.as_bytes().to_vec();
        bad.extend_from_slice(b"h2,a,p2,\xFF\xFF,x,1950-01-01,\n");
        let e = parse_file(&bad, Encoding::Cp932, NOW).unwrap_err();
        assert_eq!(e[0].line, 3);
    }
}
