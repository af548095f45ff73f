//! Output: the human summary table, the JSON summary and the SVG plot of
//! arrivals known at headquarters against true arrivals.

use crate::world::Summary;
use std::fmt::Write;

pub fn table(s: &Summary) -> String {
    let mut t = String::new();
    let rows: Vec<(&str, String)> = vec![
        ("scenario", s.scenario.clone()),
        ("seed", s.seed.to_string()),
        ("nodes", s.nodes.to_string()),
        ("simulated hours", format!("{:.2}", s.simulated_hours)),
        (
            "finished",
            match &s.stopped {
                Some(why) if !s.finished => format!("false: {why}"),
                _ => s.finished.to_string(),
            },
        ),
        (
            "commands (failed)",
            format!("{} ({})", s.commands, s.commands_failed),
        ),
        ("acked writes", s.acked_writes.to_string()),
        ("acked writes lost", s.acked_writes_lost.to_string()),
        ("frames / bytes", format!("{} / {}", s.frames, s.bytes)),
        (
            "changes new / held",
            format!("{} / {}", s.changes_new, s.changes_already_held),
        ),
        (
            "received per new",
            format!(
                "{:.3}, {:.3} without stray copies (announced {}, grafts {}, prunes {})",
                s.received_per_new, s.received_per_new_protocol, s.announced, s.grafts, s.prunes
            ),
        ),
        ("mails accepted", s.mails_accepted.to_string()),
        ("duplicate mails", s.duplicate_mails.to_string()),
        ("converged", s.converged.to_string()),
        (
            "convergence rounds",
            s.convergence_rounds.map_or("-".into(), |r| {
                format!("{r} ({} ms)", s.convergence_ms.unwrap_or(0))
            }),
        ),
        (
            "faults injected",
            s.faults_injected
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        ("transfers acked", s.transfers.to_string()),
        (
            "hostile inputs",
            format!(
                "{} ({} refused as invalid)",
                s.adversarial_inputs, s.adversarial_refused
            ),
        ),
        (
            "docs rebuilt",
            format!("{} (scanned {})", s.docs_rebuilt, s.docs_scanned),
        ),
        ("violations", s.invariant_violations.len().to_string()),
        (
            "trace hash",
            s.trace_hash[..16.min(s.trace_hash.len())].to_string(),
        ),
        ("wall ms", s.wall_ms.to_string()),
        (
            "node-hours / wall s",
            format!(
                "{:.2}",
                s.nodes as f64 * s.simulated_hours / (s.wall_ms.max(1) as f64 / 1000.0)
            ),
        ),
        (
            "peak RSS MiB",
            format!("{:.1}", s.peak_rss_bytes as f64 / 1048576.0),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(t, "  {k:<20} {v}");
    }
    for v in &s.invariant_violations {
        let _ = writeln!(t, "  ! {:<22} t={}ms {}", v.name, v.at_ms, v.detail);
    }
    t
}

pub fn json(s: &Summary) -> serde_json::Value {
    serde_json::to_value(s).expect("summary serializes")
}

/// Hand-written SVG: true arrivals and arrivals known at HQ over time.
pub fn svg(s: &Summary) -> String {
    let (w, h, m) = (800.0, 400.0, 50.0);
    let pts = &s.arrivals_curve;
    let tmax = pts.last().map_or(1, |p| p.0).max(1) as f64;
    let ymax = pts.iter().map(|p| p.1.max(p.2)).max().unwrap_or(1).max(1) as f64;
    let x = |t: u64| m + (t as f64 / tmax) * (w - 2.0 * m);
    let y = |v: u64| h - m - (v as f64 / ymax) * (h - 2.0 * m);
    let line = |f: &dyn Fn(&(u64, u64, u64)) -> u64| {
        pts.iter()
            .map(|p| format!("{:.1},{:.1}", x(p.0), y(f(p))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{m}" y="20">{} seed {}: arrivals, true (black) and known at HQ (blue)</text>"#,
        s.scenario, s.seed
    );
    let _ = writeln!(
        o,
        r#"<line x1="{m}" y1="{}" x2="{}" y2="{}" stroke="gray"/><line x1="{m}" y1="{m}" x2="{m}" y2="{}" stroke="gray"/>"#,
        h - m,
        w - m,
        h - m,
        h - m
    );
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}">{:.1} h</text>"#,
        w - m - 20.0,
        h - m + 20.0,
        tmax / 3_600_000.0
    );
    let _ = writeln!(o, r#"<text x="5" y="{}">{}</text>"#, m, ymax as u64);
    let _ = writeln!(
        o,
        r#"<polyline fill="none" stroke="black" stroke-width="2" points="{}"/>"#,
        line(&|p| p.1)
    );
    let _ = writeln!(
        o,
        r#"<polyline fill="none" stroke="blue" stroke-width="2" points="{}"/>"#,
        line(&|p| p.2)
    );
    let _ = writeln!(o, "</svg>");
    o
}
