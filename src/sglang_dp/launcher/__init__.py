"""The launcher: which GPUs and ports each worker gets (pure), and its processes (shell).

Planning (pure):
    config.py      LaunchConfig: every option of `sglang-dp launch`, declared once
    gpus.py        --gpus / CUDA_VISIBLE_DEVICES / nvidia-smi → GPU ids; dp × tp assignment (pure
                   but for `run_nvidia_smi`)
    plan.py        WorkerTemplate (what all workers share) → plan_worker: one WorkerSpec (argv,
                   env, ports, log file, KV events); plan_workers: the port bands of all
    ray_plan.py    on Ray: bundles, placement strategies, whether the cluster can hold them, the
                   port bands an actor tries on its node

Processes (shell):
    preflight.py   what the workers' Python offers: sglang importable? --nccl-port,
                   --kv-events-config?
    ports.py       which ports are busy on this machine; free ports and port bands
    shim.py        the per-worker shim: subreaper of the worker's tree, takes it along when the
                   launcher dies, copies its output to a rotated log (standard library only)
    process.py     OwnedProcess / WorkerProcess (a command run through the shim: terminate()
                   leaves nothing), the WorkerHandle and Spawner protocols, leftovers of earlier
                   runs, the launcher as subreaper
    usage.py       CPU and memory of a worker's whole tree, from its shim's record (psutil)
    supervisor.py  Supervisor (SupervisorSettings): start all, wait until ready, restart with
                   backoff (and what stays unhealthy, per the router's health monitor), retry the
                   failed later, stop
    register.py    registration of this node's workers with a router elsewhere (--register-with)
    cluster.py     make_plan (checks, plan, free ports) and Cluster: the supervisor and the router
                   wired together, no screen (`launch` and `bench --compare`)
    run.py         run_launch: `sglang-dp launch` with its screen and signals; leftovers first
    ray_cluster.py `launch --ray`: connect, reserve a placement group, hand run.py the specs and
                   the actors' spawner
    ray_worker.py  the Ray actor that owns one worker on its node, and the driver's handle on it

Nothing is imported here, so importing a pure module does not import psutil or aiohttp.
"""
