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
use crate::config::{BackendKind, Config, ConfigError, EffectivePool};
use crate::events::EventBus;
use crate::metrics::Metrics;
use crate::pool::{Pool, PoolParts, Pools};
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
    pools: Arc<Pools>,
    metrics: Arc<Metrics>,
    stats: Arc<TrafficStats>,
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
    let effective = config.effective_pools();
    // The one replica identity and kube client (a kubernetes pool's settings, if any);
    // leader election starts here.
    let cluster_config = effective
        .iter()
        .find(|p| p.config.backend.kind == BackendKind::Kubernetes)
        .unwrap_or(&effective[0]);
    let cluster = Cluster::start(&cluster_config.config, &metrics).await?;
    let named = config.has_pools();
    // One event stream for every pool: its events name their pool.
    let bus = Arc::new(EventBus::new(config.telemetry.events.buffer));
    let preview_pools: Vec<crate::preview::PoolPreview> = effective
        .iter()
        .filter_map(|p| {
            Some(crate::preview::PoolPreview {
                pool: Arc::from(p.name.as_str()),
                config: p.config.preview.clone()?,
            })
        })
        .collect();
    let previews =
        crate::preview::Previews::new(preview_pools, config.tls.is_some(), proxy_addr.port());
    let mut backend = backend;
    let mut built = Vec::with_capacity(effective.len());
    for pool in effective {
        let parts = build_pool(
            pool,
            named,
            &metrics,
            &stats,
            &bus,
            &cluster,
            backend.take(),
        );
        built.push(parts.await?);
    }
    let shutdown = Shutdown::new();

    let telemetry = Arc::new(Telemetry::new(&config.telemetry, built[0].backend.kind())?);
    if telemetry.enabled() {
        tracing::info!(
            endpoint = config.telemetry.otlp.endpoint.as_deref().unwrap_or(""),
            sample_ratio = config.telemetry.sample_ratio,
            "exporting traces over OTLP/HTTP"
        );
    }
    let pools: Vec<Arc<Pool>> = built
        .into_iter()
        .map(|p| {
            let leader = cluster.leadership();
            let replica = cluster.replica().clone();
            let pool_name = named.then(|| p.name.clone());
            let scaling = Scaling::start(
                &p.config,
                ScalingDeps {
                    stats: p.stats.clone(),
                    activator: p.activator.clone(),
                    backend: p.backend.clone(),
                    metrics: p.metrics.clone(),
                    leader,
                    replica,
                    pool: pool_name,
                },
            );
            Arc::new(Pool::new(PoolParts {
                name: p.name,
                matcher: p.matcher,
                activator: p.activator,
                backend: p.backend,
                stats: p.stats,
                metrics: p.metrics,
                scaling,
            }))
        })
        .collect();
    let pools = Arc::new(Pools::new(pools, named));
    let proxy = Arc::new(
        Proxy::new(
            &config,
            signer.clone(),
            pools.clone(),
            &metrics,
            stats.clone(),
            shutdown.clone(),
        )
        .with_telemetry(telemetry.clone())
        .with_previews(previews.clone()),
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
    let schedules = crate::schedule::start(
        &config,
        cluster.ticks(),
        cluster.leadership(),
        metrics.clone(),
        proxy_addr,
    )?;
    let admin_state = Arc::new(AdminState {
        pools: pools.clone(),
        metrics: metrics.clone(),
        stats: stats.clone(),
        shutdown: shutdown.clone(),
        max_id_length: config.session.max_id_length,
        signer,
        retry_after: proxy::error::retry_after_value(config.activation.retry_after.as_duration()),
        event_streams: admin::EventStreams::new(&config.telemetry.events),
        auth: admin_auth,
        previews,
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state));
    let names: Vec<&str> = pools.iter().map(|p| &*p.name).collect();
    tracing::info!(%proxy_addr, %admin_addr, backend = pools.first().backend.kind(), pools = ?names, tls = config.tls.is_some(), "agent-activator listening");
    Ok(RunningServer {
        proxy_addr,
        admin_addr,
        pools,
        metrics,
        stats,
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

/// A pool's parts before its autoscaler starts.
struct BuiltPool {
    name: Arc<str>,
    matcher: Option<crate::config::PoolMatch>,
    config: Config,
    activator: Arc<Activator>,
    backend: DynBackend,
    stats: Arc<TrafficStats>,
    metrics: Arc<Metrics>,
}

/// Builds one pool's backend and activator and recovers its bindings. Without `pools:`
/// (`named` false) it uses the server-wide metrics, stats and the activator's own event
/// bus, exactly as a single-pool server always did.
async fn build_pool(
    pool: EffectivePool,
    named: bool,
    metrics: &Arc<Metrics>,
    stats: &Arc<TrafficStats>,
    bus: &Arc<EventBus>,
    cluster: &Cluster,
    given: Option<DynBackend>,
) -> Result<BuiltPool, StartError> {
    let name: Arc<str> = pool.name.into();
    let (pool_metrics, pool_stats) = if named {
        let m = Arc::new(Metrics::for_pool(&name));
        metrics.attach_pool(&m);
        (m, Arc::new(TrafficStats::new()))
    } else {
        (metrics.clone(), stats.clone())
    };
    let backend = match given {
        Some(b) => b,
        None => backend::build(&pool.config, &pool_metrics, cluster)
            .await
            .map_err(|e| pool_key(e, &name, named))?,
    };
    let activator = if named {
        Activator::for_pool(
            &pool.config,
            backend.clone(),
            pool_metrics.clone(),
            bus.clone(),
            name.clone(),
        )
    } else {
        Activator::new(&pool.config, backend.clone(), pool_metrics.clone())
    };
    match activator.recover().await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(pool = %name, sessions = n, "recovered session bindings from the backend")
        }
        Err(e) => {
            tracing::warn!(pool = %name, error = %e, "could not recover session bindings; starting empty")
        }
    }
    activator.spawn_background();
    Ok(BuiltPool {
        name,
        matcher: pool.matcher,
        config: pool.config,
        activator,
        backend,
        stats: pool_stats,
        metrics: pool_metrics,
    })
}

/// Names the pool in a backend error's key (`pools.python: backend.command: ...`).
fn pool_key(e: ConfigError, name: &str, named: bool) -> ConfigError {
    match e {
        ConfigError::Invalid { key, message } if named => {
            ConfigError::invalid(format!("pools.{name}.{key}"), message)
        }
        other => other,
    }
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

    /// The first pool's activator (the only one without `pools:`).
    pub fn activator(&self) -> &Arc<Activator> {
        &self.pools.first().activator
    }

    /// Every pool.
    pub fn pools(&self) -> &Arc<Pools> {
        &self.pools
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The first pool's backend (the only one without `pools:`).
    pub fn backend(&self) -> &DynBackend {
        &self.pools.first().backend
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
        self.pools.begin_shutdown();
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
        for p in self.pools.iter() {
            p.stop_scaling();
        }
        for s in &self.schedules {
            s.abort();
        }
        // Gives the Lease up so another replica leads at once.
        self.cluster.stop().await;
        // Every pool's backend stops at once, all within one bound.
        let stops = self.pools.iter().map(|p| p.backend.shutdown());
        if tokio::time::timeout(
            BACKEND_SHUTDOWN_BOUND,
            futures_util::future::join_all(stops),
        )
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
