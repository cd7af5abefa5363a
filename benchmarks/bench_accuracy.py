"""How well the router's tree predicts what workers really have cached, per kind of traffic.

Starts two `sglang-dp sim-worker --enable-cache-report` processes and a `sglang-dp router` in
front of them (loopback, free ports), then drives two workloads and reads `/debug/stats`:

- stream_chat: 6 conversations × 4 turns through the official `openai` client, streamed
  WITHOUT `stream_options` (as the SDK sends by default), each turn resending the whole history
  (the streamed answers included) under a shared ~2,400-character system prompt;
- mixed: chat (streamed and not), `/v1/completions` with text prompts, and `/generate` with
  `input_ids`, interleaved, each family sharing long prefixes.

- default_deployment: the stream_chat workload as most users will run it — a router with
  character keys (the default) in front of workers that tokenize with a byte-level BPE tokenizer
  and a Llama-3-style chat template (`--tokenizer-path`, trained and saved here), so the router
  estimates tokens from characters through a template it does not render.

Agreement (recall) = Σ min(predicted, reported) / Σ reported cached tokens over the requests of
the workload (1.0: every cached token was predicted); `*_precision` = the same over Σ predicted
(1.0: nothing predicted that was not cached), so predicting "everything cached" cannot score
well. The router predicts each request before it learns from that request's answer. A separate
router serves each workload, so none inherits another's learned estimates.

References we did not write: `reference_checks` compares, after the runs, the router's key
length for each stream_chat conversation with the built-in template written out here
(`<|role|>\ncontent\n` per message, then `<|assistant|>\n`), and each default_deployment
worker's `prompt_tokens` with Hugging Face's own
`apply_chat_template(messages, tokenize=True, add_generation_prompt=True)`.

`chat_token_key_us_p50`: what token-level routing costs on the event loop per chat request — the
key of each turn of 8 conversations × 8 turns under a ~3,000-character system prompt (history
resent every turn, ~3–6 k characters), through a chat template and a byte-level BPE tokenizer
(4,000 merges, trained here); `_whole`: the same, encoding every conversation whole each turn
(without the encoder's memo of pieces between added tokens).

    python benchmarks/bench_accuracy.py [--json]      (writes benchmarks/results_accuracy.json)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sglang_dp.launcher.ports import free_port
from support import get_json, process, wait_until

SGLANG_DP = str(Path(sys.executable).parent / "sglang-dp")
RESULTS = Path(__file__).with_name("results_accuracy.json")
# Llama 3's chat template, its special tokens as Meta names them (content trimmed, as there)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SIMPLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hum",
]


def healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=2) as resp:
        return bool(resp.status == 200)


def post(url: str, body: dict[str, Any]) -> Any:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def cluster(stack: ExitStack, workers: int = 2, *worker_args: str) -> str:
    """Simulated workers and a router in front of them; returns the router's URL."""
    urls = []
    for _ in range(workers):
        port = free_port()
        argv = [SGLANG_DP, "sim-worker", "--port", str(port), "--enable-cache-report"]
        argv += worker_args
        proc = stack.enter_context(process([*argv, "--time-scale", "20", "--log-level", "warning"]))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda url=url: healthy(url), proc, f"worker {url}")
        urls.append(url)
    port = free_port()
    argv = [SGLANG_DP, "router", "--worker-urls", *urls, "--port", str(port)]
    router = stack.enter_context(process([*argv, "--log-level", "warning"]))
    url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: get_json(url + "/readiness")["healthy_workers"] >= workers, router, "the router"
    )
    return url


def agreement(router: str) -> dict[str, float]:
    workers = get_json(router + "/debug/stats")["workers"]
    cached = sum(w["cached_tokens"] for w in workers)
    agreed = sum(w["agreed_tokens"] for w in workers)
    predicted = sum(w["predicted_tokens"] for w in workers)
    return {
        "agreement": round(agreed / cached, 4) if cached else 0.0,
        "precision": round(agreed / predicted, 4) if predicted else 0.0,
        "cached_tokens": cached,
        "agreed_tokens": agreed,
        "predicted_tokens": predicted,
        "prompt_tokens": sum(w["prompt_tokens"] for w in workers),
        "requests_observed": sum(w["completed"] for w in workers),
        "corrections": sum(w["corrections"] for w in workers),
    }


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def chat(client: Any, history: list[dict[str, str]], max_tokens: int, stream: bool) -> str:
    """The answer to `history`, streamed (deltas joined) or whole."""
    if not stream:
        reply = client.chat.completions.create(
            model="default", messages=history, max_tokens=max_tokens
        )
        return str(reply.choices[0].message.content or "")
    chunks = client.chat.completions.create(
        model="default", messages=history, stream=True, max_tokens=max_tokens
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def stream_chat(
    router: str, conversations: int = 6, turns: int = 4
) -> tuple[dict[str, float], list[list[dict[str, str]]]]:
    """The figures, and the conversations as they were sent (for the reference checks)."""
    from openai import OpenAI

    client = OpenAI(base_url=router + "/v1", api_key="none", max_retries=0)
    rng = random.Random(1)
    system = "You are a careful assistant. " + sentence(rng, 400)
    histories = [[{"role": "system", "content": system}] for _ in range(conversations)]
    for _ in range(turns):
        for history in histories:  # conversations interleave, turn by turn
            history.append({"role": "user", "content": sentence(rng, 20)})
            history.append({"role": "assistant", "content": chat(client, history, 32, True)})
    return agreement(router), histories


def built_in_template_check(router: str, histories: list[list[dict[str, str]]]) -> int:
    """Conversations whose router key is not the built-in template as written out here."""
    wrong = 0
    for history in histories:
        written = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in history)
        route = post(router + "/debug/route", {"messages": history})
        wrong += route["key_length"] != len(written + "<|assistant|>\n")
    return wrong


def hf_template_check(worker: str, folder: str, histories: list[list[dict[str, str]]]) -> int:
    """Conversations whose `prompt_tokens` at the worker differ from Hugging Face's own
    `apply_chat_template(tokenize=True, add_generation_prompt=True)`."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    wrong = 0
    for history in histories:
        ids = hf.apply_chat_template(history, tokenize=True, add_generation_prompt=True)
        ids = ids if isinstance(ids, list) else ids["input_ids"]
        reply = post(worker + "/v1/chat/completions", {"messages": history, "max_tokens": 1})
        wrong += reply["usage"]["prompt_tokens"] != len(ids)
    return wrong


def workers_of(router: str) -> list[str]:
    return [w["url"] for w in get_json(router + "/debug/stats")["workers"]]


def mixed_traffic(router: str, rounds: int = 8) -> dict[str, float]:
    from openai import OpenAI

    client = OpenAI(base_url=router + "/v1", api_key="none", max_retries=0)
    rng = random.Random(2)
    chat_system = "Answer briefly. " + sentence(rng, 300)
    documents = [sentence(rng, 300) for _ in range(2)]
    id_prefixes = [[rng.randrange(1000, 150_000) for _ in range(600)] for _ in range(2)]
    chats = [[{"role": "system", "content": chat_system}] for _ in range(2)]
    for i in range(rounds):
        for n, history in enumerate(chats):
            history.append({"role": "user", "content": sentence(rng, 15)})
            answer = chat(client, history, 24, stream=(i + n) % 2 == 0)
            history.append({"role": "assistant", "content": answer})
        for document in documents:
            prompt = document + " Question: " + sentence(rng, 12)
            client.completions.create(model="default", prompt=prompt, max_tokens=16)
        for prefix in id_prefixes:
            ids = prefix + [rng.randrange(1000, 150_000) for _ in range(40)]
            post(router + "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 8}})
    return agreement(router)


def bpe_tokenizer(folder: str, template: str, special: list[str]) -> str:
    """A byte-level BPE tokenizer (4,000 merges, trained here on the workloads' words) with a
    chat template, saved to `folder` (nothing is downloaded); `special[0]` is its BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(3)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4256,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([sentence(rng, 200) for _ in range(200)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special[0])
    fast.chat_template = template
    fast.save_pretrained(folder)
    return folder


def default_deployment(folder: str) -> dict[str, Any]:
    """stream_chat against character keys and workers with the Llama-3-style BPE tokenizer."""
    bpe_tokenizer(folder, LLAMA3_TEMPLATE, LLAMA3_SPECIAL)
    with ExitStack() as stack:
        router = cluster(stack, 2, "--tokenizer-path", folder)
        figures, histories = stream_chat(router)
        figures["hf_template_mismatches"] = hf_template_check(
            workers_of(router)[0], folder, histories
        )
    return figures


def chat_token_key_us() -> dict[str, float]:
    import statistics
    import tempfile

    from transformers import AutoTokenizer

    from sglang_dp.router.keys import route_request
    from sglang_dp.sglang_api import CHAT
    from sglang_dp.tokenizer import HFEncoder

    rng = random.Random(3)
    with tempfile.TemporaryDirectory() as folder:
        bpe_tokenizer(folder, SIMPLE_TEMPLATE, ["<s>", "<|start|>", "<|end|>"])
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder = HFEncoder(tokenizer)
    whole = HFEncoder(tokenizer)
    whole._splitter = None  # encodes every conversation whole
    system = {"role": "system", "content": sentence(rng, 500)}
    histories: list[list[dict[str, str]]] = [[system] for _ in range(8)]
    costs: dict[str, list[float]] = {"memo": [], "whole": []}
    for _ in range(8):
        for history in histories:
            history.append({"role": "user", "content": sentence(rng, 40)})
            raw = json.dumps({"messages": history}).encode()
            for name, which in (("memo", encoder), ("whole", whole)):
                start = time.perf_counter()
                route_request(CHAT, raw, which)
                costs[name].append((time.perf_counter() - start) * 1e6)
            history.append({"role": "assistant", "content": sentence(rng, 40)})
    return {
        "chat_token_key_us_p50": round(statistics.median(costs["memo"]), 1),
        "chat_token_key_us_p50_whole": round(statistics.median(costs["whole"]), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result: dict[str, Any] = {}
    with ExitStack() as stack:
        router = cluster(stack)
        chat, histories = stream_chat(router)
        built_in_wrong = built_in_template_check(router, histories)
    with ExitStack() as stack:
        mixed = mixed_traffic(cluster(stack))
    with tempfile.TemporaryDirectory() as folder:
        default = default_deployment(folder)
    result["stream_chat_prediction_agreement"] = chat["agreement"]
    result["stream_chat_prediction_precision"] = chat["precision"]
    result["mixed_traffic_prediction_agreement"] = mixed["agreement"]
    result["mixed_traffic_prediction_precision"] = mixed["precision"]
    result["default_deployment_agreement"] = default["agreement"]
    result["default_deployment_precision"] = default["precision"]
    figures = [v for k, v in result.items() if k.endswith(("_agreement", "_precision"))]
    result["targets_met"] = all(v >= 0.95 for v in figures)
    result["reference_checks"] = {
        "built_in_template_key_mismatches": built_in_wrong,
        "hf_template_prompt_tokens_mismatches": default.pop("hf_template_mismatches"),
        "conversations_checked_each": len(histories),
    }
    result |= chat_token_key_us()
    result["stream_chat"] = chat
    result["mixed_traffic"] = mixed
    result["default_deployment"] = default
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:>36}  {value}")


if __name__ == "__main__":
    main()
