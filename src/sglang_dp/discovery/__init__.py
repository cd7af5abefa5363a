"""Finding workers without a fixed list: Kubernetes pods, watched by label.

A package of its own rather than more modules in `router/`: discovery is a *source* of workers
for the router, not part of routing; its Kubernetes client is an optional extra
(`sglang-dp[kubernetes]`) that only this package imports; and the launcher never needs it.

    config.py      DiscoveryConfig: the `--service-discovery` options (SMG's names)
    pods.py        pure: a pod from its API object, and `reconcile` (pods + members → plan)
    kube.py        shell: LIST + WATCH through the Kubernetes API, 410/backoff owned here
    discovery.py   shell: the watcher's cache → reconcile → the router's add/remove helpers

Why kubernetes_asyncio (of the three maintained async clients): it runs on aiohttp, already a
dependency and the client of our health checks, where lightkube brings httpx and kr8s brings
httpx and its own watch loop (0.20.15's `watch()` answers a 410 by retrying the same
resourceVersion forever); its configuration loaders cover the service account (token refresh
included) and kubeconfig auth (exec plugins, OIDC). We use it for configuration and requests
only: answers are read raw and the LIST/WATCH loop, 410 and backoff are ours (kube.py), so a
client's watch helper is never in the path. Its cost: ~48 MB installed (generated models we do
not use), hence an optional extra. It points at a plain-HTTP fake server on loopback with a
kubeconfig and no TLS, which is how the tests drive it.
"""
