"""The launcher: which GPUs and ports each worker gets (pure), and its processes (shell).

    gpus.py        --gpus / CUDA_VISIBLE_DEVICES / nvidia-smi → GPU ids; dp × tp assignment (pure)
    plan.py        one WorkerSpec per worker: argv, env, port band, log file (pure)
    process.py     WorkerProcess: own process group, log file, dies with the launcher; checks
    supervisor.py  Supervisor: start all, wait until ready, restart with backoff, stop

Nothing is imported here, so importing a pure module does not import psutil or aiohttp.
"""
