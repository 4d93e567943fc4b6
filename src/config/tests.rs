use super::*;
use std::time::Duration;

fn err(yaml: &str) -> String {
    Config::from_yaml(yaml).unwrap_err().to_string()
}

const STATIC: &str = "backend:\n  kind: static\n  endpoints: [\"127.0.0.1:9001\"]\n";

#[test]
fn minimal_static_config_loads_with_defaults() {
    let c = Config::from_yaml(STATIC).unwrap();
    assert_eq!(c.session.max_sessions_per_sandbox, 1);
    assert_eq!(
        c.session.admission_timeout.as_duration(),
        Duration::from_secs(30)
    );
    assert_eq!(
        c.session.sources,
        vec![SessionSource::Header("X-Session-ID".into())]
    );
    assert_eq!(c.effective_idle_policy(false), IdlePolicy::Release);
}

#[test]
fn unknown_key_is_named() {
    let e = err(&format!("{STATIC}sesion:\n  on_missing: create\n"));
    assert!(e.contains("sesion"), "{e}");
}

#[test]
fn nested_wrong_type_names_path() {
    let e = err(&format!(
        "{STATIC}session:\n  max_sessions_per_sandbox: lots\n"
    ));
    assert!(e.starts_with("session.max_sessions_per_sandbox"), "{e}");
}

#[test]
fn bad_duration_names_key() {
    let e = err(&format!("{STATIC}idle:\n  timeout: 5 parsecs\n"));
    assert!(e.starts_with("idle.timeout"), "{e}");
    assert!(e.contains("30s"), "{e}");
}

#[test]
fn durations_parse() {
    let c = Config::from_yaml(&format!(
        "{STATIC}idle:\n  timeout: 500ms\nsession:\n  admission_timeout: 10m\n"
    ))
    .unwrap();
    assert_eq!(c.idle.timeout.as_duration(), Duration::from_millis(500));
    assert_eq!(
        c.session.admission_timeout.as_duration(),
        Duration::from_secs(600)
    );
}

#[test]
fn sources_parse_in_order() {
    let c = Config::from_yaml(&format!(
        "{STATIC}session:\n  sources:\n    - path_prefix: /s/\n    - cookie: sid\n    - query: session\n"
    ))
    .unwrap();
    assert_eq!(
        c.session.sources,
        vec![
            SessionSource::PathPrefix("/s/".into()),
            SessionSource::Cookie("sid".into()),
            SessionSource::Query("session".into()),
        ]
    );
    assert_eq!(c.session.effective_cookie_name(), "sid");
}

#[test]
fn bad_path_prefix_names_index() {
    let e = err(&format!(
        "{STATIC}session:\n  sources:\n    - header: X-A\n    - path_prefix: s\n"
    ));
    assert!(e.starts_with("session.sources[1].path_prefix"), "{e}");
}

#[test]
fn static_needs_endpoints() {
    let e = err("backend:\n  kind: static\n");
    assert!(e.starts_with("backend.endpoints"), "{e}");
}

#[test]
fn static_cannot_pause() {
    let e = err(&format!("{STATIC}idle:\n  policy: pause\n"));
    assert!(e.starts_with("idle.policy"), "{e}");
}

#[test]
fn process_needs_port_placeholder() {
    let e = err("backend:\n  kind: process\n  command: [\"demo\"]\n");
    assert!(e.starts_with("backend.command"), "{e}");
}

#[test]
fn unknown_enum_value_is_named() {
    let e = err(&format!("{STATIC}session:\n  on_missing: maybe\n"));
    assert!(e.starts_with("session.on_missing"), "{e}");
}

#[test]
fn applying_decisions_needs_a_scalable_backend() {
    let e = err(&format!("{STATIC}autoscaler:\n  apply: true\n"));
    assert!(e.starts_with("autoscaler.apply"), "{e}");
}

#[test]
fn connection_bounds_have_safe_defaults() {
    let c = Config::from_yaml(STATIC).unwrap();
    let p = &c.proxy;
    assert_eq!(p.max_header_bytes, 64 * 1024);
    assert_eq!(p.max_body_bytes, None);
    assert_eq!(p.allowed_upgrades, vec!["websocket".to_owned()]);
    assert!(p.trusted_proxies.is_empty());
    assert!(p.max_connections > 0 && !p.idle_timeout.is_zero() && !p.body_timeout.is_zero());
    assert_eq!(
        c.admin.public_paths,
        vec!["/metrics".to_owned(), "/healthz".into(), "/readyz".into()]
    );
}

#[test]
fn connection_keys_are_checked_by_name() {
    for (yaml, key) in [
        ("proxy:\n  max_connections: 0\n", "proxy.max_connections"),
        (
            "proxy:\n  max_header_bytes: 100\n",
            "proxy.max_header_bytes",
        ),
        ("proxy:\n  max_body_bytes: 0\n", "proxy.max_body_bytes"),
        ("proxy:\n  idle_timeout: 0s\n", "proxy.idle_timeout"),
        ("proxy:\n  body_timeout: 0s\n", "proxy.body_timeout"),
        (
            "proxy:\n  client_header_timeout: 0s\n",
            "proxy.client_header_timeout",
        ),
        (
            "proxy:\n  tunnel_idle_timeout: 0s\n",
            "proxy.tunnel_idle_timeout",
        ),
        (
            "proxy:\n  http2_max_concurrent_streams: 0\n",
            "proxy.http2_max_concurrent_streams",
        ),
        (
            "proxy:\n  allowed_upgrades: [h2c]\n",
            "proxy.allowed_upgrades[0]",
        ),
        (
            "proxy:\n  allowed_upgrades: ['a b']\n",
            "proxy.allowed_upgrades[0]",
        ),
        (
            "proxy:\n  trusted_proxies: [10.0.0.0/8, nope]\n",
            "proxy.trusted_proxies[1]",
        ),
        (
            "admin:\n  public_paths: [metrics]\n",
            "admin.public_paths[0]",
        ),
    ] {
        let e = err(&format!("{STATIC}{yaml}"));
        assert!(e.starts_with(key), "{yaml}: {e}");
    }
}

#[test]
fn a_reachable_admin_port_needs_auth_or_an_explicit_opt_out() {
    let e = err(&format!("{STATIC}admin_listen: 0.0.0.0:9090\n"));
    assert!(
        e.starts_with("admin_listen") && e.contains("bearer_token_file"),
        "{e}"
    );
    let ok =
        |extra: &str| Config::from_yaml(&format!("{STATIC}admin_listen: 0.0.0.0:9090\n{extra}"));
    assert!(ok("admin:\n  allow_unauthenticated: true\n").is_ok());
    assert!(ok("admin:\n  auth:\n    bearer_token_file: /run/secrets/token\n").is_ok());
    assert!(Config::from_yaml(&format!("{STATIC}admin_listen: '[::1]:9090'\n")).is_ok());
}
