"""The simulated worker's shell: SGLang's HTTP API in front of the pure scheduler.

One asyncio loop; no task per request. A generation request is parsed (`api`), tokenized, given
its deterministic output (`tokenizer.OutputText`), and submitted to the `Scheduler` at the
current simulated time, `now = (loop time − start) × time_scale`. A single timer sleeps until
`scheduler.next_event_time()` (converted back to loop time); on waking it calls
`advance(now)` and writes what became visible: first tokens, stream progress every
`--stream-interval` tokens, finished requests. With `--instant` the scheduler answers inside the
handler (`run_instant`), so a request costs one parse, one cache match and one write.

Streaming: SSE (`data: {json}\\n\\n`, ending `data: [DONE]\\n\\n`); `/generate` events carry the
cumulative text, OpenAI chunks the delta. A client that disconnects aborts its request, which
frees its KV. KV events (`--kv-events-config`): after every call into the scheduler the events
its cache recorded go out as one batch (`sim.kv_events.EventPublisher`); /server_info reports
the publisher in `kv_events`, and `/debug/kv_blocks` dumps the ids of every cached page (hashed
afresh from the tree) for agreement checks. Fault injection (`sim.faults`, seeded, generation
requests only) decides per request whether it fails and how; `--stall-after-tokens N
--stall-secs S` is applied here as answers are written (a stream goes silent for S real seconds
after N tokens; a whole answer of more than N tokens comes S seconds late).

Two HTTP servers carry the one handler, `SimWorker.handle(request, responder)`: the lean
`httpserver` (default) and uvicorn + Starlette (`--http-server uvicorn`, `sim.asgi`), SGLang's
own stack. `sim.responder.Responder` is what the handler needs of a response; both implement it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from sglang_dp import __version__
from sglang_dp.httpserver import TEXT, HttpRequest
from sglang_dp.kv_wire import EventBatch, KvEventsConfig
from sglang_dp.sglang_api import CHAT, COMPLETIONS, GENERATE, sse
from sglang_dp.sim import api
from sglang_dp.sim.api import error_body
from sglang_dp.sim.config import SimConfig
from sglang_dp.sim.cost_model import CostModel, resolve
from sglang_dp.sim.faults import Faults
from sglang_dp.sim.kv_events import EventPublisher, describe
from sglang_dp.sim.responder import Responder
from sglang_dp.sim.scheduler import Events, Scheduler, SimRequest
from sglang_dp.sim.tokenizer import (
    Output,
    OutputText,
    Tokenizer,
    load_tokenizer,
    tokenizer_folder,
)

if TYPE_CHECKING:
    from sglang_dp.sim.metrics import SimMetrics

log = logging.getLogger("sglang_dp.sim")

WARMUP_PROMPT = "The capital city of France is"  # what SGLang's warm-up request sends
HEALTH_TIMEOUT_S = 20.0
DONE = b"data: [DONE]\n\n"
UNAUTHENTICATED = ("/health", "/health_generate", "/ready", "/metrics")


class IdMaker:
    """Request ids: a random per-process prefix and a counter (uuid4 per request costs more)."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._count = 0

    def next(self) -> str:
        """A fresh id, 32 hex digits like SGLang's."""
        self._count += 1
        return f"{self._prefix}{self._count:016x}"


@dataclass(eq=False)
class _Item:
    """One prompt of a call and its request in the scheduler."""

    req: SimRequest
    out: Output
    echo: str = ""
    sent_chars: int = 0  # OpenAI streams: characters of text already sent as deltas
    stall_until: float = 0.0  # loop time a stall (--stall-after-tokens) ends


@dataclass(eq=False)
class _Call:
    """One HTTP generation call (one or several prompts) waiting for the scheduler."""

    api: api.ApiRequest | None  # None: internal (warm-up, health check)
    responder: Responder | None
    items: list[_Item] = field(default_factory=list)
    open: int = 0  # items not finished yet
    oid: str = ""
    created: int = 0
    on_done: Callable[[], None] | None = None


class SimWorker:
    """State of one simulated worker and its HTTP handler (`handle`)."""

    def __init__(
        self, config: SimConfig, loop: asyncio.AbstractEventLoop, tokenizer: Tokenizer | None = None
    ) -> None:
        self.config = config
        self.cost: CostModel = resolve(config)
        self.tokenizer = tokenizer or load_tokenizer(
            tokenizer_folder(config.tokenizer_path, config.model_path)
        )
        self.outputs = OutputText(self.tokenizer, config.random_seed)
        self.kv_events = (
            KvEventsConfig.parse(config.kv_events_config)
            if config.kv_events_config
            else KvEventsConfig()
        )
        self.scheduler = Scheduler(
            self.cost,
            config.schedule_policy,
            not config.disable_radix_cache,
            config.page_size,
            self.kv_events.enabled,
        )
        self.publisher: EventPublisher | None = None
        if self.kv_events.enabled:
            self.publisher = EventPublisher(
                self.kv_events, config.host, config.kv_events_drop_rate, config.random_seed
            )
        self.metrics: SimMetrics | None = None
        if config.enable_metrics:
            # prometheus_client costs ~60 ms of start-up: only for workers that serve metrics
            from sglang_dp.sim.metrics import SimMetrics

            self.metrics = SimMetrics(self.scheduler, config.model_name)
        self._loop = loop
        self._start = loop.time()
        self._scale = config.time_scale
        self._last_now = 0.0
        self.faults = Faults(config)
        self._calls: dict[str, _Call] = {}  # rid -> call
        self._streams: dict[str, tuple[_Call, _Item]] = {}  # rid -> stream past its first token
        self._ids = IdMaker()
        self._wake: asyncio.TimerHandle | None = None
        self._wake_at = 0.0
        self.ready = False
        get, post = "GET", "POST"
        self._routes: dict[str, dict[str, Callable[[HttpRequest, Responder], None]]] = {
            "/health": {get: self._health, post: self._health},
            "/ready": {get: self._health},  # SGLang 0.5
            "/health_generate": {get: self._health_generate, post: self._health_generate},
            "/get_model_info": {get: self._model_info},
            "/model_info": {get: self._model_info},
            "/get_server_info": {get: self._server_info},
            "/server_info": {get: self._server_info},
            "/v1/models": {get: self._models},
            "/get_load": {get: self._load},
            "/metrics": {get: self._metrics},
            "/flush_cache": {get: self._flush, post: self._flush},
            "/debug/kv_blocks": {get: self._kv_blocks},
            "/abort_request": {post: self._abort},
            GENERATE: {post: self._generation(api.parse_generate)},
            COMPLETIONS: {post: self._generation(api.parse_completion)},
            CHAT: {post: self._generation(api.parse_chat)},
        }

    # ------------------------------------------------------------------ time

    def now(self) -> float:
        """Simulated seconds since start (never decreasing, even if a timer fires early)."""
        t = max((self._loop.time() - self._start) * self._scale, self._last_now)
        self._last_now = t
        return t

    def _publish_events(self) -> None:
        """What the cache recorded since the last call goes out as one batch."""
        if self.publisher is not None:
            events = self.scheduler.cache.take_events()
            if events:
                self.publisher.publish(EventBatch(time.time(), events, 0))

    def close(self) -> None:
        """Close the KV events sockets (at shutdown)."""
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None

    def _schedule_wake(self) -> None:
        self._publish_events()
        t = self.scheduler.next_event_time()
        if t is None:
            if self._wake is not None:
                self._wake.cancel()
                self._wake = None
            return
        if self._wake is not None:
            if self._wake_at <= t:
                return  # an earlier wake-up is pending; it will reschedule
            self._wake.cancel()
        self._wake_at = t
        self._wake = self._loop.call_at(self._start + t / self._scale, self._on_wake)

    def _on_wake(self) -> None:
        self._wake = None
        self._last_now = max(self._last_now, self._wake_at)  # libuv timers may fire ~1 ms early
        self._dispatch(self.scheduler.advance(self.now()))

    # ------------------------------------------------------------------ start-up

    def start(self, already_elapsed: float = 0.0) -> None:
        """Model loading (simulated), then warm-up, then ready.

        `already_elapsed`: real seconds the process has been starting already (interpreter and
        imports); they count towards the loading time, as a real worker's imports do.
        """
        delay = max(0.0, self.config.startup_seconds / self._scale - already_elapsed)
        self._loop.call_later(delay, self._become_ready)

    def _become_ready(self) -> None:
        self.ready = True
        if not self.config.skip_server_warmup:
            self._submit_internal(WARMUP_PROMPT, 8, None)
        log.info("The server is fired up and ready to roll!")

    # ------------------------------------------------------------------ HTTP entry

    def handle(self, request: HttpRequest, responder: Responder) -> None:
        """Route one HTTP request."""
        methods = self._routes.get(request.path)
        if methods is None:
            responder.send(404, error_body(f"no route {request.path}", "NotFoundError", 404))
            return
        route = methods.get(request.method)
        if route is None:
            responder.send(
                405, error_body(f"{request.method} not allowed", "MethodNotAllowed", 405)
            )
            return
        key = self.config.api_key
        if (
            key
            and request.path not in UNAUTHENTICATED
            and (request.headers.get("authorization") != "Bearer " + key)
        ):
            responder.send(401, error_body("Unauthorized", "AuthenticationError", 401))
            return
        route(request, responder)

    def _not_ready(self, responder: Responder) -> bool:
        if not self.ready:
            responder.send(503, error_body("the server is starting", "ServiceUnavailable", 503))
        return not self.ready

    # ------------------------------------------------------------------ info routes

    def _health(self, request: HttpRequest, responder: Responder) -> None:
        if not self._not_ready(responder):
            responder.send(200, b"", TEXT)

    def _health_generate(self, request: HttpRequest, responder: Responder) -> None:
        if self._not_ready(responder):
            return
        if self.config.instant:
            responder.send(200, b"", TEXT)
            return

        def timeout() -> None:
            if not responder.done:
                responder.send(
                    503, error_body("health generation timed out", "ServiceUnavailable", 503)
                )
                self.abort(rid)  # after answering: the abort also calls done(), now a no-op

        handle = self._loop.call_later(HEALTH_TIMEOUT_S, timeout)

        def done() -> None:
            handle.cancel()
            responder.send(200, b"", TEXT)

        rid = self._submit_internal("health", 1, done)

    def _local(self, path: str | None) -> str | None:
        # other routers (sgl-router among them) download a tokenizer for any non-local name
        return path if path and Path(path).is_dir() else None

    def _model_info(self, request: HttpRequest, responder: Responder) -> None:
        c = self.config
        responder.send(
            200,
            orjson.dumps(
                {
                    "model_path": self._local(c.model_path),
                    "tokenizer_path": self._local(c.tokenizer_path or c.model_path),
                    "is_generation": True,
                    "served_model_name": c.model_name,
                }
            ),
        )

    def _server_info(self, request: HttpRequest, responder: Responder) -> None:
        c = self.config
        info = dataclasses.asdict(c)
        cost = self.cost
        info.update(
            model_path=self._local(c.model_path),
            tokenizer_path=self._local(c.tokenizer_path or c.model_path),
            api_key=None,
            served_model_name=c.model_name,
            max_total_num_tokens=cost.max_total_tokens,
            max_total_tokens=cost.max_total_tokens,
            max_running_requests=cost.max_running_requests,
            chunked_prefill_size=cost.chunked_prefill_size,
            context_length=cost.context_length,
            max_req_input_len=min(cost.context_length, cost.max_total_tokens) - 1,
            prefill_tokens_per_s=cost.prefill_tokens_per_s,
            internal_states=[{"last_gen_throughput": 0.0, "memory_usage": {}}],
            version=f"sglang-dp-sim {__version__}",
            simulated=True,
            kv_events=describe(self.kv_events, c.page_size),
        )
        responder.send(200, orjson.dumps(info))

    def _models(self, request: HttpRequest, responder: Responder) -> None:
        name = self.config.model_name
        responder.send(
            200,
            orjson.dumps(
                {
                    "object": "list",
                    "data": [
                        {
                            "id": name,
                            "object": "model",
                            "created": int(time.time()),
                            "owned_by": "sglang",
                            "root": name,
                            "max_model_len": self.cost.context_length,
                        }
                    ],
                }
            ),
        )

    def _load(self, request: HttpRequest, responder: Responder) -> None:
        s = self.scheduler
        waiting = len(s.waiting)
        responder.send(
            200,
            orjson.dumps(
                [
                    {
                        "dp_rank": 0,
                        "num_reqs": len(s.running) + waiting + (1 if s.chunked else 0),
                        "num_waiting_reqs": waiting,
                        "num_tokens": s.used_tokens + sum(len(r.prompt) for r in s.waiting),
                    }
                ]
            ),
        )

    def _metrics(self, request: HttpRequest, responder: Responder) -> None:
        if self.metrics is None:
            responder.send(
                404, error_body("metrics are off (--enable-metrics)", "NotFoundError", 404)
            )
            return
        responder.send(200, self.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8")

    def _flush(self, request: HttpRequest, responder: Responder) -> None:
        self.scheduler.advance(self.now())
        if not self.scheduler.flush():
            s = self.scheduler
            responder.send(
                400,
                error_body(
                    f"Cache not flushed: {len(s.running)} running and {len(s.waiting)} waiting "
                    "requests"
                ),
            )
            return
        self._publish_events()
        log.info("cache flushed")
        responder.send(200, b"Cache flushed.\n", TEXT)

    def _kv_blocks(self, request: HttpRequest, responder: Responder) -> None:
        self.scheduler.advance(self.now())
        self._publish_events()
        cache = self.scheduler.cache
        body = {"block_size": cache.page_size, "blocks": sorted(cache.block_ids())}
        responder.send(200, orjson.dumps(body))

    def _abort(self, request: HttpRequest, responder: Responder) -> None:
        try:
            body = orjson.loads(request.body or b"{}")
        except orjson.JSONDecodeError:
            responder.send(400, error_body("body is not valid JSON"))
            return
        if not isinstance(body, dict):
            responder.send(400, error_body("body must be a JSON object"))
            return
        rids = list(self._calls) if body.get("abort_all") else [body.get("rid")]
        for rid in rids:
            if isinstance(rid, str):
                self.abort(rid)
        responder.send(200, b"", TEXT)

    # ------------------------------------------------------------------ generation

    def _generation(
        self, parse: Callable[[Any], api.ApiRequest]
    ) -> Callable[[HttpRequest, Responder], None]:
        def route(request: HttpRequest, responder: Responder) -> None:
            if self._not_ready(responder):
                return
            try:
                body = orjson.loads(request.body)
            except orjson.JSONDecodeError:
                responder.send(400, error_body("body is not valid JSON"))
                return
            try:
                parsed = parse(body)
                call = self._make_call(parsed, responder)
            except api.BadRequest as exc:
                responder.send(400, error_body(str(exc)))
                return
            fault = self.faults.draw()
            if fault is not None:
                self.faults.inject(fault, responder, parsed.stream, self._loop)
                return
            self._run(call)

        return route

    def _make_call(self, parsed: api.ApiRequest, responder: Responder) -> _Call:
        call = _Call(parsed, responder, oid=self._ids.next(), created=int(time.time()))
        rids: set[str] = set()
        for gen in parsed.inputs:
            if gen.input_ids is not None:
                prompt = gen.input_ids
            elif parsed.kind == "chat":
                prompt = self.tokenizer.encode_chat(parsed.messages, gen.text or "")
            else:
                prompt = self.tokenizer.encode(gen.text or "")
            max_new = self._check_lengths(len(prompt), gen.max_new_tokens)
            out = self.outputs.generate(prompt, max_new, gen.stop, gen.stop_token_ids)
            rid = gen.rid or self._ids.next()
            if rid in self._calls or rid in rids:
                raise api.BadRequest(f"duplicate request id {rid!r}")
            rids.add(rid)
            stream_interval = self.config.stream_interval if parsed.stream else 0
            req = SimRequest(rid, prompt, out.ids, stream_interval=max(0, stream_interval))
            echo = gen.text or "" if parsed.echo else ""
            call.items.append(_Item(req, out, echo))
        call.open = len(call.items)
        return call

    def _check_lengths(self, prompt_len: int, max_new: int) -> int:
        context = self.cost.context_length
        if prompt_len == 0:
            raise api.BadRequest("the prompt is empty")
        if prompt_len >= context:
            raise api.BadRequest(
                f"The input ({prompt_len} tokens) is longer than the model's "
                f"context length ({context} tokens)."
            )
        max_new = min(max_new, context - prompt_len)
        if not self.scheduler.fits(prompt_len, max_new):
            raise api.BadRequest(
                f"prompt ({prompt_len}) + max_new_tokens ({max_new}) exceeds "
                f"the KV cache ({self.scheduler.capacity} tokens)"
            )
        return max_new

    def _submit_internal(self, text: str, max_new: int, on_done: Callable[[], None] | None) -> str:
        prompt = self.tokenizer.encode(text)
        out = self.outputs.generate(prompt, max_new, [], [])
        req = SimRequest("internal-" + self._ids.next(), prompt, out.ids)
        call = _Call(None, None, [_Item(req, out)], 1, on_done=on_done)
        self._run(call)
        return req.rid

    def _run(self, call: _Call) -> None:
        if call.responder is not None:
            call.responder.on_disconnect = lambda: self._client_gone(call)
        now = self.now()
        if self.config.instant:
            for item in call.items:
                self.scheduler.run_instant(item.req, now)
                self._calls[item.req.rid] = call
                self._finished(item.req)
            self._publish_events()
            return
        for item in call.items:
            self._calls[item.req.rid] = call
        events = self.scheduler.submit_all([item.req for item in call.items], now)
        self._dispatch(events)

    def abort(self, rid: str) -> None:
        """Abort one request (by /abort_request, a disconnect or a timeout)."""
        call = self._calls.get(rid)
        req = self.scheduler.abort(rid, self.now())
        if req is not None and call is not None:
            self._finished(req)
        self._schedule_wake()

    def _client_gone(self, call: _Call) -> None:
        call.responder = None
        for item in call.items:
            if item.req.rid in self._calls:
                self.abort(item.req.rid)

    # ------------------------------------------------------------------ scheduler events

    def _dispatch(self, events: Events) -> None:
        for req in events.first_token:
            call = self._calls.get(req.rid)
            if call is not None and req.stream_interval:
                item = next(i for i in call.items if i.req is req)
                self._streams[req.rid] = (call, item)
                self._progress(call, item, 1)
        for req in events.finished:
            self._finished(req)
        if self._streams:
            now = self.now()
            steps = self.scheduler.decode_steps_done(now)
            generated = self.scheduler.generated
            for call, item in list(self._streams.values()):
                req = item.req
                tokens = generated(req, now, steps)
                if tokens - req.emitted >= req.stream_interval:
                    self._progress(call, item, tokens)
        self._schedule_wake()

    def _result(self, item: _Item, tokens: int | None = None) -> api.Result:
        req, out = item.req, item.out
        if tokens is None:  # finished
            done = req.aborted is False
            text = out.text if done else self.outputs.text(out.start, req.generated)
            reason: dict[str, Any] | None = (
                out.finish_reason if done else {"type": "abort", "message": "request aborted"}
            )
            tokens = req.generated
            latency = (req.finish_time or req.arrival) - req.arrival
        else:
            text, reason, latency = self.outputs.text(out.start, tokens), None, 0.0
        return api.Result(
            req.rid, text, len(req.prompt), tokens, req.cached_tokens, reason, latency,
            out.ids[:tokens],
        )  # fmt: skip

    def _progress(self, call: _Call, item: _Item, tokens: int) -> None:
        """Stream the text generated so far."""
        responder, parsed = call.responder, call.api
        if responder is None or parsed is None or responder.closed or self._stalled(item, tokens):
            return
        item.req.emitted = tokens
        r = self._result(item, tokens)
        if not responder.streaming:
            responder.start_stream()
        responder.write(self._event(call, item, r, first=tokens == 1 and item.sent_chars == 0))

    def _stalled(self, item: _Item, tokens: int) -> bool:
        """--stall-after-tokens: a stream past N tokens stays silent for --stall-secs."""
        limit = self.config.stall_after_tokens
        if limit is None or tokens <= limit:
            return False
        now = self._loop.time()
        if not item.stall_until:
            item.stall_until = now + self.config.stall_secs
        return now < item.stall_until

    def _event(self, call: _Call, item: _Item, r: api.Result, first: bool = False) -> bytes:
        parsed = call.api
        assert parsed is not None
        if parsed.kind == "generate":
            return sse(api.generate_body(r))
        delta = r.text[item.sent_chars :]
        item.sent_chars = len(r.text)
        chunk = api.openai_chunk(
            parsed.kind, call.oid, call.created, self._model(parsed), delta, r.finish_reason, first
        )
        return sse(chunk)

    def _model(self, parsed: api.ApiRequest) -> str:
        return parsed.model or self.config.model_name

    def _instant_events(
        self, call: _Call, item: _Item, start: int = 1, stop: int | None = None
    ) -> bytes:
        """--instant streaming: the progress events of tokens `start` to `stop` (exclusive;
        default: the last one, which the final events carry), all at once."""
        step = max(1, self.config.stream_interval)
        end = item.req.generated if stop is None else stop
        return b"".join(
            self._event(call, item, self._result(item, k), first=k == 1)
            for k in range(start, end, step)
        )

    def _final_events(self, call: _Call, item: _Item) -> bytes:
        parsed = call.api
        assert parsed is not None
        r = self._result(item)
        if parsed.kind == "generate":
            return sse(api.generate_body(r)) + DONE
        out = self._event(call, item, r)
        if parsed.include_usage:
            out += sse(
                api.usage_chunk(
                    parsed.kind,
                    call.oid,
                    call.created,
                    self._model(parsed),
                    r,
                    self.config.enable_cache_report,
                )
            )
        return out + DONE

    def _finished(self, req: SimRequest) -> None:
        call = self._calls.pop(req.rid, None)
        self._streams.pop(req.rid, None)
        if call is None:
            return
        if self.metrics is not None and not req.aborted:
            self.metrics.observe(req)
        call.open -= 1
        responder, parsed = call.responder, call.api
        if parsed is None:  # internal request
            if call.on_done is not None:
                call.on_done()
            return
        if responder is None or responder.done:
            return
        if parsed.stream:
            self._end_stream(call, call.items[0], responder)
            return
        if call.open == 0:
            body = self._final_body(call, parsed)
            limit = self.config.stall_after_tokens
            if limit is not None and max(i.req.generated for i in call.items) > limit:
                self._loop.call_later(self.config.stall_secs, responder.send, 200, body)
                return
            responder.send(200, body)

    def _end_stream(self, call: _Call, item: _Item, responder: Responder) -> None:
        """A finished stream's last events (after a stall, if one is due)."""
        if responder.closed:
            return
        if not responder.streaming:
            responder.start_stream()
        limit = self.config.stall_after_tokens
        if limit is not None and item.req.generated > limit and not item.stall_until:
            if self.config.instant:  # what comes before the stall goes out now
                responder.write(self._instant_events(call, item, 1, limit + 1))
                item.req.emitted = limit
            item.stall_until = self._loop.time() + self.config.stall_secs
        if item.stall_until:
            left = item.stall_until - self._loop.time()
            if left > 0:
                self._loop.call_later(left, self._end_stream, call, item, responder)
                return
        # --instant: what was not sent before a stall (everything, without one: emitted is 0)
        start = item.req.emitted + 1
        progress = self._instant_events(call, item, start) if self.config.instant else b""
        responder.end(progress + self._final_events(call, item))

    def _final_body(self, call: _Call, parsed: api.ApiRequest) -> bytes:
        results = [self._result(item) for item in call.items]
        if parsed.kind == "generate":
            bodies = [api.generate_body(r) for r in results]
            return orjson.dumps(bodies if parsed.batched else bodies[0])
        texts = [item.echo + r.text for item, r in zip(call.items, results, strict=True)]
        return orjson.dumps(
            api.openai_body(
                parsed.kind,
                call.oid,
                call.created,
                self._model(parsed),
                results,
                texts,
                self.config.enable_cache_report,
            )
        )
