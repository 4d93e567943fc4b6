//! The host user isolated sandboxes run as (`backend.sandbox_user`): resolved once at
//! start, never root, and switched to by the spawner only when the activator may do so.

use nix::unistd::{Gid, Group, Uid, User};

/// The host uid/gid of a sandbox's processes and of its working directory and volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxUser {
    pub uid: u32,
    pub gid: u32,
    /// The activator must switch to it before `exec` (it starts as root and the sandbox
    /// user is another one); false when the activator already is that user.
    pub switch: bool,
}

/// The uid/gid when no user named `nobody` exists (the kernel's overflow id).
const NOBODY: u32 = 65534;

impl SandboxUser {
    /// Resolves `backend.sandbox_user` (`NAME`, `UID` or `UID:GID`). `Err` says why,
    /// for a message naming the key.
    pub fn resolve(spec: &str) -> Result<SandboxUser, String> {
        let (uid, gid) = parse(spec)?;
        if uid == 0 || gid == 0 {
            return Err("must not be root (uid or gid 0): sandboxes run untrusted code".into());
        }
        let me = Uid::effective();
        let switch = if me.is_root() {
            true
        } else if me.as_raw() == uid {
            false
        } else {
            return Err(format!(
                "sandboxes run as uid {uid}, but the activator runs as uid {} and cannot \
                 switch users: start it as root (it never runs a sandbox as root), or set \
                 backend.sandbox_user to its own user (then sandboxes can read its files)",
                me.as_raw()
            ));
        };
        Ok(SandboxUser { uid, gid, switch })
    }
}

fn parse(spec: &str) -> Result<(u32, u32), String> {
    let spec = spec.trim();
    if let Some((u, g)) = spec.split_once(':') {
        let num = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| format!("{spec:?}: UID:GID must be two numbers"))
        };
        return Ok((num(u)?, num(g)?));
    }
    if let Ok(uid) = spec.parse::<u32>() {
        // A bare uid takes the gid of its passwd entry, else the same number.
        let gid = User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten()
            .map_or(uid, |u| u.gid.as_raw());
        return Ok((uid, gid));
    }
    match User::from_name(spec) {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        _ if spec == "nobody" => {
            let gid = Group::from_name("nogroup")
                .ok()
                .flatten()
                .map_or(NOBODY, |g| g.gid.as_raw());
            Ok((NOBODY, gid))
        }
        _ => Err(format!("no user named {spec:?} on this host")),
    }
}

/// Makes `path` owned by the sandbox user (when the activator switches to it), so the
/// sandbox can write its working directory and volumes.
pub fn chown_to(user: Option<SandboxUser>, path: &std::path::Path) -> std::io::Result<()> {
    match user {
        Some(u) if u.switch => {
            nix::unistd::chown(path, Some(Uid::from_raw(u.uid)), Some(Gid::from_raw(u.gid)))
                .map_err(std::io::Error::from)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_numbers_and_pairs_and_refuses_root() {
        assert_eq!(parse("1234:5678").unwrap(), (1234, 5678));
        assert_eq!(parse("nobody").unwrap().0, NOBODY);
        assert!(parse("no-such-user-here").is_err());
        assert!(parse("1:x").is_err());
        assert!(SandboxUser::resolve("0").is_err());
        assert!(SandboxUser::resolve("root").is_err());
        assert!(SandboxUser::resolve("1000:0").is_err());
    }
}
