//! `Config::validate`: checks values that parse but make no sense together.

use std::time::Duration;

use super::{BackendKind, Config, ConfigError, IdlePolicy, KubernetesApi, SessionSource};

impl Config {
    /// Checks values that parse but make no sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.telemetry.validate()?;
        self.customize.validate("customize")?;
        let s = &self.session;
        if s.sources.is_empty() {
            return Err(ConfigError::invalid(
                "session.sources",
                "at least one source is required",
            ));
        }
        for (i, src) in s.sources.iter().enumerate() {
            let (kind, value) = match src {
                SessionSource::Header(v) => ("header", v),
                SessionSource::Cookie(v) => ("cookie", v),
                SessionSource::PathPrefix(v) => ("path_prefix", v),
                SessionSource::Query(v) => ("query", v),
            };
            let key = format!("session.sources[{i}].{kind}");
            if value.is_empty() {
                return Err(ConfigError::invalid(key, "must not be empty"));
            }
            if let SessionSource::Header(h) = src
                && http::HeaderName::from_bytes(h.as_bytes()).is_err()
            {
                return Err(ConfigError::invalid(key, "not a valid header name"));
            }
            if let SessionSource::PathPrefix(p) = src
                && (!p.starts_with('/') || !p.ends_with('/'))
            {
                return Err(ConfigError::invalid(
                    key,
                    "must start and end with '/', e.g. /s/",
                ));
            }
        }
        self.validate_session_security()?;
        if s.max_id_length == 0 || s.max_id_length > 4096 {
            return Err(ConfigError::invalid(
                "session.max_id_length",
                "must be between 1 and 4096",
            ));
        }
        if s.max_sessions_per_sandbox == 0 {
            return Err(ConfigError::invalid(
                "session.max_sessions_per_sandbox",
                "must be at least 1",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::invalid(
                "log.level",
                format!("not a tracing filter directive: {e}"),
            ));
        }
        for (i, h) in self.proxy.strip_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(ConfigError::invalid(
                    format!("proxy.strip_headers[{i}]"),
                    "not a valid header name",
                ));
            }
        }
        for (key, d) in [
            ("proxy.request_timeout", self.proxy.request_timeout),
            ("proxy.connect_timeout", self.proxy.connect_timeout),
            ("session.admission_timeout", s.admission_timeout),
            ("idle.sweep_interval", self.idle.sweep_interval),
            ("activation.timeout", self.activation.timeout),
            ("autoscaler.tick_interval", self.autoscaler.tick_interval),
        ] {
            if d.is_zero() {
                return Err(ConfigError::invalid(key, "must be greater than 0s"));
            }
        }
        if !self.idle.deep_after.is_zero() {
            if self.idle.deep_after >= self.idle.session_ttl {
                return Err(ConfigError::invalid(
                    "idle.deep_after",
                    "must be shorter than idle.session_ttl (a paused session is released \
                     then: there is no deeper tier after it)",
                ));
            }
            if matches!(
                self.idle.policy,
                Some(IdlePolicy::Release) | Some(IdlePolicy::Keep)
            ) {
                return Err(ConfigError::invalid(
                    "idle.deep_after",
                    "applies to paused sessions: needs idle.policy pause (or unset)",
                ));
            }
        }
        if self.activation.max_queued_per_session == 0 {
            return Err(ConfigError::invalid(
                "activation.max_queued_per_session",
                "must be at least 1",
            ));
        }
        if self.activation.max_queued_total < self.activation.max_queued_per_session {
            return Err(ConfigError::invalid(
                "activation.max_queued_total",
                "must be at least activation.max_queued_per_session",
            ));
        }
        self.validate_connections()?;
        self.validate_admin()?;
        if self.pools.is_empty() {
            self.validate_backend()?;
            self.validate_autoscaler()?;
            self.validate_idle()?;
            self.validate_preview_hooks("")?;
        } else {
            // Each pool's backend, autoscaler and idle, over the top-level defaults.
            self.validate_pools()?;
        }
        if !self.schedules.is_empty() && self.tls.is_some() {
            return Err(ConfigError::invalid(
                "schedules",
                "scheduled requests are sent over plain HTTP to the proxy listener, \
                 which serves TLS here (tls.*); not supported yet",
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, sched) in self.schedules.iter().enumerate() {
            if !names.insert(sched.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("schedules[{i}].name"),
                    format!(
                        "{:?} is used twice; names key the last fired tick",
                        sched.name
                    ),
                ));
            }
            sched.validate(i, self.session.max_id_length)?;
        }
        if let Some(agent) = &self.node_agent {
            agent.validate()?;
        }
        Ok(())
    }

    /// `idle.*` as one pool sees it.
    pub(super) fn validate_idle(&self) -> Result<(), ConfigError> {
        if self.idle.timeout.is_zero() {
            return Err(ConfigError::invalid(
                "idle.timeout",
                "must be greater than 0s",
            ));
        }
        if self.session.max_sessions_per_sandbox > 1 && self.idle.policy == Some(IdlePolicy::Pause)
        {
            return Err(ConfigError::invalid(
                "idle.policy",
                "pause needs exclusive sandboxes (session.max_sessions_per_sandbox: 1)",
            ));
        }
        Ok(())
    }

    fn validate_connections(&self) -> Result<(), ConfigError> {
        let p = &self.proxy;
        for (key, d) in [
            ("proxy.client_header_timeout", p.client_header_timeout),
            ("proxy.idle_timeout", p.idle_timeout),
            ("proxy.body_timeout", p.body_timeout),
            ("proxy.tunnel_idle_timeout", p.tunnel_idle_timeout),
            ("proxy.drain_timeout", p.drain_timeout),
            ("proxy.http2_keepalive_timeout", p.http2_keepalive_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::invalid(key, "must be greater than 0s"));
            }
        }
        if p.max_connections == 0 {
            return Err(ConfigError::invalid(
                "proxy.max_connections",
                "must be at least 1",
            ));
        }
        // hyper refuses a read buffer below 8 KiB (it asserts); 1 MiB is far beyond any
        // browser's or agent's need and bounds the memory one connection can pin.
        if !(8 * 1024..=1024 * 1024).contains(&p.max_header_bytes) {
            return Err(ConfigError::invalid(
                "proxy.max_header_bytes",
                "must be between 8192 and 1048576",
            ));
        }
        if p.max_body_bytes == Some(0) {
            return Err(ConfigError::invalid(
                "proxy.max_body_bytes",
                "must be at least 1 (leave it unset for no limit)",
            ));
        }
        if p.http2_max_concurrent_streams == 0 {
            return Err(ConfigError::invalid(
                "proxy.http2_max_concurrent_streams",
                "must be at least 1",
            ));
        }
        for (i, u) in p.allowed_upgrades.iter().enumerate() {
            if u.is_empty() || !u.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
                return Err(ConfigError::invalid(
                    format!("proxy.allowed_upgrades[{i}]"),
                    "must be a protocol token such as websocket",
                ));
            }
            if u.eq_ignore_ascii_case("h2c") {
                return Err(ConfigError::invalid(
                    format!("proxy.allowed_upgrades[{i}]"),
                    "h2c cannot be relayed: it would turn the connection into a raw tunnel \
                     that skips header rules and the access log",
                ));
            }
        }
        for (i, cidr) in p.trusted_proxies.iter().enumerate() {
            if crate::cidr::parse_cidr(cidr).is_none() {
                return Err(ConfigError::invalid(
                    format!("proxy.trusted_proxies[{i}]"),
                    format!("{cidr:?} is not an address or CIDR such as 10.0.0.0/8"),
                ));
            }
        }
        Ok(())
    }

    fn validate_admin(&self) -> Result<(), ConfigError> {
        let a = &self.admin;
        for (i, path) in a.public_paths.iter().enumerate() {
            if !path.starts_with('/') {
                return Err(ConfigError::invalid(
                    format!("admin.public_paths[{i}]"),
                    "must start with '/'",
                ));
            }
        }
        match &a.auth.bearer_token_file {
            // Read at start (the file is usually a mounted Secret `check` cannot see).
            Some(file) if file.as_os_str().is_empty() => {
                return Err(ConfigError::invalid(
                    "admin.auth.bearer_token_file",
                    "must name a file",
                ));
            }
            Some(_) => {}
            None if !self.admin_listen.ip().is_loopback() && !a.allow_unauthenticated => {
                return Err(ConfigError::invalid(
                    "admin_listen",
                    format!(
                        "{} is reachable from other hosts but admin.auth.bearer_token_file \
                         is not set; set it, or admin.allow_unauthenticated: true if a \
                         network policy guards the port",
                        self.admin_listen
                    ),
                ));
            }
            None => {}
        }
        Ok(())
    }

    /// Whether this file configures only the node agent: a `node_agent` section and the
    /// default static backend without endpoints. `serve` refuses such a file.
    pub fn is_node_agent_only(&self) -> bool {
        self.node_agent.is_some()
            && self.pools.is_empty()
            && self.backend.kind == BackendKind::Static
            && self.backend.endpoints.is_empty()
    }

    pub(super) fn validate_backend(&self) -> Result<(), ConfigError> {
        let b = &self.backend;
        match b.kind {
            BackendKind::Static => {
                // A file with only a `node_agent` section configures the node agent alone.
                if b.endpoints.is_empty() && !self.is_node_agent_only() {
                    return Err(ConfigError::invalid(
                        "backend.endpoints",
                        "kind: static needs at least one endpoint",
                    ));
                }
                if !self.customize.is_empty() {
                    return Err(ConfigError::invalid(
                        "customize",
                        "kind: static cannot customise sandboxes (they already run); use \
                         kind: process or kubernetes",
                    ));
                }
                for (i, e) in b.endpoints.iter().enumerate() {
                    if e.parse::<http::uri::Authority>().is_err() || !e.contains(':') {
                        return Err(ConfigError::invalid(
                            format!("backend.endpoints[{i}]"),
                            format!("{e:?} is not host:port"),
                        ));
                    }
                }
                if self.idle.policy == Some(IdlePolicy::Pause) {
                    return Err(ConfigError::invalid(
                        "idle.policy",
                        "the static backend cannot pause; use release or keep",
                    ));
                }
            }
            BackendKind::Process => {
                if self.customize.sidecars.is_some() {
                    return Err(ConfigError::invalid(
                        "customize.sidecars",
                        "the process backend has no sidecars (OpenKruise runtimes or an \
                         agent-sandbox template variant): kind: kubernetes only",
                    ));
                }
                if b.command.is_empty() {
                    return Err(ConfigError::invalid(
                        "backend.command",
                        "kind: process needs an argv list",
                    ));
                }
                if !b.command.iter().any(|a| a.contains("{port}")) {
                    return Err(ConfigError::invalid(
                        "backend.command",
                        "no argument contains the {port} placeholder",
                    ));
                }
                if !b.ready_path.starts_with('/') {
                    return Err(ConfigError::invalid(
                        "backend.ready_path",
                        "must start with '/'",
                    ));
                }
                if b.memory_max.is_some_and(|m| m != 0 && m < 1 << 20) {
                    return Err(ConfigError::invalid(
                        "backend.memory_max",
                        "must be 0 (no limit) or at least 1Mi (a sandbox cannot start in less)",
                    ));
                }
                if b.pids_max.is_some_and(|p| p != 0 && p < 4) {
                    return Err(ConfigError::invalid(
                        "backend.pids_max",
                        "must be 0 (no limit) or at least 4 (an isolated sandbox is pasta, \
                         bubblewrap, its init and the command)",
                    ));
                }
                if b.cpu_weight.is_some_and(|w| w > 10_000) {
                    return Err(ConfigError::invalid(
                        "backend.cpu_weight",
                        "must be between 1 and 10000 (cgroup v2 cpu.weight; 100 is the \
                         default), or 0 to leave it unset",
                    ));
                }
                if b.expose_ports.len() > 16 {
                    return Err(ConfigError::invalid(
                        "backend.expose_ports",
                        "at most 16 ports per sandbox",
                    ));
                }
                for (i, p) in b.expose_ports.iter().enumerate() {
                    if *p == 0 || b.expose_ports[..i].contains(p) {
                        return Err(ConfigError::invalid(
                            format!("backend.expose_ports[{i}]"),
                            "must be a port number (1-65535) listed once",
                        ));
                    }
                }
                for (i, p) in b.ro_paths.iter().enumerate() {
                    if !p.is_absolute() {
                        return Err(ConfigError::invalid(
                            format!("backend.ro_paths[{i}]"),
                            "must be an absolute path",
                        ));
                    }
                }
                if b.max_sandboxes != 0 && b.warm_pool > b.max_sandboxes {
                    return Err(ConfigError::invalid(
                        "backend.warm_pool",
                        "must not exceed backend.max_sandboxes",
                    ));
                }
            }
            BackendKind::Kubernetes => {
                self.validate_label_domains()?;
                if b.kubernetes.api_outage_after.as_duration().is_zero() {
                    return Err(ConfigError::invalid(
                        "backend.kubernetes.api_outage_after",
                        "must be greater than 0",
                    ));
                }
                for (name, set) in self.customize.sidecars.iter().flat_map(|s| &s.sets) {
                    let key = format!("customize.sidecars.sets.{name}");
                    match b.kubernetes.api {
                        KubernetesApi::AgentSandbox if set.warm_pool.is_none() => {
                            return Err(ConfigError::invalid(
                                format!("{key}.warm_pool"),
                                "api: agent-sandbox selects sidecars by template variant: \
                                 name the SandboxWarmPool whose template has them",
                            ));
                        }
                        KubernetesApi::Openkruise if set.runtimes.is_empty() => {
                            return Err(ConfigError::invalid(
                                format!("{key}.runtimes"),
                                "api: openkruise injects sidecars as runtimes: list at least one",
                            ));
                        }
                        _ => {}
                    }
                }
                if b.kubernetes.pool.is_empty() {
                    return Err(ConfigError::invalid(
                        "backend.kubernetes.pool",
                        "must name a SandboxWarmPool / SandboxSet",
                    ));
                }
                if b.kubernetes.port == 0 {
                    return Err(ConfigError::invalid(
                        "backend.kubernetes.port",
                        "must be a TCP port",
                    ));
                }
                if b.kubernetes.activity_write_interval.as_duration()
                    >= self.idle.timeout.as_duration()
                {
                    return Err(ConfigError::invalid(
                        "backend.kubernetes.activity_write_interval",
                        "must be shorter than idle.timeout, or a busy replica's digest \
                         could look idle to the others",
                    ));
                }
                let after = b.kubernetes.shutdown_after.as_duration();
                if after < std::time::Duration::from_secs(2)
                    || after <= self.idle.session_ttl.as_duration()
                {
                    return Err(ConfigError::invalid(
                        "backend.kubernetes.shutdown_after",
                        "must be at least 2s and longer than idle.session_ttl, or the \
                         cluster would end sessions the activator still keeps",
                    ));
                }
                if b.kubernetes.pause == super::PauseMode::Freeze {
                    let a = &b.kubernetes.node_agent;
                    if a.namespace.is_empty() || a.selector.is_empty() {
                        return Err(ConfigError::invalid(
                            "backend.kubernetes.node_agent.selector",
                            "pause: freeze needs the node agent's namespace and label selector",
                        ));
                    }
                    if a.port == 0 {
                        return Err(ConfigError::invalid(
                            "backend.kubernetes.node_agent.port",
                            "must be a TCP port",
                        ));
                    }
                    if a.timeout.is_zero() {
                        return Err(ConfigError::invalid(
                            "backend.kubernetes.node_agent.timeout",
                            "must be greater than 0",
                        ));
                    }
                }
                if b.kubernetes.claim_prefix.len() > 30
                    || !b
                        .kubernetes
                        .claim_prefix
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    || b.kubernetes.claim_prefix.starts_with('-')
                {
                    return Err(ConfigError::invalid(
                        "backend.kubernetes.claim_prefix",
                        "must be at most 30 characters of a-z, 0-9 and '-', not starting \
                         with '-' (claim names are DNS labels)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// agent-sandbox's claim controller accepts a label in `additionalPodMetadata` only if
    /// its key has a domain prefix equal to, or a subdomain of, an allowlisted domain
    /// (kubernetes-sigs/agent-sandbox 2fd412d55eca extensions/controllers/
    /// sandboxclaim_controller.go `validateAdditionalPodMetadata`; the list is read,
    /// lowercased, by cmd/agent-sandbox-controller/main.go). Refuse here what it would refuse
    /// for every customised session.
    fn validate_label_domains(&self) -> Result<(), ConfigError> {
        let k = &self.backend.kubernetes;
        let key = "backend.kubernetes.allowed_label_domains";
        for d in &k.allowed_label_domains {
            let valid = !d.is_empty()
                && d.len() <= 253
                && d.split('.').all(|part| {
                    !part.is_empty()
                        && part
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                        && !part.starts_with('-')
                        && !part.ends_with('-')
                });
            if !valid {
                return Err(ConfigError::invalid(
                    key,
                    format!("{d:?} is not a lowercase DNS domain"),
                ));
            }
        }
        if k.api != KubernetesApi::AgentSandbox {
            return Ok(());
        }
        for (i, rule) in self.customize.labels.iter().enumerate() {
            let Some((domain, _)) = rule.label.split_once('/') else {
                return Err(ConfigError::invalid(
                    format!("customize.labels[{i}].label"),
                    format!(
                        "agent-sandbox's claim controller refuses a label without a domain \
                         prefix ({:?}); use one in {key}",
                        rule.label
                    ),
                ));
            };
            let domain = domain.to_ascii_lowercase();
            let allowed = k
                .allowed_label_domains
                .iter()
                .any(|d| domain == *d || domain.ends_with(&format!(".{d}")));
            if !allowed {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "customize.labels[{i}].label {:?}: the domain {domain:?} is not in \
                         {:?}, so agent-sandbox's claim controller would refuse every \
                         customised session (InvalidMetadata); add it here and to the \
                         controller's allowed-label-domains",
                        rule.label, k.allowed_label_domains
                    ),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn validate_autoscaler(&self) -> Result<(), ConfigError> {
        let a = &self.autoscaler;
        if a.target.is_nan() || a.target <= 0.0 {
            return Err(ConfigError::invalid("autoscaler.target", "must be > 0"));
        }
        if !(a.target_utilization_percentage > 0.0 && a.target_utilization_percentage <= 100.0) {
            return Err(ConfigError::invalid(
                "autoscaler.target_utilization_percentage",
                "must be in (0, 100]",
            ));
        }
        if !(a.panic_window_percentage > 0.0 && a.panic_window_percentage <= 100.0) {
            return Err(ConfigError::invalid(
                "autoscaler.panic_window_percentage",
                "must be in (0, 100]",
            ));
        }
        if a.panic_threshold_percentage < 110.0 {
            return Err(ConfigError::invalid(
                "autoscaler.panic_threshold_percentage",
                "must be at least 110",
            ));
        }
        if a.max_scale_up_rate <= 1.0 {
            return Err(ConfigError::invalid(
                "autoscaler.max_scale_up_rate",
                "must be > 1",
            ));
        }
        if a.max_scale_down_rate <= 1.0 {
            return Err(ConfigError::invalid(
                "autoscaler.max_scale_down_rate",
                "must be > 1",
            ));
        }
        if a.max_scale != 0 && a.min_scale > a.max_scale {
            return Err(ConfigError::invalid(
                "autoscaler.min_scale",
                "must not exceed autoscaler.max_scale",
            ));
        }
        if a.apply && self.backend.kind == BackendKind::Static {
            return Err(ConfigError::invalid(
                "autoscaler.apply",
                "the static backend has a fixed set of sandboxes; use apply: false",
            ));
        }
        if a.activation_scale == 0 {
            return Err(ConfigError::invalid(
                "autoscaler.activation_scale",
                "must be at least 1",
            ));
        }
        if a.peer_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "autoscaler.peer_timeout",
                "must be greater than 0s",
            ));
        }
        if a.lease_duration.as_duration() < Duration::from_secs(3) {
            return Err(ConfigError::invalid(
                "autoscaler.lease_duration",
                "must be at least 3s",
            ));
        }
        for (i, peer) in a.peers.iter().enumerate() {
            if peer.parse::<http::uri::Authority>().is_err() || peer.rsplit_once(':').is_none() {
                return Err(ConfigError::invalid(
                    format!("autoscaler.peers[{i}]"),
                    format!("{peer:?} is not host:port"),
                ));
            }
        }
        if a.stable_window.as_duration() < Duration::from_secs(6) {
            return Err(ConfigError::invalid(
                "autoscaler.stable_window",
                "must be at least 6s",
            ));
        }
        Ok(())
    }
}
