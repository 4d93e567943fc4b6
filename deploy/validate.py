#!/usr/bin/env python3
"""Validate every manifest under deploy/ offline.

- Built-in kinds: kubernetes-validate (bundled Kubernetes OpenAPI schemas), strict mode
  (unknown fields are errors).
- CRD-typed kinds (Sandbox*, ServiceMonitor, HTTPRoute): the openAPIV3Schema of the CRD
  shipped in deploy/crds/, strict (unknown fields are errors unless the schema preserves
  them). The CRDs themselves are validated as CustomResourceDefinitions first.
- Pod templates embedded in SandboxTemplates are validated as Pods, and their
  `networkPolicy` (upstream's restricted subset: ingress and egress only) as the rules of a
  NetworkPolicy.
- kustomization.yaml lists exactly the manifest files present.

`validate.py --rendered FILE` (or `-` for stdin) validates the output of
`kubectl kustomize deploy/` instead: every rendered object, by the same rules.

Exit 0 when everything is valid; 1 with one line per problem otherwise; 2 when the
validator itself is not installed (`pip install kubernetes-validate`).
"""

import copy
import glob
import os
import sys

try:
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as e:  # pragma: no cover - reported to the Rust test
    print(f"missing validator: {e} (pip install kubernetes-validate)", file=sys.stderr)
    sys.exit(2)

HERE = os.path.dirname(os.path.abspath(__file__))


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def strict(schema):
    """Kubernetes prunes unknown fields of structural schemas; reject them instead."""
    s = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if node.get("x-kubernetes-int-or-string"):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if (
            "properties" in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in node
        ):
            node["additionalProperties"] = False
        for key in ("properties",):
            for child in node.get(key, {}).values():
                walk(child)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])

    walk(s)
    return s


def describe(e):
    """One line per failure: the field path and the message, not the whole schema."""
    message = getattr(e, "message", None)
    if message is None:
        return str(e)
    path = ".".join(str(p) for p in getattr(e, "absolute_path", [])) or "(root)"
    return f"{path}: {message}"


def group_of(api_version):
    return api_version.split("/")[0] if "/" in api_version else ""


def validate_doc(doc, source, crds, version, problems):
    """Appends one line per problem of `doc` (read from `source`) to `problems`."""
    kind = doc.get("kind", "?")
    name = (doc.get("metadata") or {}).get("name", "?")
    where = f"{source}: {kind}/{name}"
    api_version = doc.get("apiVersion", "")
    key = (group_of(api_version), api_version.split("/")[-1], kind)
    if key not in crds:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{where}: {describe(e)}")
        return
    if not name or name == "?":
        problems.append(f"{where}: metadata.name is required")
    validator = jsonschema.Draft7Validator(crds[key])
    for err in validator.iter_errors(doc):
        at = ".".join(str(p) for p in err.absolute_path) or "(root)"
        problems.append(f"{where}: {at}: {err.message}")
    if kind != "SandboxTemplate":
        return
    spec = doc.get("spec") or {}
    tpl = spec.get("podTemplate") or {}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": dict(tpl.get("metadata") or {}, name=name),
        "spec": tpl.get("spec"),
    }
    try:
        kubernetes_validate.validate(pod, version, strict=True)
    except Exception as e:  # noqa: BLE001
        problems.append(f"{where}: spec.podTemplate as a Pod: {describe(e)}")
    policy = spec.get("networkPolicy")
    if policy is None:
        return
    # agent-sandbox 2fd412d55eca extensions/api/v1beta1/sandboxtemplate_types.go:
    # NetworkPolicySpec has ingress and egress only; the controller sets podSelector and
    # policyTypes (extensions/controllers/sandboxtemplate_controller.go).
    extra = sorted(set(policy) - {"ingress", "egress"})
    if extra:
        problems.append(f"{where}: spec.networkPolicy: unknown fields {extra}")
    np = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-network-policy"},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": policy.get("ingress") or [],
            "egress": policy.get("egress") or [],
        },
    }
    try:
        kubernetes_validate.validate(np, version, strict=True)
    except Exception as e:  # noqa: BLE001
        problems.append(f"{where}: spec.networkPolicy as a NetworkPolicy: {describe(e)}")


def rendered(source, crds, version, problems):
    """Validates a multi-document stream (`kubectl kustomize` output). Returns the count."""
    text = sys.stdin.read() if source == "-" else open(source).read()
    docs = [d for d in yaml.safe_load_all(text) if d]
    if not docs:
        problems.append(f"{source}: no objects rendered")
    for doc in docs:
        validate_doc(doc, "rendered", crds, version, problems)
    return len(docs)


def load_crds(version, problems):
    crds = {}
    for path in sorted(glob.glob(os.path.join(HERE, "crds", "*.yaml"))):
        for doc in load(path):
            where = f"{os.path.relpath(path, HERE)}: {doc.get('kind')}/{doc['metadata']['name']}"
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except Exception as e:  # noqa: BLE001 - every failure is reported
                problems.append(f"{where}: {describe(e)}")
                continue
            spec = doc["spec"]
            for v in spec["versions"]:
                key = (spec["group"], v["name"], spec["names"]["kind"])
                crds[key] = strict(v["schema"]["openAPIV3Schema"])
    return crds


def main():
    version = kubernetes_validate.latest_version()
    problems = []
    crds = load_crds(version, problems)
    if len(sys.argv) == 3 and sys.argv[1] == "--rendered":
        checked = rendered(sys.argv[2], crds, version, problems)
        for p in problems:
            print(p)
        if problems:
            return 1
        print(f"ok: {checked} rendered objects valid (Kubernetes {version})")
        return 0

    manifests = sorted(
        p
        for p in glob.glob(os.path.join(HERE, "*.yaml"))
        if os.path.basename(p) != "kustomization.yaml"
    )
    kustomization = load(os.path.join(HERE, "kustomization.yaml"))[0]
    listed = set(kustomization.get("resources", []))
    present = {os.path.basename(p) for p in manifests}
    for missing in sorted(listed - present):
        problems.append(f"kustomization.yaml: resource {missing} does not exist")
    for unlisted in sorted(present - listed):
        problems.append(f"kustomization.yaml: {unlisted} is not listed in resources")

    checked = 0
    for path in manifests:
        for doc in load(path):
            checked += 1
            validate_doc(doc, os.path.basename(path), crds, version, problems)

    for p in problems:
        print(p)
    if problems:
        return 1
    print(f"ok: {checked} manifests and {len(crds)} CRD schemas valid (Kubernetes {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
