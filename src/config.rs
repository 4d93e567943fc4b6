//! YAML configuration: every key, its default, and `validate()` that names the offending key.
//!
//! Loading never binds a socket: `agent-activator check` and `serve` share [`Config::load`].
//! Unknown keys are rejected (`deny_unknown_fields`) so a typo is an error, not a silent
//! default. Durations are strings such as `500ms`, `30s`, `10m`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

pub mod customize;
mod duration;
mod freeze;
pub mod node_agent;
mod pools;
mod preview;
mod session;
mod size;
mod telemetry;
mod validate;

pub use customize::{CustomizeConfig, EnvRule, LabelRule, SidecarRule, SidecarSet, VolumeRule};
pub use duration::Dur;
pub use freeze::{NodeAgentClientConfig, PauseMode};
pub use pools::{
    DEFAULT_POOL, EffectivePool, PoolAutoscaler, PoolConfig, PoolIdle, PoolMatch, validate_name,
};
pub use preview::{
    HookConfig, HooksConfig, MAX_PREVIEWS_PER_SESSION, OnHookFailure, PreviewAccess, PreviewConfig,
};
pub use session::{
    CreateRate, HmacConfig, HmacKeyConfig, MAX_KEY_ID_LEN, MIN_SECRET_LEN, SessionAuth,
    check_key_id,
};
pub use telemetry::{EventsConfig, OtlpConfig, TelemetryConfig};

/// A configuration problem, always naming the key path (e.g. `session.sources[1].cookie`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    /// An invalid value at `key`.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the proxy listener (`listen`).
    pub listen: SocketAddr,
    /// Address of the admin listener: metrics, health, session API (`admin_listen`).
    pub admin_listen: SocketAddr,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub tls: Option<TlsConfig>,
    pub proxy: ProxyConfig,
    pub session: SessionConfig,
    pub idle: IdleConfig,
    pub activation: ActivationConfig,
    pub backend: BackendConfig,
    pub autoscaler: AutoscalerConfig,
    pub schedules: Vec<ScheduleConfig>,
    pub telemetry: TelemetryConfig,
    /// Claim-time customisation: allowlisted headers -> env, volumes, sidecars, labels.
    pub customize: CustomizeConfig,
    /// Several kinds of sandbox behind one gateway (see [`PoolConfig`]); empty = one pool
    /// `default` from the top-level `backend`, `autoscaler`, `idle` and `customize`.
    pub pools: Vec<PoolConfig>,
    /// Preview URLs for the sandboxes' own ports (the default pool's; `pools[].preview`
    /// replaces it per pool). Unset: no previews.
    pub preview: Option<PreviewConfig>,
    /// Calls into the sandbox before a pause and after a resume (`pools[].hooks`
    /// replaces it per pool).
    pub hooks: HooksConfig,
    /// The node agent's section (`agent-activator node-agent`); unused by `serve`.
    pub node_agent: Option<node_agent::NodeAgentConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            admin_listen: "127.0.0.1:9090".parse().expect("literal address"),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            tls: None,
            proxy: ProxyConfig::default(),
            session: SessionConfig::default(),
            idle: IdleConfig::default(),
            activation: ActivationConfig::default(),
            backend: BackendConfig::default(),
            autoscaler: AutoscalerConfig::default(),
            schedules: Vec::new(),
            telemetry: TelemetryConfig::default(),
            customize: CustomizeConfig::default(),
            pools: Vec::new(),
            preview: None,
            hooks: HooksConfig::default(),
            node_agent: None,
        }
    }
}

/// `admin.*`: who may use the admin listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub auth: AdminAuthConfig,
    /// Allow a non-loopback `admin_listen` without `admin.auth` (`check` refuses it otherwise).
    pub allow_unauthenticated: bool,
    /// Paths served without a token (exact match), e.g. for Prometheus and kubelet probes.
    pub public_paths: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            auth: AdminAuthConfig::default(),
            allow_unauthenticated: false,
            public_paths: vec!["/metrics".into(), "/healthz".into(), "/readyz".into()],
        }
    }
}

/// `admin.auth.*`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminAuthConfig {
    /// File holding the bearer token (surrounding whitespace ignored); every admin request
    /// outside `admin.public_paths` needs `Authorization: Bearer <token>`.
    pub bearer_token_file: Option<PathBuf>,
}

/// Reads a token file: trimmed, non-empty, visible ASCII (it travels in a header).
pub fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{}: the token must be visible ASCII without spaces",
            path.display()
        ));
    }
    Ok(token.to_owned())
}

/// `log.*`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing `EnvFilter` directive; `RUST_LOG` overrides it.
    pub level: String,
    /// Emit one access-log line per request (target `access`).
    pub access_log: bool,
    /// How session IDs appear in logs: `hash` (short SHA-256 prefix) or `full`.
    pub session_ids: SessionIdLogging,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
            access_log: true,
            session_ids: SessionIdLogging::Hash,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionIdLogging {
    Hash,
    Full,
}

/// `tls.*`: serve HTTPS (ALPN h2, http/1.1) with these PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `proxy.*`: the forwarding path.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Upper bound from forwarding a request to the upstream's response head (504 after).
    /// Streams and WebSockets are not bounded by it once the head has arrived.
    pub request_timeout: Dur,
    /// TCP connect timeout to a sandbox (502 `upstream_connect` after).
    pub connect_timeout: Dur,
    /// Idle keep-alive connections to sandboxes are closed after this long.
    /// Keep it below the sandboxes' own keep-alive timeout.
    pub pool_idle_timeout: Dur,
    /// Idle connections kept per sandbox.
    pub pool_max_idle_per_host: usize,
    /// Protocol spoken to sandboxes: `http1` or `http2` (prior knowledge, h2c).
    pub upstream_protocol: UpstreamProtocol,
    /// Request headers removed before forwarding (case-insensitive), e.g. the session header.
    pub strip_headers: Vec<String>,
    /// On SIGTERM, how long in-flight requests and open streams may take to finish.
    pub drain_timeout: Dur,
    /// On SIGTERM, how long the listener keeps accepting while `/readyz` already answers
    /// 503, so load balancers and Endpoints stop sending before it closes.
    pub drain_delay: Dur,
    /// Bound from accepting a connection to its first complete request head: covers the
    /// TLS handshake, protocol detection and the head, for HTTP/1.1 and HTTP/2 alike;
    /// on HTTP/1.1 keep-alive it also bounds every later head once its first byte arrived.
    pub client_header_timeout: Dur,
    /// A client connection with no request in flight (HTTP/1.1 keep-alive, HTTP/2 with
    /// no open stream) is closed after this long.
    pub idle_timeout: Dur,
    /// Longest gap between two reads of a request body (408 `body_timeout` after).
    pub body_timeout: Dur,
    /// A relayed WebSocket (upgraded stream) with no byte in either direction for this
    /// long is closed on both sides.
    pub tunnel_idle_timeout: Dur,
    /// Client connections open at once; beyond it new connections are closed at accept.
    pub max_connections: usize,
    /// Largest request head (request line + headers) in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Largest request body in bytes (413 beyond); unset = unlimited.
    pub max_body_bytes: Option<u64>,
    /// HTTP/2: interval of keepalive PINGs to clients; 0s = none.
    pub http2_keepalive_interval: Dur,
    /// HTTP/2: a PING not acknowledged within this closes the connection.
    pub http2_keepalive_timeout: Dur,
    /// HTTP/2: concurrent streams one client connection may open.
    pub http2_max_concurrent_streams: u32,
    /// TCP keepalive on client and sandbox sockets: idle time before the first probe
    /// (then every third of it, 3 probes); 0s = off.
    pub tcp_keepalive: Dur,
    /// `Upgrade` protocols relayed (case-insensitive); any other is dropped and the
    /// request forwarded as a plain one.
    pub allowed_upgrades: Vec<String>,
    /// Peers (CIDRs or single addresses) whose `X-Forwarded-*`, `Forwarded`,
    /// `X-Real-IP` and `X-Request-ID` are believed; from anyone else they are replaced.
    pub trusted_proxies: Vec<String>,
    /// Request header names containing `_`: `forward` them (but refuse with 400 the ones
    /// that read as a routing, framing or proxy-set field, e.g. `X_Session_ID`), or `drop`
    /// every one (nginx's default, `underscores_in_headers off`).
    pub underscore_headers: UnderscoreHeaders,
    /// Serve plain HTTP/1.1 requests on the built-in fast path (`false`: every connection
    /// goes to hyper's server; slower, for comparison or to rule the fast path out).
    pub http1_fast_path: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            request_timeout: Dur::secs(300),
            connect_timeout: Dur::secs(2),
            pool_idle_timeout: Dur::secs(30),
            pool_max_idle_per_host: 64,
            upstream_protocol: UpstreamProtocol::Http1,
            strip_headers: Vec::new(),
            drain_timeout: Dur::secs(30),
            drain_delay: Dur::secs(0),
            client_header_timeout: Dur::secs(30),
            idle_timeout: Dur::secs(75),
            body_timeout: Dur::secs(60),
            tunnel_idle_timeout: Dur::secs(3600),
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            max_body_bytes: None,
            http2_keepalive_interval: Dur::secs(30),
            http2_keepalive_timeout: Dur::secs(20),
            http2_max_concurrent_streams: 128,
            tcp_keepalive: Dur::secs(60),
            allowed_upgrades: vec!["websocket".into()],
            trusted_proxies: Vec::new(),
            underscore_headers: UnderscoreHeaders::Forward,
            http1_fast_path: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

/// `proxy.underscore_headers`: what happens to request header names containing `_`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnderscoreHeaders {
    /// Forwarded, except look-alikes of routing, framing and proxy-set fields (400).
    Forward,
    /// Removed before forwarding, as nginx does by default.
    Drop,
}

/// `session.*`: where the session ID comes from and how sessions map to sandboxes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Ordered list of places the session ID is read from; the first hit wins.
    pub sources: Vec<SessionSource>,
    /// What to do with a request that carries no session ID.
    pub on_missing: OnMissing,
    /// Cookie set when `on_missing: create` mints an ID (defaults to the first `cookie`
    /// source's name, else `activator-session`).
    pub cookie_name: Option<String>,
    /// Longest accepted session ID, in bytes.
    pub max_id_length: usize,
    /// How many sessions one sandbox may serve at once (1 = exclusive).
    pub max_sessions_per_sandbox: u32,
    /// How long a new session may wait for a free sandbox before 503.
    pub admission_timeout: Dur,
    /// `none`: the session ID is a bearer secret; `hmac`: clients present signed tokens.
    pub auth: SessionAuth,
    /// Keys and lifetime of signed tokens (`auth: hmac`).
    pub hmac: HmacConfig,
    /// Request header the sandbox reads the routed session ID from; client copies are
    /// replaced.
    pub forward_header: String,
    /// Most sessions in the table at once; a new session beyond it gets 503 `session_limit`.
    pub max_sessions: usize,
    /// New sessions per client IP (token bucket); unset = unlimited.
    pub create_rate: Option<CreateRate>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            sources: vec![SessionSource::Header("X-Session-ID".into())],
            on_missing: OnMissing::Reject,
            cookie_name: None,
            max_id_length: 128,
            max_sessions_per_sandbox: 1,
            admission_timeout: Dur::secs(30),
            auth: SessionAuth::None,
            hmac: HmacConfig::default(),
            forward_header: "X-Session-ID".into(),
            max_sessions: 100_000,
            create_rate: None,
        }
    }
}

impl SessionConfig {
    /// The cookie name used when minting session IDs.
    pub fn effective_cookie_name(&self) -> &str {
        if let Some(name) = &self.cookie_name {
            return name;
        }
        self.sources
            .iter()
            .find_map(|s| match s {
                SessionSource::Cookie(name) => Some(name.as_str()),
                _ => None,
            })
            .unwrap_or("activator-session")
    }
}

/// One entry of `session.sources`, written as a one-key map: `- header: X-Session-ID`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "SessionSourceRepr")]
pub enum SessionSource {
    /// A request header (case-insensitive).
    Header(String),
    /// A cookie by name.
    Cookie(String),
    /// A path prefix such as `/s/`: `/s/{id}/rest` is routed by `{id}` and forwarded as `/rest`.
    PathPrefix(String),
    /// A query parameter by name.
    Query(String),
}

/// The YAML shape of a source: a map with exactly one of these keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionSourceRepr {
    header: Option<String>,
    cookie: Option<String>,
    path_prefix: Option<String>,
    query: Option<String>,
}

impl TryFrom<SessionSourceRepr> for SessionSource {
    type Error = String;

    fn try_from(r: SessionSourceRepr) -> Result<SessionSource, String> {
        let mut found = Vec::with_capacity(1);
        if let Some(v) = r.header {
            found.push(SessionSource::Header(v));
        }
        if let Some(v) = r.cookie {
            found.push(SessionSource::Cookie(v));
        }
        if let Some(v) = r.path_prefix {
            found.push(SessionSource::PathPrefix(v));
        }
        if let Some(v) = r.query {
            found.push(SessionSource::Query(v));
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            _ => Err("write exactly one of header, cookie, path_prefix, query per entry".into()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMissing {
    /// 400 `missing_session`.
    Reject,
    /// Mint a random 128-bit ID, return it in `Set-Cookie` and `X-Session-ID`.
    Create,
}

/// `idle.*`: what happens to a session with no traffic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdleConfig {
    /// Time without a request in flight or an open stream after which `policy` applies.
    pub timeout: Dur,
    /// `pause`, `release` or `keep`; unset means `pause` when the backend can pause,
    /// else `release`.
    pub policy: Option<IdlePolicy>,
    /// A session paused longer than this is released (its sandbox is given back).
    pub session_ttl: Dur,
    /// How often idle sessions are looked for.
    pub sweep_interval: Dur,
    /// The deep idle tier: a session paused this long is paused deeper, releasing its
    /// memory (Kubernetes: suspended through the Sandbox spec, resume is a cold pod;
    /// process backend: the process is stopped, the next request gets a new sandbox and
    /// the session counts as state-lost per `activation.on_sandbox_loss`). 0 = off.
    pub deep_after: Dur,
}

impl Default for IdleConfig {
    fn default() -> Self {
        IdleConfig {
            timeout: Dur::secs(300),
            policy: None,
            session_ttl: Dur::secs(24 * 3600),
            sweep_interval: Dur::secs(1),
            deep_after: Dur::secs(0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdlePolicy {
    Pause,
    Release,
    Keep,
}

/// `activation.*`: buffering while a sandbox is claimed or resumed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActivationConfig {
    /// Bound on one claim, create or resume (504 `activation_timeout` after).
    pub timeout: Dur,
    /// Requests one session may have waiting (503 `queue_full` beyond).
    pub max_queued_per_session: usize,
    /// Requests all sessions together may have waiting (503 `queue_full` beyond).
    pub max_queued_total: usize,
    /// When a pinned sandbox dies: `fail` (502 `sandbox_lost`) or `reclaim`.
    pub on_sandbox_loss: OnSandboxLoss,
    /// `Retry-After` seconds sent with 503 responses.
    pub retry_after: Dur,
}

impl Default for ActivationConfig {
    fn default() -> Self {
        ActivationConfig {
            timeout: Dur::secs(30),
            max_queued_per_session: 100,
            max_queued_total: 10_000,
            on_sandbox_loss: OnSandboxLoss::Fail,
            retry_after: Dur::secs(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnSandboxLoss {
    Fail,
    Reclaim,
}

/// `backend.*`: where sandboxes come from. Keys apply to the kinds noted on each field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    pub kind: BackendKind,
    /// static: fixed sandbox addresses, `host:port`.
    pub endpoints: Vec<String>,
    /// process: argv of one sandbox; `{port}` is replaced by its port.
    pub command: Vec<String>,
    /// process: extra environment for sandboxes.
    pub env: BTreeMap<String, String>,
    /// process: each sandbox gets a working directory below this one.
    pub workdir_root: PathBuf,
    /// process: a sandbox is ready when GET on this path answers 2xx.
    pub ready_path: String,
    /// process, kubernetes: ready, unassigned sandboxes kept at all times.
    pub warm_pool: u32,
    /// process: most sandboxes alive at once (warm + bound + paused); 0 = unlimited.
    pub max_sandboxes: u32,
    /// process: pass the activator's whole environment to sandboxes. Off: only `env`
    /// plus `PATH`, `HOME` and `LANG` (and `PORT`).
    pub inherit_env: bool,
    /// process: memory limit per sandbox in bytes (a number, or a string with a `K`/`M`/`G`
    /// or `Ki`/`Mi`/`Gi` suffix); over it the sandbox is OOM-killed. Unset: 1Gi when the
    /// sandbox is isolated ([`DEFAULT_MEMORY_MAX`]), no limit with `isolation: none`;
    /// `0`: no limit.
    #[serde(deserialize_with = "size::deserialize_opt_bytes")]
    pub memory_max: Option<u64>,
    /// process: most tasks (processes and threads) per sandbox. Unset: 512 when isolated
    /// ([`DEFAULT_PIDS_MAX`]), no limit with `isolation: none`; `0`: no limit.
    pub pids_max: Option<u32>,
    /// process: CPU weight per sandbox, 1..=10000 (cgroup v2 scale, default of the kernel
    /// 100; mapped to v1 `cpu.shares`). Unset: 100 when isolated, the kernel default
    /// otherwise; `0`: not set.
    pub cpu_weight: Option<u32>,
    /// process: SIGTERM-to-SIGKILL grace on release.
    pub stop_grace: Dur,
    /// process: how to freeze: `auto`, `cgroup_v2`, `cgroup_v1` or `signal`.
    pub freezer: FreezerKind,
    /// process: how sandboxes are isolated from the host and each other: `namespaces`
    /// (default; bubblewrap, a clear error naming the key where it cannot run), `auto`
    /// (namespaces where bubblewrap works, else none with a warning), `none`.
    pub isolation: IsolationKind,
    /// process: the bubblewrap executable used for namespace isolation.
    pub bwrap: PathBuf,
    /// process (isolated): the host user sandbox processes run as, `NAME`, `UID` or
    /// `UID:GID`; never root. Default `nobody` (65534 where no such user exists).
    pub sandbox_user: String,
    /// process (isolated): extra host paths bound read-only into every sandbox (beyond
    /// `/usr`, `/lib*`, `/bin`, `/sbin`, the sanitised `/etc` and the command's own files).
    pub ro_paths: Vec<PathBuf>,
    /// process (isolated): outbound network of the sandboxes: `internet` (default; NAT
    /// through pasta, host loopback and link-local addresses unreachable) or `none`.
    pub egress: Egress,
    /// process (isolated): sandbox ports reachable from the activator besides `{port}`
    /// (preview URLs), each forwarded from its own host-loopback port per sandbox.
    pub expose_ports: Vec<u16>,
    /// process (isolated): the pasta executable (Debian `passt`) that gives each sandbox
    /// its own network namespace.
    pub pasta: PathBuf,
    /// process: per-session volumes (`customize.volumes`) live below this directory, one
    /// directory per session hash, and survive the session's sandboxes.
    pub volumes_root: PathBuf,
    /// kubernetes: API flavour and object names.
    pub kubernetes: KubernetesConfig,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            kind: BackendKind::Static,
            endpoints: Vec::new(),
            command: Vec::new(),
            env: BTreeMap::new(),
            workdir_root: std::env::temp_dir().join("agent-activator"),
            ready_path: "/healthz".into(),
            warm_pool: 0,
            max_sandboxes: 64,
            inherit_env: false,
            memory_max: None,
            pids_max: None,
            cpu_weight: None,
            stop_grace: Dur::secs(5),
            freezer: FreezerKind::Auto,
            isolation: IsolationKind::Namespaces,
            bwrap: PathBuf::from("bwrap"),
            sandbox_user: "nobody".into(),
            ro_paths: Vec::new(),
            egress: Egress::Internet,
            expose_ports: Vec::new(),
            pasta: PathBuf::from("pasta"),
            volumes_root: std::env::temp_dir().join("agent-activator-volumes"),
            kubernetes: KubernetesConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    Static,
    Process,
    Kubernetes,
}

/// `backend.memory_max` of an isolated sandbox when the key is unset.
pub const DEFAULT_MEMORY_MAX: u64 = 1 << 30;
/// `backend.pids_max` of an isolated sandbox when the key is unset.
pub const DEFAULT_PIDS_MAX: u32 = 512;
/// `backend.cpu_weight` of an isolated sandbox when the key is unset.
pub const DEFAULT_CPU_WEIGHT: u32 = 100;

/// `backend.egress` (process backend, isolated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Egress {
    None,
    Internet,
}

/// `backend.isolation` (process backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsolationKind {
    Auto,
    Namespaces,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FreezerKind {
    Auto,
    CgroupV2,
    CgroupV1,
    Signal,
}

/// `backend.kubernetes.*`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// `agent-sandbox` (SIG Apps CRDs) or `openkruise`.
    pub api: KubernetesApi,
    /// Namespace of claims and sandboxes; unset = the client's default namespace.
    pub namespace: Option<String>,
    /// agent-sandbox: the SandboxWarmPool claims draw from (`spec.warmPoolRef.name`).
    /// openkruise: the SandboxSet name (`spec.templateName`).
    pub pool: String,
    /// Port the sandbox container listens on.
    pub port: u16,
    /// Path to a kubeconfig; unset = in-cluster config, then `KUBECONFIG`/`~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Prefix of claim names; the rest is a truncated SHA-256 of the session ID.
    pub claim_prefix: String,
    /// Most claims named with `claim_prefix` in the namespace (all replicas together);
    /// a new session beyond it gets 503 `no_capacity`. 0 = unlimited.
    pub max_claims: u32,
    /// Write the raw session ID into an annotation on the claim (off by default).
    pub write_session_id: bool,
    /// How often this replica republishes its activity digest (the sessions it served
    /// within `idle.timeout`), which other replicas read before pausing a sandbox. A
    /// session new to this replica is published at once (at most once a second).
    pub activity_write_interval: Dur,
    /// Honour the `agent-activator.dev/port` annotation on Sandboxes instead of dialling
    /// `podIP:port`. Off by default: whoever can annotate a Sandbox could steer traffic.
    /// Only for kube-testbed, whose pods pick their own ports.
    pub port_from_annotation: bool,
    /// Leak backstop: claims are created to expire this long after the session's last
    /// traffic (agent-sandbox `spec.lifecycle.shutdownTime` + `shutdownPolicy: Delete`,
    /// OpenKruise `spec.shutdownTime`), pushed forward while the session lives, so the
    /// cluster ends abandoned sandboxes even if every activator is gone.
    pub shutdown_after: Dur,
    /// Kubernetes Lease used for autoscaler leader election.
    pub lease_name: String,
    /// What an idle pause does: `suspend` (the Sandbox spec; the pod is deleted) or
    /// `freeze` (the node agent freezes the pod's cgroup in place; memory kept).
    pub pause: PauseMode,
    /// With `pause: freeze`, also claim pods whose containers have liveness or startup
    /// probes (a frozen container fails them and the kubelet restarts it: state lost).
    /// Off: such a claim is refused with 502 `sandbox_start_failed`.
    pub freeze_with_probes: bool,
    /// Where the node agent is (`pause: freeze` only).
    pub node_agent: NodeAgentClientConfig,
    /// agent-sandbox: the label domains its claim controller accepts in
    /// `additionalPodMetadata.labels` (its allowlist, the file
    /// `/etc/sandbox-config/allowed-label-domains`; a subdomain matches). A
    /// `customize.labels` key outside them is refused at config load instead of every
    /// customised session being refused by the controller.
    pub allowed_label_domains: Vec<String>,
    /// A new session gets 503 `control_plane` once the Kubernetes API has failed (errors,
    /// refused connections, calls hanging) continuously this long, instead of waiting out
    /// its whole budget; single transient errors are retried.
    pub api_outage_after: Dur,
    /// How long a new session (or a resume) waits on a pod the scheduler reports
    /// Unschedulable for a node to free up or be added (cluster autoscaler) before 503
    /// `no_capacity`. 0: answer as soon as the scheduler says so.
    pub unschedulable_wait: Dur,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            api: KubernetesApi::AgentSandbox,
            namespace: None,
            pool: "default".into(),
            port: 8080,
            kubeconfig: None,
            claim_prefix: "sess-".into(),
            max_claims: 1000,
            write_session_id: false,
            activity_write_interval: Dur::secs(10),
            port_from_annotation: false,
            shutdown_after: Dur::secs(48 * 3600),
            lease_name: "agent-activator-autoscaler".into(),
            pause: PauseMode::Suspend,
            freeze_with_probes: false,
            node_agent: NodeAgentClientConfig::default(),
            allowed_label_domains: vec!["sandbox.users.io".into()],
            api_outage_after: Dur::secs(5),
            unschedulable_wait: Dur::secs(0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KubernetesApi {
    AgentSandbox,
    Openkruise,
}

/// `autoscaler.*`: the Agent Pod Autoscaler (KPA semantics).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoscalerConfig {
    /// Run the decision loop at all.
    pub enabled: bool,
    /// Apply decisions through the backend; when false they are only exported.
    pub apply: bool,
    /// `rps`, `concurrency` or `session`.
    pub metric: ScalingMetric,
    /// Per-sandbox target of `metric`.
    pub target: f64,
    /// Percentage of `target` aimed for (70 = scale before sandboxes are full).
    pub target_utilization_percentage: f64,
    /// Averaging window of the stable mode.
    pub stable_window: Dur,
    /// How the one-second buckets of a window are averaged: `linear` (plain mean) or
    /// `weighted-exponential` (newer buckets weigh more; Knative's
    /// `metric-aggregation-algorithm`).
    pub metric_aggregation: MetricAggregation,
    /// Panic window as a percentage of the stable window.
    pub panic_window_percentage: f64,
    /// Panic when the panic-window desired count reaches this percentage of ready sandboxes.
    pub panic_threshold_percentage: f64,
    /// How often a decision is made.
    pub tick_interval: Dur,
    /// At most this factor more sandboxes than are ready, per decision.
    pub max_scale_up_rate: f64,
    /// At most this factor fewer sandboxes than are ready, per decision.
    pub max_scale_down_rate: f64,
    /// Never fewer sandboxes than this.
    pub min_scale: u32,
    /// Never more sandboxes than this; 0 = unlimited.
    pub max_scale: u32,
    /// Sandboxes wanted at start until that many were ready once (or one stable window
    /// passed).
    pub initial_scale: u32,
    /// A scale-down is applied only after the lower count held this long.
    pub scale_down_delay: Dur,
    /// Time at zero demand before the last sandbox is let go.
    pub scale_to_zero_grace: Dur,
    /// Coming up from zero, start with at least this many sandboxes (Knative
    /// `activation-scale`).
    pub activation_scale: u32,
    /// Other activator replicas' admin addresses (`host:port`) whose `/api/stats` the
    /// leader collects and sums. Every address a name resolves to is scraped, so a
    /// headless Service name covers all replicas; the leader skips itself.
    pub peers: Vec<String>,
    /// Bound on fetching one peer's `/api/stats`.
    pub peer_timeout: Dur,
    /// Kubernetes leader election: a leader that has not renewed the Lease for this long
    /// is replaced. It stops deciding after two thirds of it without a renewal, so two
    /// leaders never act at once.
    pub lease_duration: Dur,
}

impl Default for AutoscalerConfig {
    fn default() -> Self {
        AutoscalerConfig {
            enabled: true,
            apply: false,
            metric: ScalingMetric::Session,
            target: 1.0,
            target_utilization_percentage: 70.0,
            stable_window: Dur::secs(60),
            metric_aggregation: MetricAggregation::Linear,
            panic_window_percentage: 10.0,
            panic_threshold_percentage: 200.0,
            tick_interval: Dur::secs(2),
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            min_scale: 0,
            max_scale: 0,
            initial_scale: 1,
            scale_down_delay: Dur::secs(0),
            scale_to_zero_grace: Dur::secs(30),
            activation_scale: 1,
            peers: Vec::new(),
            peer_timeout: Dur::secs(1),
            lease_duration: Dur::secs(15),
        }
    }
}

/// `autoscaler.metric_aggregation`: how a window's buckets are averaged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MetricAggregation {
    /// The plain mean of the window's buckets.
    #[default]
    Linear,
    /// Knative's exponentially weighted average: the newest bucket weighs most, weights
    /// decay so that the whole window carries 99.99 % of the weight.
    WeightedExponential,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScalingMetric {
    Rps,
    Concurrency,
    Session,
}

/// One entry of `schedules`: a request sent through the activator on a cron schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub name: String,
    /// Cron expression with seconds: `sec min hour day-of-month month day-of-week`.
    pub cron: String,
    /// IANA time zone, e.g. `Europe/Berlin`; default UTC.
    #[serde(default = "default_tz")]
    pub timezone: String,
    pub session: String,
    #[serde(default = "default_method")]
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: Option<String>,
}

fn default_tz() -> String {
    "UTC".into()
}

fn default_method() -> String {
    "POST".into()
}

// === impl Config ===

impl Config {
    /// Parses and validates native YAML text; errors name the key path. (A file that may
    /// be a Knative Service manifest is read by `crate::loader`, one floor up.)
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let config: Config = deserialize_with_path(de)?;
        if !config.pools.is_empty() && top_level_backend(text) {
            return Err(ConfigError::invalid(
                "backend",
                "with pools, each pool has its own backend (pools[].backend); \
                 remove the top-level backend section",
            ));
        }
        config.validate()?;
        Ok(config)
    }

    /// The idle policy in force for a backend that can (or cannot) pause.
    pub fn effective_idle_policy(&self, backend_can_pause: bool) -> IdlePolicy {
        match self.idle.policy {
            Some(p) => p,
            None if backend_can_pause && self.session.max_sessions_per_sandbox == 1 => {
                IdlePolicy::Pause
            }
            None => IdlePolicy::Release,
        }
    }
}

/// Whether the document's top level has a `backend` key (its `BackendConfig` has
/// defaults, so the parsed value cannot tell).
fn top_level_backend(text: &str) -> bool {
    serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text)
        .ok()
        .is_some_and(|doc| doc.get("backend").is_some())
}

/// Deserializes with `serde_path_to_error` so the error names the key path.
pub fn deserialize_with_path<'de, T, D>(de: D) -> Result<T, ConfigError>
where
    T: Deserialize<'de>,
    D: Deserializer<'de>,
    D::Error: std::fmt::Display,
{
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." || path.is_empty() {
            "(top level)".to_string()
        } else {
            path
        };
        // serde_yaml_ng prefixes its own messages with the path; say it once.
        let inner = e.inner().to_string();
        let message = inner
            .strip_prefix(&format!("{key}: "))
            .map(str::to_owned)
            .unwrap_or(inner);
        ConfigError::invalid(key, message)
    })
}

#[cfg(test)]
mod tests;
