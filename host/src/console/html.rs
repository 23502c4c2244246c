//! Page building: HTML escaping (every value a page shows goes through [`esc`]), the layout
//! shared by every page, times in UTC with their age, and pagination links.

use std::fmt::Write;

use chrono::{DateTime, Utc};

/// `s` escaped for HTML text and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` as a URL query value (then escaped for the attribute it goes into).
pub fn q(s: &str) -> String {
    serde_urlencoded::to_string([("", s)])
        .map(|v| v.trim_start_matches('=').to_owned())
        .unwrap_or_default()
}

/// A time as `2026-12-04 10:26:38 UTC` with its age (`3 min ago`), in a `<time>` element.
pub fn time(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    format!(
        "<time datetime=\"{}\">{} <span class=\"age\">({})</span></time>",
        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        t.format("%Y-%m-%d %H:%M:%S UTC"),
        age(t, now)
    )
}

/// An optional time, or a dash.
pub fn opt_time(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    t.map_or_else(|| "–".to_owned(), |t| time(t, now))
}

/// How long ago (or, for a future time, how soon) `t` is.
pub fn age(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds();
    let (n, future) = if secs < 0 {
        (-secs, true)
    } else {
        (secs, false)
    };
    let span = duration(n);
    if n < 1 {
        "now".to_owned()
    } else if future {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// Seconds as the largest whole unit: `42 s`, `5 min`, `3 h`, `2 d`.
pub fn duration(secs: i64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3_600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h", s / 3_600),
        s => format!("{} d", s / 86_400),
    }
}

/// Sections of the navigation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nav {
    /// Overview.
    Overview,
    /// Sessions and trees.
    Sessions,
    /// Connectors.
    Connectors,
    /// Deliveries.
    Deliveries,
    /// Audit log and receipts.
    Audit,
    /// Not signed in.
    None,
}

/// What the layout needs to know about the viewer.
pub struct Chrome<'a> {
    /// The signed-in actor, for the header.
    pub actor: Option<&'a str>,
    /// The sign-in's CSRF token (for the sign-out form).
    pub csrf: Option<&'a str>,
    /// A one-shot message.
    pub flash: Option<&'a str>,
}

/// A whole page: head, navigation, flash message, `body`.
pub fn page(title: &str, nav: Nav, chrome: &Chrome<'_>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Lockstep console</title>\
         <link rel=\"stylesheet\" href=\"/console/assets/console.css\">\
         <script src=\"/console/assets/console.js\" defer></script></head><body>\
         <a class=\"skip\" href=\"#main\">Skip to content</a><header><span class=\"brand\">Lockstep</span>",
        esc(title)
    );
    if nav != Nav::None {
        out.push_str("<nav aria-label=\"Main\"><ul>");
        for (item, href, label) in [
            (Nav::Overview, "/console/", "Overview"),
            (Nav::Sessions, "/console/sessions", "Sessions"),
            (Nav::Connectors, "/console/connectors", "Connectors"),
            (Nav::Deliveries, "/console/deliveries", "Deliveries"),
            (Nav::Audit, "/console/audit", "Audit"),
        ] {
            let current = if item == nav {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(out, "<li><a href=\"{href}\"{current}>{label}</a></li>");
        }
        out.push_str("</ul></nav>");
    }
    if let (Some(actor), Some(csrf)) = (chrome.actor, chrome.csrf) {
        let _ = write!(
            out,
            "<form class=\"signout\" method=\"post\" action=\"/console/logout\">\
             <span class=\"actor\">{}</span>{}<button type=\"submit\">Sign out</button></form>",
            esc(actor),
            csrf_field(csrf)
        );
    }
    out.push_str("</header><main id=\"main\">");
    if let Some(flash) = chrome.flash {
        let _ = write!(out, "<p class=\"flash\" role=\"status\">{}</p>", esc(flash));
    }
    let _ = write!(out, "<h1>{}</h1>", esc(title));
    out.push_str(body);
    out.push_str("</main></body></html>\n");
    out
}

/// The hidden field every form carries.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

/// "Next page" link of a cursor-paginated list: `base` is the current query without the
/// cursor (already URL-encoded).
pub fn pager(base: &str, next: Option<&str>, first: bool) -> String {
    let mut out = String::from("<nav class=\"pager\" aria-label=\"Pages\">");
    if !first {
        let _ = write!(out, "<a href=\"{}\">First page</a>", esc(base));
    }
    if let Some(next) = next {
        let sep = if base.contains('?') { '&' } else { '?' };
        let _ = write!(
            out,
            "<a href=\"{}\" rel=\"next\">Next page</a>",
            esc(&format!("{base}{sep}cursor={}", q(next)))
        );
    }
    out.push_str("</nav>");
    out
}

/// "Previous/next" links of an offset-paginated list.
pub fn offset_pager(base: &str, page: usize, pages: usize) -> String {
    if pages <= 1 {
        return String::new();
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    let mut out = String::from("<nav class=\"pager\" aria-label=\"Pages\">");
    if page > 0 {
        let _ = write!(
            out,
            "<a href=\"{}\" rel=\"prev\">Previous page</a>",
            esc(&format!("{base}{sep}page={}", page - 1))
        );
    }
    let _ = write!(out, "<span>Page {} of {pages}</span>", page + 1);
    if page + 1 < pages {
        let _ = write!(
            out,
            "<a href=\"{}\" rel=\"next\">Next page</a>",
            esc(&format!("{base}{sep}page={}", page + 1))
        );
    }
    out.push_str("</nav>");
    out
}

/// A status word as a badge (class from a fixed set, text escaped).
pub fn badge(text: &str) -> String {
    let class = match text.to_ascii_lowercase().as_str() {
        "active" | "delivered" | "ok" | "up" => "good",
        "destroyed" | "disabled" | "dropped" | "pending" | "retrying" => "muted",
        "dead" | "failed" | "orphaned" => "bad",
        _ => "plain",
    };
    format!("<span class=\"badge {class}\">{}</span>", esc(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn every_markup_character_is_escaped() {
        assert_eq!(
            esc(r#"<script>alert("x&'y")</script>"#),
            "&lt;script&gt;alert(&quot;x&amp;&#39;y&quot;)&lt;/script&gt;"
        );
        assert_eq!(esc("plain ünïcode"), "plain ünïcode");
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(q("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn times_are_utc_with_their_age() {
        let now = Utc.with_ymd_and_hms(2026, 12, 4, 12, 0, 0).unwrap();
        let t = Utc.with_ymd_and_hms(2026, 12, 4, 11, 57, 0).unwrap();
        let html = time(t, now);
        assert!(html.contains("2026-12-04 11:57:00 UTC"), "{html}");
        assert!(html.contains("(3 min ago)"), "{html}");
        assert_eq!(age(now + chrono::Duration::hours(2), now), "in 2 h");
        assert_eq!(age(now, now), "now");
        assert_eq!(duration(200_000), "2 d");
    }

    #[test]
    fn the_layout_escapes_title_actor_and_flash() {
        let html = page(
            "<t>",
            Nav::Sessions,
            &Chrome {
                actor: Some("key:<k>"),
                csrf: Some("c\"x"),
                flash: Some("<b>"),
            },
            "",
        );
        assert!(!html.contains("<t>") && !html.contains("<k>") && !html.contains("<b>"));
        assert!(html.contains("value=\"c&quot;x\""));
        assert!(html.contains("aria-current=\"page\">Sessions"));
        assert!(!html.contains("<script>"), "no inline script");
    }

    #[test]
    fn pagers_link_pages() {
        let p = pager("/console/audit?realm=acme", Some("abc"), true);
        assert!(
            p.contains("href=\"/console/audit?realm=acme&amp;cursor=abc\""),
            "{p}"
        );
        assert!(!p.contains("First page"));
        assert_eq!(offset_pager("/x?a=1", 0, 1), "");
        let p = offset_pager("/x", 1, 3);
        assert!(p.contains("/x?page=0") && p.contains("/x?page=2") && p.contains("Page 2 of 3"));
    }
}
