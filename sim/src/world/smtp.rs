//! The simulated SMTP server headquarters mails through: outcomes (sent,
//! transient, permanent, indeterminate) drawn from the `smtp` random
//! stream, outages, and the mail ledger the checker reads.

use super::*;

impl World {
    pub(super) fn send_mail(&mut self, hq: usize, req: MailRequest) {
        let pair = (req.person_id.clone(), req.contact_id.clone());
        let consented = self.consented.contains(&pair);
        if let Some(prev) = self.last_sender.insert(pair.clone(), hq) {
            if prev != hq {
                // Another HQ took the claim over: the first outcome may be unknown.
                self.ledger.on_unknown(&pair.0, &pair.1);
            }
        }
        for v in self.ledger.on_send(&req, consented, self.now) {
            self.violate(v);
        }
        let r = &mut self.smtp_rng;
        let chaos = !self.healed;
        let delay = range(r, 50, 3_000);
        let (outcome, accepted) = if chaos && self.now < self.smtp_down_until {
            (MailOutcome::Transient("connection refused".into()), false)
        } else if chaos && chance(r, self.mix.smtp_indeterminate) {
            (
                MailOutcome::Indeterminate("connection lost after DATA".into()),
                chance(r, 0.5),
            )
        } else if chaos && chance(r, self.mix.smtp_transient) {
            (MailOutcome::Transient("451 try again later".into()), false)
        } else if chaos && chance(r, self.mix.smtp_permanent) {
            (MailOutcome::Permanent("550 no such user".into()), false)
        } else {
            (MailOutcome::Sent, true)
        };
        self.mail_inflight
            .entry(hq)
            .or_default()
            .insert(req.message_id.clone(), pair);
        let epoch = self.nodes[hq].epoch;
        if self.nodes[hq].crash_after_mail {
            self.nodes[hq].crash_after_mail = false;
            // The HQ dies while the server works on the message.
            let down = range(&mut self.fault_rng, 1_000, 300_000);
            self.push(self.now + delay / 2, Ev::Fault(Fault::Crash(hq, down)));
        }
        self.push(
            self.now + delay,
            Ev::MailResp {
                hq,
                epoch,
                req,
                outcome,
                accepted,
            },
        );
    }

    pub(super) fn mail_resp(
        &mut self,
        hq: usize,
        epoch: u32,
        req: MailRequest,
        outcome: MailOutcome,
        accepted: bool,
    ) {
        if let Some(m) = self.mail_inflight.get_mut(&hq) {
            m.remove(&req.message_id);
        }
        let (p, c) = (req.person_id.clone(), req.contact_id.clone());
        if matches!(outcome, MailOutcome::Indeterminate(_)) {
            self.ledger.on_unknown(&p, &c);
        }
        if matches!(outcome, MailOutcome::Permanent(_)) {
            self.ledger.on_permanent(&p, &c);
        }
        if accepted {
            self.summary.mails_accepted += 1;
            for v in self.ledger.on_accept(&p, &c, self.now) {
                self.violate(v);
            }
        }
        if self.nodes[hq].epoch != epoch || self.nodes[hq].engine.is_none() {
            return;
        }
        let rest = self.input(
            hq,
            Input::MailOutcome {
                message_id: req.message_id,
                outcome,
            },
        );
        self.after_outputs(hq, rest, None);
    }

    // ----- commands ---------------------------------------------------------
}
