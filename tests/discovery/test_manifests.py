"""examples/kubernetes, checked offline: every object is valid against the API's schemas
(kubernetes-validate, strict: no unknown fields), the router's flags parse, and the pieces fit
together (selector ↔ pod labels, port, least rights, service account)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sglang_dp.cli.router import command, config_from

FOLDER = Path(__file__).parent.parent.parent / "examples" / "kubernetes"
MANIFESTS = ("sglang-workers.yaml", "router.yaml")
VERSIONS = ("1.30.0", "1.33.0", "1.37.0")


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for name in MANIFESTS:
        for doc in yaml.safe_load_all((FOLDER / name).read_text()):
            found[doc["kind"], doc["metadata"]["name"]] = doc
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_for_the_api(version: str) -> None:
    for (kind, name), obj in objects().items():
        assert kubernetes_validate.validate(obj, version, strict=True), (kind, name)


def test_kustomization_names_every_manifest() -> None:
    kustomization = yaml.safe_load((FOLDER / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(MANIFESTS)
    binding = objects()["RoleBinding", "sglang-router-pods"]
    assert binding["subjects"][0]["namespace"] == kustomization["namespace"]


def router_container() -> dict[str, Any]:
    spec = objects()["Deployment", "sglang-router"]["spec"]["template"]["spec"]
    return spec["containers"][0]  # type: ignore[no-any-return]


def test_the_routers_flags_parse_and_select_the_workers() -> None:
    container = router_container()
    args = [a.replace("$(POD_NAMESPACE)", "sglang") for a in container["args"]]
    assert container["command"] == ["sglang-dp"] and args[0] == "router"
    context = command.make_context("router", args[1:])
    params = dict(context.params)
    config = config_from(params.pop("more_urls"), params)
    discovery = config.discovery
    assert discovery.service_discovery and discovery.service_discovery_namespace == "sglang"
    workers = objects()["Deployment", "sglang-worker"]
    labels = workers["spec"]["template"]["metadata"]["labels"]
    assert discovery.labels.items() <= labels.items()
    worker = workers["spec"]["template"]["spec"]["containers"][0]
    assert discovery.service_discovery_port == worker["ports"][0]["containerPort"]
    assert "--enable-cache-report" in worker["args"]
    assert worker["readinessProbe"]["httpGet"]["path"] == "/health"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert config.host == "0.0.0.0"


def test_the_router_has_the_least_rights_it_needs() -> None:
    found = objects()
    role = found["Role", "sglang-router-pods"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    binding = found["RoleBinding", "sglang-router-pods"]
    assert binding["roleRef"]["name"] == "sglang-router-pods"
    spec = found["Deployment", "sglang-router"]["spec"]["template"]["spec"]
    assert binding["subjects"][0]["name"] == spec["serviceAccountName"] == "sglang-router"
    assert not any(kind == "ClusterRole" for kind, _ in found)


def test_the_service_reaches_the_router() -> None:
    found = objects()
    service = found["Service", "sglang-router"]["spec"]
    router = found["Deployment", "sglang-router"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= router.items()
    workers = found["Deployment", "sglang-worker"]["spec"]["template"]["metadata"]["labels"]
    assert not service["selector"].items() <= workers.items()  # clients never hit a worker
