//! Where the kube client comes from, and this replica's identity in the cluster.

use crate::config::ConfigError;

/// The client configuration `backend.kubernetes.kubeconfig` asks for: that file, else the
/// in-cluster service account, else `KUBECONFIG` / `~/.kube/config`. Errors name the key.
pub async fn client_config(
    kubeconfig: Option<&std::path::Path>,
) -> Result<kube::Config, ConfigError> {
    let key = "backend.kubernetes.kubeconfig";
    match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| ConfigError::invalid(key, e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| ConfigError::invalid(key, e.to_string()))
        }
        None => match kube::Config::incluster() {
            Ok(c) => Ok(c),
            Err(_) => kube::Config::infer().await.map_err(|e| {
                ConfigError::invalid(
                    key,
                    format!("not in a cluster and no usable kubeconfig: {e}"),
                )
            }),
        },
    }
}

/// `POD_NAME` or `HOSTNAME`, plus a random suffix so a restarted replica does not take
/// its predecessor's activity stamps for its own.
pub(super) fn replica_id() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "activator".into());
    let suffix: u32 = rand::random();
    format!("{host}-{:06x}", suffix & 0xff_ffff)
}
