//! `server::start`: wires config, backend, activator, proxy and admin listeners into a
//! running server, and drains it on shutdown. `main` and integration tests both use it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::activation::Activator;
use crate::admin::{self, AdminAuth, AdminState};
use crate::autoscaler::{Scaling, ScalingDeps};
use crate::backend::{self, DynBackend};
use crate::cluster::Cluster;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::proxy::{self, Proxy, TlsError};
use crate::shutdown::{Phase, Shutdown};
use crate::stats::TrafficStats;
use crate::telemetry::Telemetry;

/// Upper bound on `SandboxBackend::shutdown` (killing child processes and the like).
const BACKEND_SHUTDOWN_BOUND: Duration = Duration::from_secs(30);

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration (or something it names, like a backend endpoint) is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A listener could not bind.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl StartError {
    /// Invalid configuration (exit 64) rather than an environment problem.
    pub fn is_config(&self) -> bool {
        matches!(self, StartError::Config(_) | StartError::Tls(_))
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainOutcome {
    /// Every connection and stream finished inside `proxy.drain_timeout`.
    pub complete: bool,
    /// Connections or streams still open when the window closed (and were cut).
    pub cut: usize,
}

/// A started activator: bound listeners, background tasks, and the handles tests need.
pub struct RunningServer {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    activator: Arc<Activator>,
    metrics: Arc<Metrics>,
    backend: DynBackend,
    stats: Arc<TrafficStats>,
    scaling: Scaling,
    cluster: Cluster,
    schedules: Vec<JoinHandle<()>>,
    shutdown: Shutdown,
    drain_timeout: Duration,
    drain_delay: Duration,
    proxy_task: JoinHandle<()>,
    admin_task: JoinHandle<()>,
    telemetry: Arc<Telemetry>,
}

/// Binds both listeners, builds the backend named by `backend.kind` and the activator,
/// and starts serving. `127.0.0.1:0` addresses work: ask the handle for the bound ones.
pub async fn start(config: Config) -> Result<RunningServer, StartError> {
    let metrics = Arc::new(Metrics::new());
    start_inner(config, metrics, None).await
}

/// Like [`start`] but with a backend built by the caller (tests, embedders); `metrics`
/// is the registry that backend reports to.
pub async fn start_with_backend(
    config: Config,
    backend: DynBackend,
    metrics: Arc<Metrics>,
) -> Result<RunningServer, StartError> {
    start_inner(config, metrics, Some(backend)).await
}

async fn start_inner(
    config: Config,
    metrics: Arc<Metrics>,
    backend: Option<DynBackend>,
) -> Result<RunningServer, StartError> {
    let tls = config.tls.as_ref().map(proxy::tls_acceptor).transpose()?;
    let admin_auth = AdminAuth::new(&config.admin)
        .map_err(|m| ConfigError::invalid("admin.auth.bearer_token_file", m))?;
    let signer = crate::session::TokenSigner::from_config(&config.session)?;
    let proxy_listener = bind("listen", config.listen).await?;
    let admin_listener = bind("admin_listen", config.admin_listen).await?;
    let proxy_addr = local_addr("listen", &proxy_listener, config.listen)?;
    let admin_addr = local_addr("admin_listen", &admin_listener, config.admin_listen)?;

    let stats = Arc::new(TrafficStats::new());
    // The one replica identity and kube client; leader election starts here.
    let cluster = Cluster::start(&config, &metrics).await?;
    let backend = match backend {
        Some(b) => b,
        None => backend::build(&config, &metrics, &cluster).await?,
    };
    let activator = Activator::new(&config, backend.clone(), metrics.clone());
    match activator.recover().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(sessions = n, "recovered session bindings from the backend"),
        Err(e) => tracing::warn!(error = %e, "could not recover session bindings; starting empty"),
    }
    activator.spawn_background();
    let shutdown = Shutdown::new();

    let telemetry = Arc::new(Telemetry::new(&config.telemetry, backend.kind())?);
    if telemetry.enabled() {
        tracing::info!(
            endpoint = config.telemetry.otlp.endpoint.as_deref().unwrap_or(""),
            sample_ratio = config.telemetry.sample_ratio,
            "exporting traces over OTLP/HTTP"
        );
    }
    let proxy = Arc::new(
        Proxy::new(
            &config,
            signer.clone(),
            activator.clone(),
            &metrics,
            stats.clone(),
            shutdown.clone(),
        )
        .with_telemetry(telemetry.clone()),
    );
    let proxy_config = config.proxy.clone();
    let proxy_shutdown = shutdown.clone();
    let proxy_metrics = metrics.clone();
    let proxy_task = tokio::spawn(async move {
        proxy::serve(
            proxy_listener,
            tls,
            proxy,
            &proxy_config,
            &proxy_metrics,
            proxy_shutdown,
        )
        .await;
    });
    let scaling = Scaling::start(
        &config,
        ScalingDeps {
            stats: stats.clone(),
            activator: activator.clone(),
            backend: backend.clone(),
            metrics: metrics.clone(),
            leader: cluster.leadership(),
            replica: cluster.replica().clone(),
        },
    );
    let schedules = crate::schedule::start(
        &config,
        cluster.ticks(),
        cluster.leadership(),
        metrics.clone(),
        proxy_addr,
    )?;
    let admin_state = Arc::new(AdminState {
        activator: activator.clone(),
        backend: backend.clone(),
        metrics: metrics.clone(),
        stats: stats.clone(),
        shutdown: shutdown.clone(),
        max_id_length: config.session.max_id_length,
        signer,
        retry_after: proxy::error::retry_after_value(config.activation.retry_after.as_duration()),
        autoscaler: scaling.autoscaler().clone(),
        event_streams: admin::EventStreams::new(&config.telemetry.events),
        auth: admin_auth,
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state));
    tracing::info!(%proxy_addr, %admin_addr, backend = backend.kind(), tls = config.tls.is_some(), "agent-activator listening");
    Ok(RunningServer {
        proxy_addr,
        admin_addr,
        activator,
        metrics,
        backend,
        stats,
        scaling,
        cluster,
        schedules,
        shutdown,
        drain_timeout: config.proxy.drain_timeout.as_duration(),
        drain_delay: config.proxy.drain_delay.as_duration(),
        proxy_task,
        admin_task,
        telemetry,
    })
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}

fn local_addr(
    key: &'static str,
    l: &TcpListener,
    addr: SocketAddr,
) -> Result<SocketAddr, StartError> {
    l.local_addr()
        .map_err(|source| StartError::Bind { key, addr, source })
}

impl RunningServer {
    /// The bound proxy address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn activator(&self) -> &Arc<Activator> {
        &self.activator
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn backend(&self) -> &DynBackend {
        &self.backend
    }

    pub fn stats(&self) -> &Arc<TrafficStats> {
        &self.stats
    }

    /// This replica's identity, kube client and leadership.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The shutdown phase; `advance(Phase::Draining)` on a clone starts a drain that
    /// [`RunningServer::wait`] then completes.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Starts a shutdown now and waits for it to finish: readiness 503 for
    /// `proxy.drain_delay` while still serving, then the drain.
    pub async fn shutdown(self) -> DrainOutcome {
        self.shutdown.advance(Phase::Unready);
        if self.shutdown.phase() == Phase::Unready && !self.drain_delay.is_zero() {
            tracing::info!(delay = ?self.drain_delay, "readiness is 503; accepting until the drain delay is over");
            tokio::select! {
                _ = tokio::time::sleep(self.drain_delay) => {}
                _ = self.shutdown.reached(Phase::Draining) => {}
            }
        }
        self.finish().await
    }

    /// Waits until a shutdown is started (by a handle or [`RunningServer::run_until`])
    /// and completes it.
    pub async fn wait(self) -> DrainOutcome {
        self.shutdown.reached(Phase::Unready).await;
        self.shutdown().await
    }

    /// Serves until `signal` resolves (e.g. [`crate::shutdown::signal`]) or a shutdown is
    /// started elsewhere, then drains.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) -> DrainOutcome {
        tokio::select! {
            _ = signal => {}
            _ = self.shutdown.reached(Phase::Unready) => {}
        }
        self.shutdown().await
    }

    /// Readiness 503 and listener closed (already), activations refused, in-flight
    /// requests and streams drained within `proxy.drain_timeout`, then the backend stops.
    async fn finish(self) -> DrainOutcome {
        self.shutdown.advance(Phase::Draining);
        self.activator.begin_shutdown();
        let tracker = self.shutdown.tracker();
        let complete = tokio::time::timeout(self.drain_timeout, tracker.idle())
            .await
            .is_ok();
        let cut = tracker.count();
        if complete {
            tracing::info!("drain complete");
        } else {
            tracing::warn!(cut, "drain window over; closing what is left");
        }
        self.shutdown.advance(Phase::Closed);
        self.scaling.stop();
        for s in &self.schedules {
            s.abort();
        }
        // Gives the Lease up so another replica leads at once.
        self.cluster.stop().await;
        if tokio::time::timeout(BACKEND_SHUTDOWN_BOUND, self.backend.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("backend shutdown did not finish within {BACKEND_SHUTDOWN_BOUND:?}");
        }
        let _ = self.proxy_task.await;
        let _ = self.admin_task.await;
        // Spans of the drained requests are exported before the process ends.
        self.telemetry.shutdown().await;
        DrainOutcome { complete, cut }
    }
}
