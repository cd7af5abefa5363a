"""The routing engine: tree + policy + per-worker state, with time as a parameter.

For every request the shell calls, on one event loop:

    dispatch = engine.route(key, now, exclude, streamed)   match → choose → speculate
    try:
        ... forward the request to dispatch.worker ...
        engine.first_token(dispatch, now)        a stream's first chunk: its prefill is done
        engine.observe(dispatch, outcome, now)   correct the tree from `cached_tokens`
    except ...:
        engine.fail(dispatch, "connect_error")
    finally:
        engine.release(dispatch)                 no-op if observe/fail already released it

A `Dispatch` is the in-flight handle: the worker's in-flight count goes up in `route` and down
exactly once, by whichever of observe/fail/release comes first, so a `finally` makes a leak
impossible (streams that end early, timeouts, client disconnects included).

Queues and prices (what `least_ttft` routes by, `prices.py`): a routed request's uncached key
elements wait in its worker's prefill queue until its first token comes (`first_token`, called
by the shell on a stream's first chunk), it ends, or — not streamed, so nothing will say
earlier — its estimated time to first token has passed `DEADLINE` times over; then it counts
as running. (A stream keeps its place until its first chunk: a worker that stalls looks as
busy as it is.) Each streamed answer's time to first token, with the queue it waited behind
and its real uncached elements (from `cached_tokens`), updates its worker's `PriceFit` in
`observe`. Workers are priced alike unless they differ: the fleet's prices (the median of the
workers that have learned theirs from `WARMUP` answers, else `set_prior`'s, else the default)
serve every worker whose own prefill price is within `DISTINCT` of the fleet's, so that noise in
one fit does not send all idle traffic to one of identical GPUs; a slower GPU, or another model
or TP size, gets its own. A worker that joins starts from the fleet's prices.

Correction (`observe`), the proposal's fourth phase that sgl-router never built:
- the worker now caches prompt + output: insert the extended key for it;
- predicted tokens = matched elements / elements-per-token, capped at prompt_tokens - 1 as SGLang
  caps `cached_tokens`. Token keys: exactly 1. Character keys: one estimate per kind of key
  (chat, text: learned from responses, as a rendered conversation and plain text differ), and
  for `input_ids` rendered as decimal numbers the exact count of whole numbers matched;
- a *confirmed* prediction (the matched part was touched before any request still in flight on
  that worker was sent, so it had surely been prefilled) that the worker contradicts by more than
  `TOLERANCE` means it has been evicting: its budget shrinks to `SHRINK` × its current share and
  its least recently used leaves go; accurate predictions grow the budget back, up to the worker's
  KV capacity (converted to key elements) when known, else the global budget. Unconfirmed misses
  (same-batch duplicates compute the prefix twice in SGLang) change nothing but the statistics.
- `reset_worker` (restarted or flushed) drops the worker's whole share.

Exact cache view (`use_events`): with token keys and a `KvIndex` fed by the workers' KV events
(SGLang's `--kv-events-config`), a worker whose event stream is whole (`KvIndex.trusted`) is
matched on the blocks it stored — whole pages, as SGLang matches — or, if longer, on the whole
pages of what the tree says was routed to it in the last `SPECULATIVE_TTL_S`, or since the
oldest request it still has waiting for its prefill (their events cannot have come yet:
`RadixTree.recent_match`); every other worker on the tree. The tree keeps
being updated and corrected for all of them, so a worker whose stream breaks falls back to a
current picture. `Explanation.views` and `WorkerStats.cache_view` say which picture served.

The tree as a whole is held to `max_tree_memory_mb` (its estimated bytes: `tree.memory`) and
`max_tree_size` key elements — global budgets: memory does not grow with the number of workers.
While the tree is over either, every request evicts at most `EVICT_STEP` of the least recently
used leaves (no pause: no step walks the tree). A worker's own share is cut back when it exceeds
its budget by `SLACK`, in steps of at most `EVICT_STEP_WORK` nodes, one per request of that
worker (`RadixTree.evict_step`), until it fits.
"""

from __future__ import annotations

import heapq
import itertools
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from sglang_dp.options import nested, option
from sglang_dp.router.keys import KIND_IDS, KIND_TEXT, KINDS
from sglang_dp.router.kv_index import SPECULATIVE_TTL_S, KvIndex
from sglang_dp.router.policies import PolicyConfig, make_policy
from sglang_dp.router.prices import (
    WARMUP,
    Fleet,
    PriceFit,
    Prices,
    WorkerLoad,
    default_step_prices,
    default_ttft_prices,
    estimate,
    estimate_parts,
    queue_wait,
)
from sglang_dp.router.tree import Key, KeyLike, Path, RadixTree

TOLERANCE_TOKENS = 8  # below this a misprediction is noise (token boundaries, templates)
TOLERANCE_RATE = 0.1  # ... or below this share of the prediction
SHRINK = 0.85  # budget after an eviction is detected, as a share of the current tree share
SLACK = 0.05  # evict a worker's share when its budget is exceeded by this share (amortised)
EVICT_STEP = 256  # leaves one request may evict from the whole tree (bounds the pause)
EVICT_STEP_WORK = 1024  # nodes one request may look at to cut its worker's share (~1-3 ms)
EWMA = 0.05  # weight of one response in an elements-per-token estimate (after the first 20)
CHARS_PER_TOKEN = 4.0  # starting estimate for character keys (English text)
DEADLINE = 1.5  # a queued request counts as running after this many times its estimated ttft
OUTPUTS = 128.0  # tokens an answer has, until answers say (least_ttft's decode time)
DISTINCT = 0.25  # a worker's own prices serve it when its prefill price is this far off the fleet's
EVENTS = "events"  # a worker matched on its KV events (exact)
TREE = "tree"  # ... on the approximate tree
_NOTHING: frozenset[str] = frozenset()


class NoWorkerAvailable(Exception):
    """No healthy worker can take the request (none registered, none healthy, all excluded)."""


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the routing engine (policy settings included)."""

    policy: PolicyConfig = nested(PolicyConfig)
    max_tree_size: int = option(
        2**26, "Key elements (characters or tokens) the whole tree may hold, all workers together."
    )
    max_tree_memory_mb: int = option(
        1024,
        "Memory the routing tree may use, all workers together, in MB (an estimate of its "
        "objects; measured, the router's memory grows by 1.09-1.11x of it).",
    )
    token_keys: bool = option(False, "Keys are token ids (else characters).", cli=False)

    def __post_init__(self) -> None:
        if self.max_tree_size <= 0:
            raise ValueError("max_tree_size must be positive")
        if self.max_tree_memory_mb <= 0:
            raise ValueError("max_tree_memory_mb must be positive")


class Decision(NamedTuple):
    """Where a request goes and why (also what `/debug/route` shows, without side effects)."""

    worker: str
    reason: str
    policy: str
    matched: int  # key elements the chosen worker probably holds
    key_length: int
    load: int  # the chosen worker's requests in flight when deciding

    @property
    def match_rate(self) -> float:
        return self.matched / self.key_length if self.key_length else 0.0


class Explanation(NamedTuple):
    """A dry-run decision with everything that mattered: every routable worker's match and load."""

    decision: Decision
    matches: dict[str, int]  # routable workers only, in worker order
    loads: dict[str, int]
    pending: dict[str, int]  # uncached key elements in flight (cache_aware's misses use it)
    estimates: dict[str, tuple[float, float, float, float, float]]  # s: `prices.estimate_parts`
    views: dict[str, str]  # which picture of its cache each match came from: "events" or "tree"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the worker reported for a finished request."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int = 0
    extended_key: KeyLike | None = None  # key + generated output, in the key's own format
    kind: int = KIND_TEXT  # the key's kind (keys.KIND_*): which estimate of its token count

    # Written out (the generated one is the same): under mypyc a dataclass's generated __init__
    # runs interpreted, about 15 times slower than this compiled one, once per request.
    def __init__(
        self,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int = 0,
        extended_key: KeyLike | None = None,
        kind: int = KIND_TEXT,
    ) -> None:
        object.__setattr__(self, "prompt_tokens", prompt_tokens)
        object.__setattr__(self, "cached_tokens", cached_tokens)
        object.__setattr__(self, "completion_tokens", completion_tokens)
        object.__setattr__(self, "extended_key", extended_key)
        object.__setattr__(self, "kind", kind)


class _WorkerState:
    __slots__ = (
        "agreed_tokens",
        "budget",
        "cached_tokens",
        "capacity_tokens",
        "completed",
        "completion_tokens",
        "corrections",
        "errors",
        "evicted",
        "generation",
        "healthy",
        "in_flight",
        "load",
        "mispredicted",
        "pending",
        "predicted_tokens",
        "prompt_tokens",
        "queue_deadlines",
        "queued",
        "resets",
        "routed",
        "speculated",
        "step_fit",
        "ttft_fit",
        "url",
    )

    def __init__(
        self, url: str, capacity_tokens: int | None, ttft_prior: Prices, step_prior: Prices
    ) -> None:
        self.url = url
        self.ttft_fit = PriceFit(ttft_prior)
        self.step_fit = PriceFit(step_prior)
        self.load = WorkerLoad(self.ttft_fit.prices, self.step_fit.prices)
        self.queued: dict[int, int] = {}  # dispatch id -> its uncached elements, first token due
        self.queue_deadlines: list[tuple[float, int]] = []  # heap: when each counts as running
        self.healthy = True
        self.capacity_tokens = capacity_tokens
        self.budget = math.inf  # learned share of the tree, in key elements
        self.in_flight: dict[int, float] = {}  # dispatch id -> when it was sent (ordered)
        self.pending = 0  # key elements of in-flight prompts it was not predicted to hold
        self.generation = 0
        self.routed = self.completed = self.errors = self.resets = 0
        self.predicted_tokens = self.cached_tokens = self.prompt_tokens = 0
        self.completion_tokens = 0
        self.agreed_tokens = 0  # sum of min(predicted, reported) cached tokens
        self.mispredicted = self.corrections = self.evicted = 0
        self.speculated = 0  # routed on a match its KV events had not confirmed yet


@dataclass(slots=True, eq=False)
class Dispatch:
    """The handle of one request in flight; see the module docstring."""

    id: int
    decision: Decision
    key: Key
    sent_at: float
    prior_touch: float | None  # when the worker last touched the matched part, before this
    oldest_in_flight: float  # send time of its oldest request in flight when this was routed
    uncached: int  # key elements the worker was not predicted to hold (its prefill work)
    _state: _WorkerState
    _generation: int
    released: bool = False
    ahead: int = 0  # key elements queued on the worker before this one
    running: int = 0  # the worker's requests past their first token when this was routed
    context: int = 0  # key elements of the worker's requests in flight when this was routed
    batch: int = 0  # the worker's requests in flight when this was routed
    first_token_at: float | None = None

    def __init__(  # written out for mypyc: see Outcome
        self,
        id: int,
        decision: Decision,
        key: Key,
        sent_at: float,
        prior_touch: float | None,
        oldest_in_flight: float,
        uncached: int,
        _state: _WorkerState,
        _generation: int,
        released: bool = False,
        ahead: int = 0,
        running: int = 0,
        context: int = 0,
        batch: int = 0,
    ) -> None:
        self.id = id
        self.decision = decision
        self.key = key
        self.sent_at = sent_at
        self.prior_touch = prior_touch
        self.oldest_in_flight = oldest_in_flight
        self.uncached = uncached
        self._state = _state
        self._generation = _generation
        self.released = released
        self.ahead = ahead
        self.running = running
        self.context = context
        self.batch = batch
        self.first_token_at = None

    @property
    def worker(self) -> str:
        return self.decision.worker


@dataclass(frozen=True, slots=True)
class WorkerStats:
    url: str
    healthy: bool
    in_flight: int
    pending: int  # key elements of in-flight prompts not predicted cached (queued prefill)
    routed: int
    completed: int
    errors: int
    resets: int
    prompt_tokens: int
    cached_tokens: int  # what the worker reported
    completion_tokens: int
    predicted_tokens: int  # what the tree predicted for the same requests
    agreed_tokens: int  # sum over requests of min(predicted, reported cached tokens)
    mispredicted: int  # requests whose prediction was off by more than the tolerance
    corrections: int  # evictions detected and applied to the tree
    evicted: int  # key elements removed from its share by corrections and budgets
    tree_size: int
    budget: float  # its learned share budget (inf: unbounded but for the global budget)
    capacity_tokens: int | None
    queued: int = 0  # key elements of prefill waiting for their first token
    running: int = 0  # requests in flight past their first token
    wait_s: float = 0.0  # what they are estimated to delay a new first token by
    context: int = 0  # key elements of its requests in flight
    # the prices it is routed by (`prices.Prices`: s, s per key element, s per request)
    ttft_prices: tuple[float, float, float] = (0.0, 0.0, 0.0)
    step_prices: tuple[float, float, float] = (0.0, 0.0, 0.0)
    ttft_samples: int = 0  # answers its own fits learned from
    step_samples: int = 0
    cache_view: str = TREE  # what its matches come from: EVENTS (exact) or TREE
    speculated: int = 0  # routed there on pages its events had not confirmed yet (recent routes)

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def predicted_rate(self) -> float:
        return self.predicted_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def agreement(self) -> float:
        """How much of what the worker really had cached the tree predicted (1: all of it)."""
        return self.agreed_tokens / self.cached_tokens if self.cached_tokens else 1.0


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    policy: str
    now: float
    workers: tuple[WorkerStats, ...]
    reasons: tuple[tuple[str, int], ...]
    tree_size: int
    tree_nodes: int
    max_tree_size: int
    elements_per_token: float  # the text estimate
    elements_per_token_by_kind: tuple[tuple[str, float], ...] = ()
    tree_memory: int = 0  # estimated bytes (`RadixTree.memory`)

    @property
    def routed(self) -> int:
        return sum(w.routed for w in self.workers)

    @property
    def hit_rate(self) -> float:
        prompt = sum(w.prompt_tokens for w in self.workers)
        return sum(w.cached_tokens for w in self.workers) / prompt if prompt else 0.0


class RoutingEngine:
    """Owns the tree, the policy and the workers' state; see the module docstring."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self._tree = RadixTree()
        self._workers: dict[str, _WorkerState] = {}
        self._routable: tuple[_WorkerState, ...] = ()
        self._loads: dict[str, int] = {}  # routable workers' in-flight counts, kept current
        self._pending: dict[str, int] = {}  # ... and their uncached key elements in flight
        per_token = 1.0 if self.config.token_keys else CHARS_PER_TOKEN
        self._view = Fleet(OUTPUTS)  # ... and their queues, batches and prices (least_ttft)
        self._policy = make_policy(self.config.policy, self._view)
        self._policy_name = self._policy.name
        self._priors = (default_ttft_prices(per_token), default_step_prices(per_token))
        self._fleet = self._priors  # the prices of workers not distinct from the fleet
        self._fitted = 0  # samples since the fleet was last priced
        self._answers = 0  # answers the output length was learned from
        self._ids = itertools.count(1)
        self._max_memory = self.config.max_tree_memory_mb << 20
        self._reasons: dict[str, int] = {}  # a Counter's item assignment is several times slower
        start = 1.0 if self.config.token_keys else CHARS_PER_TOKEN
        self._per_token = [start] * len(KINDS)  # indexed by keys.KIND_*
        self._learned = [0] * len(KINDS)  # responses each estimate was learned from
        self._events: KvIndex | None = None

    @property
    def tree(self) -> RadixTree:
        """The tree, for read-only inspection (`branches`, `match`)."""
        return self._tree

    # -- workers ---------------------------------------------------------------------------

    def add_worker(
        self, url: str, capacity_tokens: int | None = None, healthy: bool = True
    ) -> None:
        """Register a worker with an empty share; re-adding an existing one is a no-op."""
        if url not in self._workers:
            state = _WorkerState(url, capacity_tokens, *self._fleet)
            state.healthy = healthy
            self._workers[url] = state
            self._price_fleet()
            self._refresh_routable()

    def remove_worker(self, url: str) -> None:
        state = self._workers.pop(url, None)
        if state is not None:
            self._tree.remove_tenant(url)
            self._refresh_routable()

    def set_healthy(self, url: str, healthy: bool) -> None:
        """Take a worker out of routing or back in; its share of the tree is kept."""
        state = self._workers.get(url)
        if state is not None and state.healthy != healthy:
            state.healthy = healthy
            self._refresh_routable()

    def set_capacity(self, url: str, capacity_tokens: int | None) -> None:
        """The worker's KV capacity (`max_total_num_tokens`) bounds its share of the tree."""
        state = self._workers.get(url)
        if state is not None:
            state.capacity_tokens = capacity_tokens

    def set_prior(self, ttft: Prices, step: Prices | None = None) -> None:
        """Prices to start from until answers say otherwise (a simulated worker's profile)."""
        self._priors = (ttft, step or self._priors[1])
        for state in self._workers.values():
            state.ttft_fit.reset_prior(self._priors[0])
            state.step_fit.reset_prior(self._priors[1])
        self._price_fleet()

    def reset_worker(self, url: str) -> None:
        """The worker restarted or flushed its cache: it holds nothing any more."""
        state = self._workers.get(url)
        if state is not None:
            self._tree.remove_tenant(url)
            state.generation += 1
            state.resets += 1
            state.budget = math.inf

    def use_events(self, index: KvIndex | None) -> None:
        """Match token keys on this index of the workers' KV events where a worker's picture
        is whole (`KvIndex.trusted`); the tree serves the others, and is kept up to date for
        all of them (None: the tree alone)."""
        self._events = index

    @property
    def workers(self) -> list[str]:
        return list(self._workers)

    def healthy_workers(self) -> list[str]:
        return [s.url for s in self._routable]

    # -- routing ---------------------------------------------------------------------------

    def explain(
        self, key: KeyLike, exclude: Iterable[str] = (), now: float | None = None
    ) -> Explanation:
        """The decision the policy would take now, with no side effect on tree or loads
        (queues past their deadline at `now` are settled first, as `route` would).

        Random and round-robin policies advance their generator, so two dry runs may differ.
        """
        if now is not None:
            self._settle_queues(now)
        loads = self._candidates(exclude).copy()
        path = self._tree.walk(key)
        matched, exact, _ = self._matches(path, loads, now)
        decision = self._decide(matched, len(path.key), loads)
        matches = {w: matched.get(w, 0) for w in loads}
        length = len(path.key)
        fleet = self._view
        estimates = {
            w: estimate_parts(fleet.loads[w], length - matches[w], loads[w], length, fleet.outputs)
            for w in loads
        }
        pending = {w: self._pending[w] for w in loads}
        views = {w: EVENTS if w in exact else TREE for w in loads}
        return Explanation(decision, matches, loads, pending, estimates, views)

    def route(
        self, key: KeyLike, now: float, exclude: Iterable[str] = (), streamed: bool = False
    ) -> Dispatch:
        """Choose a worker, count the request in flight there and speculate: insert the key.

        `streamed`: the shell will report the first token (`first_token`), so the request
        waits in its worker's queue until then, with no deadline."""
        self._settle_queues(now)
        self._view.now = now
        path = self._tree.walk(key)
        loads = self._candidates(exclude)
        matched, _, speculated = self._matches(path, loads, now)
        decision = self._decide(matched, len(path.key), loads)
        state = self._workers[decision.worker]
        if decision.worker in speculated:
            state.speculated += 1
        prior = self._tree.insert_at(path, state.url, now)
        oldest = next(iter(state.in_flight.values()), math.inf)
        uncached = decision.key_length - decision.matched
        load = state.load
        dispatch = Dispatch(
            next(self._ids), decision, path.key, now, prior, oldest, uncached, state,
            state.generation, False, load.queued, load.running, load.context, len(state.in_flight),
        )  # fmt: skip
        state.in_flight[dispatch.id] = now
        state.pending += uncached
        state.queued[dispatch.id] = uncached
        if not streamed:
            due = now + DEADLINE * estimate(load, uncached)
            heapq.heappush(state.queue_deadlines, (due, dispatch.id))
        load.queued += uncached
        load.context += decision.key_length
        self._sync_load(state)
        state.routed += 1
        self._reasons[decision.reason] = self._reasons.get(decision.reason, 0) + 1
        self._enforce_budgets(state)
        return dispatch

    def first_token(self, dispatch: Dispatch, now: float) -> None:
        """The request's first token came (a stream's first chunk): its prefill is done."""
        if dispatch.first_token_at is None:
            dispatch.first_token_at = now
        if not dispatch.released:
            self._start_running(dispatch._state, dispatch.id)

    def observe(self, dispatch: Dispatch, outcome: Outcome, now: float) -> None:
        """The correction phase: the worker's real `cached_tokens` repairs the tree, and a
        streamed answer's time to first token its prices."""
        self._view.now = max(self._view.now, now)  # when the worker went idle, if it did
        self.release(dispatch)
        state = dispatch._state
        state.completed += 1
        if outcome.prompt_tokens <= 0:
            return
        predicted = self._predicted_tokens(dispatch, outcome)  # before it learns from this one
        self._learn_elements_per_token(dispatch, outcome)
        self._learn_prices(dispatch, outcome, now)
        state.prompt_tokens += outcome.prompt_tokens
        state.cached_tokens += outcome.cached_tokens
        state.completion_tokens += outcome.completion_tokens
        state.predicted_tokens += predicted
        state.agreed_tokens += min(predicted, outcome.cached_tokens)
        if state is not self._workers.get(state.url) or dispatch._generation != state.generation:
            return  # removed or restarted since: what it cached then is gone
        extended = outcome.extended_key if outcome.extended_key is not None else dispatch.key
        self._tree.insert(extended, state.url, now)
        short = predicted - outcome.cached_tokens
        if short > max(TOLERANCE_TOKENS, TOLERANCE_RATE * predicted):
            state.mispredicted += 1
            if self._confirmed(dispatch):
                self._shrink(state)
        else:
            state.budget = min(self._ceiling(state), state.budget + len(extended))
        self._enforce_budgets(state)

    def fail(self, dispatch: Dispatch, reason: str) -> None:
        """The request failed at or before the worker (connect error, 5xx, timeout)."""
        if not dispatch.released:
            dispatch._state.errors += 1
            error = f"error:{reason}"
            self._reasons[error] = self._reasons.get(error, 0) + 1
        self.release(dispatch)

    def retract(self, dispatch: Dispatch) -> None:
        """The attempt never reached the worker's cache (it failed before any answer): undo its
        speculation, so the worker holds in the tree only what it was predicted to hold."""
        state = dispatch._state
        if state is self._workers.get(state.url) and dispatch._generation == state.generation:
            self._tree.retract(dispatch.key, state.url, dispatch.decision.matched)

    def release(self, dispatch: Dispatch) -> None:
        """End the request's in-flight accounting; only the first call has an effect."""
        if not dispatch.released:
            dispatch.released = True
            state = dispatch._state
            state.in_flight.pop(dispatch.id, None)
            state.pending -= dispatch.uncached
            load = state.load
            uncached = state.queued.pop(dispatch.id, None)
            if uncached is None:
                load.running -= 1
            else:
                load.queued -= uncached
            load.context -= dispatch.decision.key_length
            if not state.in_flight:
                load.idle_since = self._view.now
            self._sync_load(state)

    # -- reading ---------------------------------------------------------------------------

    def decisions(self, reason: str) -> int:
        """How many routing decisions (or errors) so far had this reason."""
        return self._reasons.get(reason, 0)

    def snapshot(self, now: float) -> EngineSnapshot:
        return EngineSnapshot(
            policy=self._policy.name,
            now=now,
            workers=tuple(self._stats(s) for s in self._workers.values()),
            reasons=tuple(sorted(self._reasons.items())),
            tree_size=self._tree.total_size,
            tree_nodes=self._tree.node_count,
            max_tree_size=self.config.max_tree_size,
            elements_per_token=self._per_token[KIND_TEXT],
            elements_per_token_by_kind=tuple(zip(KINDS, self._per_token)),
            tree_memory=self._tree.memory,
        )

    # -- internals -------------------------------------------------------------------------

    def _refresh_routable(self) -> None:
        self._routable = tuple(s for s in self._workers.values() if s.healthy)
        self._loads = {s.url: len(s.in_flight) for s in self._routable}
        self._pending = {s.url: s.pending for s in self._routable}
        self._view.loads = {s.url: s.load for s in self._routable}

    def _price_fleet(self) -> None:
        """The fleet's prices, and which workers they serve (see the module docstring)."""
        states = self._workers.values()
        ttft = fleet_prices([s.ttft_fit for s in states], self._priors[0])
        step = fleet_prices([s.step_fit for s in states], self._priors[1])
        self._fleet = (ttft, step)
        for state in states:
            state.load.ttft = own_or_fleet(state.ttft_fit, ttft)
            state.load.step = own_or_fleet(state.step_fit, step)

    def _settle_queues(self, now: float) -> None:
        """Queued requests past their deadline count as running (their first token is due)."""
        for state in self._routable:
            deadlines = state.queue_deadlines
            while deadlines and deadlines[0][0] <= now:
                self._start_running(state, heapq.heappop(deadlines)[1])

    @staticmethod
    def _start_running(state: _WorkerState, dispatch_id: int) -> None:
        uncached = state.queued.pop(dispatch_id, None)
        if uncached is not None:
            state.load.queued -= uncached
            state.load.running += 1

    def _learn_prices(self, dispatch: Dispatch, outcome: Outcome, now: float) -> None:
        """A streamed answer's time to first token against the work it waited for, and its
        mean decode step against the batch it joined; every answer's length."""
        tokens = outcome.completion_tokens
        if tokens > 0:
            self._answers += 1
            weight = max(EWMA, 1.0 / self._answers)
            self._view.outputs += weight * (tokens - self._view.outputs)
        first = dispatch.first_token_at
        if first is None:
            return
        kind = outcome.kind if 0 <= outcome.kind < len(KINDS) else KIND_TEXT
        own = max(outcome.prompt_tokens - outcome.cached_tokens, 0) * self._per_token[kind]
        state = dispatch._state
        work = dispatch.ahead + own
        learned = state.ttft_fit.add(first - dispatch.sent_at, work, dispatch.running)
        if tokens >= 2:
            step = (now - first) / (tokens - 1)
            context = dispatch.context + dispatch.decision.key_length
            learned = state.step_fit.add(step, context, dispatch.batch + 1) or learned
        if learned:
            self._fitted += 1
            if self._fitted * 8 >= len(self._workers):  # every sample up to 8 workers
                self._fitted = 0
                self._price_fleet()

    def _sync_load(self, state: _WorkerState) -> None:
        if state.url in self._loads and self._workers.get(state.url) is state:
            self._loads[state.url] = len(state.in_flight)
            self._pending[state.url] = state.pending

    def _candidates(self, exclude: Iterable[str]) -> dict[str, int]:
        """The routable workers' loads (the engine's own dict when nothing is excluded)."""
        excluded = frozenset(exclude) if exclude else _NOTHING  # () or []: no set to build
        loads = self._loads
        if excluded:
            loads = {w: n for w, n in loads.items() if w not in excluded}
        if not loads:
            raise NoWorkerAvailable(self._why_none(excluded))
        return loads

    def _why_none(self, excluded: frozenset[str]) -> str:
        if not self._workers:
            return "no workers are registered"
        if not self._routable:
            return f"none of the {len(self._workers)} workers is healthy"
        return f"all {len(excluded)} healthy workers were tried and failed"

    def _matches(
        self, path: Path, loads: dict[str, int], now: float | None
    ) -> tuple[dict[str, int], list[str], list[str]]:
        """Every candidate's match: its KV events' where they are whole (exact, whole pages),
        the tree's elsewhere; the workers matched on events; and those of them whose match
        is speculative: a prefix routed there lately counts as held before its events come
        (the tree's touch, `_unconfirmed_since`)."""
        index = self._events
        key = path.key
        if index is None or isinstance(key, str):
            return path.matched, [], []
        exact = [w for w in loads if index.trusted(w)]
        speculated: list[str] = []
        if not exact:
            return path.matched, exact, speculated
        stored = index.match(key, exact)
        since = (self._view.now if now is None else now) - SPECULATIVE_TTL_S
        page = index.block_size
        matched = dict(path.matched)
        for w in exact:
            held = stored[w]
            if matched.get(w, 0) > held:  # the tree knows more: routed there lately?
                recent = self._tree.recent_match(path, w, self._unconfirmed_since(w, since))
                recent = recent // page * page
                if recent > held:
                    held = recent
                    speculated.append(w)
            matched[w] = held
        return matched, exact, speculated

    def _unconfirmed_since(self, url: str, since: float) -> float:
        """Since when the worker's routed prefixes may still be unconfirmed: `since`, or
        earlier while a request routed then still waits for its prefill (SGLang publishes a
        prompt's pages when it has computed them, seconds later behind a long queue)."""
        state = self._workers[url]
        oldest = next(iter(state.queued), None)  # in routing order: the first one routed
        return since if oldest is None else min(state.in_flight.get(oldest, since), since)

    def _decide(self, matched: dict[str, int], length: int, loads: dict[str, int]) -> Decision:
        worker, reason = self._policy.choose(loads, matched, length, self._pending)
        fields = (worker, reason, self._policy_name, matched.get(worker, 0), length, loads[worker])
        # what Decision(*fields) does, without its interpreted __new__ (once per request)
        return tuple.__new__(Decision, fields)

    def _learn_elements_per_token(self, dispatch: Dispatch, outcome: Outcome) -> None:
        kind = outcome.kind
        if not self.config.token_keys and 0 <= kind < len(KINDS):
            ratio = len(dispatch.key) / outcome.prompt_tokens
            self._learned[kind] += 1
            weight = max(EWMA, 1.0 / self._learned[kind])  # a plain mean until it has a history
            self._per_token[kind] += weight * (ratio - self._per_token[kind])

    def _predicted_tokens(self, dispatch: Dispatch, outcome: Outcome) -> int:
        matched = dispatch.decision.matched
        key = dispatch.key
        kind = outcome.kind if 0 <= outcome.kind < len(KINDS) else KIND_TEXT
        if kind == KIND_IDS and isinstance(key, str):
            tokens = whole_numbers(key, matched)  # exact, whatever the digits per id
        else:
            tokens = int(matched / self._per_token[kind])
        return max(0, min(tokens, outcome.prompt_tokens - 1))

    @staticmethod
    def _confirmed(dispatch: Dispatch) -> bool:
        """The matched part was touched before any request still in flight was sent."""
        return dispatch.prior_touch is not None and dispatch.prior_touch < dispatch.oldest_in_flight

    def _shrink(self, state: _WorkerState) -> None:
        state.corrections += 1
        state.budget = SHRINK * self._tree.size(state.url)  # `_enforce_budgets` evicts

    def _ceiling(self, state: _WorkerState) -> float:
        if state.capacity_tokens is None:
            return float(self.config.max_tree_size)
        return state.capacity_tokens * max(self._per_token)

    def _enforce_budgets(self, state: _WorkerState) -> None:
        budget = min(state.budget, self._ceiling(state))
        tree = self._tree
        url = state.url
        if tree.evicting(url) or tree.size(url) > budget * (1 + SLACK):
            state.evicted += tree.evict_step(url, int(budget), EVICT_STEP_WORK)
        limit, memory = self.config.max_tree_size, self._max_memory
        if tree.total_size > limit or tree.memory > memory:
            tree.evict_global(limit, memory, EVICT_STEP)

    def _stats(self, state: _WorkerState) -> WorkerStats:
        return WorkerStats(
            url=state.url,
            healthy=state.healthy,
            in_flight=len(state.in_flight),
            pending=state.pending,
            routed=state.routed,
            completed=state.completed,
            errors=state.errors,
            resets=state.resets,
            prompt_tokens=state.prompt_tokens,
            cached_tokens=state.cached_tokens,
            completion_tokens=state.completion_tokens,
            predicted_tokens=state.predicted_tokens,
            agreed_tokens=state.agreed_tokens,
            mispredicted=state.mispredicted,
            corrections=state.corrections,
            evicted=state.evicted,
            tree_size=self._tree.size(state.url),
            budget=min(state.budget, self._ceiling(state)),
            capacity_tokens=state.capacity_tokens,
            queued=state.load.queued,
            running=state.load.running,
            wait_s=queue_wait(state.load),
            context=state.load.context,
            ttft_prices=state.load.ttft.as_tuple(),
            step_prices=state.load.step.as_tuple(),
            ttft_samples=state.ttft_fit.samples,
            step_samples=state.step_fit.samples,
            cache_view=self._view_of(state.url),
            speculated=state.speculated,
        )

    def _view_of(self, url: str) -> str:
        index = self._events
        return EVENTS if index is not None and index.trusted(url) else TREE


def whole_numbers(key: str, matched: int) -> int:
    """Token ids rendered as decimal numbers joined by spaces: how many of them the first
    `matched` characters of `key` hold whole."""
    spaces = key.count(" ", 0, matched)
    ends_at_a_number = matched >= len(key) or key[matched] == " "
    return spaces + 1 if matched > 0 and ends_at_a_number else spaces


def fleet_prices(fits: list[PriceFit], prior: Prices) -> Prices:
    """The median prices of the fits learned from `WARMUP` answers, else the prior."""
    learned = [f.prices for f in fits if f.samples >= WARMUP]
    if not learned:
        return prior
    return Prices(
        statistics.median(p.base for p in learned),
        statistics.median(p.per_element for p in learned),
        statistics.median(p.per_request for p in learned),
    )


def own_or_fleet(fit: PriceFit, fleet: Prices) -> Prices:
    """A worker's own prices when its per-element price is `DISTINCT` from the fleet's."""
    if fit.samples < WARMUP or fleet.per_element <= 0:
        return fleet
    ratio = fit.prices.per_element / fleet.per_element
    return fit.prices if abs(ratio - 1.0) > DISTINCT else fleet
