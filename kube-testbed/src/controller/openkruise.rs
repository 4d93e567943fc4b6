//! OpenKruise agents as of `0b72c83ae0bc`: the Sandbox controller (phases, pause by pod
//! deletion, `shutdownTime`), the SandboxSet pool and the one-shot SandboxClaim
//! controller. Paths below are in openkruise/agents at that revision.

use std::sync::Arc;
use std::time::Duration;

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
    // spec.shutdownTime is deleted.
    for s in &sandboxes {
        if passed(&s["spec"]["shutdownTime"]) {
            let (_, ns, name) = key_of(f, s);
            let _ = ctrl.store().delete(res.sandboxes, &ns, &name);
        }
    }
    let sandboxes = ctrl.list(res.sandboxes);
    // The open-source pause path deletes the pod (spec.paused).
    let pods = ctrl.drive_pods(f, &sandboxes, |s| s["spec"]["paused"] != true);
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

/// `pkg/controller/sandbox/sandbox_controller.go` calculateStatus (~L630-690) and the
/// phase list in `api/v1alpha1/sandbox_types.go`: Pending until the pod runs, Running
/// with Ready=True and `podInfo.podIP`; `spec.paused` moves Running to Paused at once with
/// SandboxPaused=False until the pod is gone (then True); un-pausing goes Paused ->
/// Resuming (Resumed=False) -> Running (Resumed=True). A pod that exits makes it Failed.
pub fn sandbox_status(s: &Value, pod: PodView) -> Value {
    let g = &s["metadata"]["generation"];
    let paused = s["spec"]["paused"] == true;
    let before = s["status"]["phase"].as_str().unwrap_or("");
    let mut conds = Vec::new();
    let phase = if pod == PodView::Failed {
        conds.push(condition("Ready", "False", "PodFailed", "Pod failed", g));
        "Failed"
    } else if paused {
        let done = pod == PodView::Absent;
        conds.push(condition("Ready", "False", "SandboxPaused", "", g));
        conds.push(condition(
            "SandboxPaused",
            if done { "True" } else { "False" },
            if done { "PodDeleted" } else { "DeletingPod" },
            "",
            g,
        ));
        "Paused"
    } else if let PodView::Running(_) = pod {
        conds.push(condition("Ready", "True", "PodReady", "", g));
        if matches!(before, "Paused" | "Resuming") || has_condition(s, "SandboxResumed") {
            conds.push(condition("SandboxResumed", "True", "ResumeSucceed", "", g));
        }
        "Running"
    } else if let PodView::Frozen(_) = pod {
        // The pod still runs (frozen); its readiness probe fails.
        conds.push(condition("Ready", "False", "PodNotReady", "", g));
        "Running"
    } else {
        let reason = if pod == PodView::Unschedulable {
            "Unschedulable"
        } else {
            "PodNotReady"
        };
        conds.push(condition("Ready", "False", reason, "", g));
        if matches!(before, "Paused" | "Resuming") {
            conds.push(condition("SandboxResumed", "False", "CreatePod", "", g));
            "Resuming"
        } else {
            "Pending"
        }
    };
    let mut status = json!({"phase": phase, "conditions": conds, "observedGeneration": g});
    if let PodView::Running(a) | PodView::Frozen(a) | PodView::Terminating(a) = pod {
        status["podInfo"] =
            json!({"podIP": a.ip().to_string(), "nodeName": crate::controller::NODE_NAME});
    }
    status
}

fn has_condition(s: &Value, ty: &str) -> bool {
    s["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == ty)
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

/// `pkg/controller/sandboxclaim/core/common_control.go`, one step per pass:
///
/// 1. Pending -> Claiming (`claimStartTime`).
/// 2. Claiming: `claimSandboxes` -> `sandboxcr.TryClaimSandbox`
///    (`pkg/sandbox-manager/infra/sandboxcr/claim.go` modifyPickedSandbox ~L701 and
///    buildClaimOptions ~L280-360): one optimistic Update of an available pool member that
///    sets [`CLAIM_NAME_LABEL`], `sandbox-claimed: "true"`, [`OWNER_ANNOTATION`] = claim
///    UID, clears ownerReferences (the SandboxSet then refills) and copies the claim's
///    `spec.shutdownTime`. No stock and `createOnNoStock` (default true): a new Sandbox
///    created already claimed.
/// 3. Once a Sandbox carries its UID (`countClaimedSandboxes`): Completed with
///    `claimedReplicas: 1` and `completionTime`. **The claim status never names the
///    Sandbox.**
/// 4. Completed: deleted `ttlAfterCompleted` (default 60m; negative = never) after
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
        "" | "Pending" => {
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
            let claimed = sandboxes.iter().any(|s| {
                s["metadata"]["namespace"] == key.1.as_str()
                    && s["metadata"]["annotations"][OWNER_ANNOTATION] == *uid
            });
            if claimed {
                let mut st = status.clone();
                st["phase"] = json!("Completed");
                st["claimedReplicas"] = json!(1);
                st["completionTime"] = json!(now());
                st["message"] = json!("Completed: 1/1 claimed");
                st["conditions"] = json!([condition("Completed", "True", "ClaimCompleted", "", g)]);
                ctrl.set_status(res.claims, &key, st);
                ctrl.stepped(&key);
                return;
            }
            let Some(set_name) = claim["spec"]["templateName"].as_str() else {
                return;
            };
            let Some(set) = sets.iter().find(|s| {
                s["metadata"]["namespace"] == key.1.as_str() && s["metadata"]["name"] == set_name
            }) else {
                return;
            };
            let claim_it = |n: &mut Value| {
                n["metadata"]["labels"][CLAIM_NAME_LABEL] = json!(key.2);
                n["metadata"]["labels"][CLAIMED_LABEL] = json!("true");
                n["metadata"]["annotations"][OWNER_ANNOTATION] = uid.clone();
                n["metadata"]["annotations"][CLAIM_TIME_ANNOTATION] = json!(now());
                n["metadata"]["ownerReferences"] = json!([]);
                if !claim["spec"]["shutdownTime"].is_null() {
                    n["spec"]["shutdownTime"] = claim["spec"]["shutdownTime"].clone();
                }
            };
            let pick = sandboxes.iter().find(|s| {
                s["metadata"]["namespace"] == key.1.as_str()
                    && s["metadata"]["labels"][POOL_LABEL] == set_name
                    && s["metadata"]["annotations"]["agents.kruise.io/lock"].is_null()
                    && available(s, set)
            });
            if let Some(s) = pick {
                let _ = update_from(ctrl.store(), res.sandboxes, s, claim_it);
            } else if claim["spec"]["createOnNoStock"] != false {
                let mut obj = new_sandbox(set, false);
                claim_it(&mut obj);
                let _ = ctrl.store().create(res.sandboxes, &key.1, obj);
            }
            ctrl.stepped(&key);
        }
    }
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
