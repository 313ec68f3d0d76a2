//! Metrics of `slipstream sync` (the sidecar), served with
//! `--metrics-addr`: `slipstream_sync_*`, next to the process metrics and
//! `slipstream_build_info`.

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};

use super::{Exposition, base_registry};

/// What a sync did so far. Cheap to clone (the values are shared).
#[derive(Clone, Debug, Default)]
pub struct SyncMetrics {
    /// KV updates received and applied.
    pub updates: Counter,
    /// Versions swapped into the directory.
    pub swaps: Counter,
    /// Projections refused (too large, collision, invalid key under Fail).
    pub refused: Counter,
    /// The KV revision the directory holds.
    pub cursor: Gauge,
    /// 1 once the directory holds a complete state.
    pub ready: Gauge,
    /// Watches that failed or ended and were started again.
    pub watch_restarts: Counter,
}

impl SyncMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "sync_updates",
            "KV updates the sync received and applied",
            self.updates.clone(),
        );
        registry.register(
            "sync_swaps",
            "Versions swapped into the directory",
            self.swaps.clone(),
        );
        registry.register(
            "sync_refused",
            "Projections not written (too large, key collision, invalid key under Fail)",
            self.refused.clone(),
        );
        registry.register(
            "sync_cursor",
            "KV revision the directory holds",
            self.cursor.clone(),
        );
        registry.register(
            "sync_ready",
            "Whether the directory holds a complete state (1) or not yet (0)",
            self.ready.clone(),
        );
        registry.register(
            "sync_watch_restarts",
            "Watches that failed or ended and were started again",
            self.watch_restarts.clone(),
        );
    }

    /// These metrics with the process metrics and build info, to serve.
    pub fn exposition(&self) -> Exposition {
        let mut root = base_registry();
        self.register(root.sub_registry_with_prefix("slipstream"));
        Exposition::new(root)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Format;

    #[test]
    fn sync_metrics_are_exported_under_their_names() {
        let m = SyncMetrics::default();
        m.swaps.inc();
        m.cursor.set(42);
        let text = m.exposition().encode(Format::Classic);
        for line in [
            "slipstream_sync_swaps_total 1\n",
            "slipstream_sync_cursor 42\n",
            "slipstream_sync_ready 0\n",
            "# TYPE slipstream_sync_updates_total counter\n",
            "slipstream_build_info{",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(!m.is_ready());
    }
}
