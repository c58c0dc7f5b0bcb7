//! A lane's circuit and its share of `wagate_circuit_open{scope}`.

use super::*;

/// A lane's circuit and its share of `wagate_circuit_open{scope}`: the
/// gauge follows the lane's state through scope changes, and a lane that
/// ends with its circuit open (revocation, shutdown) gives its count back.
#[derive(Default)]
pub(super) struct Circuit(Option<errors::Scope>);

impl Circuit {
    pub(super) fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// Opens (or moves) the circuit; true if it was closed.
    pub(super) fn open(&mut self, scope: errors::Scope) -> bool {
        let was = self.0.replace(scope);
        if was != Some(scope) {
            if let Some(old) = was {
                metrics::gauge!(m::CIRCUIT_OPEN, "scope" => old.label()).decrement(1.0);
            }
            metrics::gauge!(m::CIRCUIT_OPEN, "scope" => scope.label()).increment(1.0);
        }
        was.is_none()
    }

    /// Closes the circuit; true if it was open.
    pub(super) fn close(&mut self) -> bool {
        match self.0.take() {
            Some(scope) => {
                metrics::gauge!(m::CIRCUIT_OPEN, "scope" => scope.label()).decrement(1.0);
                true
            }
            None => false,
        }
    }
}

impl Drop for Circuit {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge(text: &str, scope: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("wagate_circuit_open{{scope=\"{scope}\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    #[test]
    fn the_gauge_follows_scope_changes_and_lanes_that_end_open() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let (a, b) = (errors::Scope::Token, errors::Scope::Number);
            let mut c = Circuit::default();
            assert!(c.open(a));
            assert!(!c.open(a), "already open");
            assert!(!c.open(b), "moved, not newly opened");
            let t = handle.render();
            assert_eq!(
                (gauge(&t, a.label()), gauge(&t, b.label())),
                (0.0, 1.0),
                "{t}"
            );
            let mut other = Circuit::default();
            other.open(b);
            assert_eq!(gauge(&handle.render(), b.label()), 2.0);
            drop(other); // a lane ending with its circuit open
            assert_eq!(gauge(&handle.render(), b.label()), 1.0);
            assert!(c.close());
            assert!(!c.close());
            let t = handle.render();
            assert_eq!(
                (gauge(&t, a.label()), gauge(&t, b.label())),
                (0.0, 0.0),
                "{t}"
            );
        });
    }
}
