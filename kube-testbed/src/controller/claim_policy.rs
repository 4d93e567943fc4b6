//! agent-sandbox's claim admission, as its claim controller does it (kubernetes-sigs/
//! agent-sandbox `2fd412d55eca`, `extensions/controllers/sandboxclaim_controller.go`): the
//! label-domain allowlist on `additionalPodMetadata`, and the SandboxTemplate's injection
//! policies for `env` and `volumeClaimTemplates`. A refused claim gets `Ready=False` with
//! the reason `computeReadyCondition` writes and is never bound.

use serde_json::Value;

/// Why the claim controller refused a claim: the Ready condition's reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
    /// Upstream suppresses (does not retry) user-configuration errors
    /// (`suppressErrors`); a plain error is retried with backoff as `ReconcilerError`.
    pub final_: bool,
}

/// `validateAdditionalPodMetadata`'s fallback when no allowlist file is mounted.
pub const DEFAULT_LABEL_DOMAIN: &str = "sandbox.users.io";
/// `restrictedDomains`: annotation domains a claim may not set.
const RESTRICTED_DOMAINS: [&str; 3] = ["kubernetes.io", "k8s.io", "agents.x-k8s.io"];
/// `exemptedMetadataKeys` (`autoscalerSafeToEvictAnnotation`).
const EXEMPTED: &str = "cluster-autoscaler.kubernetes.io/safe-to-evict";

fn invalid(message: String) -> Refusal {
    // `reconcileActive` wraps it: fmt.Errorf("%w: %w", ErrInvalidMetadata, err).
    Refusal {
        reason: "InvalidMetadata",
        message: format!("invalid additional pod metadata: {message}"),
        final_: true,
    }
}

fn in_domain(domain: &str, allowed: &str) -> bool {
    domain == allowed || domain.ends_with(&format!(".{allowed}"))
}

/// `validation.IsQualifiedName`, reduced: `[prefix/]name`, name 1-63 characters of
/// `[A-Za-z0-9._-]` starting and ending alphanumeric, prefix a lowercase DNS subdomain.
fn qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c))
    });
    name_ok && prefix_ok
}

/// `validation.IsValidLabelValue`: empty, or up to 63 characters of `[A-Za-z0-9._-]`
/// starting and ending alphanumeric.
fn label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// `validateAdditionalPodMetadata`: every label key needs a domain prefix in the allowlist
/// (`allowed`, or [`DEFAULT_LABEL_DOMAIN`] when empty; a subdomain matches), annotation
/// keys may not be in a restricted system domain, `app=sandbox-router` is refused.
pub fn validate_metadata(claim: &Value, allowed: &[String]) -> Result<(), Refusal> {
    let fallback = [DEFAULT_LABEL_DOMAIN.to_owned()];
    let allowed = if allowed.is_empty() {
        &fallback[..]
    } else {
        allowed
    };
    let meta = &claim["spec"]["additionalPodMetadata"];
    for (k, v) in meta["labels"].as_object().into_iter().flatten() {
        let v = v.as_str().unwrap_or("");
        let fail = |why: String| Err(invalid(format!("failed to validate label {k:?}: {why}")));
        if !qualified_name(k) {
            return fail(format!("invalid label key: {k:?}"));
        }
        if k.eq_ignore_ascii_case("app") && v.eq_ignore_ascii_case("sandbox-router") {
            return fail(format!("restricted system label value: {k:?}={v:?}"));
        }
        let Some((domain, _)) = k.split_once('/') else {
            return fail(format!("label {k:?} must have a domain prefix"));
        };
        let domain = domain.to_ascii_lowercase();
        if !allowed.iter().any(|d| in_domain(&domain, d)) {
            return fail(format!("label domain {domain:?} is not in the allowlist"));
        }
        if !label_value(v) {
            return fail(format!("invalid label value: {v:?}"));
        }
    }
    for (k, _) in meta["annotations"].as_object().into_iter().flatten() {
        if !qualified_name(k) {
            return Err(invalid(format!("invalid annotation key: {k:?}")));
        }
        if let Some((domain, _)) = k.split_once('/') {
            let domain = domain.to_ascii_lowercase();
            if RESTRICTED_DOMAINS.iter().any(|d| in_domain(&domain, d)) && k != EXEMPTED {
                return Err(invalid(format!(
                    "failed to validate annotation {k:?}: restricted system domain"
                )));
            }
        }
    }
    Ok(())
}

/// The checks of `createSandbox` (cold path) in its order: `mergeVolumeClaimTemplates`
/// under `volumeClaimTemplatesPolicy`, then `env` under `envVarsInjectionPolicy` and
/// `injectEnvs`. Both policies default to `Disallowed`
/// (`extensions/api/v1beta1/sandboxtemplate_types.go`, `+kubebuilder:default=Disallowed`;
/// an unset field is treated the same).
pub fn check_injection(claim: &Value, template: &Value) -> Result<(), Refusal> {
    let spec = &template["spec"];
    let claim_vcts = claim["spec"]["volumeClaimTemplates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !claim_vcts.is_empty() {
        let vct_err = |m: String| Refusal {
            reason: "VolumeClaimTemplatesError",
            message: format!("failed to merge volume claim templates: {m}"),
            final_: true,
        };
        match spec["volumeClaimTemplatesPolicy"].as_str().unwrap_or("") {
            "Allowed" => {
                let template_names: Vec<&Value> = spec["volumeClaimTemplates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| &v["metadata"]["name"])
                    .collect();
                if let Some(v) = claim_vcts
                    .iter()
                    .find(|v| template_names.contains(&&v["metadata"]["name"]))
                {
                    return Err(vct_err(format!(
                        "overriding volume claim templates is forbidden by the template: \
                         cannot override template volume {}",
                        v["metadata"]["name"]
                    )));
                }
            }
            "Overrides" => {}
            _ => {
                return Err(vct_err(
                    "volume claim templates are disallowed by the template".into(),
                ));
            }
        }
    }
    let env = claim["spec"]["env"].as_array().cloned().unwrap_or_default();
    if env.is_empty() {
        return Ok(());
    }
    let policy = spec["envVarsInjectionPolicy"].as_str().unwrap_or("");
    if policy != "Allowed" && policy != "Overrides" {
        return Err(Refusal {
            reason: "EnvVarsInjectionRejected",
            message: "environment variable injection rejected: environment variable \
                      injection is not allowed by the template policy"
                .into(),
            final_: true,
        });
    }
    let containers = spec["podTemplate"]["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for e in &env {
        let target = match e["containerName"].as_str() {
            Some(n) => containers.iter().find(|c| c["name"] == n),
            None => containers.first(),
        };
        let Some(c) = target else {
            // A plain error: retried as ReconcilerError.
            return Err(Refusal {
                reason: "ReconcilerError",
                message: format!(
                    "Error seen: target container {} not found in template for environment \
                     variable {}",
                    e["containerName"], e["name"]
                ),
                final_: false,
            });
        };
        let defined = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["name"] == e["name"]);
        if defined && policy != "Overrides" {
            return Err(Refusal {
                reason: "ReconcilerError",
                message: format!(
                    "Error seen: environment variable override is not allowed by the template \
                     policy for variable {}",
                    e["name"]
                ),
                final_: false,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claim(labels: Value) -> Value {
        json!({"spec": {"additionalPodMetadata": {"labels": labels}}})
    }

    #[test]
    fn labels_outside_the_allowlist_are_invalid_metadata() {
        assert!(validate_metadata(&claim(json!({"sandbox.users.io/team": "a"})), &[]).is_ok());
        assert!(validate_metadata(&claim(json!({"x.sandbox.users.io/team": "a"})), &[]).is_ok());
        let r = validate_metadata(&claim(json!({"example.com/team": "a"})), &[]).unwrap_err();
        assert_eq!(r.reason, "InvalidMetadata");
        assert!(r.message.contains("not in the allowlist"), "{}", r.message);
        assert!(validate_metadata(&claim(json!({"team": "a"})), &[]).is_err());
        let allowed = ["example.com".to_owned()];
        assert!(validate_metadata(&claim(json!({"example.com/team": "a"})), &allowed).is_ok());
    }

    #[test]
    fn injection_policies_default_to_disallowed() {
        let t = json!({"spec": {"podTemplate": {"spec": {"containers": [{"name": "a"}]}}}});
        let env = json!({"spec": {"env": [{"name": "X", "value": "1"}]}});
        assert_eq!(
            check_injection(&env, &t).unwrap_err().reason,
            "EnvVarsInjectionRejected"
        );
        let vct = json!({"spec": {"volumeClaimTemplates": [{"metadata": {"name": "w"}}]}});
        assert_eq!(
            check_injection(&vct, &t).unwrap_err().reason,
            "VolumeClaimTemplatesError"
        );
        let mut allowed = t.clone();
        allowed["spec"]["envVarsInjectionPolicy"] = json!("Allowed");
        allowed["spec"]["volumeClaimTemplatesPolicy"] = json!("Allowed");
        assert!(check_injection(&env, &allowed).is_ok());
        assert!(check_injection(&vct, &allowed).is_ok());
    }
}
