//! WebSocket (and any allowed HTTP/1.1 upgrade) relay: once both sides switched
//! protocols, bytes are copied both ways until either side closes, no byte moved either
//! way for `proxy.tunnel_idle_timeout` (both sides are closed: a half-open client must not
//! keep its session active forever), or the drain window of a shutdown is over. Not
//! bounded by `proxy.request_timeout`.

use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus::{IntCounter, IntGauge};

use super::activity::{TunnelActivity, Watched};
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
    /// `proxy.tunnel_idle_timeout`.
    pub idle_timeout: Duration,
    /// Counts relays closed for idleness.
    pub idle_closed: IntCounter,
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
            idle_timeout,
            idle_closed,
        } = self;
        open_gauge.inc();
        let activity = TunnelActivity::new();
        let relay = async {
            let (client, upstream) =
                tokio::try_join!(client, upstream).map_err(|e| format!("upgrade failed: {e}"))?;
            let mut client = Watched::new(TokioIo::new(client), activity.clone(), ());
            let mut upstream = Watched::new(TokioIo::new(upstream), activity.clone(), ());
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
            _ = idle(&activity, idle_timeout) => {
                idle_closed.inc();
                tracing::debug!(timeout = ?idle_timeout, "upgraded stream idle: closing both sides");
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

/// Resolves once no byte moved through the tunnel for `timeout`.
async fn idle(activity: &TunnelActivity, timeout: Duration) {
    loop {
        let deadline = activity.deadline(timeout);
        if deadline <= tokio::time::Instant::now() {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}
