//! `Flavour`: one activator, two sandbox APIs. Typed views over `DynamicObject`s and the
//! bodies of the few writes the activator makes.

use std::net::IpAddr;

use kube::api::{ApiResource, DynamicObject};
use serde_json::{Value, json};

use super::crd::{agent_sandbox as asb, condition, is_true, openkruise as okr};
use crate::config::{KubernetesApi, VolumeRule};
use crate::customize::ClaimSpec;
use crate::session::SessionKey;

/// Annotation that overrides `backend.kubernetes.port` for one sandbox, honoured only with
/// `backend.kubernetes.port_from_annotation: true`: anyone who can annotate a Sandbox
/// could otherwise steer traffic. Only the test double (kube-testbed) sets it.
pub const PORT_ANNOTATION: &str = "agent-activator.dev/port";

/// Which sandbox API the cluster speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    AgentSandbox,
    OpenKruise,
}

/// Which object carries a session's leak backstop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownTarget {
    Claim,
    Sandbox,
}

/// A Go duration meaning "never" for OpenKruise's `ttlAfterCompleted`.
pub const NEVER: &str = "-1s";

/// OpenKruise's claim-controller timeouts, from the activator's own budgets: upstream's
/// defaults (`waitReadyTimeout` 30s, `claimTimeout` 1m, openkruise/agents 0b72c83ae0bc
/// `api/v1alpha1/sandboxclaim_types.go` `+kubebuilder:default`) would kill and retry a
/// slow cold start underneath `activation.timeout`, or give up before the session does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimTimeouts {
    /// `waitReadyTimeout`: a new Sandbox's start (`activation.timeout`).
    pub wait_ready: std::time::Duration,
    /// `claimTimeout`: the whole claim (`session.admission_timeout` +
    /// `activation.timeout`).
    pub claim: std::time::Duration,
}

/// A Go duration string in whole seconds, rounded up, at least `1s` (both fields are
/// validated `>= 1s` upstream).
fn go_seconds(d: std::time::Duration) -> String {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    format!("{}s", secs.max(1))
}

/// What the activator needs to know about one Sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SandboxView {
    /// Ready for traffic: agent-sandbox Ready=True for the current generation with a pod
    /// IP; OpenKruise phase Running, Ready=True with a pod IP. Never while suspended.
    pub ready: bool,
    pub pod_ip: Option<IpAddr>,
    /// The spec asks for suspension (`operatingMode: Suspended` / `paused: true`).
    pub spec_paused: bool,
    /// The suspension is complete: the pod is gone (agent-sandbox `Suspended=True`
    /// reason `PodTerminated`, or no pod IP left; OpenKruise `SandboxPaused=True` or no
    /// pod IP left).
    pub pause_done: bool,
    /// agent-sandbox `PodScheduled=False` reason `Unschedulable`: no node has room.
    pub unschedulable: bool,
    /// The pod reached a terminal phase (agent-sandbox `Finished=True`, OpenKruise phase
    /// Failed/Succeeded): the session's state is gone.
    pub finished: bool,
    /// [`PORT_ANNOTATION`], when set.
    pub port_override: Option<u16>,
    /// Still an unclaimed warm-pool member.
    pub warm: bool,
    /// Being deleted.
    pub deleting: bool,
    /// [`super::freeze::FROZEN_ANNOTATION`]: the UID of the pod the node agent froze
    /// (`pause: freeze`). A frozen pod keeps its IP but takes no traffic until thawed.
    pub frozen: Option<String>,
    /// The claim this Sandbox belongs to: agent-sandbox its controller ownerReference
    /// (kind SandboxClaim), OpenKruise the `claim-name` label.
    pub claim: Option<String>,
    /// That claim's UID: the ownerReference's, or OpenKruise's `agents.kruise.io/owner`.
    pub claim_uid: Option<String>,
}

impl SandboxView {
    /// Ready to take traffic, not asked to suspend and not frozen.
    pub fn serving(&self) -> Option<IpAddr> {
        if self.ready && !self.spec_paused && !self.deleting && self.frozen.is_none() {
            self.pod_ip
        } else {
            None
        }
    }
}

impl Flavour {
    pub fn from_config(api: KubernetesApi) -> Flavour {
        match api {
            KubernetesApi::AgentSandbox => Flavour::AgentSandbox,
            KubernetesApi::Openkruise => Flavour::OpenKruise,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Flavour::AgentSandbox => "agent-sandbox",
            Flavour::OpenKruise => "openkruise",
        }
    }

    pub fn sandbox_resource(self) -> ApiResource {
        match self {
            Flavour::AgentSandbox => ApiResource::erase::<asb::Sandbox>(&()),
            Flavour::OpenKruise => ApiResource::erase::<okr::Sandbox>(&()),
        }
    }

    pub fn claim_resource(self) -> ApiResource {
        match self {
            Flavour::AgentSandbox => ApiResource::erase::<asb::SandboxClaim>(&()),
            Flavour::OpenKruise => ApiResource::erase::<okr::SandboxClaim>(&()),
        }
    }

    /// SandboxWarmPool / SandboxSet.
    pub fn pool_resource(self) -> ApiResource {
        match self {
            Flavour::AgentSandbox => ApiResource::erase::<asb::SandboxWarmPool>(&()),
            Flavour::OpenKruise => ApiResource::erase::<okr::SandboxSet>(&()),
        }
    }

    /// The body of a new claim on `pool` for `session`, carrying its customisation.
    /// `shutdown_time` (RFC 3339) is the leak backstop: past it the controllers delete the
    /// claim (agent-sandbox, policy Delete) or the Sandbox (OpenKruise) even if no
    /// activator is left to release it.
    ///
    /// Customisation, field by field (agent-sandbox `extensions/api/v1beta1/
    /// sandboxclaim_types.go` @2fd412d; OpenKruise `api/v1alpha1/sandboxclaim_types.go`,
    /// `mount_types.go`, `sandbox_types.go` @0b72c83):
    /// - env: `env[{name, value, containerName}]` / `envVars{name: value}`;
    /// - volumes: `volumeClaimTemplates[{metadata.name: <volume>, spec}]` (the controller
    ///   names the PVC `<volume>-<sandbox>`, the sandbox being named after the session's
    ///   claim, and mounts it as pod volume `<volume>`: the template's container must mount
    ///   that name) / `dynamicVolumesMount[{pvName: <volume>-<session hash>, mountPath}]`;
    /// - labels: `additionalPodMetadata.labels` / `labels`;
    /// - sidecars: the set's `warm_pool` as `warmPoolRef.name` (a template variant) /
    ///   `runtimes[{name}]`.
    pub fn claim_spec(
        self,
        pool: &str,
        shutdown_time: &str,
        custom: &ClaimSpec,
        session: &SessionKey,
        timeouts: ClaimTimeouts,
    ) -> Value {
        let sidecars = custom.sidecars.as_ref().map(|s| &s.set);
        let spec = match self {
            Flavour::AgentSandbox => serde_json::to_value(asb::SandboxClaimSpec {
                warm_pool_ref: asb::NameRef {
                    name: sidecars
                        .and_then(|s| s.warm_pool.clone())
                        .unwrap_or_else(|| pool.into()),
                },
                lifecycle: Some(asb::Lifecycle {
                    shutdown_time: Some(shutdown_time.into()),
                    ttl_seconds_after_finished: None,
                    shutdown_policy: Some("Delete".into()),
                }),
                additional_pod_metadata: asb::PodMetadata {
                    labels: custom.labels.clone(),
                    annotations: Default::default(),
                },
                env: custom
                    .env
                    .iter()
                    .map(|e| asb::EnvVar {
                        name: e.name.clone(),
                        value: e.value.clone(),
                        container_name: e.container_name.clone(),
                    })
                    .collect(),
                volume_claim_templates: custom.volumes.iter().map(volume_claim_template).collect(),
            }),
            Flavour::OpenKruise => serde_json::to_value(okr::SandboxClaimSpec {
                template_name: pool.into(),
                create_on_no_stock: Some(true),
                wait_ready_timeout: Some(go_seconds(timeouts.wait_ready)),
                claim_timeout: Some(go_seconds(timeouts.claim)),
                shutdown_time: Some(shutdown_time.into()),
                // The default (60m) deletes the claim of a live session after an hour;
                // negative means never (api/v1alpha1/sandboxclaim_types.go).
                ttl_after_completed: Some(NEVER.into()),
                labels: custom.labels.clone(),
                env_vars: custom
                    .env
                    .iter()
                    .map(|e| (e.name.clone(), e.value.clone()))
                    .collect(),
                dynamic_volumes_mount: custom
                    .volumes
                    .iter()
                    .map(|v| okr::CsiMountConfig {
                        pv_name: ClaimSpec::volume_name(v, session),
                        mount_path: v.mount_path.clone(),
                        attributes: v.attributes.clone(),
                    })
                    .collect(),
                runtimes: sidecars
                    .map(|s| {
                        s.runtimes
                            .iter()
                            .map(|name| okr::RuntimeConfig { name: name.clone() })
                            .collect()
                    })
                    .unwrap_or_default(),
                ..okr::SandboxClaimSpec::default()
            }),
        };
        spec.expect("claim specs serialize")
    }

    /// The patch that moves the leak backstop of a live session to `shutdown_time`, and
    /// which object it goes to: agent-sandbox the claim (`spec.lifecycle.shutdownTime`,
    /// read on every reconcile), OpenKruise the Sandbox (`spec.shutdownTime`: a Completed
    /// claim no longer manages its Sandbox, so moving the claim's field would do nothing).
    pub fn shutdown_patch(self, shutdown_time: &str) -> (ShutdownTarget, Value) {
        match self {
            Flavour::AgentSandbox => (
                ShutdownTarget::Claim,
                json!({"spec": {"lifecycle": {"shutdownTime": shutdown_time}}}),
            ),
            Flavour::OpenKruise => (
                ShutdownTarget::Sandbox,
                json!({"spec": {"shutdownTime": shutdown_time}}),
            ),
        }
    }

    /// The leak backstop currently set for a session: on the claim or on the Sandbox.
    pub fn shutdown_time(
        self,
        claim: &DynamicObject,
        sandbox: Option<&DynamicObject>,
    ) -> Option<String> {
        let v = match self {
            Flavour::AgentSandbox => &claim.data["spec"]["lifecycle"]["shutdownTime"],
            Flavour::OpenKruise => &sandbox?.data["spec"]["shutdownTime"],
        };
        v.as_str().map(str::to_owned)
    }

    /// agent-sandbox: the Sandbox named in the claim's `status.sandbox.name`, written by
    /// the controller only once adoption completed. (The `agents.x-k8s.io/sandbox-name`
    /// annotation is written before adoption and may name a Sandbox another claim wins:
    /// never read.) OpenKruise claims never name their Sandbox: `None`.
    pub fn claim_sandbox(self, claim: &DynamicObject) -> Option<String> {
        match self {
            Flavour::AgentSandbox => {
                let status = claim.data.get("status").cloned().unwrap_or(Value::Null);
                let s: asb::SandboxClaimStatus = serde_json::from_value(status).unwrap_or_default();
                s.sandbox.and_then(|s| s.name).filter(|n| !n.is_empty())
            }
            Flavour::OpenKruise => None,
        }
    }

    /// The typed view of a Sandbox.
    pub fn sandbox_view(self, obj: &DynamicObject) -> SandboxView {
        let spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
        let status = obj.data.get("status").cloned().unwrap_or(Value::Null);
        let labels = obj.metadata.labels.as_ref();
        let annotations = obj.metadata.annotations.as_ref();
        let generation = obj.metadata.generation;
        let mut v = SandboxView {
            port_override: annotations
                .and_then(|a| a.get(PORT_ANNOTATION))
                .and_then(|p| p.parse().ok()),
            deleting: obj.metadata.deletion_timestamp.is_some(),
            frozen: annotations
                .and_then(|a| a.get(super::freeze::FROZEN_ANNOTATION))
                .cloned(),
            ..SandboxView::default()
        };
        match self {
            Flavour::AgentSandbox => {
                let spec: asb::SandboxSpec = serde_json::from_value(spec).unwrap_or_default();
                let st: asb::SandboxStatus = serde_json::from_value(status).unwrap_or_default();
                v.pod_ip = st.pod_ips.first().and_then(|ip| ip.parse().ok());
                v.spec_paused = spec.operating_mode.as_deref() == Some("Suspended");
                // controllers/sandbox_controller.go computeConditions: every condition
                // carries observedGeneration = the Sandbox's generation; one from before
                // the last spec change (a suspend or resume) describes the old spec.
                let current = |c: &&super::crd::Condition| {
                    generation.is_none() || c.observed_generation == generation
                };
                let ready = condition(&st.conditions, "Ready")
                    .filter(current)
                    .is_some_and(|c| c.status == "True");
                v.ready = ready && v.pod_ip.is_some();
                // Suspended is persistent and may linger from an earlier suspension
                // (computeSuspendedCondition): only one written for this spec counts; no
                // pod IP counts once the controller has reconciled this spec.
                let reconciled = condition(&st.conditions, "Ready").filter(current).is_some();
                v.pause_done = v.spec_paused
                    && (condition(&st.conditions, "Suspended")
                        .filter(current)
                        .is_some_and(|c| {
                            c.status == "True" && c.reason.as_deref() == Some("PodTerminated")
                        })
                        || (v.pod_ip.is_none() && reconciled));
                // computePodScheduledCondition mirrors the pod's PodScheduled (from
                // v0.5.6, agent-sandbox b7405194 #1291; absent before, so older
                // controllers' unschedulable pods are waited on until the deadline).
                v.unschedulable = condition(&st.conditions, "PodScheduled")
                    .filter(current)
                    .is_some_and(|c| {
                        c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
                    });
                v.finished = is_true(&st.conditions, "Finished");
                v.warm = labels.is_some_and(|l| l.contains_key(asb::WARM_POOL_LABEL));
                if let Some(o) = obj.metadata.owner_references.as_ref().and_then(|refs| {
                    refs.iter()
                        .find(|o| o.controller == Some(true) && o.kind == "SandboxClaim")
                }) {
                    v.claim = Some(o.name.clone());
                    v.claim_uid = Some(o.uid.clone());
                }
            }
            Flavour::OpenKruise => {
                let spec: okr::SandboxSpec = serde_json::from_value(spec).unwrap_or_default();
                let st: okr::SandboxStatus = serde_json::from_value(status).unwrap_or_default();
                v.pod_ip = st
                    .pod_info
                    .and_then(|p| p.pod_ip)
                    .and_then(|ip| ip.parse().ok());
                v.spec_paused = spec.paused.unwrap_or(false);
                let phase = st.phase.as_deref().unwrap_or("");
                // pkg/controller/sandbox/sandbox_controller.go calculateStatus sets
                // status.observedGeneration: a status from before the last spec change
                // (e.g. Running just after `paused: true` was written) is stale. podInfo
                // is kept through a pause (core/util.go ensureStopPaused), so only the
                // phase and Ready say whether that IP serves.
                let current = generation.is_none() || st.observed_generation == generation;
                v.ready = current
                    && phase == "Running"
                    && is_true(&st.conditions, "Ready")
                    && v.pod_ip.is_some();
                v.pause_done = v.spec_paused
                    && current
                    && (is_true(&st.conditions, "SandboxPaused") || v.pod_ip.is_none());
                v.finished = matches!(phase, "Failed" | "Succeeded");
                v.warm = labels
                    .and_then(|l| l.get(okr::CLAIMED_LABEL))
                    .is_some_and(|c| c == "false");
                v.claim = labels.and_then(|l| l.get(okr::CLAIM_NAME_LABEL)).cloned();
                v.claim_uid = annotations
                    .and_then(|a| a.get(okr::OWNER_ANNOTATION))
                    .cloned();
            }
        }
        v
    }

    /// The spec change that suspends (`true`) or resumes (`false`) a sandbox.
    pub fn pause_spec(self, paused: bool) -> Value {
        match self {
            Flavour::AgentSandbox => {
                json!({"operatingMode": if paused { "Suspended" } else { "Running" }})
            }
            Flavour::OpenKruise => json!({"paused": paused}),
        }
    }

    /// What a suspend keeps, in words (admin API and docs).
    pub fn pause_keeps(self) -> &'static str {
        match self {
            Flavour::AgentSandbox => "files on persistent volumes; memory and the pod IP are lost",
            Flavour::OpenKruise => {
                "files on persistent volumes; memory and the pod IP are lost (the open-source \
                 path deletes the pod; spec.persistentContents needs a vendor runtime)"
            }
        }
    }
}

/// A `volumeClaimTemplates` entry for `volume`: one ReadWriteOnce PVC of `size`.
fn volume_claim_template(volume: &VolumeRule) -> asb::PersistentVolumeClaimTemplate {
    let mut spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": volume.size}},
    });
    if let Some(class) = &volume.storage_class {
        spec["storageClassName"] = json!(class);
    }
    asb::PersistentVolumeClaimTemplate {
        metadata: asb::EmbeddedObjectMetadata {
            name: volume.name.clone(),
        },
        spec,
    }
}
