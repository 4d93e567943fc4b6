//! OpenKruise agents as of `0b72c83ae0bc`: the Sandbox controller (phases, pause by pod
//! deletion, `shutdownTime`), the SandboxSet pool and the one-shot SandboxClaim
//! controller. Paths below are in openkruise/agents at that revision.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use serde_json::{Value, json};

use super::{
    Controller, Flavour, PodView, condition, controller_of, controller_ref, key_of, now,
    parse_time, passed, update_from,
};
use crate::controller::flavour::Resources;

/// `api/v1alpha1/labels.go`: pool membership, claimed flag ("true"/"false"), claim name.
pub const POOL_LABEL: &str = "agents.kruise.io/sandbox-pool";
pub const TEMPLATE_LABEL: &str = "agents.kruise.io/sandbox-template";
pub const CLAIMED_LABEL: &str = "agents.kruise.io/sandbox-claimed";
pub const CLAIM_NAME_LABEL: &str = "agents.kruise.io/claim-name";
/// `api/v1alpha1/annotations.go` `AnnotationOwner`: the claiming SandboxClaim's UID.
pub const OWNER_ANNOTATION: &str = "agents.kruise.io/owner";
pub const CLAIM_TIME_ANNOTATION: &str = "agents.kruise.io/claim-timestamp";
/// `api/v1alpha1/annotations.go` `AnnotationLock` (`utils.LockSandbox`).
pub const LOCK_ANNOTATION: &str = "agents.kruise.io/lock";

/// `api/v1alpha1/sandboxclaim_types.go`: `ttlAfterCompleted` defaults to 60m.
const DEFAULT_TTL: Duration = Duration::from_secs(3600);

pub(crate) fn reconcile(ctrl: &Arc<Controller>, res: Resources) {
    let f = Flavour::OpenKruise;
    let claims = ctrl.list(res.claims);
    let sets = ctrl.list(res.pools);
    ctrl.forget_gone(f, &claims);
    let sandboxes = ctrl.list(res.sandboxes);
    ctrl.collect_orphans(res.sandboxes, &sandboxes, "SandboxSet", &sets);
    // pkg/controller/sandbox/sandbox_controller.go checkTimers (~L321): a Sandbox past
    // spec.shutdownTime is deleted, except a Failed or Succeeded one: Reconcile returns
    // for those before it checks timers (`isSandboxCompletedPhase`, ~L311).
    for s in &sandboxes {
        let completed = matches!(s["status"]["phase"].as_str(), Some("Failed" | "Succeeded"));
        if passed(&s["spec"]["shutdownTime"]) && !completed {
            let (_, ns, name) = key_of(f, s);
            let _ = ctrl.store().delete(res.sandboxes, &ns, &name);
        }
    }
    let sandboxes = ctrl.list(res.sandboxes);
    // The open-source pause path deletes the pod (spec.paused), Running sandboxes only.
    let pods = ctrl.drive_pods(f, &sandboxes, wants_pod);
    for s in &sandboxes {
        let key = key_of(f, s);
        let pod = pods.get(&key).copied().unwrap_or(PodView::Absent);
        // The port goes up before Ready and comes down after it, so no reader sees a
        // ready Sandbox without its port.
        let up = matches!(
            pod,
            PodView::Running(_) | PodView::Frozen(_) | PodView::Terminating(_)
        );
        if up {
            ctrl.sync_port_annotation(res.sandboxes, &key, s, pod);
        }
        ctrl.set_status(res.sandboxes, &key, sandbox_status(s, pod));
        if !up {
            ctrl.sync_port_annotation(res.sandboxes, &key, s, pod);
        }
    }
    let sandboxes = ctrl.list(res.sandboxes);
    for set in &sets {
        fill_set(ctrl, res, set, &sandboxes);
    }
    let sandboxes = ctrl.list(res.sandboxes);
    for c in &claims {
        reconcile_claim(ctrl, res, c, &sandboxes, &sets);
    }
}

/// `pkg/controller/sandbox/sandbox_controller.go` Reconcile and calculateStatus
/// (~L290-400, ~L579-726), `core/common_control.go` EnsureSandboxRunning /
/// defaultSyncStatusFromPod / EnsureSandboxResumed and `core/util.go` ensureStopPaused, by
/// the phase the status had before:
///
/// - Failed/Succeeded are final: the status is left as it is (`isSandboxCompletedPhase`
///   returns before anything else, the shutdown timer included).
/// - Pending: `spec.paused` is not looked at (pausing needs Running first); Running with
///   `podInfo` and Ready from the pod once the pod runs; no conditions before.
/// - Running: no pod -> Failed ("Pod Not Found"); `spec.paused` -> Paused with Ready set to
///   False and `SandboxPaused=False/Pending` (`preparePausedPhase`).
/// - Paused: `SandboxPaused=True/StopPauseSucceed` once the pod is gone; **`podInfo` is not
///   cleared** (ensureStopPaused only sets the condition), so it keeps the old pod's IP.
///   Un-paused after that: Resuming with `SandboxResumed=False/CreatePod`.
/// - Resuming: Running with the new pod's `podInfo` and `SandboxResumed=True` once the new
///   pod runs; `SandboxPaused` dropped (`finalizeResumePhase`).
///
/// Every write carries `status.observedGeneration = metadata.generation`.
pub fn sandbox_status(s: &Value, pod: PodView) -> Value {
    let g = &s["metadata"]["generation"];
    let paused = s["spec"]["paused"] == true;
    let old = &s["status"];
    let before = old["phase"].as_str().unwrap_or("Pending");
    if matches!(before, "Failed" | "Succeeded") {
        return old.clone();
    }
    let mut conds: Vec<Value> = old["conditions"].as_array().cloned().unwrap_or_default();
    let set = |conds: &mut Vec<Value>, c: Value| {
        conds.retain(|x| x["type"] != c["type"]);
        conds.push(c);
    };
    let drop_cond = |conds: &mut Vec<Value>, ty: &str| conds.retain(|x| x["type"] != ty);
    let mut pod_info = old["podInfo"].clone();
    let live = |a: &std::net::SocketAddr| json!({"podIP": a.ip().to_string(), "nodeName": crate::controller::NODE_NAME});
    let mut message = Value::Null;
    let ready_from_pod = |conds: &mut Vec<Value>, pod: PodView| {
        let ready = matches!(pod, PodView::Running(_));
        set(
            conds,
            condition(
                "Ready",
                if ready { "True" } else { "False" },
                "PodReady",
                "",
                g,
            ),
        );
    };
    let phase = match before {
        "Running" => match pod {
            PodView::Absent | PodView::Failed => {
                message = json!(if pod == PodView::Failed {
                    "Pod status phase is Failed"
                } else {
                    "Pod Not Found"
                });
                "Failed"
            }
            _ if paused => {
                drop_cond(&mut conds, "SandboxResumed");
                set(&mut conds, condition("Ready", "False", "PodReady", "", g));
                set(
                    &mut conds,
                    condition("SandboxPaused", "False", "Pending", "", g),
                );
                "Paused"
            }
            PodView::Running(a) | PodView::Frozen(a) => {
                pod_info = live(&a);
                ready_from_pod(&mut conds, pod);
                "Running"
            }
            _ => "Running",
        },
        "Paused" => {
            let done = conds
                .iter()
                .any(|c| c["type"] == "SandboxPaused" && c["status"] == "True");
            if done && !paused {
                set(
                    &mut conds,
                    condition("SandboxResumed", "False", "CreatePod", "", g),
                );
                "Resuming"
            } else {
                if pod == PodView::Absent {
                    set(
                        &mut conds,
                        condition("SandboxPaused", "True", "StopPauseSucceed", "", g),
                    );
                }
                "Paused"
            }
        }
        "Resuming" => match pod {
            PodView::Running(a) => {
                pod_info = live(&a);
                set(
                    &mut conds,
                    condition("SandboxResumed", "True", "ResumePod", "", g),
                );
                drop_cond(&mut conds, "SandboxPaused");
                ready_from_pod(&mut conds, pod);
                "Running"
            }
            _ => "Resuming",
        },
        // Pending (and anything unknown).
        _ => match pod {
            PodView::Failed => {
                message = json!("Pod status phase is Failed");
                "Failed"
            }
            PodView::Running(a) | PodView::Frozen(a) => {
                pod_info = live(&a);
                ready_from_pod(&mut conds, pod);
                "Running"
            }
            _ => "Pending",
        },
    };
    let mut status = json!({"phase": phase, "conditions": conds, "observedGeneration": g});
    if !pod_info.is_null() {
        status["podInfo"] = pod_info;
    }
    if !message.is_null() {
        status["message"] = message;
    }
    status
}

/// Whether the Sandbox controller wants `s`'s pod to run: everything but a Sandbox in
/// (or entering) the Paused phase; a Pending one is started even if `spec.paused` (pause
/// applies to Running sandboxes only, `calculateStatus`).
fn wants_pod(s: &Value) -> bool {
    let phase = s["status"]["phase"].as_str().unwrap_or("Pending");
    match phase {
        "Paused" => false,
        "Running" => s["spec"]["paused"] != true,
        _ => true,
    }
}

/// `pkg/utils/utils.go` GetSandboxState (~L232): available = controlled by its SandboxSet
/// and Ready (the `IsSandboxReady` condition), not being deleted, not past shutdownTime.
fn available(s: &Value, set: &Value) -> bool {
    controller_of(s).is_some_and(|o| o["uid"] == set["metadata"]["uid"])
        && s["metadata"]["deletionTimestamp"].is_null()
        && s["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// `pkg/controller/sandboxset/utils.go` NewSandboxFromSandboxSet (~L174-212): members are
/// `generateName: <set>-` with the pool/template labels and `sandbox-claimed: "false"`,
/// controlled by the set. Status: `replicas` and `availableReplicas`
/// (`api/v1alpha1/sandboxset_types.go`).
fn fill_set(ctrl: &Controller, res: Resources, set: &Value, sandboxes: &[Value]) {
    let (_, ns, name) = key_of(Flavour::OpenKruise, set);
    let want = set["spec"]["replicas"].as_u64().unwrap_or(0) as usize;
    let mut members: Vec<&Value> = sandboxes
        .iter()
        .filter(|s| {
            s["metadata"]["namespace"] == ns.as_str()
                && s["metadata"]["labels"][POOL_LABEL] == name.as_str()
                && controller_of(s).is_some_and(|o| o["uid"] == set["metadata"]["uid"])
                && s["metadata"]["deletionTimestamp"].is_null()
        })
        .collect();
    if members.len() < want {
        for _ in members.len()..want {
            let _ = ctrl
                .store()
                .create(res.sandboxes, &ns, new_sandbox(set, true));
        }
    } else if members.len() > want {
        members.sort_by_key(|s| available(s, set));
        for s in &members[..members.len() - want] {
            let _ = ctrl.store().delete(
                res.sandboxes,
                &ns,
                s["metadata"]["name"].as_str().unwrap_or(""),
            );
        }
        members.drain(..members.len() - want);
    }
    let status = json!({
        "observedGeneration": set["metadata"]["generation"],
        "replicas": members.len(),
        "availableReplicas": members.iter().filter(|s| available(s, set)).count(),
        "selector": format!("{POOL_LABEL}={name}"),
    });
    ctrl.set_status(res.pools, &key_of(Flavour::OpenKruise, set), status);
}

fn new_sandbox(set: &Value, owned: bool) -> Value {
    let name = set["metadata"]["name"].as_str().unwrap_or("");
    let mut obj = json!({
        "metadata": {
            "generateName": format!("{name}-"),
            "labels": {POOL_LABEL: name, TEMPLATE_LABEL: name, CLAIMED_LABEL: "false"},
        },
        "spec": {"template": set["spec"]["template"].clone()},
    });
    if owned {
        obj["metadata"]["ownerReferences"] = json!([controller_ref(set, "SandboxSet")]);
    }
    obj
}

/// A claim whose Sandbox is locked and whose post-processing runs
/// (`sandboxcr/claim.go` TryClaimSandbox step 3, `runClaimPostProcesses`).
#[derive(Debug, Clone)]
pub(crate) struct PostProcess {
    /// The locked Sandbox.
    pub sandbox: String,
    /// When it was locked.
    pub locked: Instant,
    /// When it was seen ready (post-processing proper starts then). `None` for a Sandbox
    /// created for the claim (`LockTypeCreate`): it is waited on first, bounded by
    /// `waitReadyTimeout`.
    pub ready: Option<Instant>,
}

/// `api/v1alpha1/sandboxclaim_types.go` `+kubebuilder:default`: `claimTimeout` 1m,
/// `waitReadyTimeout` 30s (applied by the API server when unset).
const DEFAULT_CLAIM_TIMEOUT: f64 = 60.0;
const DEFAULT_WAIT_READY_TIMEOUT: f64 = 30.0;

fn duration_field(claim: &Value, field: &str, default: f64) -> f64 {
    claim["spec"][field]
        .as_str()
        .and_then(parse_go_duration)
        .unwrap_or(default)
}

/// The claim controller (`pkg/controller/sandboxclaim/sandboxclaim_controller.go`
/// Reconcile, `core/util.go` CalculateClaimStatus, `core/common_control.go`
/// EnsureClaimClaiming / claimSandboxes), one step per pass:
///
/// 1. `""` -> Claiming with `claimStartTime` (there is no Pending phase: the phases are
///    Claiming and Completed, `api/v1alpha1/sandboxclaim_types.go`).
/// 2. SandboxSet missing -> Completed (`SandboxSetNotFound`); `claimedReplicas` met ->
///    Completed (`AllReplicasClaimed`); past `claimTimeout` since `claimStartTime` ->
///    Completed with `TimedOut=True/ClaimTimeoutReached` and
///    `Completed=True/TimeoutReached` (all terminal).
/// 3. `sandboxcr.TryClaimSandbox` (`pkg/sandbox-manager/infra/sandboxcr/claim.go`): lock an
///    available pool member in one optimistic Update (modifyPickedSandbox ~L701,
///    `utils.LockSandbox`: [`CLAIM_NAME_LABEL`], `sandbox-claimed: "true"`,
///    [`OWNER_ANNOTATION`] = claim UID, ownerReferences cleared, the claim's
///    `shutdownTime` copied), or with no stock and `createOnNoStock` create one already
///    locked. **Then** `runClaimPostProcesses`: a created Sandbox is waited on until ready
///    (`waitReadyTimeout`), then runtime init (`envVars`) and CSI mounts
///    (`dynamicVolumesMount`) take [`super::ControllerConfig::post_process_delay`] (the
///    testbed assumes the set carries the agent runtime, `applyInitRuntimeOptions`). A
///    failure deletes the locked Sandbox (`clearFailedSandbox`, default
///    `ReserveFailedSandboxFor` never) and the claim tries again.
/// 4. Only a successful TryClaimSandbox counts: `claimedReplicas: 1` is written after it
///    (EnsureClaimClaiming step 9); the next pass completes the claim. **The claim status
///    never names the Sandbox.**
/// 5. Completed: deleted `ttlAfterCompleted` (default 60m; negative = never) after
///    completion (`EnsureClaimCompleted`); the Sandbox is left alone.
fn reconcile_claim(
    ctrl: &Controller,
    res: Resources,
    claim: &Value,
    sandboxes: &[Value],
    sets: &[Value],
) {
    let key = key_of(Flavour::OpenKruise, claim);
    let g = &claim["metadata"]["generation"];
    let uid = &claim["metadata"]["uid"];
    let status = &claim["status"];
    let completed = |reason: &str, message: &str, timed_out: bool| {
        let mut st = status.clone();
        st["phase"] = json!("Completed");
        st["completionTime"] = json!(now());
        st["message"] = json!(message);
        st["observedGeneration"] = g.clone();
        let mut conds = vec![condition("Completed", "True", reason, message, g)];
        if timed_out {
            conds.push(condition(
                "TimedOut",
                "True",
                "ClaimTimeoutReached",
                message,
                g,
            ));
        }
        st["conditions"] = json!(conds);
        ctrl.set_status(res.claims, &key, st);
        ctrl.post_processing.lock().expect("post lock").remove(&key);
    };
    match status["phase"].as_str().unwrap_or("") {
        "Completed" => {
            let ttl = match claim["spec"]["ttlAfterCompleted"].as_str() {
                Some(s) => parse_go_duration(s),
                None => Some(DEFAULT_TTL.as_secs_f64()),
            };
            let (Some(ttl), Some(done)) = (ttl, parse_time(&status["completionTime"])) else {
                return;
            };
            let elapsed = (chrono::Utc::now() - done).num_milliseconds() as f64 / 1000.0;
            if ttl >= 0.0 && elapsed >= ttl {
                let _ = ctrl.store().delete(res.claims, &key.1, &key.2);
            }
        }
        _ if !ctrl.may_step(&key) => {}
        "" => {
            ctrl.set_status(
                res.claims,
                &key,
                json!({
                    "phase": "Claiming", "claimedReplicas": 0, "claimStartTime": now(),
                    "observedGeneration": g,
                }),
            );
            ctrl.stepped(&key);
        }
        _ => {
            let set_name = claim["spec"]["templateName"].as_str().unwrap_or("");
            let Some(set) = sets.iter().find(|s| {
                s["metadata"]["namespace"] == key.1.as_str() && s["metadata"]["name"] == set_name
            }) else {
                completed(
                    "SandboxSetNotFound",
                    &format!("SandboxSet {set_name} not found"),
                    false,
                );
                return;
            };
            if status["claimedReplicas"].as_i64().unwrap_or(0) >= 1 {
                completed(
                    "AllReplicasClaimed",
                    "Successfully claimed all 1 sandboxes",
                    false,
                );
                ctrl.stepped(&key);
                return;
            }
            let pending = ctrl
                .post_processing
                .lock()
                .expect("post lock")
                .get(&key)
                .cloned();
            if let Some(p) = pending {
                post_process(ctrl, res, claim, sandboxes, p);
                return;
            }
            let started = parse_time(&status["claimStartTime"]);
            let timeout = duration_field(claim, "claimTimeout", DEFAULT_CLAIM_TIMEOUT);
            if let Some(t) = started {
                let elapsed = (chrono::Utc::now() - t).num_milliseconds() as f64 / 1000.0;
                if elapsed >= timeout {
                    completed(
                        "TimeoutReached",
                        &format!("Timeout reached after {elapsed:.0}s, claimed 0/1 sandboxes"),
                        true,
                    );
                    return;
                }
            }
            let claim_it = |n: &mut Value| {
                n["metadata"]["labels"][CLAIM_NAME_LABEL] = json!(key.2);
                n["metadata"]["labels"][CLAIMED_LABEL] = json!("true");
                n["metadata"]["annotations"][OWNER_ANNOTATION] = uid.clone();
                n["metadata"]["annotations"][LOCK_ANNOTATION] = json!(format!("lock-{}", key.2));
                n["metadata"]["annotations"][CLAIM_TIME_ANNOTATION] = json!(now());
                n["metadata"]["ownerReferences"] = json!([]);
                if !claim["spec"]["shutdownTime"].is_null() {
                    n["spec"]["shutdownTime"] = claim["spec"]["shutdownTime"].clone();
                }
            };
            let pick = sandboxes.iter().find(|s| {
                s["metadata"]["namespace"] == key.1.as_str()
                    && s["metadata"]["labels"][POOL_LABEL] == set_name
                    && s["metadata"]["annotations"][LOCK_ANNOTATION].is_null()
                    && available(s, set)
            });
            let locked = if let Some(s) = pick {
                update_from(ctrl.store(), res.sandboxes, s, claim_it)
                    .ok()
                    .map(|o| (o, false))
            } else if claim["spec"]["createOnNoStock"] != false {
                let mut obj = new_sandbox(set, false);
                claim_it(&mut obj);
                ctrl.store()
                    .create(res.sandboxes, &key.1, obj)
                    .ok()
                    .map(|o| (o, true))
            } else {
                None
            };
            if let Some((o, created)) = locked {
                let p = PostProcess {
                    sandbox: o["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                    locked: Instant::now(),
                    ready: (!created).then(Instant::now),
                };
                ctrl.post_processing
                    .lock()
                    .expect("post lock")
                    .insert(key.clone(), p);
            }
            ctrl.stepped(&key);
        }
    }
}

/// Step 3's `runClaimPostProcesses` for a locked Sandbox, then step 4's count.
fn post_process(
    ctrl: &Controller,
    res: Resources,
    claim: &Value,
    sandboxes: &[Value],
    mut p: PostProcess,
) {
    let key = key_of(Flavour::OpenKruise, claim);
    let forget = || {
        ctrl.post_processing.lock().expect("post lock").remove(&key);
    };
    let Some(s) = sandboxes.iter().find(|s| {
        s["metadata"]["namespace"] == key.1.as_str()
            && s["metadata"]["name"] == p.sandbox.as_str()
            && s["metadata"]["deletionTimestamp"].is_null()
    }) else {
        forget();
        return;
    };
    // clearFailedSandbox: the locked Sandbox is deleted and the claim tries again.
    let fail = || {
        let _ = ctrl.store().delete(res.sandboxes, &key.1, &p.sandbox);
        forget();
    };
    if p.ready.is_none() {
        let ready = s["status"]["phase"] == "Running"
            && s["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
        if ready {
            p.ready = Some(Instant::now());
            ctrl.post_processing
                .lock()
                .expect("post lock")
                .insert(key.clone(), p.clone());
        } else {
            let limit = duration_field(claim, "waitReadyTimeout", DEFAULT_WAIT_READY_TIMEOUT);
            if p.locked.elapsed().as_secs_f64() >= limit {
                fail();
            }
            return;
        }
    }
    let nonempty = |f: &str| {
        claim["spec"][f].as_array().is_some_and(|a| !a.is_empty())
            || claim["spec"][f].as_object().is_some_and(|o| !o.is_empty())
    };
    if nonempty("envVars") || nonempty("dynamicVolumesMount") {
        if ctrl.post_process_fails() {
            fail();
            return;
        }
        let since = p.ready.unwrap_or(p.locked);
        if since.elapsed() < ctrl.config().post_process_delay {
            return;
        }
    }
    forget();
    let mut st = claim["status"].clone();
    st["claimedReplicas"] = json!(1);
    st["message"] = json!("Claiming sandboxes: 1/1 claimed");
    ctrl.set_status(res.claims, &key, st);
    ctrl.stepped(&key);
}

/// Parses a Go `time.Duration` string (`-1s`, `60m`, `1h30m`, `250ms`) into seconds.
pub fn parse_go_duration(s: &str) -> Option<f64> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(0.0);
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * scale;
        rest = &rest[unit_len..];
    }
    Some(if neg { -total } else { total })
}

#[cfg(test)]
mod tests {
    use super::parse_go_duration;

    #[test]
    fn go_durations_parse_like_time_parse_duration() {
        assert_eq!(parse_go_duration("-1s"), Some(-1.0));
        assert_eq!(parse_go_duration("60m"), Some(3600.0));
        assert_eq!(parse_go_duration("1h30m"), Some(5400.0));
        assert_eq!(parse_go_duration("250ms"), Some(0.25));
        assert_eq!(parse_go_duration("0"), Some(0.0));
        assert_eq!(parse_go_duration("5x"), None);
        assert_eq!(parse_go_duration(""), None);
    }
}
