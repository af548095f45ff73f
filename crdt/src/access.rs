//! Who may read a medical profile, why, and how often: the rules the engine
//! applies to every [`crate::api::Command::ReadMedical`] before it audits
//! and answers.
//!
//! - A read names its purpose from a short, closed list
//!   ([`AccessReason`]), never free text, so the audit trail can be
//!   reviewed ("who saw what, and why") without reading prose.
//! - A profile without recorded consent is read only through break-glass:
//!   a separate, audited [`crate::api::Command::BreakGlass`] grant for one
//!   operator and one person, with a purpose and a written justification,
//!   valid for [`BREAK_GLASS_TTL_MS`] (one transport). Reads under it are
//!   flagged `break_glass` in the audit and listed for review at
//!   headquarters.
//! - Each operator may read at most [`READS_PER_WINDOW`] profiles per
//!   [`READ_WINDOW_MS`]: a lost or misused session cannot page through
//!   the whole medical cache.
//!
//! [`MedicalAccess`] is owned by the engine and keeps its state in memory
//! (grants and read counts are lost on restart: a restarted node asks for a
//! new grant, the safe direction). Time is the driver's monotonic clock.

use std::collections::{BTreeMap, VecDeque};

/// How long a break-glass grant lasts: one ambulance transport.
pub const BREAK_GLASS_TTL_MS: u64 = 60 * 60 * 1000;
/// Medical reads allowed per operator per [`READ_WINDOW_MS`].
pub const READS_PER_WINDOW: usize = 30;
pub const READ_WINDOW_MS: u64 = 10 * 60 * 1000;
/// Operators whose read history is kept; the oldest are forgotten beyond.
const MAX_TRACKED_OPERATORS: usize = 4096;
/// Live grants kept at most; the oldest are dropped beyond.
const MAX_GRANTS: usize = 4096;

/// The purpose of a medical read, from a closed list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AccessReason {
    /// 救急搬送: the person is being carried by an ambulance.
    EmergencyTransport,
    /// 救急処置: emergency treatment on site.
    EmergencyTreatment,
    /// 病院への引継ぎ: handing over to the receiving hospital.
    HospitalHandover,
    /// 診療: treatment at a clinic.
    ClinicCare,
    /// 訪問時の確認: a home or shelter visit.
    Visit,
}

impl AccessReason {
    pub const ALL: [AccessReason; 5] = [
        AccessReason::EmergencyTransport,
        AccessReason::EmergencyTreatment,
        AccessReason::HospitalHandover,
        AccessReason::ClinicCare,
        AccessReason::Visit,
    ];

    pub fn code(self) -> &'static str {
        match self {
            AccessReason::EmergencyTransport => "emergency_transport",
            AccessReason::EmergencyTreatment => "emergency_treatment",
            AccessReason::HospitalHandover => "hospital_handover",
            AccessReason::ClinicCare => "clinic_care",
            AccessReason::Visit => "visit",
        }
    }

    pub fn ja(self) -> &'static str {
        match self {
            AccessReason::EmergencyTransport => "救急搬送",
            AccessReason::EmergencyTreatment => "救急処置",
            AccessReason::HospitalHandover => "病院への引継ぎ",
            AccessReason::ClinicCare => "診療",
            AccessReason::Visit => "訪問時の確認",
        }
    }

    pub fn en(self) -> &'static str {
        match self {
            AccessReason::EmergencyTransport => "emergency transport",
            AccessReason::EmergencyTreatment => "emergency treatment",
            AccessReason::HospitalHandover => "handover to hospital",
            AccessReason::ClinicCare => "clinic care",
            AccessReason::Visit => "visit",
        }
    }

    pub fn parse(code: &str) -> Option<AccessReason> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }
}

/// Why a read or grant was refused (each refusal is audited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The reason is not one of [`AccessReason::ALL`].
    UnknownReason,
    /// The operator read [`READS_PER_WINDOW`] profiles in the window.
    RateLimited,
    /// No recorded consent and no break-glass grant.
    NoConsent,
    /// `break_glass` asked for without a live grant.
    NoGrant,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::UnknownReason => "unknown_reason",
            Refusal::RateLimited => "rate_limited",
            Refusal::NoConsent => "no_consent",
            Refusal::NoGrant => "no_break_glass_grant",
        }
    }

    pub fn message(self) -> String {
        match self {
            Refusal::UnknownReason => format!(
                "reason must be one of: {}",
                AccessReason::ALL.map(|r| r.code()).join(", ")
            ),
            Refusal::RateLimited => format!(
                "more than {READS_PER_WINDOW} medical reads in {} minutes by this operator",
                READ_WINDOW_MS / 60_000
            ),
            Refusal::NoConsent => {
                "no recorded consent for this profile: break-glass access is required".into()
            }
            Refusal::NoGrant => "no live break-glass grant for this operator and person".into(),
        }
    }
}

/// Break-glass grants and per-operator read counts.
#[derive(Clone, Debug, Default)]
pub struct MedicalAccess {
    /// (operator, person) → monotonic expiry.
    grants: BTreeMap<(String, String), u64>,
    /// operator → monotonic times of recent reads (oldest first).
    reads: BTreeMap<String, VecDeque<u64>>,
}

impl MedicalAccess {
    /// Counts one read by `operator` at `now_mono_ms`, or refuses it when
    /// the operator is over the limit (a refused read is not counted).
    pub fn admit_read(&mut self, operator: &str, now_mono_ms: u64) -> Result<(), Refusal> {
        let since = now_mono_ms.saturating_sub(READ_WINDOW_MS);
        self.reads.retain(|_, q| {
            while q.front().is_some_and(|t| *t <= since) {
                q.pop_front();
            }
            !q.is_empty()
        });
        if !self.reads.contains_key(operator) && self.reads.len() >= MAX_TRACKED_OPERATORS {
            // Forget the operator whose newest read is oldest.
            if let Some(k) = self
                .reads
                .iter()
                .min_by_key(|(_, q)| q.back().copied())
                .map(|(k, _)| k.clone())
            {
                self.reads.remove(&k);
            }
        }
        let q = self.reads.entry(operator.to_string()).or_default();
        if q.len() >= READS_PER_WINDOW {
            return Err(Refusal::RateLimited);
        }
        q.push_back(now_mono_ms);
        Ok(())
    }

    /// Records a grant; returns its monotonic expiry.
    pub fn grant(&mut self, operator: &str, person_id: &str, now_mono_ms: u64) -> u64 {
        self.grants.retain(|_, exp| *exp > now_mono_ms);
        if self.grants.len() >= MAX_GRANTS {
            if let Some(k) = self
                .grants
                .iter()
                .min_by_key(|(_, e)| **e)
                .map(|(k, _)| k.clone())
            {
                self.grants.remove(&k);
            }
        }
        let exp = now_mono_ms + BREAK_GLASS_TTL_MS;
        self.grants
            .insert((operator.to_string(), person_id.to_string()), exp);
        exp
    }

    /// Whether `operator` holds a live grant for `person_id`.
    pub fn has_grant(&self, operator: &str, person_id: &str, now_mono_ms: u64) -> bool {
        self.grants
            .get(&(operator.to_string(), person_id.to_string()))
            .is_some_and(|exp| *exp > now_mono_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_a_closed_list() {
        for r in AccessReason::ALL {
            assert_eq!(AccessReason::parse(r.code()), Some(r));
        }
        assert_eq!(AccessReason::parse("x"), None);
        assert_eq!(AccessReason::parse("搬送中"), None);
    }

    #[test]
    fn reads_are_limited_per_operator_and_window() {
        let mut a = MedicalAccess::default();
        for i in 0..READS_PER_WINDOW as u64 {
            a.admit_read("op1", 1000 + i).unwrap();
        }
        assert_eq!(a.admit_read("op1", 2000), Err(Refusal::RateLimited));
        // Another operator is not affected; the window slides.
        a.admit_read("op2", 2000).unwrap();
        a.admit_read("op1", 1000 + READ_WINDOW_MS).unwrap();
    }

    #[test]
    fn grants_are_per_operator_and_person_and_expire() {
        let mut a = MedicalAccess::default();
        let exp = a.grant("op1", "p1", 10);
        assert_eq!(exp, 10 + BREAK_GLASS_TTL_MS);
        assert!(a.has_grant("op1", "p1", 11));
        assert!(!a.has_grant("op2", "p1", 11));
        assert!(!a.has_grant("op1", "p2", 11));
        assert!(!a.has_grant("op1", "p1", exp));
    }
}
