//! Property tests: arbitrary bytes into session extraction, token verification and the
//! session header rewriting. None may panic, and each must classify correctly.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Uri};
use proptest::prelude::*;

use agent_activator::config::Config;
use agent_activator::session::{
    ExtractError, SessionExtractor, SessionForwarding, SessionKey, SessionOrigin, TokenError,
    TokenSigner,
};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

fn config(session: &str) -> Config {
    Config::from_yaml(&format!(
        "backend: {{kind: static, endpoints: ['127.0.0.1:1']}}\nsession: {session}\n"
    ))
    .unwrap()
}

fn signer() -> Arc<TokenSigner> {
    Arc::new(TokenSigner::new(&[("k1", SECRET)], 3600, 128).unwrap())
}

fn is_id(b: &[u8]) -> bool {
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'~' | b'-'))
}

/// Bytes a header value may hold (visible ASCII, space, tab, obs-text).
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![0x20u8..0x7f, Just(b'\t'), 0x80u8..=0xff],
        0..200,
    )
}

fn id_string() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._~-]{1,128}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn header_extraction_classifies(raw in header_bytes()) {
        let c = config("{sources: [{header: X-Session-ID}]}");
        let e = SessionExtractor::new(&c.session, None, false);
        let mut h = HeaderMap::new();
        h.insert("x-session-id", HeaderValue::from_bytes(&raw).unwrap());
        let uri: Uri = "/x".parse().unwrap();
        match e.extract(&uri, &h) {
            Ok(s) => {
                prop_assert!(is_id(&raw));
                prop_assert_eq!(s.key.as_str().as_bytes(), &raw[..]);
                prop_assert_eq!(s.origin, SessionOrigin::Header);
            }
            Err(ExtractError::Invalid { origin: "header", .. }) => prop_assert!(!is_id(&raw)),
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    #[test]
    fn every_source_at_once_never_panics(
        header in header_bytes(),
        cookie in header_bytes(),
        path in "/[ -~&&[^ #?%]]{0,60}",
        query in "[a-z=&._~-]{0,60}",
    ) {
        let c = config("{sources: [{header: X-Session-ID}, {cookie: sid}, {path_prefix: /s/}, {query: session}], on_missing: create}");
        for signer in [None, Some(signer())] {
            let e = SessionExtractor::new(&c.session, signer, false);
            let mut h = HeaderMap::new();
            h.insert("x-session-id", HeaderValue::from_bytes(&header).unwrap());
            h.insert("cookie", HeaderValue::from_bytes(&cookie).unwrap());
            let Ok(uri) = format!("{path}?{query}").parse::<Uri>() else { continue };
            if let Ok(s) = e.extract(&uri, &h) {
                prop_assert!(is_id(s.key.as_str().as_bytes()));
                if let Some(p) = s.rewritten {
                    prop_assert!(p.as_str().starts_with('/'));
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_verify(raw in prop::collection::vec(any::<u8>(), 0..300)) {
        let s = signer();
        prop_assert!(s.verify(&raw).is_err());
    }

    #[test]
    fn minted_tokens_verify_and_any_change_fails(
        id in id_string(),
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let s = signer();
        let key = SessionKey::parse(&id, 128).unwrap();
        let token = s.mint(&key);
        prop_assert_eq!(s.verify(token.as_bytes()).unwrap(), key);
        let mut bad = token.clone().into_bytes();
        let i = pos.index(bad.len());
        prop_assume!(bad[i] != byte);
        bad[i] = byte;
        // Hex is case-insensitive to the decoder: a case flip of a MAC digit is the same MAC.
        let same_mac = i >= token.len() - 64 && bad[i].eq_ignore_ascii_case(&token.as_bytes()[i]);
        prop_assume!(!same_mac);
        match s.verify(&bad) {
            Err(TokenError::Malformed | TokenError::BadSignature | TokenError::UnknownKey
                | TokenError::Expired) => {}
            other => prop_assert!(false, "a changed token was {other:?}"),
        }
    }

    #[test]
    fn rewriting_hides_the_token_cookie_and_keeps_the_rest(
        pairs in prop::collection::vec(("[a-z]{1,4}", "[A-Za-z0-9._-]{0,8}"), 0..8),
        forged in prop::collection::vec(header_bytes(), 0..3),
        id in id_string(),
    ) {
        let c = config(&format!(
            "{{auth: hmac, hmac: {{keys: [{{id: k1, secret_file: '{}'}}]}}, sources: [{{header: X-Session-ID}}, {{cookie: sid}}]}}",
            secret_file().display()
        ));
        let f = SessionForwarding::new(&c.session);
        let mut h = HeaderMap::new();
        let mut cookie: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        cookie.insert(cookie.len() / 2, "sid=token".into());
        h.insert("cookie", HeaderValue::from_str(&cookie.join("; ")).unwrap());
        for v in &forged {
            h.append("x-session-id", HeaderValue::from_bytes(v).unwrap());
        }
        let key = SessionKey::parse(&id, 128).unwrap();
        f.prepare_request(&mut h, &key);
        let sent: Vec<_> = h.get_all("x-session-id").iter().collect();
        prop_assert_eq!(sent, vec![id.as_str()]);
        let kept: Vec<String> = pairs
            .iter()
            .filter(|(k, _)| k != "sid")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let got = h.get("cookie").map(|v| v.to_str().unwrap().to_owned());
        if kept.is_empty() {
            prop_assert_eq!(got, None);
        } else {
            prop_assert_eq!(got, Some(kept.join("; ")));
        }
    }

    #[test]
    fn sandbox_set_cookie_filter(lines in prop::collection::vec(header_bytes(), 0..6)) {
        let c = config("{sources: [{cookie: sid}], cookie_name: activator-session}");
        let f = SessionForwarding::new(&c.session);
        let mut h = HeaderMap::new();
        for l in &lines {
            h.append("set-cookie", HeaderValue::from_bytes(l).unwrap());
        }
        f.filter_response(&mut h);
        let name = |l: &[u8]| {
            let end = l.iter().position(|c| *c == b'=' || *c == b';').unwrap_or(l.len());
            l[..end].trim_ascii().to_vec()
        };
        let expected: Vec<&[u8]> = lines
            .iter()
            .map(Vec::as_slice)
            .filter(|l| {
                let n = name(l);
                n != b"sid" && n != b"activator-session"
            })
            .collect();
        let got: Vec<&[u8]> = h.get_all("set-cookie").iter().map(HeaderValue::as_bytes).collect();
        prop_assert_eq!(got, expected);
    }
}

/// A key file shared by the cases of this binary.
fn secret_file() -> std::path::PathBuf {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("aa-props-key-{}", std::process::id()));
        std::fs::write(&p, SECRET).unwrap();
        p
    })
    .clone()
}
