//! Captures the warnings and errors that the real `chitchat` crate logs (targets `chitchat::…`),
//! so tests can prove our nodes never make it log a decode error ("invalid-chitchat-payload")
//! or a fatal receive error.

use std::fmt::Debug;
use std::sync::OnceLock;

use parking_lot::Mutex;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// One captured event: level, target, message and fields.
#[derive(Debug, Clone)]
pub struct Captured {
    pub level: Level,
    pub target: String,
    pub text: String,
}

#[derive(Default)]
pub struct Capture {
    events: Mutex<Vec<Captured>>,
}

struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        self.0.push_str(&format!("{}={value:?}", field.name()));
    }
}

impl Subscriber for Capture {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target().starts_with("chitchat::") && *metadata.level() <= Level::WARN
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut text = Text(String::new());
        event.record(&mut text);
        self.events.lock().push(Captured {
            level: *event.metadata().level(),
            target: event.metadata().target().to_string(),
            text: text.0,
        });
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

impl Capture {
    /// Captured events whose text contains `pattern`.
    pub fn matching(&self, pattern: &str) -> Vec<Captured> {
        self.events
            .lock()
            .iter()
            .filter(|e| e.text.contains(pattern))
            .cloned()
            .collect()
    }

    /// Decode errors and fatal receive errors logged by real chitchat nodes so far.
    pub fn reference_failures(&self) -> Vec<Captured> {
        let mut failures = self.matching("invalid-chitchat-payload");
        failures.extend(self.matching("fatal UDP recv error"));
        failures
    }
}

/// The process-wide capture (installed as the global tracing subscriber on first use).
pub fn reference_log() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::default());
        tracing::subscriber::set_global_default(CaptureRef(capture))
            .expect("no other global subscriber in the test binaries");
        capture
    })
}

/// `Subscriber` for a `&'static Capture`.
struct CaptureRef(&'static Capture);

impl Subscriber for CaptureRef {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        self.0.new_span(span)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        self.0.record(span, values)
    }
    fn record_follows_from(&self, span: &Id, follows: &Id) {
        self.0.record_follows_from(span, follows)
    }
    fn event(&self, event: &Event<'_>) {
        self.0.event(event)
    }
    fn enter(&self, span: &Id) {
        self.0.enter(span)
    }
    fn exit(&self, span: &Id) {
        self.0.exit(span)
    }
}
