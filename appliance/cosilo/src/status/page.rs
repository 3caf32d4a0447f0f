//! The read-only status page: one HTML document with no script, its chart an inline SVG, so it
//! renders the same in any browser (and in `chromium --headless --dump-dom`). It refreshes itself
//! every 10 s.

use std::fmt::Write;

use super::{DicePoint, StatusReport};

/// Escapes text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The page for `r`.
pub fn render(r: &StatusReport) -> String {
    let f = &r.federation;
    let mut h = String::new();
    let title = if f.site.is_empty() {
        "Cosilo appliance".to_string()
    } else {
        format!("Cosilo appliance {}", f.site)
    };
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"10\">\
         <title>{t}</title><style>\
         body{{font-family:sans-serif;margin:2em;color:#222}}\
         table{{border-collapse:collapse;margin-bottom:1.5em}}\
         td,th{{border:1px solid #ccc;padding:.3em .8em;text-align:left}}\
         .num{{text-align:right}}</style></head><body>\n<h1>{t}</h1>\n",
        t = esc(&title)
    );
    let _ = writeln!(
        h,
        "<p>Federation <b id=\"federation\">{}</b>, strategy <b id=\"strategy\">{}</b>: \
         round <b id=\"round\">{}</b> of <span id=\"rounds-planned\">{}</span>{}, \
         model version {}. Cosilo {}, up {} s.</p>",
        esc(&f.federation),
        esc(&f.strategy),
        f.round,
        f.rounds_planned,
        if f.finished { " (finished)" } else { "" },
        f.model_version,
        esc(&r.version),
        r.uptime_s
    );

    h.push_str("<h2>Members</h2>\n<table id=\"members\"><tr><th>site</th><th>status</th><th>round</th><th>model version</th><th>last presence</th></tr>\n");
    for m in &f.members {
        let _ = writeln!(
            h,
            "<tr class=\"member\" data-site=\"{id}\"><td>{id}{me}</td><td>{st}</td><td class=\"num\">{rd}</td><td class=\"num\">{mv}</td><td>{seen}</td></tr>",
            id = esc(&m.id),
            me = if m.me { " (this site)" } else { "" },
            st = esc(m.status.as_deref().unwrap_or("not heard from")),
            rd = m.round.map_or("–".into(), |x| x.to_string()),
            mv = m.model_version.map_or("–".into(), |x| x.to_string()),
            seen = if m.me {
                "now".to_string()
            } else {
                m.last_seen_s
                    .map_or("never".into(), |s| format!("{s:.0} s ago"))
            },
        );
    }
    h.push_str("</table>\n");

    h.push_str("<h2>Held-out Dice over rounds</h2>\n");
    h.push_str(&chart(&f.dice));
    if !f.dice_by_class.is_empty() {
        h.push_str(
            "<table id=\"dice-by-class\"><tr><th>class</th><th>Dice (last evaluation)</th></tr>\n",
        );
        for (c, d) in &f.dice_by_class {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td class=\"num\">{d:.3}</td></tr>",
                esc(c)
            );
        }
        h.push_str("</table>\n");
    }

    h.push_str("<h2>Work and traffic</h2>\n<table id=\"work\">\n");
    let _ = writeln!(
        h,
        "<tr><td>inference queue</td><td class=\"num\" id=\"inference-queue\">{}</td></tr>",
        r.inference_queue
    );
    let _ = writeln!(
        h,
        "<tr><td>write-back outbox (pending / given up)</td><td class=\"num\">{} / {}</td></tr>",
        r.outbox_pending.map_or("–".into(), |x| x.to_string()),
        r.outbox_dead.map_or("–".into(), |x| x.to_string())
    );
    let _ = writeln!(
        h,
        "<tr><td>last training loss</td><td class=\"num\">{}</td></tr>",
        f.last_loss.map_or("–".into(), |l| format!("{l:.4}"))
    );
    let _ = writeln!(
        h,
        "<tr><td>sent / received</td><td class=\"num\">{} / {}</td></tr>",
        bytes(f.bytes_sent),
        bytes(f.bytes_received)
    );
    let refused: u64 = f.refused.values().sum();
    let reasons: Vec<String> = f
        .refused
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{} {n}", esc(k)))
        .collect();
    let _ = writeln!(
        h,
        "<tr><td>refused messages</td><td class=\"num\">{refused}{}</td></tr>",
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join(", "))
        }
    );
    h.push_str("</table>\n<h2>Machine</h2>\n<table id=\"machine\">\n");
    if r.temperatures.is_empty() {
        h.push_str("<tr><td>temperatures</td><td>no thermal zones on this machine</td></tr>\n");
    }
    for t in &r.temperatures {
        let _ = writeln!(
            h,
            "<tr class=\"temperature\"><td>{}</td><td class=\"num\">{:.1} °C</td></tr>",
            esc(&t.zone),
            t.celsius
        );
    }
    if let Some(d) = &r.disk {
        let _ = writeln!(
            h,
            "<tr><td>disk free ({})</td><td class=\"num\" id=\"disk-free\">{} of {}</td></tr>",
            esc(&d.path),
            bytes(d.free_bytes),
            bytes(d.total_bytes)
        );
    }
    if let Some(m) = r.memory_available_bytes {
        let _ = writeln!(
            h,
            "<tr><td>memory available</td><td class=\"num\">{}</td></tr>",
            bytes(m)
        );
    }
    h.push_str("</table>\n<p><a href=\"/status.json\">status.json</a> · <a href=\"/metrics\">metrics</a></p>\n</body></html>\n");
    h
}

/// Dice over rounds as an inline SVG line chart: one `<circle>` per evaluated round, carrying
/// its round and score in data attributes.
fn chart(points: &[DicePoint]) -> String {
    const W: f64 = 480.0;
    const H: f64 = 200.0;
    const PAD: f64 = 30.0;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg id=\"dice-chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"held-out Dice over rounds\">\
         <rect x=\"{PAD}\" y=\"{t}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#999\"/>\
         <text x=\"4\" y=\"{t1}\" font-size=\"11\">1.0</text><text x=\"4\" y=\"{b}\" font-size=\"11\">0.0</text>",
        t = PAD / 2.0,
        w = W - 1.5 * PAD,
        h = H - 1.5 * PAD,
        t1 = PAD / 2.0 + 4.0,
        b = H - PAD + 4.0,
    );
    if points.is_empty() {
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"13\">no evaluation yet</text>",
            W / 2.0 - 50.0,
            H / 2.0
        );
    } else {
        let max_round = points.iter().map(|p| p.round).max().unwrap_or(1).max(1) as f64;
        let min_round = points.iter().map(|p| p.round).min().unwrap_or(0) as f64;
        let span = (max_round - min_round).max(1.0);
        let xy = |p: &DicePoint| {
            let x = PAD + (p.round as f64 - min_round) / span * (W - 2.0 * PAD);
            let y = H - PAD - p.score.clamp(0.0, 1.0) * (H - 1.5 * PAD);
            (x, y)
        };
        let line: Vec<String> = points
            .iter()
            .map(|p| {
                let (x, y) = xy(p);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>",
            line.join(" ")
        );
        for p in points {
            let (x, y) = xy(p);
            let _ = write!(
                s,
                "<circle class=\"point\" cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"#1f77b4\" \
                 data-round=\"{}\" data-dice=\"{:.4}\"><title>round {}: {:.3}</title></circle>",
                p.round, p.score, p.round, p.score
            );
        }
        let _ = write!(
            s,
            "<text x=\"{PAD}\" y=\"{y}\" font-size=\"11\">round {}</text>\
             <text x=\"{x}\" y=\"{y}\" font-size=\"11\">round {}</text>",
            min_round,
            max_round,
            y = H - 8.0,
            x = W - 2.0 * PAD,
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{FederationView, Member};

    #[test]
    fn the_page_shows_members_round_and_one_point_per_evaluated_round() {
        let r = StatusReport {
            federation: FederationView {
                site: "h1".into(),
                federation: "fed".into(),
                round: 2,
                rounds_planned: 4,
                dice: vec![
                    DicePoint {
                        round: 1,
                        score: 0.25,
                    },
                    DicePoint {
                        round: 2,
                        score: 0.5,
                    },
                ],
                members: vec![Member {
                    id: "<h2>".into(),
                    me: false,
                    status: None,
                    round: None,
                    model_version: None,
                    last_seen_s: None,
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        let html = render(&r);
        assert!(html.contains("<b id=\"round\">2</b>"), "{html}");
        assert_eq!(html.matches("class=\"point\"").count(), 2);
        assert!(html.contains("data-round=\"2\" data-dice=\"0.5000\""));
        assert!(html.contains("&lt;h2&gt;"), "names are escaped");
        assert!(!html.contains("<h2></td>"));
        assert!(render(&StatusReport::default()).contains("no evaluation yet"));
    }
}
