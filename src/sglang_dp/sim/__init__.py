"""The simulated SGLang worker: a RadixAttention-like engine (pure) behind SGLang's HTTP API.

Engine: `tokenizer` (word-level or local HF) · `radix_cache` (token radix tree, locks, LRU) ·
`cost_model` (profiles, step times) · `calibration` (fitting profiles to measured step times) ·
`scheduler` (continuous batching in simulated time).
Shell: `http` (lean HTTP/1.1 server) · `server` (routes, timer loop, faults) · `metrics` ·
`run` (process entry).
`config` declares every option once; `python -m sglang_dp.sim` and `sglang-dp sim-worker` run it.
"""
