use http::{HeaderName, StatusCode};

use super::*;

fn rules(yaml: &str) -> EdgeRules {
    let config = Config::from_yaml(&format!(
        "backend:\n  kind: static\n  endpoints: ['127.0.0.1:1']\n{yaml}"
    ))
    .unwrap();
    EdgeRules::new(&config)
}

fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (k, v) in pairs {
        m.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    m
}

fn check(
    r: &EdgeRules,
    method: Method,
    version: Version,
    authority: Option<&str>,
    pairs: &[(&str, &str)],
) -> Result<HeaderMap, EdgeViolation> {
    let mut h = map(pairs);
    r.check_request(&method, version, authority.map(str::as_bytes), &mut h)
        .map(|()| h)
}

#[test]
fn connect_is_refused_with_405() {
    let r = rules("");
    let e = check(
        &r,
        Method::CONNECT,
        Version::HTTP_11,
        Some("t:443"),
        &[("host", "t:443")],
    )
    .unwrap_err();
    assert_eq!(e, EdgeViolation::Connect);
    assert_eq!(e.code(), "method_not_allowed");
    assert!(check(&r, Method::CONNECT, Version::HTTP_2, Some("t:443"), &[]).is_err());
}

#[test]
fn lookalikes_of_routing_framing_and_configured_fields_are_refused() {
    let r = rules(
        "session:\n  sources: [{header: X-Session-ID}, {header: X-Tenant}]\nproxy:\n  strip_headers: [X-Internal-Auth]\n",
    );
    for name in [
        "X_Session_ID",
        "x-session_id",
        "X_TENANT",
        "Content_Length",
        "Transfer_Encoding",
        "X_Forwarded_For",
        "X_Request_ID",
        "x_internal_auth",
    ] {
        let got = check(
            &r,
            Method::GET,
            Version::HTTP_11,
            None,
            &[("host", "a"), (name, "v")],
        );
        let e = got.expect_err(name);
        assert_eq!(e.code(), "lookalike_header", "{name}");
    }
    // Other underscore names pass, untouched.
    let h = check(
        &r,
        Method::GET,
        Version::HTTP_11,
        None,
        &[("host", "a"), ("x_custom", "1")],
    )
    .unwrap();
    assert_eq!(h["x_custom"], "1");
}

#[test]
fn drop_policy_removes_every_underscore_name_and_keeps_the_rest() {
    let r = rules("proxy:\n  underscore_headers: drop\n");
    let h = check(
        &r,
        Method::GET,
        Version::HTTP_11,
        None,
        &[
            ("host", "a"),
            ("x_session_id", "s2"),
            ("x-session-id", "s1"),
            ("x_custom", "1"),
            ("x-ok", "2"),
        ],
    )
    .unwrap();
    let mut names: Vec<_> = h.keys().map(|n| n.as_str().to_owned()).collect();
    names.sort();
    assert_eq!(names, ["host", "x-ok", "x-session-id"]);
}

#[test]
fn duplicate_session_headers_are_refused() {
    let r = rules("");
    let e = check(
        &r,
        Method::GET,
        Version::HTTP_11,
        None,
        &[
            ("host", "a"),
            ("x-session-id", "s1"),
            ("X-Session-ID", "s1"),
        ],
    )
    .unwrap_err();
    assert_eq!(e.code(), "duplicate_session_header");
    assert!(
        check(
            &r,
            Method::GET,
            Version::HTTP_11,
            None,
            &[("host", "a"), ("x-session-id", "s1")]
        )
        .is_ok()
    );
}

#[test]
fn host_rules_by_version() {
    let r = rules("");
    let code = |v, a: Option<&str>, pairs: &[(&str, &str)]| {
        check(&r, Method::GET, v, a, pairs).err().map(|e| e.code())
    };
    // HTTP/1.1: exactly one valid Host.
    assert_eq!(code(Version::HTTP_11, None, &[("host", "a.example")]), None);
    assert_eq!(code(Version::HTTP_11, None, &[]), Some("invalid_host"));
    assert_eq!(
        code(Version::HTTP_11, None, &[("host", "a"), ("host", "a")]),
        Some("invalid_host")
    );
    assert_eq!(code(Version::HTTP_10, None, &[]), None);
    // Absolute-form: the target's authority must be the Host.
    assert_eq!(
        code(
            Version::HTTP_11,
            Some("a.example"),
            &[("host", "A.example")]
        ),
        None
    );
    assert_eq!(
        code(
            Version::HTTP_11,
            Some("b.example"),
            &[("host", "a.example")]
        ),
        Some("invalid_host")
    );
    assert_eq!(
        code(Version::HTTP_11, Some("b.example"), &[]),
        Some("invalid_host")
    );
    // HTTP/2: :authority and host agree, or one of them alone; neither is refused.
    assert_eq!(code(Version::HTTP_2, Some("a.example"), &[]), None);
    assert_eq!(code(Version::HTTP_2, None, &[("host", "a.example")]), None);
    assert_eq!(
        code(Version::HTTP_2, Some("a.example"), &[("host", "a.example")]),
        None
    );
    assert_eq!(
        code(
            Version::HTTP_2,
            Some("a.example"),
            &[("host", "evil.example")]
        ),
        Some("invalid_host")
    );
    assert_eq!(code(Version::HTTP_2, None, &[]), Some("invalid_host"));
}

#[test]
fn host_values() {
    for ok in [
        "a",
        "a.example",
        "a.example:8080",
        "127.0.0.1:1",
        "[::1]",
        "[::1]:80",
        "x_y.example",
        "%41.example",
    ] {
        assert!(valid_host(ok.as_bytes()), "{ok}");
    }
    for bad in [
        "",
        ":80",
        "a b",
        "a@b",
        "a/b",
        "a?b",
        "a#b",
        "a\\b",
        "a:8x",
        "a:123456",
        "[::1",
        "[]",
        "[::1]x",
        "\u{e9}.example",
    ] {
        assert!(!valid_host(bad.as_bytes()), "{bad}");
    }
}

#[test]
fn http2_cookies_are_joined() {
    let r = rules("");
    let h = check(
        &r,
        Method::GET,
        Version::HTTP_2,
        Some("a"),
        &[("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")],
    )
    .unwrap();
    assert_eq!(h.get_all(COOKIE).iter().count(), 1);
    assert_eq!(h[COOKIE], "a=1; b=2; c=3");
    // HTTP/1.1 is left as sent.
    let h = check(
        &r,
        Method::GET,
        Version::HTTP_11,
        None,
        &[("host", "a"), ("cookie", "a=1"), ("cookie", "b=2")],
    )
    .unwrap();
    assert_eq!(h.get_all(COOKIE).iter().count(), 2);
}

#[test]
fn forbidden_trailers_are_dropped() {
    let mut t = map(&[
        ("content-length", "5"),
        ("x-checksum", "1"),
        ("Host", "a"),
        ("transfer-encoding", "chunked"),
        ("set-cookie", "a=1"),
        ("grpc-status", "0"),
    ]);
    drop_forbidden_trailers(&mut t);
    let mut names: Vec<_> = t.keys().map(|n| n.as_str().to_owned()).collect();
    names.sort();
    assert_eq!(names, ["grpc-status", "x-checksum"]);
}

#[test]
fn content_length_by_status() {
    for (status, keeps) in [
        (200, true),
        (204, false),
        (304, false),
        (101, false),
        (103, false),
        (404, true),
    ] {
        let mut h = map(&[("content-length", "3")]);
        fix_response_length(StatusCode::from_u16(status).unwrap(), &mut h);
        assert_eq!(h.contains_key(CONTENT_LENGTH), keeps, "{status}");
    }
}

#[test]
fn no_reuse_after_a_tunnel() {
    assert!(!reusable_after(&Method::CONNECT, StatusCode::OK));
    assert!(!reusable_after(
        &Method::GET,
        StatusCode::SWITCHING_PROTOCOLS
    ));
    assert!(reusable_after(&Method::CONNECT, StatusCode::FORBIDDEN));
    assert!(reusable_after(&Method::GET, StatusCode::OK));
}

#[test]
fn connection_cannot_name_routing_fields() {
    let r = rules("");
    for name in ["Host", "content-length", "X-Session-ID"] {
        assert!(!r.connection_may_remove(name.as_bytes()), "{name}");
    }
    assert!(r.connection_may_remove(b"x-request-id"));
    assert!(is_hop_by_hop(b"Keep-Alive") && !is_hop_by_hop(b"trailer"));
}
