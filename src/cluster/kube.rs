//! `KubeContext`: the one kube client of a replica, its namespace and its identity.

use super::ReplicaId;
use crate::config::ConfigError;

/// What a Kubernetes component needs from the cluster: the process's only `kube::Client`
/// (cheap to clone: one connection pool, one set of credentials), the namespace the
/// activator works in, and this replica's identity. Built once by [`super::Cluster`] and
/// handed to the backend, the elector and the tick store.
#[derive(Clone)]
pub struct KubeContext {
    pub client: kube::Client,
    pub namespace: String,
    pub replica: ReplicaId,
}

impl KubeContext {
    /// A context over an existing client (tests, embedders).
    pub fn new(client: kube::Client, namespace: &str, replica: ReplicaId) -> KubeContext {
        KubeContext {
            client,
            namespace: namespace.to_owned(),
            replica,
        }
    }

    /// Builds the client `backend.kubernetes.kubeconfig` asks for (see [`client_config`]);
    /// `namespace` unset means the client's default namespace.
    pub async fn connect(
        kubeconfig: Option<&std::path::Path>,
        namespace: Option<&str>,
        replica: ReplicaId,
    ) -> Result<KubeContext, ConfigError> {
        let config = client_config(kubeconfig).await?;
        let namespace = namespace
            .map(str::to_owned)
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config)
            .map_err(|e| ConfigError::invalid("backend.kubernetes.kubeconfig", e.to_string()))?;
        Ok(KubeContext {
            client,
            namespace,
            replica,
        })
    }

    /// A namespaced API for `K` in the activator's namespace.
    pub fn api<K>(&self) -> kube::Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        kube::Api::namespaced(self.client.clone(), &self.namespace)
    }
}

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
