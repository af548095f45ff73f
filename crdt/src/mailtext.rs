//! Family safety mail text: templates per language, filled with the
//! minimal content the law allows (name, safe, time, and the shelter only
//! when the resident allowed it).
//!
//! A template is a subject and a body with placeholders: `{name}` (the
//! resident), `{contact}` (the addressee), `{time}` (arrival in Japan time,
//! `2026年12月5日 23時50分`), `{time_en}` (`2026-12-05 23:50 JST`) and
//! `{shelter}`. A body line that mentions `{shelter}` is left out entirely
//! when the shelter may not be named, so no empty "避難所:" line gives a
//! hint. Unknown placeholders are refused when templates are configured
//! ([`MailTemplate::check`]), so a typo cannot send `{nmae}` to a family.

use crate::jst;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailTemplate {
    pub subject: String,
    pub body: String,
}

/// The placeholders a template may use.
pub const PLACEHOLDERS: [&str; 5] = ["name", "contact", "time", "time_en", "shelter"];
/// Longest template part accepted.
pub const MAX_TEMPLATE_CHARS: usize = 4000;

/// Templates by language code; `ja` is the fallback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailTemplates(pub BTreeMap<String, MailTemplate>);

impl Default for MailTemplates {
    fn default() -> Self {
        let mut m = BTreeMap::new();
        m.insert(
            "ja".to_string(),
            MailTemplate {
                subject: "【安否情報】{name} さんは無事です / Safety notice: {name} is safe".into(),
                body: "{contact} 様\n\n\
                       {name} さんは無事に避難所に到着しました。\n\
                       到着時刻: {time}\n\
                       避難所: {shelter}\n\n\
                       {name} has arrived safely at a shelter.\n\
                       Arrived: {time_en}\n\
                       Shelter: {shelter}\n\n\
                       このメールは、ご本人が事前に登録し同意した連絡先にのみお送りしています。\n\
                       This message goes only to contacts the resident registered in advance with consent.\n"
                    .into(),
            },
        );
        m.insert(
            "en".to_string(),
            MailTemplate {
                subject: "Safety notice: {name} is safe / 【安否情報】{name} さんは無事です".into(),
                body: "Dear {contact},\n\n\
                       {name} has arrived safely at a shelter.\n\
                       Arrived: {time_en}\n\
                       Shelter: {shelter}\n\n\
                       {name} さんは無事に避難所に到着しました（{time}）。\n\n\
                       This message goes only to contacts the resident registered in advance with consent.\n"
                    .into(),
            },
        );
        MailTemplates(m)
    }
}

/// What a mail says.
#[derive(Clone, Debug)]
pub struct MailFacts<'a> {
    pub name: &'a str,
    pub contact: &'a str,
    pub arrived_ms: u64,
    /// `None` when the resident did not allow naming the shelter.
    pub shelter: Option<&'a str>,
}

impl MailTemplate {
    /// Refuses unknown placeholders, unbalanced braces and oversized text.
    pub fn check(&self) -> Result<(), String> {
        for (part, text) in [("subject", &self.subject), ("body", &self.body)] {
            if text.trim().is_empty() {
                return Err(format!("{part}: empty"));
            }
            if text.chars().count() > MAX_TEMPLATE_CHARS {
                return Err(format!(
                    "{part}: longer than {MAX_TEMPLATE_CHARS} characters"
                ));
            }
            let mut rest = text.as_str();
            while let Some(open) = rest.find('{') {
                let after = &rest[open + 1..];
                let close = after
                    .find('}')
                    .ok_or_else(|| format!("{part}: '{{' without '}}'"))?;
                let name = &after[..close];
                if !PLACEHOLDERS.contains(&name) {
                    return Err(format!(
                        "{part}: unknown placeholder {{{name}}} (known: {})",
                        PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(" ")
                    ));
                }
                rest = &after[close + 1..];
            }
            if rest.contains('}') {
                return Err(format!("{part}: '}}' without '{{'"));
            }
        }
        if self.subject.contains('\n') || self.subject.contains("{shelter}") {
            return Err("subject: one line, and it may not name the shelter".into());
        }
        Ok(())
    }

    /// (subject, body).
    pub fn render(&self, f: &MailFacts<'_>) -> (String, String) {
        let fill = |line: &str| {
            line.replace("{name}", f.name)
                .replace("{contact}", f.contact)
                .replace("{time_en}", &jst::format_en(f.arrived_ms))
                .replace("{time}", &jst::format_ja(f.arrived_ms))
                .replace("{shelter}", f.shelter.unwrap_or(""))
        };
        let body: Vec<String> = self
            .body
            .split('\n')
            .filter(|l| f.shelter.is_some() || !l.contains("{shelter}"))
            .map(fill)
            .collect();
        (fill(&self.subject), body.join("\n"))
    }
}

impl MailTemplates {
    /// The template for a language (`ja` when unknown or empty).
    pub fn for_language(&self, lang: &str) -> &MailTemplate {
        self.0
            .get(lang)
            .or_else(|| self.0.get("ja"))
            .or_else(|| self.0.values().next())
            .expect("at least one template")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(shelter: Option<&str>) -> MailFacts<'_> {
        MailFacts {
            name: "山田 太郎",
            contact: "山田 花子",
            arrived_ms: 1_796_482_224_840,
            shelter,
        }
    }

    #[test]
    fn defaults_are_valid_and_in_japan_time() {
        let t = MailTemplates::default();
        for tpl in t.0.values() {
            tpl.check().unwrap();
        }
        let (subject, body) = t.for_language("ja").render(&facts(Some("三条小学校")));
        assert!(subject.starts_with("【安否情報】山田 太郎 さんは無事です"));
        assert!(body.contains("到着時刻: 2026年12月5日 23時50分"), "{body}");
        assert!(body.contains("避難所: 三条小学校"));
        assert!(body.contains("Arrived: 2026-12-05 23:50 JST"));
        assert!(!body.contains("1796482224840"));
        assert!(body.starts_with("山田 花子 様"));
    }

    #[test]
    fn shelter_lines_vanish_when_not_allowed() {
        let t = MailTemplates::default();
        for lang in ["ja", "en", "xx", ""] {
            let (_, body) = t.for_language(lang).render(&facts(None));
            assert!(
                !body.contains("避難所:") && !body.contains("Shelter:"),
                "{body}"
            );
            assert!(body.contains("山田 太郎"));
        }
    }

    #[test]
    fn bad_templates_are_refused() {
        let ok = MailTemplate {
            subject: "s {name}".into(),
            body: "b {time}".into(),
        };
        ok.check().unwrap();
        for (s, b) in [
            ("s {nmae}", "b"),
            ("s", "b {time"),
            ("s", "b }"),
            ("", "b"),
            ("s {shelter}", "b"),
            ("s\nBcc: x", "b"),
        ] {
            let t = MailTemplate {
                subject: s.into(),
                body: b.into(),
            };
            assert!(t.check().is_err(), "{s:?} {b:?}");
        }
    }
}
