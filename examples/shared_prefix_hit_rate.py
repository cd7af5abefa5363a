"""Sends a shared-prefix load (4 system prompts × 8 questions) and reads the cache hit rate.

Each answer's `meta_info.cached_tokens` says how much of its prompt the worker had cached; the
router keeps each system prompt on one worker, so after the first question of a group almost the
whole prompt is a hit.

    python examples/shared_prefix_hit_rate.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import json
import random
import urllib.request
from collections import Counter


def generate(url: str, text: str) -> tuple[dict[str, int], str]:
    body = json.dumps({"text": text, "sampling_params": {"max_new_tokens": 8}}).encode()
    request = urllib.request.Request(url + "/generate", body, {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.load(reply)["meta_info"], reply.headers.get("x-sglang-dp-worker", "?")


def main(url: str) -> None:
    rng = random.Random(0)
    words = ["order", "refund", "parcel", "invoice", "address", "warranty", "card", "account"]
    systems = [f"Assistant {g}. " + " ".join(rng.choices(words, k=400)) for g in range(4)]
    requests = [(g, f" Question {q}: where is my {rng.choice(words)}?") for g in range(4)
                for q in range(8)]  # fmt: skip
    rng.shuffle(requests)
    prompt = cached = 0
    placement: Counter[tuple[int, str]] = Counter()
    for group, question in requests:
        meta, worker = generate(url, systems[group] + question)
        prompt += meta["prompt_tokens"]
        cached += meta["cached_tokens"]
        placement[(group, worker)] += 1
    print(f"cache hit rate: {cached / prompt:.1%} of {prompt:,} prompt tokens")
    for (group, worker), count in sorted(placement.items()):
        print(f"  system prompt {group}: {count} requests on {worker}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    main(parser.parse_args().url.rstrip("/"))
