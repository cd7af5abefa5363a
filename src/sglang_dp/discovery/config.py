"""The `--service-discovery` options, declared once (flags are generated from these fields).

SMG's names and meaning (sgl-router): `--service-discovery` turns it on, `--selector k=v ...`
labels a pod must carry (ANDed), `--service-discovery-port` the port its workers listen on (80),
`--service-discovery-namespace` the namespace to watch (unset: all namespaces). Ours on top:
`--kubeconfig` (unset: the pod's service account in a cluster, else $KUBECONFIG or
~/.kube/config) and `--discovery-unready-grace-secs` (30 s: how long a pod that turned unready
keeps its tree share before it is dropped).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from sglang_dp.options import option

# Kubernetes label keys: an optional DNS-subdomain prefix and a name; values: a name or empty.
_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
_LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_LABEL_VALUE = re.compile(rf"^{_NAME}?$")


@dataclass(frozen=True)
class DiscoveryConfig:
    service_discovery: bool = option(
        False, "Find workers by watching Kubernetes pods (Running and Ready) with --selector."
    )
    selector: tuple[str, ...] = option(
        (),
        "Labels a worker pod must carry, key=value, all of them (--selector app=sglang tier=gpu).",
        metavar="KEY=VALUE",
    )
    service_discovery_port: int = option(80, "Port the discovered pods' workers listen on.")
    service_discovery_namespace: str | None = option(
        None, "Namespace to watch (default: all namespaces).", type=str
    )
    kubeconfig: str | None = option(
        None,
        "Kubeconfig file for service discovery (default: the pod's service account inside a "
        "cluster, else $KUBECONFIG or ~/.kube/config).",
        type=str,
    )
    discovery_unready_grace_secs: float = option(
        30.0,
        "A discovered pod that turns unready takes no new requests at once, and loses its "
        "share of the routing tree after this many seconds still unready.",
    )

    def __post_init__(self) -> None:
        labels = parse_selector(self.selector)
        if self.service_discovery and not labels:
            raise ValueError("--service-discovery needs --selector key=value (which pods)")
        if labels and not self.service_discovery:
            raise ValueError("--selector is for --service-discovery, which is not on")
        if not 0 < self.service_discovery_port < 65536:
            raise ValueError("--service-discovery-port must be between 1 and 65535")
        if self.discovery_unready_grace_secs < 0:
            raise ValueError("--discovery-unready-grace-secs must be >= 0")

    @property
    def labels(self) -> dict[str, str]:
        return parse_selector(self.selector)


DISCOVERY_FLAGS = tuple(f.name for f in dataclasses.fields(DiscoveryConfig))


def parse_selector(items: tuple[str, ...]) -> dict[str, str]:
    """`("app=sglang", "tier=gpu")` → `{"app": "sglang", "tier": "gpu"}` (ANDed equalities);
    an item may hold several, comma-separated, as `kubectl -l` takes them."""
    labels: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            key, sep, value = part.strip().partition("=")
            if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                raise ValueError(
                    f"selector {part!r} must be key=value with Kubernetes label syntax "
                    "(e.g. app=sglang)"
                )
            if labels.get(key, value) != value:
                raise ValueError(f"selector names {key!r} twice with different values")
            labels[key] = value
    return labels


def selector_query(labels: dict[str, str]) -> str:
    """The `labelSelector` query value: `app=sglang,tier=gpu`."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))
