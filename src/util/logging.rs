//! Logging setup of every subcommand: `--log-format` (text or JSON) and
//! `--log-level` (an `EnvFilter` directive; fallback `RUST_LOG`, then
//! `info`).
//!
//! JSON lines are flat: one object per line with `timestamp`, `level`,
//! `target`, `message` (once), the event's fields and the fields of every
//! span it happened in (a worker's span carries `namespace` and `binding`),
//! all at the top level.

use std::fmt;

use clap::{Args, ValueEnum};
use serde_json::{Map, Value};
use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{
    EnvFilter,
    field::Visit,
    fmt::{
        FmtContext, FormatEvent, FormatFields, FormattedFields, format::JsonFields, format::Writer,
    },
    registry::LookupSpan,
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logging flags, shared by `run` and `sync`.
#[derive(Args, Clone, Debug, Default)]
pub struct LogArgs {
    /// Log line format: text (for people) or json (one flat object per line).
    #[arg(
        long,
        env = "SLIPSTREAM_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log level or filter directive (`debug`, `info,slipstream=debug`)
    /// [default: env RUST_LOG, else info].
    #[arg(long, env = "SLIPSTREAM_LOG_LEVEL")]
    pub log_level: Option<String>,
}

/// Where log lines go.
#[derive(Clone, Copy, Debug)]
pub enum Output {
    Stdout,
    Stderr,
}

impl LogArgs {
    /// The filter `--log-level` (else `RUST_LOG`, else `info`) asks for; a
    /// directive that does not parse is an error naming the flag.
    pub fn filter(&self) -> anyhow::Result<EnvFilter> {
        match self.log_level.as_deref().map(str::trim) {
            Some(level) if !level.is_empty() => {
                EnvFilter::try_new(level).map_err(|e| anyhow::anyhow!("--log-level {level:?}: {e}"))
            }
            _ => Ok(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))),
        }
    }

    /// Installs the global subscriber (a second call keeps the first).
    pub fn init(&self, output: Output) -> anyhow::Result<()> {
        let filter = self.filter()?;
        let builder = tracing_subscriber::fmt().with_env_filter(filter);
        let _ = match (self.log_format, output) {
            (LogFormat::Text, Output::Stdout) => builder
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
                .try_init(),
            (LogFormat::Text, Output::Stderr) => builder
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .try_init(),
            (LogFormat::Json, Output::Stdout) => builder
                .fmt_fields(JsonFields::new())
                .event_format(FlatJson)
                .try_init(),
            (LogFormat::Json, Output::Stderr) => builder
                .with_writer(std::io::stderr)
                .fmt_fields(JsonFields::new())
                .event_format(FlatJson)
                .try_init(),
        };
        Ok(())
    }
}

/// Keys every JSON line has; a field of the same name is written as
/// `field.<name>` so it cannot replace them.
const RESERVED: [&str; 4] = ["timestamp", "level", "target", "message"];

/// The flat JSON line format (see the module docs).
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = Map::new();
        // outermost span first: inner spans and the event override
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(formatted) = ext.get::<FormattedFields<N>>()
                    && let Ok(Value::Object(map)) =
                        serde_json::from_str::<Value>(formatted.as_str())
                {
                    fields.extend(map);
                }
            }
        }
        let mut visitor = FieldVisitor::default();
        event.record(&mut visitor);
        fields.extend(visitor.fields);
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::String(crate::util::time::now_rfc3339()),
        );
        line.insert("level".into(), Value::String(meta.level().to_string()));
        let target = match fields.remove("log.target") {
            Some(Value::String(t)) => t,
            _ => meta.target().to_owned(),
        };
        line.insert("target".into(), Value::String(target));
        line.insert(
            "message".into(),
            Value::String(visitor.message.unwrap_or_default()),
        );
        for (key, value) in fields {
            if key.starts_with("log.") {
                continue; // the `log` crate's bridge fields
            }
            let key = if RESERVED.contains(&key.as_str()) {
                format!("field.{key}")
            } else {
                key
            };
            line.insert(key, value);
        }
        let text = serde_json::to_string(&Value::Object(line)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// An event's fields as JSON values; `message` kept apart (a second field
/// of that name, as in `warn!(message, "text")`, becomes `field.message`,
/// so a line never carries two).
#[derive(Default)]
struct FieldVisitor {
    message: Option<String>,
    fields: Map<String, Value>,
}

impl FieldVisitor {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            let text = match value {
                Value::String(s) => s,
                other => other.to_string(),
            };
            if self.message.is_none() {
                self.message = Some(text);
            } else {
                self.fields
                    .insert("field.message".to_owned(), Value::String(text));
            }
        } else {
            self.fields.insert(field.name().to_owned(), value);
        }
    }
}

impl Visit for FieldVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
}

/// The span of everything one binding does (its worker, its reconciles):
/// every line inside carries flat `namespace` and `binding` fields. At
/// ERROR level so it exists whatever `--log-level` keeps; a root span, so a
/// worker started inside a reconcile does not carry that reconcile's fields.
pub fn binding_span(namespace: &str, binding: &str) -> tracing::Span {
    tracing::error_span!(parent: None, "binding", namespace = %namespace, binding = %binding)
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex},
    };

    use tracing::Instrument;

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            crate::util::lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_are_flat_with_span_fields_and_one_message() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("info"))
            .with_writer(move || writer.clone())
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = binding_span("shop", "web");
            let _in = span.enter();
            let message = "detail text";
            tracing::warn!(keys = 3, message, "not written");
            tracing::info!(level = "x", ns = ?Some("a"), "reserved");
        });
        let text = String::from_utf8(crate::util::lock(&buf.0).clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let first = lines[0].as_object().unwrap();
        assert_eq!(first["namespace"], "shop");
        assert_eq!(first["binding"], "web");
        assert_eq!(first["keys"], 3);
        assert_eq!(first["level"], "WARN");
        let mut messages = [&first["message"], &first["field.message"]];
        messages.sort_by_key(|v| v.to_string());
        assert_eq!(messages, ["detail text", "not written"]);
        assert!(first.values().all(|v| !v.is_object()), "{text}");
        assert_eq!(
            text.lines().next().unwrap().matches("\"message\"").count(),
            1
        );
        let second = lines[1].as_object().unwrap();
        assert_eq!(second["level"], "INFO");
        assert_eq!(second["field.level"], "x");
    }

    #[test]
    fn log_level_wins_over_rust_log_and_bad_directives_are_errors() {
        let args = LogArgs {
            log_level: Some("debug".into()),
            ..LogArgs::default()
        };
        assert_eq!(args.filter().unwrap().to_string(), "debug");
        let args = LogArgs {
            log_level: Some("=[".into()),
            ..LogArgs::default()
        };
        let e = args.filter().unwrap_err().to_string();
        assert!(e.contains("--log-level"), "{e}");
    }

    #[tokio::test]
    async fn instrumented_tasks_carry_the_binding_fields() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("warn"))
            .with_writer(move || writer.clone())
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        async { tracing::warn!("inside") }
            .instrument(binding_span("ns1", "b1"))
            .await;
        let text = String::from_utf8(crate::util::lock(&buf.0).clone()).unwrap();
        let line: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["namespace"], "ns1");
        assert_eq!(line["binding"], "b1");
    }
}
