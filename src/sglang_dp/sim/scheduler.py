"""The simulated GPU scheduler: continuous batching over a radix cache, in simulated time.

Pure and synchronous: every call takes `now` (simulated seconds, non-decreasing) and the shell
asks `next_event_time()` when to call `advance(now)` again. Nothing happens between calls, so
the state is evaluated lazily, exactly as if the GPU had run in the meantime.

The GPU runs one batch at a time, back to back. At each batch boundary (SGLang's event loop):

1. **Prefill** has priority. The partially prefilled (chunked) request continues first; then
   waiting requests in policy order (`fcfs`: arrival; `lpm`: longest cached prefix first,
   falling back to fcfs above 128 waiting, as SGLang does) are admitted while
   running + batch < max_running_requests, the batch's new tokens stay under
   chunked_prefill_size (the request that crosses it is chunked), and its new tokens plus its
   whole output fit in KV = capacity − locked − held − reserved (free + evictable, minus what
   running requests will still write). The first refusal ends the batch.
   `cached_tokens` is the prefix matched *now*, capped at len(prompt) − 1; requests in the same
   batch do not see each other's prompts (both compute a shared new prefix).
   Duration: the cost model's, summed over its requests (each request's new tokens, and their
   attention over everything before them: the cached prefix and earlier chunks). At its end
   each prompt (or chunk) goes into the tree, locked, and each fully prefilled request has its
   first token.
2. Otherwise a **decode run**: one token per running request per step; step time from the cost
   model. Steps are not simulated one by one: the run lasts until the next request finishes
   (O(1) arithmetic via `CostModel.decode_run_seconds`); an arrival or an abort cuts it at the
   step in progress. Per-request progress is `1 + decode_steps − join_step`, so a step costs
   nothing per request.
3. A finished request inserts prompt + output[:-1] into the tree and unlocks its path.

KV accounting (tokens): tree (`cache.size`, protected + evictable) + `held` (KV outside the
tree: in-flight prefill chunks, output tokens of running requests, all prompts when the cache
is disabled) ≤ capacity, with `reserved` = KV promised to admitted requests but not yet written.
Eviction (LRU, unlocked leaves) happens only when an allocation needs room.

Pages (`page_size` > 1): the cache holds whole pages, so `cached_tokens` is a multiple of the
page size; a prefilled prompt's partial last page stays `held` by its request until a later
chunk fills it or the request ends, when the unaligned tail is freed, as SGLang frees it.
`kv_events`: the cache records SGLang's KV events (`cache.take_events()`).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import count

from sglang_dp.sim.cost_model import CostModel
from sglang_dp.sim.radix_cache import Node, RadixCache

WAITING, PREFILLING, RUNNING, FINISHED = "waiting", "prefilling", "running", "finished"
LPM_MAX_QUEUE = 128  # SGLang switches lpm to fcfs above this many waiting requests


@dataclass(eq=False)
class SimRequest:
    """One generation request as the scheduler sees it."""

    rid: str
    prompt: list[int]
    output: list[int]  # the tokens it will generate (deterministic, precomputed)
    arrival: float = 0.0
    stream_interval: int = 0  # > 0: the shell wants progress every that many tokens
    emitted: int = 0  # tokens already sent to the client (kept by the shell)
    state: str = WAITING
    cached_tokens: int = 0
    prefilled: int = 0  # prompt tokens whose KV exists
    node: Node | None = None  # deepest node this request has locked
    join_step: int = 0
    generated: int = 0  # valid once finished
    first_token_time: float | None = None
    finish_time: float | None = None
    aborted: bool = False

    @property
    def max_new_tokens(self) -> int:
        """Length of the output."""
        return len(self.output)


@dataclass
class Batch:
    """The batch the GPU is running: a prefill, or a run of `steps` decode steps."""

    start: float
    end: float
    prefill: list[tuple[SimRequest, int]] = field(default_factory=list)  # (request, new tokens)
    steps: int = 0
    size: int = 0  # decode batch size
    context: int = 0  # decode context at the run's start


@dataclass
class Events:
    """What became visible to clients during an `advance`."""

    first_token: list[SimRequest] = field(default_factory=list)
    finished: list[SimRequest] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.first_token or self.finished)


@dataclass
class Stats:
    """Counters for /metrics and /get_load."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0
    finished_requests: int = 0
    last_batch_cache_hit_rate: float = 0.0


class Scheduler:
    """Waiting queue, running batch, radix cache and KV accounting (see module docstring)."""

    def __init__(
        self,
        cost: CostModel,
        policy: str = "fcfs",
        cache_enabled: bool = True,
        page_size: int = 1,
        kv_events: bool = False,
    ) -> None:
        self.cost = cost
        self.policy = policy
        self.cache = RadixCache(cache_enabled, page_size, kv_events)
        self.capacity = cost.max_total_tokens
        self.waiting: list[SimRequest] = []
        self.running: dict[str, SimRequest] = {}
        self.chunked: SimRequest | None = None
        self.batch: Batch | None = None
        self.held = 0
        self.reserved = 0
        self.context = 0  # KV context of running requests (decode cost)
        self.decode_steps = 0
        self._finish_heap: list[tuple[int, int, SimRequest]] = []
        self._seq = count()
        self.stats = Stats()

    # ------------------------------------------------------------------ queries

    @property
    def busy(self) -> bool:
        """Any request waiting, prefilling or running."""
        return bool(self.waiting or self.running or self.chunked or self.batch)

    @property
    def used_tokens(self) -> int:
        """KV tokens in use and not evictable (SGLang's token_usage numerator)."""
        return self.cache.protected_size + self.held

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether a request could ever run (alone, on an empty cache)."""
        return prompt_tokens + max_new_tokens <= self.capacity

    def decode_steps_done(self, now: float) -> int:
        """Decode steps completed by `now` (call after `advance(now)`)."""
        done = self.decode_steps
        b = self.batch
        if b is not None and b.steps:
            done += self.cost.decode_steps_within(b.size, b.context, now - b.start)
        return done

    def generated(self, req: SimRequest, now: float, steps_done: int | None = None) -> int:
        """Tokens `req` has generated by `now` (call after `advance(now)`).

        `steps_done` (from `decode_steps_done(now)`) saves recomputing it for many requests.
        """
        if req.state != RUNNING:
            return req.generated
        done = self.decode_steps_done(now) if steps_done is None else steps_done
        return min(1 + done - req.join_step, req.max_new_tokens)

    def next_event_time(self) -> float | None:
        """When `advance` next has something to report (None: idle until a request arrives)."""
        b = self.batch
        if b is None:
            return None
        if not b.steps:
            return b.end
        t = b.end
        for req in self.running.values():
            if req.stream_interval > 0:
                due = req.join_step + req.emitted + req.stream_interval - 1 - self.decode_steps
                if 0 < due < b.steps:
                    t = min(t, b.start + self.cost.decode_run_seconds(b.size, b.context, due))
        return t

    # ------------------------------------------------------------------ commands

    def submit(self, req: SimRequest, now: float) -> Events:
        """A request arrives at `now`."""
        return self.submit_all([req], now)

    def submit_all(self, reqs: Iterable[SimRequest], now: float) -> Events:
        """Requests that arrive together at `now` (one HTTP call): they can share a batch."""
        events = self.advance(now)
        for req in reqs:
            req.arrival = now
            req.state = WAITING
            self.waiting.append(req)
        self._cut_decode_run(now)
        if self.batch is None:
            self.batch = self._next_batch(now)
        return events

    def abort(self, rid: str, now: float) -> SimRequest | None:
        """Abort a request (client gone or /abort_request); its KV is released."""
        self.advance(now)
        for i, req in enumerate(self.waiting):
            if req.rid == rid:
                del self.waiting[i]
                self._finish(req, now, 0, aborted=True)
                return req
        in_prefill = [r for r, _ in self.batch.prefill] if self.batch else []
        found = self.running.get(rid) or next((r for r in in_prefill if r.rid == rid), None)
        if found is None or found.aborted:
            return None
        req = found
        req.aborted = True  # removed at the next batch boundary, like SGLang
        req.generated = self.generated(req, now)
        self._cut_decode_run(now)
        return req

    def flush(self) -> bool:
        """Clear the cache; refused (False) while any request is queued or running."""
        if self.busy:
            return False
        self.cache.reset()
        self.held = self.reserved = self.context = 0
        return True

    def run_instant(self, req: SimRequest, now: float) -> None:
        """Answer at once (`--instant`): no batching or cost, but the cache still works."""
        prompt = req.prompt
        req.cached_tokens, _ = self.cache.match_prefix(prompt[: len(prompt) - 1], now)
        req.arrival = req.first_token_time = req.finish_time = now
        kept = prompt + req.output[:-1] if req.output else prompt
        _, node = self.cache.insert(kept, now)
        overflow = self.cache.size - self.capacity
        if overflow > 0:
            self.cache.lock(node)  # evict others first
            overflow -= self.cache.evict(overflow)
            self.cache.unlock(node)
            self.cache.evict(overflow)
        req.generated = len(req.output)
        req.state = FINISHED
        self._count(req)

    def advance(self, now: float) -> Events:
        """Run the GPU up to `now`: complete every batch that ends by then, start the next."""
        events = Events()
        while self.batch is not None and self.batch.end <= now:
            done = self.batch
            if done.steps:
                self._complete_decode(done, events)
            else:
                self._complete_prefill(done, events)
            self.batch = self._next_batch(done.end)
        return events

    # ------------------------------------------------------------------ batches

    def _next_batch(self, t: float) -> Batch | None:
        self._drop_aborted(t)
        batch = self._form_prefill(t)
        if batch is not None or not self.running:
            return batch
        heap = self._finish_heap
        while heap[0][2].state != RUNNING:  # entries of aborted requests
            heapq.heappop(heap)
        steps = max(1, heap[0][0] - self.decode_steps)
        size = len(self.running)
        end = t + self.cost.decode_run_seconds(size, self.context, steps)
        return Batch(t, end, steps=steps, size=size, context=self.context)

    def _ordered_waiting(self, t: float) -> list[SimRequest]:
        if self.policy != "lpm" or len(self.waiting) > LPM_MAX_QUEUE:
            return self.waiting
        match = self.cache.match_prefix
        return sorted(self.waiting, key=lambda r: -match(r.prompt[: len(r.prompt) - 1])[0])

    def _form_prefill(self, t: float) -> Batch | None:
        limit = self.cost.chunked_prefill_size
        budget = limit if limit > 0 else 1 << 62
        batch: list[tuple[SimRequest, int]] = []
        if self.chunked is not None:
            req, self.chunked = self.chunked, None
            chunk = min(len(req.prompt) - req.prefilled, budget)
            batch.append((req, chunk))
            budget -= chunk
            if req.prefilled + chunk < len(req.prompt):
                self.chunked = req
                budget = 0
        admitted: set[int] = set()
        hit = total = 0
        for req in self._ordered_waiting(t) if budget > 0 else ():
            if len(self.running) + len(batch) >= self.cost.max_running_requests:
                break
            prompt = req.prompt
            matched, node = self.cache.match_prefix(prompt[: len(prompt) - 1], t)
            self.cache.lock(node)
            new = len(prompt) - matched
            need = new + max(0, req.max_new_tokens - 1)
            if need > self.capacity - self.cache.protected_size - self.held - self.reserved:
                self.cache.unlock(node)
                break
            req.node, req.cached_tokens, req.prefilled = node, matched, matched
            req.state = PREFILLING
            self.reserved += need
            chunk = min(new, budget)
            batch.append((req, chunk))
            admitted.add(id(req))
            hit, total = hit + matched, total + len(prompt)
            budget -= chunk
            if chunk < new:
                self.chunked = req
                break
            if budget <= 0:
                break
        if admitted:
            self.waiting = [r for r in self.waiting if id(r) not in admitted]
            self.stats.last_batch_cache_hit_rate = hit / total
        if not batch:
            return None
        for _, chunk in batch:
            self.reserved -= chunk
            self.held += chunk
        self._make_room()
        # each request's chunk attends to the prefix before it (a hit or its earlier chunks)
        duration = self.cost.prefill_seconds((req.prefilled, chunk) for req, chunk in batch)
        return Batch(t, t + duration, prefill=batch)

    def _complete_prefill(self, b: Batch, events: Events) -> None:
        page = self.cache.page_size
        for req, chunk in b.prefill:
            tail_before = req.prefilled % page
            req.prefilled += chunk
            if self.cache.enabled:
                # the computed prompt joins the tree (shared from now on), still locked by req;
                # a partial last page stays the request's own (held) until it fills or ends
                _, node = self.cache.insert(req.prompt[: req.prefilled], b.end)
                self.held -= chunk + tail_before - req.prefilled % page
                self.cache.lock(node)
                assert req.node is not None
                self.cache.unlock(req.node)
                req.node = node
            if req.aborted:
                self._finish(req, b.end, 0, aborted=True)
                if self.chunked is req:
                    self.chunked = None
                continue
            if req.prefilled < len(req.prompt):
                continue  # chunked: more next batch
            req.first_token_time = b.end
            if req.max_new_tokens <= 1:
                self._finish(req, b.end, req.max_new_tokens)
                events.finished.append(req)
                continue
            req.state = RUNNING
            req.join_step = self.decode_steps
            self.running[req.rid] = req
            self.context += len(req.prompt) + 1
            heapq.heappush(
                self._finish_heap,
                (self.decode_steps + req.max_new_tokens - 1, next(self._seq), req),
            )
            events.first_token.append(req)

    def _complete_decode(self, b: Batch, events: Events) -> None:
        produced = b.steps * b.size
        self.decode_steps += b.steps
        self.context += produced
        self.reserved -= produced
        self.held += produced
        self._make_room()
        heap = self._finish_heap
        while heap and heap[0][0] <= self.decode_steps:
            req = heapq.heappop(heap)[2]
            if req.state == RUNNING and not req.aborted:
                del self.running[req.rid]
                self._finish(req, b.end, req.max_new_tokens)
                events.finished.append(req)
        self._drop_aborted(b.end)

    def _drop_aborted(self, t: float) -> None:
        for req in [r for r in self.running.values() if r.aborted]:
            del self.running[req.rid]
            # at a batch boundary: every completed step counted in decode_steps
            generated = min(1 + self.decode_steps - req.join_step, req.max_new_tokens)
            self._finish(req, t, generated, aborted=True)

    def _cut_decode_run(self, now: float) -> None:
        """End the current decode run after the step in progress (something changed)."""
        b = self.batch
        if b is None or not b.steps or now >= b.end:
            return
        steps = min(b.steps, self.cost.decode_steps_within(b.size, b.context, now - b.start) + 1)
        b.steps = steps
        b.end = b.start + self.cost.decode_run_seconds(b.size, b.context, steps)

    def _make_room(self) -> None:
        over = self.cache.size + self.held - self.capacity
        if over > 0:
            self.cache.evict(over)

    def _finish(self, req: SimRequest, t: float, generated: int, aborted: bool = False) -> None:
        """Release a request's KV: its tokens join the tree, its path unlocks."""
        was_running = req.state == RUNNING
        req.generated = generated
        req.finish_time = t
        req.aborted = aborted
        kv_out = max(0, generated - 1)  # the last token never gets KV
        if was_running:
            self.context -= len(req.prompt) + generated
            self.reserved -= max(0, req.max_new_tokens - 1) - kv_out
        elif req.state == PREFILLING:
            self.reserved -= len(req.prompt) - req.prefilled + max(0, req.max_new_tokens - 1)
        if req.node is not None:
            if self.cache.enabled:
                whole = req.prefilled == len(req.prompt)
                self.cache.insert(
                    req.prompt[: req.prefilled] + (req.output[:kv_out] if whole else []), t
                )
                # the unaligned tail is freed, as SGLang frees it
                self.held -= kv_out + req.prefilled % self.cache.page_size
            else:
                self.held -= req.prefilled + kv_out
            self.cache.unlock(req.node)
            req.node = None
        req.state = FINISHED
        if not aborted:
            self._count(req)

    def _count(self, req: SimRequest) -> None:
        s = self.stats
        s.prompt_tokens += len(req.prompt)
        s.cached_tokens += req.cached_tokens
        s.generation_tokens += req.generated
        s.finished_requests += 1


def total_tokens(reqs: Iterable[SimRequest]) -> int:
    """Prompt tokens of some requests (for /get_load)."""
    return sum(len(r.prompt) for r in reqs)
