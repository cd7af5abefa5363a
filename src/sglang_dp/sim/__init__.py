"""The simulated SGLang worker: a RadixAttention-like engine (pure) behind SGLang's HTTP API.

config.py       SimConfig: every option, declared once (SGLang's names and defaults)
tokenizer.py    word-level or a local HF tokenizer; deterministic outputs
radix_cache.py  pure: token radix tree, locks, LRU eviction, KV events of pages
cost_model.py   pure: profiles and step times
calibration.py  pure: fitting a profile to measured step times
scheduler.py    pure: continuous batching in simulated time
api.py          pure: parsing SGLang's and OpenAI's generation routes, response shapes
faults.py       the seeded fault draw (pure) and its acting on a response
server.py       shell: SimWorker, the routes and the timer loop, for either HTTP server
asgi.py         shell: the same handler served by uvicorn + Starlette (--http-server uvicorn)
kv_events.py    shell: the KV events publisher (ZMQ PUB + replay)
metrics.py      shell: Prometheus metrics under SGLang's names
run.py          shell: process entry (logging, option checks, event loop, signals)
command.py      shell: the click command of `sglang-dp sim-worker` and `python -m sglang_dp.sim`
"""
