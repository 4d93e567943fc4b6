use super::*;
use crate::config::Config;

fn extractor(yaml: &str) -> SessionExtractor {
    let config = Config::from_yaml(&format!(
        "backend: {{kind: static, endpoints: ['127.0.0.1:1']}}\n{yaml}"
    ))
    .expect("valid config");
    SessionExtractor::new(&config.session, None, false)
}

fn req(uri: &str, headers: &[(&str, &str)]) -> (Uri, HeaderMap) {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    (uri.parse().unwrap(), map)
}

const ALL: &str = "session:
  sources:
    - header: X-Session-ID
    - cookie: sid
    - path_prefix: /s/
    - query: session
";

#[test]
fn header_source() {
    let e = extractor(ALL);
    let (u, h) = req("/x", &[("x-session-id", "abc")]);
    let got = e.extract(&u, &h).unwrap();
    assert_eq!(got.key.as_str(), "abc");
    assert_eq!(got.origin, SessionOrigin::Header);
    assert!(got.rewritten.is_none());
}

#[test]
fn cookie_source_across_headers_and_quotes() {
    let e = extractor(ALL);
    let (u, h) = req(
        "/x",
        &[("cookie", "a=1; b=2"), ("cookie", "other=3; sid=\"c-1\"")],
    );
    let got = e.extract(&u, &h).unwrap();
    assert_eq!(got.key.as_str(), "c-1");
    assert_eq!(got.origin, SessionOrigin::Cookie);
}

#[test]
fn cookie_name_must_match_exactly() {
    let e = extractor(ALL);
    let (u, h) = req("/x", &[("cookie", "xsid=1; sidx=2")]);
    assert!(matches!(e.extract(&u, &h), Err(ExtractError::Missing(_))));
}

#[test]
fn path_prefix_strips_and_keeps_query() {
    let e = extractor(ALL);
    let (u, h) = req("/s/abc/api/v1?x=1&y=2", &[]);
    let got = e.extract(&u, &h).unwrap();
    assert_eq!(got.key.as_str(), "abc");
    assert_eq!(got.origin, SessionOrigin::PathPrefix);
    assert_eq!(got.rewritten.unwrap().as_str(), "/api/v1?x=1&y=2");

    let (u, h) = req("/s/abc", &[]);
    assert_eq!(e.extract(&u, &h).unwrap().rewritten.unwrap().as_str(), "/");
    let (u, h) = req("/s/abc?q", &[]);
    assert_eq!(
        e.extract(&u, &h).unwrap().rewritten.unwrap().as_str(),
        "/?q"
    );
}

#[test]
fn query_source() {
    let e = extractor(ALL);
    let (u, h) = req("/x?a=1&session=q-9&b", &[]);
    let got = e.extract(&u, &h).unwrap();
    assert_eq!(got.key.as_str(), "q-9");
    assert_eq!(got.origin, SessionOrigin::Query);
}

#[test]
fn first_present_source_decides_and_others_must_agree() {
    let e = extractor(ALL);
    let (u, h) = req("/s/good/x", &[("x-session-id", "bad id")]);
    let err = e.extract(&u, &h).unwrap_err();
    assert!(matches!(
        err,
        ExtractError::Invalid {
            origin: "header",
            ..
        }
    ));
    // The cookie decides over the path, which names another session: a conflict.
    let (u, h) = req("/s/good/x", &[("cookie", "sid=fromcookie")]);
    assert!(matches!(
        e.extract(&u, &h),
        Err(ExtractError::Conflicting {
            first: "cookie",
            second: "path_prefix"
        })
    ));
    let (u, h) = req("/s/good/x", &[("cookie", "sid=good")]);
    let got = e.extract(&u, &h).unwrap();
    assert_eq!(
        (got.key.as_str(), got.origin),
        ("good", SessionOrigin::Cookie)
    );
}

#[test]
fn invalid_ids() {
    let e = extractor("session: {max_id_length: 4}");
    for bad in ["", "toolong", "a/b", "é"] {
        let (u, mut h) = req("/", &[]);
        h.insert(
            "x-session-id",
            HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
        );
        assert!(
            matches!(e.extract(&u, &h), Err(ExtractError::Invalid { .. })),
            "{bad:?}"
        );
    }
    let e = extractor(ALL);
    let (u, h) = req("/s//rest", &[]);
    assert!(matches!(
        e.extract(&u, &h),
        Err(ExtractError::Invalid {
            origin: "path_prefix",
            reason: InvalidSessionId::Empty
        })
    ));
}

#[test]
fn missing_rejects_or_mints() {
    let e = extractor(ALL);
    let (u, h) = req("/plain", &[]);
    match e.extract(&u, &h) {
        Err(ExtractError::Missing(msg)) => assert!(msg.contains("cookie sid"), "{msg}"),
        other => panic!("expected Missing, got {other:?}"),
    }
    let e = extractor("session: {on_missing: create, sources: [{cookie: sid}]}");
    let a = e.extract(&u, &h).unwrap();
    let b = e.extract(&u, &h).unwrap();
    assert_eq!(a.origin, SessionOrigin::Minted);
    assert_ne!(a.key, b.key);
    let cookie = e.set_cookie(&e.client_value(&a.key)).unwrap();
    assert_eq!(
        cookie.to_str().unwrap(),
        format!("sid={}; Path=/; HttpOnly; SameSite=Lax", a.key.as_str())
    );
}

#[test]
fn secure_cookie_with_tls() {
    let config = Config::from_yaml(
        "backend: {kind: static, endpoints: ['127.0.0.1:1']}\nsession: {on_missing: create}",
    )
    .unwrap();
    let e = SessionExtractor::new(&config.session, None, true);
    let key = SessionKey::random();
    let v = e.set_cookie(key.as_str()).unwrap();
    assert!(v.to_str().unwrap().starts_with("activator-session="));
    assert!(v.to_str().unwrap().ends_with("; Secure"));
}

#[test]
fn conflicting_sources() {
    let e = extractor(ALL);
    let (u, h) = req("/s/alice/x", &[("x-session-id", "bob")]);
    assert_eq!(
        e.extract(&u, &h).unwrap_err(),
        ExtractError::Conflicting {
            first: "header",
            second: "path_prefix"
        }
    );
    // Agreeing sources are fine, and the prefix goes whichever decided.
    let (u, h) = req("/s/alice/ws?x=1", &[("cookie", "sid=alice")]);
    let got = e.extract(&u, &h).unwrap();
    assert_eq!(got.key.as_str(), "alice");
    assert_eq!(got.origin, SessionOrigin::Cookie);
    assert_eq!(got.rewritten.unwrap().as_str(), "/ws?x=1");
    // An invalid value in a later source is still an error.
    let (u, h) = req("/x?session=a%20b", &[("x-session-id", "alice")]);
    assert!(matches!(
        e.extract(&u, &h),
        Err(ExtractError::Invalid {
            origin: "query",
            ..
        })
    ));
}

#[test]
fn tokens_with_hmac() {
    let config = Config::from_yaml(
        "backend: {kind: static, endpoints: ['127.0.0.1:1']}\n\
         session: {sources: [{header: X-Session-ID}, {cookie: sid}]}",
    )
    .unwrap();
    let signer = std::sync::Arc::new(
        TokenSigner::new(&[("k1", b"0123456789abcdef0123456789abcdef")], 60, 128).unwrap(),
    );
    let e = SessionExtractor::new(&config.session, Some(signer.clone()), false);
    let alice = SessionKey::parse("alice", 128).unwrap();
    let token = signer.mint(&alice);
    let (u, h) = req("/", &[("x-session-id", &token)]);
    assert_eq!(e.extract(&u, &h).unwrap().key, alice);
    // A fresh token for the same session in the cookie agrees with the header's.
    let other = signer.mint_at(&alice, now_unix_plus(30));
    let (u, h) = req(
        "/",
        &[
            ("x-session-id", &token),
            ("cookie", &format!("sid={other}")),
        ],
    );
    assert_eq!(e.extract(&u, &h).unwrap().key, alice);
    for bad in ["alice", "", &token.replacen("alice", "bobby", 1)] {
        let (u, h) = req("/", &[("x-session-id", bad)]);
        assert!(
            matches!(
                e.extract(&u, &h),
                Err(ExtractError::Token {
                    origin: "header",
                    ..
                })
            ),
            "{bad:?}"
        );
    }
    let (u, h) = req("/", &[]);
    assert!(matches!(
        e.extract(&u, &h),
        Err(ExtractError::Token {
            reason: TokenError::Missing,
            ..
        })
    ));
}

fn now_unix_plus(s: u64) -> u64 {
    super::super::now_unix() + s
}
