//! kubernetes-sigs/agent-sandbox as of `2fd412d55eca`: the Sandbox controller (pod,
//! conditions), the SandboxWarmPool controller and the SandboxClaim controller with its
//! three-step adoption. Paths below are in that repository at that revision.

use std::sync::Arc;

use serde_json::{Value, json};

use super::claim_policy;
use super::{
    Controller, Flavour, PodView, condition, controller_of, controller_ref, key_of, passed,
    update_from,
};
use crate::controller::flavour::Resources;

/// `api/v1beta1/sandbox_types.go` `SandboxWarmPoolLabel`: marks a pool member; its value is
/// `NameHash(pool name)`.
pub const WARM_POOL_LABEL: &str = "agents.x-k8s.io/warm-pool-sandbox";
/// `extensions/api/v1beta1/sandboxclaim_types.go` `AssignedSandboxNameAnnotation`: written
/// on the claim *before* adoption, cleared if adoption is lost.
pub const ASSIGNED_ANNOTATION: &str = "agents.x-k8s.io/sandbox-name";
/// `extensions/api/v1beta1/sandboxtemplate_types.go` `SandboxIDLabel`: the claim's UID.
pub const CLAIM_UID_LABEL: &str = "agents.x-k8s.io/claim-uid";

/// `controllers/sandbox_controller.go` `NameHash`: FNV-1a 32-bit, 8 hex digits.
pub fn name_hash(name: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

pub(crate) fn reconcile(ctrl: &Arc<Controller>, res: Resources) {
    let f = Flavour::AgentSandbox;
    let claims = ctrl.list(res.claims);
    let pools = ctrl.list(res.pools);
    ctrl.forget_gone(f, &claims);
    for c in &claims {
        expire_claim(ctrl, res, c);
    }
    let claims = ctrl.list(res.claims);
    let sandboxes = ctrl.list(res.sandboxes);
    ctrl.collect_orphans(res.sandboxes, &sandboxes, "SandboxClaim", &claims);
    ctrl.collect_orphans(res.sandboxes, &sandboxes, "SandboxWarmPool", &pools);
    let sandboxes = ctrl.list(res.sandboxes);
    // controllers/sandbox_controller.go reconcilePod (~L1241): Suspended -> delete the pod.
    let pods = ctrl.drive_pods(f, &sandboxes, |s| s["spec"]["operatingMode"] != "Suspended");
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
    for p in &pools {
        fill_pool(ctrl, res, p, &sandboxes);
    }
    let sandboxes = ctrl.list(res.sandboxes);
    for c in &claims {
        reconcile_claim(ctrl, res, c, &sandboxes, &pools);
    }
}

/// The Sandbox's status for its pod, as `reconcileChildResources` (~L415: podIPs only
/// while a pod exists) and `computeConditions` (~L475-710) build it: Suspended (always
/// present), Finished and PodScheduled (present only while they apply), Ready. Every
/// condition carries `observedGeneration: metadata.generation`.
pub fn sandbox_status(s: &Value, pod: PodView) -> Value {
    let g = &s["metadata"]["generation"];
    let suspended = s["spec"]["operatingMode"] == "Suspended";
    let exists = pod != PodView::Absent;
    let mut conds = Vec::new();
    // computeSuspendedCondition: True/PodTerminated only once the pod is gone.
    conds.push(match (suspended, exists) {
        (false, _) => condition(
            "Suspended",
            "False",
            "NotSuspended",
            "Sandbox is not suspended",
            g,
        ),
        (true, false) => condition(
            "Suspended",
            "True",
            "PodTerminated",
            "Pod has been terminated. Sandbox is suspended",
            g,
        ),
        (true, true) => condition(
            "Suspended",
            "False",
            "PodTerminating",
            "Pod is terminating. Sandbox is suspending",
            g,
        ),
    });
    // computeFinishedCondition: the pod reached a terminal phase.
    if pod == PodView::Failed {
        conds.push(condition("Finished", "True", "PodFailed", "Pod failed", g));
    }
    // computePodScheduledCondition: mirrors the pod's PodScheduled; absent without a pod.
    match pod {
        PodView::Absent => {}
        PodView::Unschedulable => conds.push(condition(
            "PodScheduled",
            "False",
            "Unschedulable",
            "0/1 nodes are available: 1 Insufficient cpu.",
            g,
        )),
        _ => conds.push(condition("PodScheduled", "True", "PodScheduled", "", g)),
    }
    // computeReadyCondition: Ready=False reason SandboxSuspended as soon as the spec says
    // Suspended, even while the pod still terminates with its IP.
    conds.push(if suspended {
        let msg = if exists {
            "Sandbox is suspending"
        } else {
            "Sandbox is suspended"
        };
        condition("Ready", "False", "SandboxSuspended", msg, g)
    } else {
        match pod {
            PodView::Running(_) => {
                condition("Ready", "True", "DependenciesReady", "Pod is Ready", g)
            }
            PodView::Frozen(_) => condition(
                "Ready",
                "False",
                "DependenciesNotReady",
                "Pod exists with phase: Running but is not Ready",
                g,
            ),
            PodView::Failed => condition("Ready", "False", "PodFailed", "Pod failed", g),
            PodView::Absent => condition(
                "Ready",
                "False",
                "DependenciesNotReady",
                "Pod does not exist",
                g,
            ),
            _ => condition(
                "Ready",
                "False",
                "DependenciesNotReady",
                "Pod exists with phase: Pending",
                g,
            ),
        }
    });
    let mut status = json!({ "conditions": conds });
    if let PodView::Running(a) | PodView::Frozen(a) | PodView::Terminating(a) = pod {
        status["podIPs"] = json!([a.ip().to_string()]);
        status["nodeName"] = json!(crate::controller::NODE_NAME);
    }
    status
}

fn is_ready(s: &Value) -> bool {
    s["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn controlled_by(s: &Value, owner: &Value) -> bool {
    controller_of(s).is_some_and(|o| o["uid"] == owner["metadata"]["uid"])
}

fn same_ns(a: &Value, b: &Value) -> bool {
    a["metadata"]["namespace"] == b["metadata"]["namespace"]
}

fn find<'a>(objs: &'a [Value], ns_of: &Value, name: &str) -> Option<&'a Value> {
    objs.iter()
        .find(|o| same_ns(o, ns_of) && o["metadata"]["name"] == name)
}

/// `extensions/controllers/sandboxwarmpool_controller.go`: members are the Sandboxes
/// labelled `NameHash(pool)` (~L484) and controlled by the pool; new ones get
/// `generateName: <pool>-`, the label and the pool as controller (~L1039-1096);
/// `spec.replicas` defaults to 1 (`extensions/api/v1beta1/sandboxwarmpool_types.go`);
/// status has replicas, readyReplicas and selector (~L589-599).
fn fill_pool(ctrl: &Controller, res: Resources, pool: &Value, sandboxes: &[Value]) {
    let ns = pool["metadata"]["namespace"].as_str().unwrap_or("");
    let name = pool["metadata"]["name"].as_str().unwrap_or("");
    let hash = name_hash(name);
    let want = pool["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
    let mut members: Vec<&Value> = sandboxes
        .iter()
        .filter(|s| {
            same_ns(s, pool)
                && s["metadata"]["labels"][WARM_POOL_LABEL] == hash.as_str()
                && controlled_by(s, pool)
                && s["metadata"]["deletionTimestamp"].is_null()
        })
        .collect();
    if members.len() < want {
        let template = template_of(ctrl, res, pool);
        for _ in members.len()..want {
            let obj = json!({
                "metadata": {
                    "generateName": format!("{name}-"),
                    "labels": {WARM_POOL_LABEL: hash},
                    "ownerReferences": [controller_ref(pool, "SandboxWarmPool")],
                },
                "spec": sandbox_spec(template.as_ref()),
            });
            let _ = ctrl.store().create(res.sandboxes, ns, obj);
        }
    } else if members.len() > want {
        // Not-ready ones go first.
        members.sort_by_key(|s| is_ready(s));
        for s in &members[..members.len() - want] {
            let _ = ctrl.store().delete(
                res.sandboxes,
                ns,
                s["metadata"]["name"].as_str().unwrap_or(""),
            );
        }
        members.drain(..members.len() - want);
    }
    let status = json!({
        "replicas": members.len(),
        "readyReplicas": members.iter().filter(|s| is_ready(s)).count(),
        "selector": format!("{WARM_POOL_LABEL}={hash}"),
        "observedGeneration": pool["metadata"]["generation"],
    });
    ctrl.set_status(res.pools, &key_of(Flavour::AgentSandbox, pool), status);
}

/// The SandboxTemplate a pool names in `spec.sandboxTemplateRef`.
fn template_of(ctrl: &Controller, res: Resources, pool: &Value) -> Option<Value> {
    let name = pool["spec"]["sandboxTemplateRef"]["name"].as_str()?;
    let ns = pool["metadata"]["namespace"].as_str().unwrap_or("");
    ctrl.store().get(res.templates?, ns, name).ok()
}

fn sandbox_spec(template: Option<&Value>) -> Value {
    json!({
        "podTemplate": template
            .map(|t| t["spec"]["podTemplate"].clone())
            .unwrap_or_else(|| json!({"spec": {"containers": []}})),
    })
}

/// The cold-created Sandbox's spec with the claim's customisation applied
/// (sandboxclaim_controller.go ~L1700-1800), once [`claim_policy::check_injection`]
/// allowed it: its `volumeClaimTemplates` appended, its `env` set on the container named
/// by `containerName` (else the first), replacing a variable of the same name (policy
/// `Overrides`), and `additionalPodMetadata.labels` on the pod template.
fn customized_spec(mut spec: Value, claim: &Value) -> Value {
    if let Some(vcts) = claim["spec"]["volumeClaimTemplates"].as_array() {
        spec["volumeClaimTemplates"] = json!(vcts);
    }
    if let Some(labels) = claim["spec"]["additionalPodMetadata"]["labels"].as_object() {
        for (k, v) in labels {
            spec["podTemplate"]["metadata"]["labels"][k] = v.clone();
        }
    }
    for env in claim["spec"]["env"].as_array().into_iter().flatten() {
        let Some(containers) = spec["podTemplate"]["spec"]["containers"].as_array_mut() else {
            continue;
        };
        let target = match env["containerName"].as_str() {
            Some(name) => containers.iter_mut().find(|c| c["name"] == name),
            None => containers.first_mut(),
        };
        let Some(c) = target else { continue };
        let var = json!({"name": env["name"], "value": env["value"]});
        match c["env"].as_array_mut() {
            Some(list) => {
                list.retain(|e| e["name"] != env["name"]);
                list.push(var);
            }
            None => c["env"] = json!([var]),
        }
    }
    spec
}

/// `extensions/controllers/sandboxclaim_controller.go` Reconcile (~L258-300): a claim
/// past `spec.lifecycle.shutdownTime` is deleted with policy Delete/DeleteForeground (its
/// Sandbox follows by garbage collection); with Retain its Sandbox is deleted
/// (`reconcileExpired`) and the claim kept.
fn expire_claim(ctrl: &Controller, res: Resources, claim: &Value) {
    let lifecycle = &claim["spec"]["lifecycle"];
    if !passed(&lifecycle["shutdownTime"]) {
        return;
    }
    let ns = claim["metadata"]["namespace"].as_str().unwrap_or("");
    let name = claim["metadata"]["name"].as_str().unwrap_or("");
    match lifecycle["shutdownPolicy"].as_str() {
        Some("Delete") | Some("DeleteForeground") => {
            let _ = ctrl.store().delete(res.claims, ns, name);
        }
        _ => {
            if let Some(s) = claim["status"]["sandbox"]["name"].as_str() {
                let _ = ctrl.store().delete(res.sandboxes, ns, s);
            }
            // computeReadyCondition with isClaimExpired: Ready=False/ClaimExpired, and the
            // claim is never bound again (terminal).
            let g = &claim["metadata"]["generation"];
            let status = json!({"conditions": [condition(
                "Ready", "False", "ClaimExpired", "Claim expired. Sandbox cleanup initiated.", g,
            )]});
            ctrl.set_status(res.claims, &key_of(Flavour::AgentSandbox, claim), status);
        }
    }
}

/// True once `claim` is past `spec.lifecycle.shutdownTime` (`checkExpiration`).
fn expired(claim: &Value) -> bool {
    passed(&claim["spec"]["lifecycle"]["shutdownTime"])
}

/// One step of the claim controller per pass, at least `step_delay` apart:
///
/// 1. `adoptSandboxFromCandidates` (~L1110-1160): write [`ASSIGNED_ANNOTATION`] on the
///    claim (optimistic `Update`). Two claims can name the same candidate here.
/// 2. `completeAdoption` (~L1214-1318): on the Sandbox, drop the warm-pool label, add
///    [`CLAIM_UID_LABEL`], make the claim its controller (optimistic `Patch`). The loser
///    of a race finds the Sandbox controlled by another claim and, in
///    `resolveAdoptionCompletion` / `removeAssignedSandboxReference` (~L1413-1510),
///    clears its annotation and starts over.
/// 3. `computeAndSetStatus` (~L841-861): `status.sandbox.name` and `podIPs`, the Ready
///    condition, and the Sandbox's Finished condition copied (`syncFinishedCondition`).
///
/// With no warm candidate, `createSandbox` (~L1678) creates a Sandbox named after the
/// claim, controlled by it, from the pool's template.
fn reconcile_claim(
    ctrl: &Controller,
    res: Resources,
    claim: &Value,
    sandboxes: &[Value],
    pools: &[Value],
) {
    let key = key_of(Flavour::AgentSandbox, claim);
    let name = key.2.as_str();
    if expired(claim) {
        // Handled by expire_claim: nothing is adopted or created for it any more.
        return;
    }
    if let Some(bound) = claim["status"]["sandbox"]["name"]
        .as_str()
        .filter(|s| !s.is_empty())
    {
        // Bound: keep mirroring the Sandbox (status writes are not adoption steps).
        let s = find(sandboxes, claim, bound).filter(|s| controlled_by(s, claim));
        ctrl.set_status(res.claims, &key, claim_status(claim, s));
        return;
    }
    if !ctrl.may_step(&key) {
        return;
    }
    // reconcileActive (~L486): the additional pod metadata is validated first, on every
    // path; a refusal is written as Ready=False/InvalidMetadata and not retried.
    if let Err(r) = claim_policy::validate_metadata(claim, &ctrl.config().allowed_label_domains) {
        refuse(ctrl, res, &key, claim, &r);
        return;
    }
    if let Some(assigned) = claim["metadata"]["annotations"][ASSIGNED_ANNOTATION].as_str() {
        match find(sandboxes, claim, assigned) {
            Some(s) if controlled_by(s, claim) => {
                ctrl.set_status(res.claims, &key, claim_status(claim, Some(s)));
            }
            Some(s)
                if controller_of(s).is_some_and(|o| o["kind"] == "SandboxWarmPool")
                    && s["metadata"]["deletionTimestamp"].is_null() =>
            {
                let uid = claim["metadata"]["uid"].clone();
                let owner = controller_ref(claim, "SandboxClaim");
                let _ = update_from(ctrl.store(), res.sandboxes, s, |n| {
                    if let Some(l) = n["metadata"]["labels"].as_object_mut() {
                        l.remove(WARM_POOL_LABEL);
                    }
                    n["metadata"]["labels"][CLAIM_UID_LABEL] = uid;
                    n["metadata"]["ownerReferences"] = json!([owner]);
                });
            }
            // Deleted, or won by another claim: clear the reference.
            _ => {
                let _ = update_from(ctrl.store(), res.claims, claim, |n| {
                    if let Some(a) = n["metadata"]["annotations"].as_object_mut() {
                        a.remove(ASSIGNED_ANNOTATION);
                    }
                });
            }
        }
        ctrl.stepped(&key);
        return;
    }
    if let Some(s) = find(sandboxes, claim, name).filter(|s| controlled_by(s, claim)) {
        ctrl.set_status(res.claims, &key, claim_status(claim, Some(s)));
        ctrl.stepped(&key);
        return;
    }
    let Some(pool_name) = claim["spec"]["warmPoolRef"]["name"].as_str() else {
        return;
    };
    let pool = find(pools, claim, pool_name);
    let hash = name_hash(pool_name);
    // A claim with `env` or `volumeClaimTemplates` bypasses the warm pool: warm pods have
    // neither (sandboxclaim_controller.go ~L2111-2112).
    let nonempty = |f: &str| claim["spec"][f].as_array().is_some_and(|a| !a.is_empty());
    let cold_only = nonempty("env") || nonempty("volumeClaimTemplates");
    // getCandidate (~L899): an unclaimed, network-ready member of the pool.
    let candidate = pool.filter(|_| !cold_only).and_then(|pool| {
        sandboxes.iter().find(|s| {
            same_ns(s, claim)
                && s["metadata"]["labels"][WARM_POOL_LABEL] == hash.as_str()
                && controlled_by(s, pool)
                && s["metadata"]["deletionTimestamp"].is_null()
                && is_ready(s)
                && s["status"]["podIPs"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
        })
    });
    if let Some(s) = candidate {
        let sname = s["metadata"]["name"].clone();
        let _ = update_from(ctrl.store(), res.claims, claim, |n| {
            n["metadata"]["annotations"][ASSIGNED_ANNOTATION] = sname;
        });
        ctrl.stepped(&key);
        return;
    }
    // getTemplate -> getWarmPool / getTemplateForWarmPool: ErrWarmPoolNotFound or
    // ErrTemplateNotFound (computeReadyCondition ~L693-715); the claim stays unbound and
    // is requeued every minute.
    let Some(pool) = pool else {
        let r = claim_policy::Refusal {
            reason: "WarmPoolNotFound",
            message: format!("SandboxWarmPool {pool_name:?} not found"),
            final_: false,
        };
        refuse(ctrl, res, &key, claim, &r);
        return;
    };
    let Some(template) = template_of(ctrl, res, pool) else {
        let r = claim_policy::Refusal {
            reason: "TemplateNotFound",
            message: "template of the warmpool not found".into(),
            final_: false,
        };
        refuse(ctrl, res, &key, claim, &r);
        return;
    };
    // createSandbox (~L1678-1810): the template's injection policies for
    // volumeClaimTemplates and env.
    if let Err(r) = claim_policy::check_injection(claim, &template) {
        refuse(ctrl, res, &key, claim, &r);
        return;
    }
    let obj = json!({
        "metadata": {
            "name": name,
            "labels": {CLAIM_UID_LABEL: claim["metadata"]["uid"]},
            "annotations": {"agents.x-k8s.io/sandbox-template-ref": template["metadata"]["name"]},
            "ownerReferences": [controller_ref(claim, "SandboxClaim")],
        },
        "spec": customized_spec(sandbox_spec(Some(&template)), claim),
    });
    let ns = claim["metadata"]["namespace"].as_str().unwrap_or("");
    let _ = ctrl.store().create(res.sandboxes, ns, obj);
    ctrl.stepped(&key);
}

/// `computeReadyCondition` (~L693-790) for a reconcile error: Ready=False with the
/// error's reason and message at the claim's generation; no `status.sandbox`.
fn refuse(
    ctrl: &Controller,
    res: Resources,
    key: &super::Key,
    claim: &Value,
    r: &claim_policy::Refusal,
) {
    let g = &claim["metadata"]["generation"];
    let status = json!({"conditions": [condition("Ready", "False", r.reason, &r.message, g)]});
    ctrl.set_status(res.claims, key, status);
}

/// The claim's status bound to `sandbox` (or unbound when it is gone).
fn claim_status(claim: &Value, sandbox: Option<&Value>) -> Value {
    let g = &claim["metadata"]["generation"];
    let Some(s) = sandbox else {
        return json!({"conditions": [condition(
            "Ready", "False", "SandboxMissing", "Sandbox is missing", g,
        )]});
    };
    let ready = is_ready(s);
    let mut conds = vec![condition(
        "Ready",
        if ready { "True" } else { "False" },
        if ready {
            "SandboxReady"
        } else {
            "SandboxNotReady"
        },
        "",
        g,
    )];
    if let Some(fin) = s["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Finished")
    {
        conds.push(fin.clone());
    }
    let mut sandbox = json!({"name": s["metadata"]["name"]});
    if let Some(ips) = s["status"]["podIPs"].as_array().filter(|a| !a.is_empty()) {
        sandbox["podIPs"] = json!(ips);
    }
    json!({"conditions": conds, "sandbox": sandbox})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_hash_is_fnv1a_32_like_upstream() {
        // FNV-1a 32 of "" is the offset basis; of "a" is 0xe40c292c (reference values).
        assert_eq!(name_hash(""), "811c9dc5");
        assert_eq!(name_hash("a"), "e40c292c");
    }
}
