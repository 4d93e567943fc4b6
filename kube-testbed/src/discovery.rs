//! Discovery documents (`/apis`, group, resource lists) and the `/scale` subresource.

use bytes::Bytes;
use http::Method;
use serde_json::{Value, json};

use crate::http::{apply_patch, parse_json};
use crate::store::{ApiError, ResourceType, Store};

/// `GET /apis`: every non-core group with its versions.
pub(crate) fn group_list(types: &[ResourceType]) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for t in types.iter().filter(|t| !t.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, vs)) if !vs.contains(&t.version) => vs.push(t.version.clone()),
            Some(_) => {}
            None => groups.push((t.group.clone(), vec![t.version.clone()])),
        }
    }
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": groups.iter().map(|(g, vs)| group_doc(g, vs)).collect::<Vec<_>>(),
    })
}

fn group_doc(group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": vs,
        "preferredVersion": vs[0],
    })
}

/// `GET /apis/{group}`.
pub(crate) fn group(types: &[ResourceType], group: &str) -> Result<Value, ApiError> {
    let versions: Vec<String> = types
        .iter()
        .filter(|t| t.group == group)
        .map(|t| t.version.clone())
        .fold(Vec::new(), |mut acc, v| {
            if !acc.contains(&v) {
                acc.push(v);
            }
            acc
        });
    if versions.is_empty() {
        return Err(ApiError::new(
            404,
            "NotFound",
            format!("group {group} not found"),
        ));
    }
    Ok(group_doc(group, &versions))
}

/// `GET /apis/{group}/{version}` or `/api/v1`: resources with their verbs and subresources.
pub(crate) fn resource_list(types: &[ResourceType], group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for t in types
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        resources.push(json!({
            "name": t.plural,
            "singularName": t.kind.to_ascii_lowercase(),
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
        }));
        if t.status {
            resources.push(json!({
                "name": format!("{}/status", t.plural), "singularName": "",
                "namespaced": t.namespaced, "kind": t.kind, "verbs": ["get", "patch", "update"],
            }));
        }
        if t.scale {
            resources.push(json!({
                "name": format!("{}/scale", t.plural), "singularName": "",
                "namespaced": t.namespaced, "group": "autoscaling", "version": "v1",
                "kind": "Scale", "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    })
}

/// The `autoscaling/v1 Scale` view of an object with `spec.replicas`.
fn scale_of(obj: &Value) -> Value {
    let m = &obj["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
            "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"],
        },
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(0)},
        "status": {
            "replicas": obj["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": obj["status"]["selector"].as_str().unwrap_or(""),
        },
    })
}

/// `GET`, `PUT` or `PATCH` on `.../{name}/scale`.
pub(crate) fn scale(
    store: &Store,
    res: usize,
    ns: &str,
    name: &str,
    method: &Method,
    content_type: &str,
    body: &Bytes,
) -> Result<Value, ApiError> {
    if method == Method::GET {
        return store.get(res, ns, name).map(|o| scale_of(&o));
    }
    let input = parse_json(body)?;
    let updated = store.update_with(res, ns, name, None, |old| {
        let current = scale_of(old);
        let new_scale = match *method {
            Method::PUT => input.clone(),
            Method::PATCH => {
                let mut base = current.clone();
                base["metadata"]
                    .as_object_mut()
                    .map(|m| m.remove("resourceVersion"));
                let mut patched = apply_patch(&base, content_type, &input)?;
                if patched["metadata"].get("resourceVersion").is_none() {
                    patched["metadata"]["resourceVersion"] =
                        current["metadata"]["resourceVersion"].clone();
                }
                patched
            }
            _ => {
                return Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "scale supports GET, PUT, PATCH",
                ));
            }
        };
        let replicas = new_scale["spec"]["replicas"]
            .as_i64()
            .ok_or_else(|| ApiError::new(422, "Invalid", "spec.replicas: Required value"))?;
        if replicas < 0 {
            return Err(ApiError::new(422, "Invalid", "spec.replicas: must be >= 0"));
        }
        let mut new = old.clone();
        new["spec"]["replicas"] = json!(replicas);
        new["metadata"]["resourceVersion"] = new_scale["metadata"]["resourceVersion"].clone();
        Ok(new)
    })?;
    Ok(scale_of(&updated))
}
