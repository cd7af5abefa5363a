"""The supervisor with real simulated workers (and small Python programs for failures).

Sim workers run at time scale 1000 on free loopback ports; backoffs are shortened through the
constructor. Every condition is polled with a deadline; the leak check in conftest fails a test
that leaves a process behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from sglang_dp.launcher.plan import WorkerSpec, with_ports
from sglang_dp.launcher.process import WorkerProcess
from sglang_dp.launcher.supervisor import (
    AllWorkersFailed,
    StartupFailed,
    Supervisor,
    SupervisorSettings,
    WorkerStatus,
)
from tests.launcher.conftest import (
    Runner,
    gone,
    python_spec,
    sim_specs,
    spec_for,
)
from tests.processes import until

BOOM = "import sys; print('loading weights'); print('boom: CUDA out of memory'); sys.exit(3)"
SILENT = "import time; time.sleep(60)"  # never answers HTTP
DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"


class Recorder:
    """Everything the supervisor told its caller, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.events: list[str] = []

    def event(self, message: str) -> None:
        self.events.append(message)

    def up(self, url: str) -> None:
        self.calls.append(("up", url))

    def down(self, url: str, restarted: bool) -> None:
        self.calls.append(("down", url, restarted))

    def supervisor(self, specs: Sequence[WorkerSpec], **options: Any) -> Supervisor:
        """Quick settings, changed by `options` (SupervisorSettings fields, `spawner`, `clock`)."""
        settings: dict[str, Any] = {
            "startup_timeout": 20.0,
            "max_restarts": 3,
            "backoff_base": 0.02,
            "health_interval": 0.05,
            "check_interval": 0.05,
        }
        shell = {name: options.pop(name) for name in ("spawner", "clock") if name in options}
        settings.update(options)
        return Supervisor(
            list(specs), SupervisorSettings(**settings), on_event=self.event, on_up=self.up,
            on_down=self.down, **shell,
        )  # fmt: skip

    def saw(self, text: str) -> bool:
        return any(text in event for event in self.events)


def with_argv(spec: WorkerSpec, code: str) -> WorkerSpec:
    """The same worker slot running a Python one-liner instead."""
    return dataclasses.replace(spec, argv=(sys.executable, "-c", code))


def http(url: str, path: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except OSError:  # refused, or closed without an answer (a crashing worker)
        return 0, None


async def ask(url: str, path: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
    return await asyncio.to_thread(http, url, path, body, key)


def status(sup: Supervisor, index: int = 0) -> WorkerStatus:
    return sup.snapshot()[index]


def all_gone(sup: Supervisor, pids: Sequence[int]) -> None:
    assert all(gone(pid) for pid in pids), [pid for pid in pids if not gone(pid)]
    assert all(s.pid is None for s in sup.snapshot())


# --- start-up --------------------------------------------------------------------------------


def test_all_start_and_become_healthy(run_both: Runner, tmp_path: Path) -> None:
    specs = sim_specs(tmp_path, 3)
    specs[2] = dataclasses.replace(specs[2], argv=(*specs[2].argv, "--api-key", "k"))
    rec = Recorder()

    async def scenario() -> None:
        sup = rec.supervisor(specs)
        try:
            await sup.start()
            pids = [s.pid for s in sup.snapshot()]
            assert all(pids) and {s.state for s in sup.snapshot()} <= {"starting", "loading"}
            urls = await sup.wait_ready(allow_partial=False)
            assert sorted(urls) == sorted(s.url for s in specs)
            assert sorted(rec.calls) == sorted(("up", s.url) for s in specs)
            assert (await ask(specs[2].url, "/get_model_info"))[0] == 401  # the key was sent
            assert (await ask(specs[2].url, "/get_model_info", key="k"))[0] == 200
            snap = sup.snapshot()
            assert [s.state for s in snap] == ["healthy"] * 3
            for s, spec in zip(snap, specs):
                assert (s.index, s.port, s.url) == (spec.index, spec.port, spec.url)
                assert s.gpus == (s.index,)  # virtual ids
                assert s.simulated and s.log_path == spec.log_path and s.restarts == 0
                assert s.ready_at is not None and s.ready_at >= s.started_at
                assert s.rss_bytes > 0  # sampled at the first snapshot (the shim, at least)
                assert s.last_error == ""
            assert rec.saw("worker 1: healthy on http://127.0.0.1:")
        finally:
            await sup.stop(grace=5)
        all_gone(sup, [p for p in pids if p])
        assert [s.state for s in sup.snapshot()] == ["stopped"] * 3
        assert sorted(rec.calls[3:]) == sorted(("down", s.url, False) for s in specs)
        await sup.stop()  # idempotent
        assert len(rec.calls) == 6

    run_both(scenario)


def test_a_worker_that_fails_at_startup_stops_the_launch(run: Runner, tmp_path: Path) -> None:
    good, bad = sim_specs(tmp_path, 2)
    rec = Recorder()

    async def scenario() -> None:
        sup = rec.supervisor([good, with_argv(bad, BOOM)])
        await sup.start()
        pids = [s.pid for s in sup.snapshot()]
        try:
            with pytest.raises(StartupFailed) as caught:
                await sup.wait_ready(allow_partial=False)
            failure = caught.value
            assert failure.index == 1
            assert failure.reason == "exited with code 3 while starting"
            assert failure.log_tail[-2:] == ["loading weights", "boom: CUDA out of memory"]
            assert str(failure) == "worker 1 failed to start: exited with code 3 while starting"
            bad_status = status(sup, 1)
            assert (bad_status.state, bad_status.restarts, bad_status.pid) == ("failed", 0, None)
            assert "exited with code 3" in bad_status.last_error
        finally:
            await sup.stop(grace=5)
        all_gone(sup, [p for p in pids if p])
        assert ("down", bad.url, False) not in rec.calls  # it never was up

    run(scenario)


def test_startup_timeout(run: Runner, tmp_path: Path) -> None:
    [spec] = sim_specs(tmp_path, 1, "--startup-seconds", "1000000")  # loads for 1000 s
    rec = Recorder()

    async def scenario() -> None:
        sup = rec.supervisor([spec], startup_timeout=1.5)
        await sup.start()
        pid = status(sup).pid
        assert pid
        try:
            ready = asyncio.ensure_future(sup.wait_ready(allow_partial=False))
            await until(lambda: status(sup).state == "loading", what="HTTP up, /health 503")
            with pytest.raises(StartupFailed, match=r"not ready after 1.5 s \(still loading\)"):
                await ready
            assert gone(pid)  # terminated before the failure is reported
        finally:
            await sup.stop(grace=5)

    run(scenario)


def test_allow_partial_starts_with_the_healthy_ones(run: Runner, tmp_path: Path) -> None:
    good, bad = sim_specs(tmp_path, 2)
    rec = Recorder()

    async def scenario() -> None:
        sup = rec.supervisor([with_argv(bad, BOOM), good], max_restarts=2)
        await sup.start()
        try:
            assert await sup.wait_ready(allow_partial=True) == [good.url]
            # the failing one keeps being restarted, then gives up
            await until(lambda: status(sup).state == "failed", what="restarts to run out")
            assert status(sup).restarts == 2
            assert rec.saw("worker 1: exited with code 3 while starting; restarting in 0.02 s")
            assert rec.saw("restarting in 0.04 s (restart 2 of 2)")  # exponential backoff
            assert rec.saw("worker 1: failed: exited with code 3 while starting; gave up after 2")
            assert status(sup, 1).state == "healthy"
            assert rec.calls == [("up", good.url)]
        finally:
            await sup.stop(grace=5)

    run(scenario)


def test_allow_partial_fails_when_every_worker_fails(run: Runner, tmp_path: Path) -> None:
    specs = [python_spec(tmp_path, BOOM, i) for i in range(2)]
    specs[1] = python_spec(tmp_path, "import sys; print('second'); sys.exit(4)", 1)
    rec = Recorder()

    async def scenario() -> None:
        sup = rec.supervisor(specs, max_restarts=0)
        await sup.start()
        with pytest.raises(StartupFailed) as caught:
            await sup.wait_ready(allow_partial=True)
        failed = [e for e in rec.events if ": failed: " in e]
        assert len(failed) == 2
        last = int(failed[-1].split()[1].rstrip(":"))
        assert caught.value.index == last  # the last one to fail speaks for all
        assert caught.value.log_tail[-1] == ("second" if last else "boom: CUDA out of memory")
        with pytest.raises(AllWorkersFailed):
            await sup.supervise()
        await sup.stop()

    run(scenario)


def test_a_program_that_cannot_be_started(run: Runner, tmp_path: Path) -> None:
    rec = Recorder()
    specs = [python_spec(tmp_path, SILENT, 0), spec_for(tmp_path, [str(tmp_path / "nope")], 1)]

    async def scenario() -> None:
        sup = rec.supervisor(specs)
        with pytest.raises(StartupFailed, match=r"worker 1 failed to start: cannot start: .*nope"):
            await sup.start()
        assert [(s.state, s.pid) for s in sup.snapshot()] == [("stopped", None), ("failed", None)]
        assert "nope" in status(sup, 1).last_error

    run(scenario)


# --- supervision -----------------------------------------------------------------------------


def test_killed_worker_is_restarted_and_rejoins(run_both: Runner, tmp_path: Path) -> None:
    specs = sim_specs(tmp_path, 2)
    rec = Recorder()
    url = specs[1].url

    async def scenario() -> None:
        sup = rec.supervisor(specs, max_restarts=1, stable_after=0.0)
        await sup.start()
        supervising = asyncio.ensure_future(sup.supervise())
        try:
            await sup.wait_ready(allow_partial=False)
            for restarts in (1, 2):  # it became ready in between: the budget of 1 comes back
                old = status(sup, 1).pid
                assert old
                os.kill(old, signal.SIGKILL)
                await until(lambda: ("down", url, True) in rec.calls, what="on_down")
                assert status(sup, 1).state in {"restarting", "starting", "loading"}
                await until(lambda: rec.calls[-1] == ("up", url), what="on_up")
                assert rec.calls[-2:] == [("down", url, True), ("up", url)]
                now = status(sup, 1)
                assert (now.state, now.restarts) == ("healthy", restarts)
                assert now.pid and now.pid != old and gone(old)
                assert rec.saw("worker 1: killed by SIGKILL; restarting in")
                assert (await ask(url, "/get_model_info"))[0] == 200
                rec.calls.remove(("down", url, True))
            assert status(sup, 0).restarts == 0
        finally:
            await sup.stop(grace=5)
            await supervising  # returns once stopped

    run_both(scenario)


def test_max_restarts_is_respected(run: Runner, tmp_path: Path) -> None:
    [spec] = sim_specs(tmp_path, 1, "--crash-after", "0")  # exits on its first generation
    rec = Recorder()
    body = {"text": "hello", "sampling_params": {"max_new_tokens": 1}}

    async def scenario() -> None:
        sup = rec.supervisor([spec], max_restarts=1)
        await sup.start()
        await sup.wait_ready(allow_partial=False)
        supervising = asyncio.ensure_future(sup.supervise())
        try:
            await ask(spec.url, "/generate", body)  # crash 1: restarted
            await until(lambda: rec.calls.count(("up", spec.url)) == 2, what="the restart")
            await ask(spec.url, "/generate", body)  # crash 2: no budget left
            with pytest.raises(AllWorkersFailed):
                await supervising
            assert rec.calls == [
                ("up", spec.url),
                ("down", spec.url, True),
                ("up", spec.url),
                ("down", spec.url, False),
            ]
            final = status(sup)
            assert (final.state, final.restarts, final.pid) == ("failed", 1, None)
            assert rec.saw("gave up after 1 restarts in a row")
        finally:
            await sup.stop(grace=5)

    run(scenario)


def test_port_in_use_moves_the_worker(run: Runner, tmp_path: Path) -> None:
    [spec] = sim_specs(tmp_path, 1)
    rec = Recorder()

    async def scenario() -> None:
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", spec.port))
            squatter.listen()
            sup = rec.supervisor([spec])
            await sup.start()
            try:
                # not partial: a port race is no reason to give up
                [url] = await sup.wait_ready(allow_partial=False)
                moved = sup.specs[0]
                assert url == moved.url != spec.url
                # the next free band (the first one, unless something else holds it)
                assert moved.port > spec.port and (moved.port - spec.port) % 10 == 0
                assert moved.nccl_port == moved.port + 1
                assert rec.calls == [("up", moved.url)]
                assert rec.saw(f"port {spec.port} is in use: moving to port ")
                assert status(sup).port == moved.port and status(sup).restarts >= 1
                assert (await ask(moved.url, "/get_model_info"))[0] == 200
            finally:
                await sup.stop(grace=5)
            assert rec.calls[-1] == ("down", moved.url, False)

    run(scenario)


def test_unresponsive_worker_is_unhealthy_until_it_answers(run: Runner, tmp_path: Path) -> None:
    [spec] = sim_specs(tmp_path, 1)
    rec = Recorder()

    async def scenario() -> None:
        sup = rec.supervisor([spec], probe_timeout=0.2)
        await sup.start()
        await sup.wait_ready(allow_partial=False)
        pid = status(sup).pid
        assert pid
        try:
            os.killpg(pid, signal.SIGSTOP)
            await until(lambda: status(sup).state == "unhealthy", what="unhealthy")
            assert rec.saw("worker 0: unhealthy: /health failed: TimeoutError")
            assert "/health failed" in status(sup).last_error
            os.killpg(pid, signal.SIGCONT)
            await until(lambda: status(sup).state == "healthy", what="healthy again")
            assert rec.saw("worker 0: healthy again")
            assert rec.calls == [("up", spec.url)]  # routing is the router's call
        finally:
            os.killpg(pid, signal.SIGCONT)
            await sup.stop(grace=5)

    run(scenario)


def test_a_hung_worker_is_restarted_and_serves_again(run: Runner, tmp_path: Path) -> None:
    [spec] = sim_specs(tmp_path, 1)
    rec = Recorder()

    async def scenario() -> None:
        sup = rec.supervisor([spec], probe_timeout=0.2, unhealthy_restart=0.5)
        await sup.start()
        await sup.wait_ready(allow_partial=False)
        supervising = asyncio.ensure_future(sup.supervise())
        shim = status(sup).pid
        assert shim
        hung = psutil.Process(shim).children()[0]  # the worker itself (its shim still works)
        try:
            hung.suspend()  # alive, answering nothing: a hung collective
            await until(lambda: rec.calls.count(("up", spec.url)) == 2, what="the restart")
            assert gone(hung.pid)
            assert rec.calls == [("up", spec.url), ("down", spec.url, True), ("up", spec.url)]
            assert rec.saw("worker 0: failing health checks for ")
            assert status(sup).state == "healthy" and status(sup).restarts == 1
            assert (await ask(spec.url, "/generate", {"text": "hi"}))[0] == 200
        finally:
            if not gone(hung.pid):
                hung.resume()
            await sup.stop(grace=5)
            await supervising

    run(scenario)


def test_a_failed_worker_is_tried_again_later(run: Runner, tmp_path: Path) -> None:
    [spec] = sim_specs(tmp_path, 1, "--crash-after", "0")  # exits on its first generation
    rec = Recorder()

    async def scenario() -> None:
        sup = rec.supervisor([spec], max_restarts=0, retry_failed=0.5)
        await sup.start()
        await sup.wait_ready(allow_partial=False)
        supervising = asyncio.ensure_future(sup.supervise())
        try:
            await ask(spec.url, "/generate", {"text": "hello"})  # no restart budget at all
            await until(lambda: status(sup).retry_at is not None, what="a retry planned")
            assert status(sup).state == "failed" and rec.saw("trying it again in 0.5 s")
            await until(lambda: rec.calls.count(("up", spec.url)) == 2, what="the retry")
            assert rec.calls[1] == ("down", spec.url, False)
            assert status(sup).retry_at is None and not supervising.done()
        finally:
            await sup.stop(grace=5)
            await supervising

    run(scenario)


# --- stopping --------------------------------------------------------------------------------


def test_stop_while_starting_and_restarting(run: Runner, tmp_path: Path) -> None:
    specs = [
        python_spec(tmp_path, SILENT, 0),
        python_spec(tmp_path, DEAF, 1),  # ignores SIGTERM: killed after the grace
        python_spec(tmp_path, BOOM, 2),  # in its backoff when stop() comes
    ]
    rec = Recorder()

    async def scenario() -> None:
        sup = rec.supervisor(specs, backoff_base=30.0)
        await sup.start()
        pids = [s.pid for s in sup.snapshot() if s.pid]
        waiting = asyncio.ensure_future(sup.wait_ready(allow_partial=True))
        await until(lambda: status(sup, 2).state == "restarting", what="the backoff")
        # a deadline well short of the 30 s backoff: stop() must not wait it out (nor for HTTP)
        await asyncio.wait_for(sup.stop(grace=0.3), timeout=15)
        with pytest.raises(StartupFailed, match="stopped before the workers were ready"):
            await waiting
        all_gone(sup, pids)
        assert [s.state for s in sup.snapshot()] == ["stopped", "stopped", "stopped"]
        assert rec.calls == []

    run(scenario)


def test_cpu_and_memory_of_the_process_tree(run: Runner, tmp_path: Path) -> None:
    family = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'print(1, flush=True)\\nwhile True: pass']); "
        "time.sleep(60)"
    )
    clock = [0.0]
    rec = Recorder()

    async def scenario() -> None:
        sup = rec.supervisor(
            [python_spec(tmp_path, family)], clock=lambda: clock[0], startup_timeout=1e9
        )
        await sup.start()
        try:
            first = status(sup)  # first sample: no CPU figure yet
            assert first.cpu_percent == 0.0 and first.rss_bytes > 0

            log = tmp_path / "worker-0.log"
            await until(lambda: log.read_text().endswith("\n1\n"), what="the grandchild to spin")

            def busy() -> bool:
                clock[0] += 5.0  # sample again, re-reading the tree
                return status(sup).cpu_percent > 50  # the spinning grandchild counts

            await until(busy, what="the tree's CPU use")
            assert status(sup).rss_bytes > 2 * 5_000_000  # two Python processes
            clock[0] += 0.5
            assert status(sup) == status(sup)  # not re-sampled within a second
        finally:
            await sup.stop(grace=5)

    run(scenario)


def test_a_spawner_that_chooses_the_port_gives_the_url_and_its_restarts_are_new_urls(
    run: Runner, tmp_path: Path
) -> None:
    """As Ray's actors do: each run of the worker listens where its spawner put it."""
    spec = sim_specs(tmp_path, 1)[0]
    bands = iter([spec.port + 20, spec.port + 30])  # free bands after the planned one
    rec = Recorder()

    async def spawn(template: WorkerSpec) -> WorkerProcess:
        port = next(bands)
        return await WorkerProcess.spawn(with_ports(template, port, port + 1))

    async def scenario() -> None:
        sup = rec.supervisor([spec], max_restarts=1, spawner=spawn, keeps_urls=False)
        await sup.start()
        supervising = asyncio.ensure_future(sup.supervise())
        try:
            first, second = (f"http://127.0.0.1:{spec.port + n}" for n in (20, 30))
            assert await sup.wait_ready(allow_partial=False) == [first]
            assert status(sup).url == first and sup.specs[0].port == spec.port + 20
            os.kill(status(sup).pid or 0, signal.SIGKILL)
            await until(lambda: rec.calls[-1:] == [("up", second)], what="the new url up")
            assert rec.calls == [("up", first), ("down", first, False), ("up", second)]
            assert (await ask(second, "/get_model_info"))[0] == 200
        finally:
            await sup.stop(grace=5)
            await supervising

    run(scenario)
