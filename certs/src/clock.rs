//! What a node does when its wall clock is obviously wrong (B-2).
//!
//! Model: the node's own certificate is the best time evidence it has offline:
//! the CA's clock was right when it issued the certificate, and the
//! certificate's `notBefore` is the issuing time minus one hour
//! ([`crate::ca::BACKDATE`]). So a device clock before our own `notBefore` is
//! certainly wrong, and one after our own `notAfter` is wrong or the
//! certificate really expired; either way it needs an operator.
//!
//! Policy (decided here, shown by the node in its UI and status API):
//!
//! * [`clock_sanity`] is evaluated at startup and then periodically with the
//!   current wall time; a verdict other than [`ClockVerdict::Plausible`] makes
//!   the node show "device clock looks wrong" with [`ClockVerdict::message`].
//! * The node keeps working locally (registration, check-in) because merges
//!   never depend on wall clocks; audit entries carry the clock-trust flag.
//! * Certificate time checks are **never** relaxed: peers whose certificates
//!   look expired or not yet valid under our clock are rejected with a hint
//!   naming both times ([`crate::tls::PeerCertError::NotYetValid`]), and peers
//!   will likewise reject us. Nothing is silently accepted.
//! * Operator action: set the device clock (or enable NTP/GNSS time) and, if
//!   the verdict was [`ClockVerdict::AfterOwnCertificateExpiry`] and the clock
//!   is right, issue a new certificate with `kizuna certs issue`.
//!
//! The function is pure: time is an argument.

use crate::identity::NodeIdentity;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The result of comparing the device clock with our own certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockVerdict {
    /// `not_before <= now <= not_after`.
    Plausible,
    /// The clock is before our certificate was issued: certainly wrong.
    BeforeOwnCertificate {
        now: OffsetDateTime,
        not_before: OffsetDateTime,
    },
    /// The clock is after our certificate expired: wrong, or the certificate
    /// needs renewing.
    AfterOwnCertificateExpiry {
        now: OffsetDateTime,
        not_after: OffsetDateTime,
    },
}

/// Compare wall time `now` with our own certificate's validity.
pub fn clock_sanity(now: OffsetDateTime, own: &NodeIdentity) -> ClockVerdict {
    if now < own.not_before {
        ClockVerdict::BeforeOwnCertificate {
            now,
            not_before: own.not_before,
        }
    } else if now > own.not_after {
        ClockVerdict::AfterOwnCertificateExpiry {
            now,
            not_after: own.not_after,
        }
    } else {
        ClockVerdict::Plausible
    }
}

impl ClockVerdict {
    /// True unless [`ClockVerdict::Plausible`].
    pub fn clock_looks_wrong(&self) -> bool {
        !matches!(self, ClockVerdict::Plausible)
    }

    /// Operator-facing text (English; the UI translates), `None` if plausible.
    pub fn message(&self) -> Option<String> {
        match self {
            ClockVerdict::Plausible => None,
            ClockVerdict::BeforeOwnCertificate { now, not_before } => Some(format!(
                "device clock looks wrong: now is {}, but this node's certificate was issued at {}; set the clock",
                fmt_time(*now),
                fmt_time(*not_before)
            )),
            ClockVerdict::AfterOwnCertificateExpiry { now, not_after } => Some(format!(
                "device clock looks wrong or this node's certificate expired: now is {}, certificate valid until {}; \
                 set the clock, or issue a new certificate",
                fmt_time(*now),
                fmt_time(*not_after)
            )),
        }
    }
}

/// RFC 3339 rendering used in every time-related message.
pub fn fmt_time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| format!("{} (unix seconds)", t.unix_timestamp()))
}

/// Render Unix seconds as RFC 3339 (out-of-range values as plain seconds).
pub fn fmt_unix(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .map(fmt_time)
        .unwrap_or_else(|| format!("{secs} (unix seconds)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crdt::{NodeId, Role};
    use time::Duration;

    fn ident() -> NodeIdentity {
        let nb = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        NodeIdentity {
            node_id: NodeId::new("shelter-1").unwrap(),
            role: Role::Shelter,
            serial: vec![1],
            not_before: nb,
            not_after: nb + Duration::days(365),
            signing_key: None,
        }
    }

    #[test]
    fn verdicts() {
        let id = ident();
        assert_eq!(
            clock_sanity(id.not_before + Duration::days(1), &id),
            ClockVerdict::Plausible
        );
        let boot_2000 = OffsetDateTime::from_unix_timestamp(946_684_800).unwrap();
        let v = clock_sanity(boot_2000, &id);
        assert!(matches!(v, ClockVerdict::BeforeOwnCertificate { .. }));
        assert!(v.message().unwrap().contains("now is 2000-01-01T00:00:00Z"));
        let v = clock_sanity(id.not_after + Duration::seconds(1), &id);
        assert!(matches!(v, ClockVerdict::AfterOwnCertificateExpiry { .. }));
        assert!(v.clock_looks_wrong());
        assert_eq!(fmt_unix(u64::MAX), format!("{} (unix seconds)", u64::MAX));
    }
}
