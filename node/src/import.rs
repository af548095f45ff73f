//! CSV imports of municipal data, all through one machinery: decode,
//! parse and validate the whole file first, then hand the records to the
//! engine in batches, one durable commit each.
//!
//! A data set is a [`Dataset`]: its exact header, how one row is read
//! (it may add to a record started on an earlier row, like a household's
//! members or a person's contacts), the batch size and the engine command
//! a batch becomes. [`parse`] gives every data set the same guarantees:
//!
//! - Encodings: UTF-8 with or without BOM, or CP932 (Shift_JIS); `auto`
//!   takes UTF-8 when the whole file is valid UTF-8, else CP932. Bytes
//!   invalid in the chosen encoding are an error on their line, never
//!   replaced.
//! - The header row must name exactly the data set's columns, in order.
//!   RFC 4180 quoting (`"a,b"`, `""` for a quote; a field may not span
//!   lines); blank lines are skipped.
//! - Every bad row is reported with its line number; an
//!   Individual-Number-shaped value in any cell (in any disguise:
//!   separators, full width, invisible characters; see
//!   [`crdt::text::contains_individual_number`]) rejects the row without
//!   echoing it. If any row is bad nothing is imported.
//! - Batches have op ids derived from the file's hash ([`batch_op_id`]),
//!   so re-running the same file after an interruption replays committed
//!   batches instead of writing them twice.
//!
//! The formats are in `docs/cli.md`; [`RegistryRows`] is the resident
//! registry, [`datasets`] holds shelters, family contacts, medical
//! profiles and insurance eligibility, and [`import_file`] runs any of
//! them against a data directory (role checked, progress bar, batches).

pub mod datasets;

use crate::console::{progress, Exit};
use crate::driver::Driver;
use crate::store::{DataDirLock, SqliteStore, DB_FILE_NAME};
use anyhow::Context;
use crdt::api::Operator;
use crdt::engine::EngineConfig;
use crdt::model::{Household, Member, Validate, MAX_MEMBERS};
use crdt::text::{contains_individual_number, CardUserId};
use crdt::{NodeId, Role};
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

/// A whole number in ASCII or full-width digits (at most 9 of them).
pub fn ascii_number(s: &str) -> Option<u64> {
    let d: String = s
        .chars()
        .map(|c| match c {
            '０'..='９' => char::from_u32(c as u32 - '０' as u32 + '0' as u32).unwrap_or(c),
            c => c,
        })
        .collect();
    if d.is_empty() || d.len() > 9 || !d.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    d.parse().ok()
}

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
    parse_date("birth_date", s)
}

/// [`parse_birth_date`] for any date column.
pub fn parse_date(field: &'static str, s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_ascii() {
        crdt::model::check_date(field, s).map_err(|e| e.to_string())?;
        return Ok(s.to_string());
    }
    let bad = || format!("{field}: expected YYYY-MM-DD or an era date like 令和8年4月1日");
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
            "{field}: {}0年 does not exist (the first year is 元年)",
            era.name
        ));
    }
    let y = era.start.0 + ey - 1;
    let iso = format!("{y:04}-{m:02}-{d:02}");
    crdt::model::check_date(field, &iso).map_err(|e| e.to_string())?;
    let ymd = (y, m, d);
    if ymd < era.start || era.end.is_some_and(|e| ymd > e) {
        return Err(format!(
            "{field}: {} is outside the {} era ({}-{:02}-{:02} to {})",
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

/// One importable data set (see the module docs).
pub trait Dataset: Default {
    /// Used in op ids, messages and the CLI.
    const NAME: &'static str;
    /// Roles whose data directory may import this data set.
    const ROLES: &'static [crdt::Role] = &[crdt::Role::Hq];
    const COLUMNS: &'static [&'static str];
    /// Records per engine command.
    const BATCH: usize;
    type Item: Clone;
    /// Reads one row whose column count was checked; `Err` is the reason
    /// this line is bad.
    fn row(&mut self, line: usize, f: &[String], now_wall_ms: u64) -> Result<(), String>;
    /// The records in order of first appearance, each with its first line.
    fn finish(self) -> Result<Vec<(usize, Self::Item)>, Vec<RowError>>;
    /// The person a record is about, checked against the registry before
    /// anything is written (`None` for records not about a person).
    fn person(item: &Self::Item) -> Option<&str>;
    /// Rows a record stands for (persons of a household, contacts of a
    /// person), for the summary.
    fn rows(item: &Self::Item) -> usize {
        let _ = item;
        1
    }
    fn command(items: Vec<Self::Item>) -> crdt::api::Command;
}

/// Parses and validates the decoded lines of a data set. All errors are
/// collected.
pub fn parse<D: Dataset>(
    lines: &[String],
    now_wall_ms: u64,
) -> Result<Vec<(usize, D::Item)>, Vec<RowError>> {
    let mut errors = Vec::new();
    let Some(header) = lines.first() else {
        return Err(vec![RowError {
            line: 0,
            reason: "empty file".into(),
        }]);
    };
    match split_csv(header) {
        Ok(h) if h.iter().map(|s| s.trim()).eq(D::COLUMNS.iter().copied()) => {}
        _ => {
            return Err(vec![RowError {
                line: 1,
                reason: format!("header must be exactly: {}", D::COLUMNS.join(",")),
            }])
        }
    }
    // Every cell goes through the Individual-Number guard before anything
    // else looks at it (so no later message can echo one); a line that
    // does not split is checked whole. Each line alone, on every core.
    let cells = crdt::par::map(&lines[1..], crate::run::cores(), |line| {
        if line.trim().is_empty() {
            return None;
        }
        Some(match split_csv(line) {
            Ok(f) => match f.iter().position(|c| contains_individual_number(c)) {
                Some(col) => Err(format!(
                    "rejected: individual-number-shaped input (column {})",
                    D::COLUMNS.get(col).copied().unwrap_or("?")
                )),
                None => Ok(f),
            },
            Err(r) => Err(match contains_individual_number(line) {
                true => "rejected: individual-number-shaped input".into(),
                false => r,
            }),
        })
    });
    let mut d = D::default();
    for (i, cells) in cells.into_iter().enumerate() {
        let ln = i + 2;
        let Some(cells) = cells else { continue };
        let mut err = |reason: String| errors.push(RowError { line: ln, reason });
        let f = match cells {
            Ok(f) => f,
            Err(r) => {
                err(r);
                continue;
            }
        };
        if f.len() != D::COLUMNS.len() {
            err(format!(
                "expected {} columns, found {}",
                D::COLUMNS.len(),
                f.len()
            ));
            continue;
        }
        if let Err(r) = d.row(ln, &f, now_wall_ms) {
            err(r);
        }
    }
    let items = match d.finish() {
        Ok(items) => items,
        Err(mut e) => {
            errors.append(&mut e);
            errors.sort_by_key(|e| e.line);
            Vec::new()
        }
    };
    if errors.is_empty() && items.is_empty() {
        errors.push(RowError {
            line: 0,
            reason: "no rows after the header".into(),
        });
    }
    if errors.is_empty() {
        Ok(items)
    } else {
        Err(errors)
    }
}

/// Decodes and parses a whole file of a data set.
pub fn parse_dataset<D: Dataset>(
    bytes: &[u8],
    enc: Encoding,
    now_wall_ms: u64,
) -> Result<(Encoding, Vec<(usize, D::Item)>), Vec<RowError>> {
    let (encoding, lines) = decode(bytes, enc)?;
    Ok((encoding, parse::<D>(&lines, now_wall_ms)?))
}

/// The resident registry: one row per person, grouped into households.
#[derive(Default)]
pub struct RegistryRows {
    households: Vec<(usize, Household)>,
    hh_index: HashMap<String, usize>,
    persons: HashMap<String, usize>,
    cards: HashMap<String, usize>,
}

impl Dataset for RegistryRows {
    const NAME: &'static str = "registry";
    const COLUMNS: &'static [&'static str] = &COLUMNS;
    const BATCH: usize = BATCH_HOUSEHOLDS;
    type Item = Household;

    fn row(&mut self, ln: usize, f: &[String], now_wall_ms: u64) -> Result<(), String> {
        let birth_date = parse_birth_date(&f[5])?;
        crdt::model::check_birth_date("birth_date", &birth_date, now_wall_ms)
            .map_err(|e| e.to_string())?;
        let card = match f[6].trim() {
            "" => None,
            c => Some(CardUserId::parse(c).map_err(|e| e.to_string())?),
        };
        let member = Member {
            person_id: f[2].clone(),
            name: f[3].clone(),
            kana: f[4].clone(),
            birth_date,
            card_user_id: card.clone(),
        };
        member.validate().map_err(|e| e.to_string())?;
        let probe = Household {
            household_id: f[0].clone(),
            address: f[1].clone(),
            members: vec![member.clone()],
        };
        probe.validate().map_err(|e| e.to_string())?;
        if let Some(first) = self.persons.get(&member.person_id) {
            return Err(format!(
                "duplicate person_id {} (first on line {first})",
                member.person_id
            ));
        }
        if let Some(c) = &card {
            if let Some(first) = self.cards.get(c.as_str()) {
                return Err(format!("duplicate card_user_id (first on line {first})"));
            }
        }
        match self.hh_index.get(&probe.household_id) {
            Some(&idx) => {
                let (first, h) = &mut self.households[idx];
                if h.address != probe.address {
                    return Err(format!(
                        "household {} has a different address than on line {first}",
                        h.household_id
                    ));
                }
                if h.members.len() >= MAX_MEMBERS {
                    return Err(format!(
                        "household {} has more than {MAX_MEMBERS} members",
                        h.household_id
                    ));
                }
                h.members.push(member.clone());
            }
            None => {
                self.hh_index
                    .insert(probe.household_id.clone(), self.households.len());
                self.households.push((ln, probe));
            }
        }
        self.persons.insert(member.person_id, ln);
        if let Some(c) = card {
            self.cards.insert(c.as_str().to_string(), ln);
        }
        Ok(())
    }

    fn finish(self) -> Result<Vec<(usize, Household)>, Vec<RowError>> {
        Ok(self.households)
    }

    fn person(_: &Household) -> Option<&str> {
        None
    }

    fn rows(h: &Household) -> usize {
        h.members.len()
    }

    fn command(households: Vec<Household>) -> crdt::api::Command {
        crdt::api::Command::ImportHouseholds { households }
    }
}

/// Parses and validates the decoded lines of a registry file.
pub fn parse_lines(
    lines: &[String],
    now_wall_ms: u64,
) -> Result<(Vec<Household>, usize), Vec<RowError>> {
    let items = parse::<RegistryRows>(lines, now_wall_ms)?;
    let persons = items.iter().map(|(_, h)| h.members.len()).sum();
    Ok((items.into_iter().map(|(_, h)| h).collect(), persons))
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

/// A stable op id per (data set, file content, batch): re-running the
/// same import replays recorded results instead of writing twice. (The
/// registry keeps the op ids it had before the other data sets existed.)
/// `file_hash` is the file's BLAKE3 hash, taken once per import (hashing
/// the whole file per batch made the hashing quadratic in its size).
pub fn batch_op_id(dataset: &str, file_hash: &blake3::Hash, batch: usize) -> String {
    let h = file_hash.to_hex();
    match dataset {
        "registry" => format!("import-{}-{batch}", &h[..24]),
        d => format!("import-{d}-{}-{batch}", &h[..24]),
    }
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
    import_dataset::<RegistryRows>(data_dir, file, enc, node_id)
}

/// The data sets `kizuna import` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DatasetName {
    Registry,
    Shelters,
    Contacts,
    Medical,
    Eligibility,
}

/// [`import_dataset`] by name.
pub fn import_named(
    name: DatasetName,
    data_dir: &std::path::Path,
    file: &std::path::Path,
    enc: Encoding,
    node_id: Option<&str>,
) -> Result<String, Exit> {
    use datasets::*;
    match name {
        DatasetName::Registry => import_dataset::<RegistryRows>(data_dir, file, enc, node_id),
        DatasetName::Shelters => import_dataset::<ShelterRows>(data_dir, file, enc, node_id),
        DatasetName::Contacts => import_dataset::<ContactRows>(data_dir, file, enc, node_id),
        DatasetName::Medical => import_dataset::<MedicalRows>(data_dir, file, enc, node_id),
        DatasetName::Eligibility => import_dataset::<EligibilityRows>(data_dir, file, enc, node_id),
    }
}

/// Opens a data directory for an import of data set `D`: the node id and
/// role come from the database; a role not in `D::ROLES` is refused (exit
/// 2, nothing written); a fresh directory needs `node_id` and becomes an
/// hq database, if hq may import `D`.
pub fn open_for<D: Dataset>(
    data_dir: &std::path::Path,
    node_id: Option<&str>,
) -> Result<(DataDirLock, SqliteStore, EngineConfig), Exit> {
    let lock = DataDirLock::acquire(data_dir)?;
    let store = crate::atrest::open_for_command(
        &data_dir.join(DB_FILE_NAME),
        crate::store::OpenOptions::default(),
    )
    .map_err(|e| Exit::bad_input(format!("{e:#}")))?;
    let allowed = D::ROLES
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(" or ");
    let (id, role) = match crdt::store::Store::load_meta(&store)? {
        Some(m) if !D::ROLES.contains(&m.role) => {
            return Err(Exit::bad_input(format!(
                "{} belongs to {} node {}; {} import needs a data directory of a {allowed} node / \
                 この役割のノードには{}を取り込めません",
                data_dir.display(),
                m.role,
                m.node_id,
                D::NAME,
                D::NAME
            )))
        }
        Some(m) => {
            if let Some(n) = node_id {
                if n != m.node_id.as_str() {
                    return Err(Exit::bad_input(format!(
                        "--node-id {n} does not match the data directory's node {}",
                        m.node_id
                    )));
                }
            }
            (m.node_id, m.role)
        }
        None if D::ROLES.contains(&Role::Hq) => {
            let n = node_id.ok_or_else(|| {
                Exit::bad_input(format!(
                    "{} is a new data directory: give --node-id (the hq node's id from its certificate)",
                    data_dir.display()
                ))
            })?;
            (
                NodeId::new(n).map_err(|e| Exit::bad_input(e.to_string()))?,
                Role::Hq,
            )
        }
        None => {
            return Err(Exit::bad_input(format!(
                "{} is a new data directory: start the node once first",
                data_dir.display()
            )))
        }
    };
    // The node is stopped and its key elsewhere: the import is stored
    // unsigned and signed by the node at its next start (crdt::signing).
    let mut cfg = EngineConfig::new(id, role, crdt::signing::Trust::offline());
    cfg.build_threads = crate::run::cores();
    Ok((lock, store, cfg))
}

/// The whole `kizuna import DATASET` (and `registry import`): parse and
/// validate the file, open the data directory ([`open_for`]), check that
/// every person the records are about is known, then commit one command
/// per batch through the engine thread with a progress bar. Bad rows are
/// printed to stderr as `FILE:line N: reason` and import nothing.
pub fn import_dataset<D: Dataset>(
    data_dir: &std::path::Path,
    file: &std::path::Path,
    enc: Encoding,
    node_id: Option<&str>,
) -> Result<String, Exit> {
    let bad_rows = |errors: &[RowError]| {
        for e in errors {
            eprintln!("{}:{e}", file.display());
        }
        Exit::bad_input(format!(
            "{}: {} bad row(s); nothing was imported / 不正な行があるため何も取り込んでいません",
            file.display(),
            errors.len()
        ))
    };
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let (encoding, items) =
        parse_dataset::<D>(&bytes, enc, crate::run::wall_ms()).map_err(|e| bad_rows(&e))?;
    let (lock, store, ecfg) = open_for::<D>(data_dir, node_id)?;
    let persons: Vec<&str> = items.iter().filter_map(|(_, i)| D::person(i)).collect();
    let known = crdt::store::Store::known_persons(&store, &persons)?;
    let unknown: Vec<RowError> = items
        .iter()
        .filter_map(|(line, item)| {
            let p = D::person(item)?;
            (!known.contains(p)).then(|| RowError {
                line: *line,
                reason: format!("unknown person_id {p} (not in the registry)"),
            })
        })
        .collect();
    if !unknown.is_empty() {
        return Err(bad_rows(&unknown));
    }
    let rows: usize = items.iter().map(|(_, i)| D::rows(i)).sum();
    let records: Vec<D::Item> = items.into_iter().map(|(_, i)| i).collect();
    let driver = Driver::start(store, ecfg)?;
    let batches: Vec<&[D::Item]> = records.chunks(D::BATCH).collect();
    let file_hash = blake3::hash(&bytes);
    let pb = progress(records.len() as u64, &format!("importing {}", D::NAME));
    let mut landed = 0usize;
    let mut failure = None;
    for (i, b) in batches.iter().enumerate() {
        let r = driver.command_blocking(
            batch_op_id(D::NAME, &file_hash, i),
            Operator(format!("{}-import", D::NAME)),
            D::command(b.to_vec()),
        );
        match r {
            Ok(_) => {
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
        None if D::NAME == "registry" => Ok(format!(
            "imported {} households, {rows} persons ({encoding:?}, {} batch(es))",
            records.len(),
            batches.len()
        )),
        None => Ok(format!(
            "imported {} {} record(s) from {rows} row(s) ({encoding:?}, {} batch(es))",
            records.len(),
            D::NAME,
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
