"""Start real processes (simulated workers) on free loopback ports and talk to them (test helpers).

Each worker runs in its own session (process group) and is stopped by its pid's group, never by
name. Readiness and every other condition are polled with a deadline, never slept on.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from sglang_dp.launcher import ports, process

SGLANG_DP = str(Path(sys.executable).parent / "sglang-dp")
Scenario = Callable[[], Awaitable[Any]]


def run_on(kind: str, scenario: Scenario, timeout: float = 30.0) -> Any:
    """Run one scenario on a fresh loop ("asyncio" or "uvloop"); cancel whatever it left behind."""
    loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(scenario(), timeout))
    finally:
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        loop.close()


def make_hf_tokenizer(folder: Path) -> Path:
    """A tiny word-level Hugging Face tokenizer saved to `folder` (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "hello", "world", "the", "of", "and", "to", "capital", "is"]
    model = models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")
    fast.save_pretrained(str(folder))
    return folder


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


def make_chat_tokenizer(folder: Path) -> Path:
    """A tiny byte-level BPE tokenizer with a chat template, trained and saved to `folder`
    (nothing is downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<|start|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["hello world, the capital of France is Paris. " * 20, "You are a helpful assistant."]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return folder


def free_port() -> int:
    """A port nobody listens on right now."""
    return ports.free_port()


def free_port_band(size: int) -> int:
    """Consecutive free ports below the ephemeral range, at a random place (tests side by side)."""
    return ports.free_port_band(size, random.Random())


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def until(
    condition: Callable[[], Any], timeout: float = 10.0, what: str = "it", interval: float = 0.01
) -> Any:
    """Poll `condition` without blocking the event loop until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)
    return value


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
        raw: bytes | None = None,
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = raw if raw is not None else None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=headers or {})
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.request("POST", path, body, **kw)

    def events(self, path: str, body: Any) -> list[Any]:
        """A streamed response's `data:` payloads (JSON decoded, `[DONE]` kept as a string)."""
        reply = self.post(path, body)
        assert reply.status == 200, reply.body
        assert reply.headers["content-type"].startswith("text/event-stream")
        out: list[Any] = []
        for block in reply.body.decode().split("\n\n"):
            if block.startswith("data: "):
                payload = block[len("data: ") :]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None


def _healthy(worker: Worker) -> bool:
    if not worker.alive():
        raise AssertionError(f"worker exited with {worker.proc.returncode}")
    try:
        return worker.get("/health", timeout=1).status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    """TERM the worker's process group, then KILL it if it lingers."""
    process.stop_group(proc)


@contextmanager
def sim_worker(
    *args: str, module: bool = False, ready: bool = True, stderr_file: Path | None = None
) -> Iterator[Worker]:
    """A running `sglang-dp sim-worker` (or `python -m sglang_dp.sim`) on a free port."""
    port = free_port()
    base = [sys.executable, "-m", "sglang_dp.sim"] if module else [SGLANG_DP, "sim-worker"]
    err = open(stderr_file, "wb") if stderr_file else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [*base, "--port", str(port), "--log-level", "warning", *args],
        stdout=subprocess.DEVNULL,
        stderr=err,
        start_new_session=True,
    )
    worker = Worker(proc, port)
    try:
        if ready:
            wait_for(lambda: _healthy(worker), timeout=30, what="worker health")
        yield worker
    finally:
        stop(proc)
        if stderr_file:
            err.close()  # type: ignore[union-attr]
