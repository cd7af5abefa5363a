"""The launcher: which GPUs and ports each worker gets (pure), and its processes (shell).

    gpus.py        --gpus / CUDA_VISIBLE_DEVICES / nvidia-smi → GPU ids; dp × tp assignment (pure)
    plan.py        one WorkerSpec per worker: argv, env, port band, log file (pure)
    shim.py        the per-worker shim: subreaper of the worker's tree, takes it along when the
                   launcher dies, copies its output to a rotated log (standard library only)
    process.py     OwnedProcess / WorkerProcess (a command run through the shim: terminate()
                   leaves nothing), the WorkerHandle and Spawner protocols, leftovers of earlier
                   runs, the launcher as subreaper; pre-flight checks
    supervisor.py  Supervisor: start all, wait until ready, restart with backoff (and what stays
                   unhealthy, per the router's health monitor), retry the failed later, stop

Nothing is imported here, so importing a pure module does not import psutil or aiohttp.
"""
