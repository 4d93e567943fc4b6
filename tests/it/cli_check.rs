//! `agent-activator check`: exit 0 on a good config, 64 with the key path on a bad one.

use std::process::Command;

fn check(yaml: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("aa-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{:x}.yaml", rand_suffix(yaml)));
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_agent-activator"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run agent-activator check");
    let _ = std::fs::remove_file(&path);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// A file name per YAML text so parallel tests do not collide.
fn rand_suffix(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

#[test]
fn valid_config_exits_zero() {
    let (code, out) = check("backend:\n  kind: static\n  endpoints: [\"127.0.0.1:9001\"]\n");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn unknown_key_exits_64_naming_it() {
    let (code, out) =
        check("backend:\n  kind: static\n  endpoints: [\"127.0.0.1:9001\"]\n  endpoint: x\n");
    assert_eq!(code, 64, "{out}");
    // The exact key path, not a substring that the valid key `endpoints` also contains.
    assert!(out.contains(": backend.endpoint: "), "{out}");
    assert!(out.contains("unknown field `endpoint`"), "{out}");
}

#[test]
fn bad_value_exits_64_naming_the_path() {
    let (code, out) = check(
        "backend:\n  kind: static\n  endpoints: [\"127.0.0.1:9001\"]\nactivation:\n  timeout: soon\n",
    );
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("activation.timeout"), "{out}");
}

#[test]
fn missing_file_exits_64() {
    let out = Command::new(env!("CARGO_BIN_EXE_agent-activator"))
        .args(["check", "--config", "/nonexistent/agent-activator.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn control_character_in_cookie_name_exits_64() {
    // It used to pass `check` and then panic every request that minted a session.
    let (code, out) = check(
        "backend:\n  kind: static\n  endpoints: [\"127.0.0.1:9001\"]\n\
         session:\n  on_missing: create\n  cookie_name: \"sid\\u0007\"\n",
    );
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("session.cookie_name: "), "{out}");
}
