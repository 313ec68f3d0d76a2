//! The two text formats `/metrics` speaks, picked by the `Accept` header:
//! OpenMetrics 1.0 (what the registry encodes) and the classic Prometheus
//! text format 0.0.4 (derived from it line by line).

use std::{collections::HashSet, sync::Arc};

use prometheus_client::registry::Registry;

/// A text format of the exposition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
    /// `text/plain; version=0.0.4`, what every Prometheus-compatible
    /// scraper reads.
    Classic,
}

impl Format {
    pub const OPENMETRICS_CONTENT_TYPE: &'static str =
        "application/openmetrics-text; version=1.0.0; charset=utf-8";
    pub const CLASSIC_CONTENT_TYPE: &'static str = "text/plain; version=0.0.4; charset=utf-8";

    pub const fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => Self::OPENMETRICS_CONTENT_TYPE,
            Format::Classic => Self::CLASSIC_CONTENT_TYPE,
        }
    }

    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text` with a quality at least that of any
    /// `text/plain` (or wildcard) it names; else the classic format.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Format::Classic;
        };
        let mut openmetrics = 0.0_f32;
        let mut classic = 0.0_f32;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => classic = classic.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= classic {
            Format::OpenMetrics
        } else {
            Format::Classic
        }
    }
}

/// A registry, ready to encode in either format. Cheap to clone.
#[derive(Clone)]
pub struct Exposition(Arc<Registry>);

impl Exposition {
    pub fn new(registry: Registry) -> Self {
        Self(Arc::new(registry))
    }

    /// The exposition in `format` (empty if encoding failed, which only a
    /// broken `fmt::Write` could cause).
    pub fn encode(&self, format: Format) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.0).is_err() {
            out.clear();
        }
        match format {
            Format::OpenMetrics => out,
            Format::Classic => to_classic(&out),
        }
    }
}

/// OpenMetrics text -> classic text: a counter family is named after its
/// `_total` samples (else classic parsers type them as untyped), an info
/// family becomes a gauge named after its `_info` samples, `# UNIT` and
/// `# EOF` go.
pub fn to_classic(openmetrics: &str) -> String {
    let mut renamed: HashSet<&str> = HashSet::new();
    let mut info: HashSet<&str> = HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            match kind {
                "counter" => {
                    renamed.insert(name);
                }
                "info" => {
                    info.insert(name);
                }
                _ => {}
            }
        }
    }
    let family = |name: &str| -> String {
        if renamed.contains(name) {
            format!("{name}_total")
        } else if info.contains(name) {
            format!("{name}_info")
        } else {
            name.to_owned()
        }
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", family(name)));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let kind = match kind {
                "info" => "gauge",
                "counter" | "gauge" | "histogram" | "summary" => kind,
                _ => "untyped",
            };
            out.push_str(&format!("# TYPE {} {kind}\n", family(name)));
        } else if is_created_sample(line) {
            // classic parsers know no `_created` samples
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn is_created_sample(line: &str) -> bool {
    let name = line.split(['{', ' ']).next().unwrap_or("");
    !line.starts_with('#') && name.ends_with("_created")
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::{counter::Counter, gauge::Gauge, histogram::Histogram};

    use super::*;

    #[test]
    fn accept_headers_pick_the_format() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text")),
            Format::OpenMetrics
        );
        assert_eq!(Format::negotiate(None), Format::Classic);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Classic);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Classic);
        assert_eq!(
            Format::negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5")),
            Format::Classic
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::Classic
        );
    }

    #[test]
    fn classic_text_names_counter_families_after_their_samples() {
        let mut r = Registry::with_prefix("x");
        let c = Counter::<u64>::default();
        c.inc();
        r.register("hits", "Hits", c);
        let g = Gauge::<i64>::default();
        r.register("open", "Open", g);
        r.register("lat", "Latency", Histogram::new([1.0]));
        let e = Exposition::new(r);
        let om = e.encode(Format::OpenMetrics);
        assert!(om.contains("# TYPE x_hits counter\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
        let classic = e.encode(Format::Classic);
        assert!(classic.contains("# HELP x_hits_total Hits.\n"), "{classic}");
        assert!(
            classic.contains("# TYPE x_hits_total counter\n"),
            "{classic}"
        );
        assert!(classic.contains("x_hits_total 1\n"), "{classic}");
        assert!(classic.contains("# TYPE x_open gauge\n"), "{classic}");
        assert!(classic.contains("# TYPE x_lat histogram\n"), "{classic}");
        assert!(
            classic.contains("x_lat_bucket{le=\"+Inf\"} 0\n"),
            "{classic}"
        );
        assert!(!classic.contains("# EOF"), "{classic}");
        // every sample line belongs to the family typed just above it
        let mut family = String::new();
        for line in classic.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap().to_owned();
            } else if !line.starts_with('#') {
                assert!(line.starts_with(&family), "{line} outside {family}");
            }
        }
    }
}
