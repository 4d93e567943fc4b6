//! `SandboxId`: a sandbox's name, shared by backends, the session table and the event stream.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

/// A backend-unique sandbox name (process: `sbx-<n>`, Kubernetes: the Sandbox's name).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct SandboxId(Arc<str>);

impl SandboxId {
    pub fn new(name: impl Into<Arc<str>>) -> SandboxId {
        SandboxId(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SandboxId({})", self.0)
    }
}
