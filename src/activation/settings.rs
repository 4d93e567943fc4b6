//! `Settings`: the configuration the activation layer reads, resolved once.

use std::time::Duration;

use crate::config::{Config, CustomizeConfig, IdlePolicy, OnSandboxLoss, SessionIdLogging};
use crate::customize::Customizer;

/// The configuration the activation layer reads, resolved once.
pub(crate) struct Settings {
    pub activation_timeout: Duration,
    pub admission_timeout: Duration,
    pub idle_timeout: Duration,
    pub session_ttl: Duration,
    /// `idle.deep_after` (zero: no deep tier).
    pub deep_after: Duration,
    pub sweep_interval: Duration,
    pub idle_policy: IdlePolicy,
    pub on_loss: OnSandboxLoss,
    pub full_ids: bool,
    pub can_pause: bool,
    /// Shortest interval between two `record_activity` calls for one session.
    pub activity_report_interval: Duration,
    /// `customize`: what a new session's headers may ask of its sandbox.
    pub customizer: Customizer,
}

impl Settings {
    pub(crate) fn new(config: &Config, can_pause: bool) -> Settings {
        let mut idle_policy = config.effective_idle_policy(can_pause);
        if idle_policy == IdlePolicy::Pause && !can_pause {
            tracing::warn!(
                "idle.policy: pause is not supported by this backend; idle sessions are released"
            );
            idle_policy = IdlePolicy::Release;
        }
        Settings {
            activation_timeout: config.activation.timeout.into(),
            admission_timeout: config.session.admission_timeout.into(),
            idle_timeout: config.idle.timeout.into(),
            session_ttl: config.idle.session_ttl.into(),
            deep_after: config.idle.deep_after.into(),
            sweep_interval: config.idle.sweep_interval.into(),
            idle_policy,
            on_loss: config.activation.on_sandbox_loss,
            full_ids: config.log.session_ids == SessionIdLogging::Full,
            can_pause,
            activity_report_interval: Duration::from_secs(1),
            customizer: customizer(&config.customize),
        }
    }
}

/// Compiles `customize`. `Config::validate` has compiled it already, so this fails only
/// for a configuration built in code without validation: then nothing is customised and
/// the error is logged (a refusal of every session would be worse).
fn customizer(config: &CustomizeConfig) -> Customizer {
    Customizer::new(config, "customize").unwrap_or_else(|e| {
        tracing::error!(error = %e, "customize: invalid, sessions are not customised");
        Customizer::new(&CustomizeConfig::default(), "customize")
            .unwrap_or_else(|_| unreachable!("the empty customize section compiles"))
    })
}
