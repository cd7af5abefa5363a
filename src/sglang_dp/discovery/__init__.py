"""Finding workers without a fixed list: Kubernetes pods, watched by label.

A package of its own rather than more modules in `router/`: discovery is a *source* of workers
for the router, not part of routing; its Kubernetes client is an optional extra
(`sglang-dp[kubernetes]`) that only this package imports; and the launcher never needs it.

    config.py      DiscoveryConfig: the `--service-discovery` options (SMG's names)
    pods.py        pure: a pod from its API object, and `reconcile` (pods + members → plan)
    kube.py        shell: LIST + WATCH through the Kubernetes API, 410/backoff owned here
    discovery.py   shell: the watcher's cache → reconcile → the router's add/remove helpers
"""
