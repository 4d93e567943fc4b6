//! Claims the controllers refuse and pods nobody can schedule, against kube-testbed (issue
//! 21 items 1-2): the refusal is read from the claim's (or Sandbox's) status and becomes
//! a prompt, specific client error — 502 `claim_rejected` (the controller's reason in the
//! log and the admin API's events, never in the body), 503 `no_capacity` with
//! `Retry-After` for Unschedulable — instead of a wait for the whole budget.

use crate::kube_support;

use std::time::Duration;

use agent_activator::config::Config;
use kube_support::*;
use tokio::time::Instant;

/// Small budgets, so today's behaviour (wait them out) shows as a wrong answer quickly;
/// a prompt answer must come well inside them.
const BUDGETS: &str = "session:\n  admission_timeout: 6s\n";

const ENV_RULE: &str = "customize:\n  env:\n    - {header: X-Sandbox-Env-Region, name: REGION, \
                        pattern: \"[a-z]{2}-[a-z]+\"}\n";
const LABEL_RULE: &str = "customize:\n  labels:\n    - {header: X-Sandbox-Team, label: \
                          example.com/team, pattern: \"[a-z]+\"}\n";
/// The same rule in the controller's default allowlist.
const DEFAULT_DOMAIN_LABEL_RULE: &str = "customize:\n  labels:\n    - {header: X-Sandbox-Team, \
                                         label: sandbox.users.io/team, pattern: \"[a-z]+\"}\n";
const VOLUME_RULE: &str = "customize:\n  volumes:\n    - {name: workspace, mount_path: \
                           /workspace, size: 1Gi}\n";

/// A session request with `headers`, the elapsed time and the response.
async fn timed(
    proxy: std::net::SocketAddr,
    session: &str,
    headers: &[(&str, &str)],
) -> (Duration, u16, serde_json::Value, http::HeaderMap) {
    let started = Instant::now();
    let (status, body, h) = http_with(proxy, "GET", "/state", Some(session), headers).await;
    (started.elapsed(), status, body, h)
}

/// Asserts a 502 `claim_rejected` whose body carries none of the controller's words, and
/// an admin event naming `reason`.
async fn assert_rejected(
    srv: &agent_activator::server::RunningServer,
    got: (Duration, u16, serde_json::Value, http::HeaderMap),
    reason: &str,
) {
    let (took, status, body, headers) = got;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "claim_rejected", "{body}");
    let text = body.to_string();
    assert!(
        !text.contains(reason) && !text.contains("allowlist") && !text.contains("template"),
        "the controller's text leaked to the client: {text}"
    );
    assert!(headers.get("retry-after").is_none(), "{headers:?}");
    // docs/benchmarks.md records these figures.
    eprintln!("controller refusal ({reason}) -> client answer: {took:?}");
    // End to end (a fresh activator's first request: watch sync, claim create, the
    // controller's pass, the answer); the goal of < 2 s is recorded in docs/benchmarks.md.
    // The bound here leaves room for a loaded CI machine and is still well inside the
    // 6 s admission budget that was waited out before.
    assert!(
        took < Duration::from_secs(4),
        "the refusal took {took:?} (goal < 2 s)"
    );
    let events = admin_events(srv.admin_addr()).await;
    assert!(
        events.iter().any(|e| e["kind"] == "rejected"
            && e["detail"].as_str().is_some_and(|d| d.starts_with(reason))),
        "no rejected event with detail {reason}: {events:?}"
    );
}

#[test]
fn a_label_outside_the_controllers_allowlist_is_refused_at_config_load() {
    let yaml = |extra: &str| {
        format!(
            "backend:\n  kind: kubernetes\n  kubernetes:\n    api: agent-sandbox\n{extra}{LABEL_RULE}"
        )
    };
    let err = Config::from_yaml(&yaml("")).expect_err("example.com is not allowed by default");
    let msg = err.to_string();
    assert!(
        msg.contains("backend.kubernetes.allowed_label_domains") && msg.contains("example.com"),
        "{msg}"
    );
    // Allowed once the operator lists the domain (as on the controller).
    Config::from_yaml(&yaml("    allowed_label_domains: [example.com]\n"))
        .expect("an allowlisted domain is accepted");
    // The default domain, and its subdomains, need nothing.
    let ok = LABEL_RULE.replace("example.com/team", "team.sandbox.users.io/name");
    Config::from_yaml(&format!(
        "backend:\n  kind: kubernetes\n  kubernetes:\n    api: agent-sandbox\n{ok}"
    ))
    .expect("the default allowlist");
    // A malformed domain names the key.
    let err = Config::from_yaml(&yaml("    allowed_label_domains: [\"Not A Domain\"]\n"))
        .expect_err("not a DNS subdomain");
    assert!(
        err.to_string()
            .contains("backend.kubernetes.allowed_label_domains"),
        "{err}"
    );
}

#[tokio::test]
async fn agent_sandbox_refusals_are_a_prompt_502_claim_rejected() {
    // This controller was started with another allowlist than the activator's default.
    let tb = testbed_with(|o| {
        o.bind_delay = Duration::from_millis(10);
        o.allowed_label_domains = vec!["corp.example".into()];
    })
    .await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &config("agent-sandbox", "default", ""));

    // env on a template that does not allow it (upstream's default policy).
    let srv = activator_on(
        &tb,
        "agent-sandbox",
        "default",
        &format!("{BUDGETS}{ENV_RULE}"),
        |_| {},
    )
    .await;
    let got = timed(
        srv.proxy_addr(),
        "env",
        &[("x-sandbox-env-region", "eu-west")],
    )
    .await;
    assert_rejected(&srv, got, "EnvVarsInjectionRejected").await;
    // The refused claim is not left behind.
    wait_until(&tb, "the refused claim is deleted", |tb| {
        object(
            tb,
            AGENT_SANDBOX,
            "SandboxClaim",
            &b.claim_name(&key("env")),
        )
        .is_none()
    })
    .await;
    srv.shutdown().await;

    // volumeClaimTemplates likewise.
    let srv = activator_on(
        &tb,
        "agent-sandbox",
        "default",
        &format!("{BUDGETS}{VOLUME_RULE}"),
        |_| {},
    )
    .await;
    let got = timed(srv.proxy_addr(), "vol", &[]).await;
    assert_rejected(&srv, got, "VolumeClaimTemplatesError").await;
    srv.shutdown().await;

    // A label domain the activator allows but the controller does not (the two lists
    // disagree): InvalidMetadata.
    let srv = activator_on(
        &tb,
        "agent-sandbox",
        "default",
        &format!("{BUDGETS}{DEFAULT_DOMAIN_LABEL_RULE}"),
        |_| {},
    )
    .await;
    let got = timed(srv.proxy_addr(), "label", &[("x-sandbox-team", "infra")]).await;
    assert_rejected(&srv, got, "InvalidMetadata").await;
    srv.shutdown().await;

    // With the policies deploy/sandboxtemplate.yaml sets, the same customisation works.
    tb.set_template_policies("default", "default", "Allowed", "Allowed")
        .unwrap();
    let srv = activator_on(
        &tb,
        "agent-sandbox",
        "default",
        &format!("{BUDGETS}{ENV_RULE}"),
        |_| {},
    )
    .await;
    let (_, status, body, _) = timed(
        srv.proxy_addr(),
        "env2",
        &[("x-sandbox-env-region", "eu-west")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    srv.shutdown().await;
}

#[tokio::test]
async fn openkruise_terminal_claim_is_a_prompt_502_claim_rejected() {
    let tb = testbed(Duration::from_millis(10)).await;
    // No SandboxSet of that name: the claim controller completes the claim with
    // SandboxSetNotFound (terminal).
    let srv = activator_on(&tb, "openkruise", "missing", BUDGETS, |_| {}).await;
    let got = timed(srv.proxy_addr(), "kruise", &[]).await;
    assert_rejected(&srv, got, "SandboxSetNotFound").await;
    srv.shutdown().await;
}

#[tokio::test]
async fn an_unschedulable_pod_is_a_prompt_503_no_capacity_on_claim_and_on_resume() {
    let tb = testbed(Duration::from_millis(10)).await;
    tb.seed_agent_sandbox("default", "default", 0).unwrap();
    let ctrl = tb.controller.clone().unwrap();
    ctrl.set_capacity(Some(0));
    let srv = activator_on(&tb, "agent-sandbox", "default", BUDGETS, |c| {
        c.activation.timeout = agent_activator::config::Dur::secs(6)
    })
    .await;
    let (took, status, body, headers) = timed(srv.proxy_addr(), "u1", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_capacity", "{body}");
    assert_eq!(headers["retry-after"], "1");
    eprintln!("Unschedulable (claim) -> client answer: {took:?}");
    assert!(took < Duration::from_secs(4), "took {took:?} (goal < 2 s)");

    // Resume: the suspended sandbox's pod finds no node.
    ctrl.set_capacity(None);
    let (_, status, body, _) = timed(srv.proxy_addr(), "u2", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(srv.activator().pause(&key("u2")).await.unwrap());
    ctrl.set_capacity(Some(0));
    let (took, status, body, headers) = timed(srv.proxy_addr(), "u2", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_capacity", "{body}");
    assert_eq!(headers["retry-after"], "1");
    eprintln!("Unschedulable (resume) -> client answer: {took:?}");
    assert!(took < Duration::from_secs(4), "took {took:?} (goal < 2 s)");
    // Room again: the same session resumes.
    ctrl.set_capacity(None);
    let (_, status, body, _) = timed(srv.proxy_addr(), "u2", &[]).await;
    assert_eq!(status, 200, "{body}");
    srv.shutdown().await;
}
