//! WebSocket (and any HTTP/1.1 upgrade) relay: once both sides switched protocols, bytes
//! are copied both ways until either side closes. Not bounded by `proxy.request_timeout`;
//! cut only when the drain window of a shutdown is over.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus::IntGauge;

use super::completion::Completion;
use crate::shutdown::{Phase, Shutdown, TrackGuard};

/// One upgraded connection pair waiting to be relayed.
pub struct Relay {
    pub client: OnUpgrade,
    pub upstream: OnUpgrade,
    /// Recorded (and the session lease dropped) when the relay ends.
    pub completion: Completion,
    /// Keeps a shutdown drain waiting for this stream.
    pub track: TrackGuard,
    pub open_gauge: IntGauge,
}

impl Relay {
    /// Runs the relay on its own task.
    pub fn spawn(self, shutdown: Shutdown) {
        tokio::spawn(self.run(shutdown));
    }

    async fn run(self, shutdown: Shutdown) {
        let Relay {
            client,
            upstream,
            completion,
            track,
            open_gauge,
        } = self;
        open_gauge.inc();
        let relay = async {
            let (client, upstream) =
                tokio::try_join!(client, upstream).map_err(|e| format!("upgrade failed: {e}"))?;
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            tokio::io::copy_bidirectional(&mut client, &mut upstream)
                .await
                .map(|_| ())
                .map_err(|e| format!("relay: {e}"))
        };
        tokio::select! {
            result = relay => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "upgraded stream ended with an error");
                }
            }
            _ = shutdown.reached(Phase::Closed) => {
                tracing::info!("drain window over: closing an upgraded stream");
            }
        }
        open_gauge.dec();
        completion.finish();
        drop(track);
    }
}
