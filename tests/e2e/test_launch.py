"""`sglang-dp launch --simulate` end to end, through the installed command."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import openai
import pexpect
import psutil

from tests.e2e.launcher import (
    alive,
    fake_children,
    fake_sglang_env,
    gone,
    launch_argv,
    launched,
)
from tests.processes import SGLANG_DP, free_port, wait_for


def test_launch_routes_plain_streaming_and_openai_requests_then_stops_on_sigint(
    tmp_path: Path,
) -> None:
    with launched(3, tmp_path) as run:
        children = run.children()
        assert len(children) >= 3
        reply = run.router.post(
            "/generate", {"text": "hello", "sampling_params": {"max_new_tokens": 3}}
        )
        assert reply.status == 200 and reply.json()["meta_info"]["completion_tokens"] == 3
        stream = run.router.post(
            "/generate", {"text": "hi", "stream": True, "sampling_params": {"max_new_tokens": 3}}
        )
        assert stream.body.decode().rstrip().endswith("data: [DONE]")
        client = openai.OpenAI(base_url=run.router.url + "/v1", api_key="x", max_retries=0)
        chat = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hey"}], max_tokens=4
        )
        assert chat.choices[0].message.content
        assert (run.log_dir / "worker-0.log").exists() and (run.log_dir / "router.log").exists()
        os.kill(run.proc.pid, signal.SIGINT)
        assert run.proc.wait(timeout=15) == 0
        wait_for(lambda: gone(children), timeout=5, what="every worker gone")
        output = run.proc.stdout.read().decode() if run.proc.stdout else ""
        assert "ready" in output and "curl" in output


def test_killed_worker_is_restarted_and_requests_keep_succeeding(tmp_path: Path) -> None:
    with launched(2, tmp_path, "--", "--time-scale", "100") as run:
        victim = run.children()[0]
        victim.kill()
        wait_for(
            lambda: run.router.get("/readiness").json()["healthy_workers"] == 1,
            what="the dead worker leaves routing",
        )
        statuses = [
            run.router.post("/generate", {"text": uuid.uuid4().hex}).status for _ in range(20)
        ]
        assert statuses == [200] * 20
        wait_for(lambda: run.ready(2), timeout=30, what="the worker restarted and rejoined")
        stats = run.router.get("/debug/stats").json()
        assert any("restart" in event or "back" in event for event in stats["events"])


def test_a_hung_worker_is_restarted_and_requests_keep_succeeding(tmp_path: Path) -> None:
    hang = ("--unhealthy-restart-secs", "1", "--health-check-timeout-secs", "0.5")
    with launched(2, tmp_path, *hang, "--", "--time-scale", "100") as run:
        shim = next(p for p in run.children() if "shim.py" in " ".join(p.cmdline()))
        worker = shim.children()[0]
        worker.suspend()  # alive, answering nothing
        try:
            statuses = [run.router.post("/generate", {"text": str(i)}).status for i in range(6)]
            assert statuses == [200] * 6
            wait_for(lambda: not worker.is_running(), timeout=20, what="the hung worker stopped")
            wait_for(lambda: run.ready(2), timeout=30, what="its replacement healthy")
        finally:
            if worker.is_running():
                worker.resume()
        events = run.router.get("/debug/stats").json()["events"]
        assert any("failing health checks for" in event for event in events)


def test_with_sglangs_process_tree_nothing_outlives_a_crash_or_the_launcher(
    tmp_path: Path,
) -> None:
    """The stand-in SGLang's children ignore SIGTERM and never watch their parent."""
    with launched(2, tmp_path, "--", "--time-scale", "1000", fake_sglang=True) as run:
        log = run.log_dir / "worker-0.log"
        old = fake_children(log)
        assert len(old) == 3 and len(fake_children(run.log_dir / "worker-1.log")) == 3
        server = psutil.Process(old[0]).parent()
        assert server is not None and "sglang.launch_server" in " ".join(server.cmdline())
        server.kill()
        wait_for(lambda: not any(map(alive, old)), timeout=10, what="the crashed tree gone")
        wait_for(lambda: fake_children(log) != old, timeout=20, what="the restart")
        wait_for(lambda: run.ready(2), timeout=30, what="the worker back")
        tree = run.children()
        assert len(tree) == 2 * 5  # 2 × (shim, launch_server, 3 children)
        assert run.router.post("/generate", {"text": "still here"}).status == 200
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
        wait_for(lambda: gone(tree), timeout=5, what="every descendant gone")
        assert not list(run.log_dir.glob("*.pids"))  # each shim cleaned up after its tree


def test_leftovers_of_a_killed_launch_are_reported_then_killed_with_kill_stale(
    tmp_path: Path,
) -> None:
    with launched(1, tmp_path, "--", "--time-scale", "1000", fake_sglang=True) as run:
        children = fake_children(run.log_dir / "worker-0.log")
        shim = next(p for p in run.children() if "shim.py" in " ".join(p.cmdline()))
        shim.suspend()  # the launcher and its shim killed at once: the shim cleans nothing
        os.kill(run.proc.pid, signal.SIGKILL)
        shim.kill()
        run.proc.wait()
        wait_for(lambda: not shim.is_running(), what="the shim gone")
        assert all(map(alive, children))  # orphaned: they ignore SIGTERM, watch nobody
        argv = launch_argv(1, free_port(), run.log_dir, "--no-dashboard", fake_sglang=True)
        refused = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                                 env=fake_sglang_env())  # fmt: skip
        assert refused.returncode == 2
        assert "--kill-stale" in refused.stdout and str(children[0]) in refused.stdout
        with launched(1, tmp_path, "--kill-stale", "--", "--time-scale", "1000",
                      fake_sglang=True) as again:  # fmt: skip
            assert not any(map(alive, children))
            os.kill(again.proc.pid, signal.SIGINT)
            assert again.proc.wait(timeout=20) == 0
            output = again.proc.stdout.read().decode() if again.proc.stdout else ""
            assert f"killed {len(children)} process(es)" in output


def test_sighup_stops_new_requests_and_a_second_signal_skips_the_grace(tmp_path: Path) -> None:
    with launched(1, tmp_path, "--shutdown-grace-secs", "60") as run:
        workers = run.children()
        kept = http.client.HTTPConnection("127.0.0.1", run.router.port, timeout=10)
        kept.request("POST", "/generate", json.dumps({"text": "first"}))
        first = kept.getresponse()
        first.read()
        assert first.status == 200
        endless = {"text": "go on", "stream": True, "sampling_params": {"max_new_tokens": 10**6}}
        streaming = http.client.HTTPConnection("127.0.0.1", run.router.port, timeout=30)
        streaming.request("POST", "/generate", json.dumps(endless))
        assert streaming.getresponse().status == 200  # in flight until the end of the grace
        os.kill(run.proc.pid, signal.SIGHUP)  # the terminal closed: a stop, not a death

        def refused_on_a_kept_connection() -> bool:
            # An idle kept-alive connection is closed at once (a new one is refused); one that
            # was busy answers 503 + close: either way nothing new is served while draining.
            try:
                kept.request("POST", "/generate", json.dumps({"text": "more"}))
                reply = kept.getresponse()
                reply.read()
            except (ConnectionError, http.client.HTTPException):
                return True
            return reply.status == 503

        wait_for(refused_on_a_kept_connection, what="new requests refused while draining")
        assert run.proc.poll() is None  # draining: the stream is still in flight
        os.kill(run.proc.pid, signal.SIGINT)  # the second signal: no more grace
        assert run.proc.wait(timeout=15) == 0
        wait_for(lambda: gone(workers), timeout=5, what="every worker gone")
        kept.close()
        streaming.close()


def test_a_worker_failing_at_startup_stops_everything_and_shows_its_log(tmp_path: Path) -> None:
    port = free_port()
    argv = launch_argv(2, port, tmp_path / "logs", "--no-dashboard", "--", "--time-scale", "-1")
    result = subprocess.run(
        argv, capture_output=True, check=False, timeout=60, start_new_session=True
    )
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode != 0
    assert "failed to start" in output and "--time-scale must be positive" in output


def test_more_gpus_than_available_is_a_clear_error(tmp_path: Path) -> None:
    argv = [SGLANG_DP, "launch", "--model-path", "m", "--dp", "4", "--tp", "2", "--gpus", "0,1"]
    result = subprocess.run(argv, capture_output=True, check=False, timeout=30, cwd=tmp_path)
    assert result.returncode != 0
    assert "8 GPUs" in result.stdout.decode() + result.stderr.decode()


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = [SGLANG_DP, "launch", "--simulate", "--dp", "1", "--port", str(port)]
        result = subprocess.run(argv, capture_output=True, check=False, timeout=30, cwd=tmp_path)
    assert result.returncode != 0
    assert f"{port}" in result.stdout.decode() and "in use" in result.stdout.decode()


def test_dashboard_shows_a_row_per_worker_on_a_terminal(tmp_path: Path) -> None:
    port = free_port()
    argv = launch_argv(2, port, tmp_path / "logs")
    child = pexpect.spawn(argv[0], argv[1:], dimensions=(40, 160), timeout=60)
    workers: list[psutil.Process] = []
    try:
        child.expect("ready")
        workers = psutil.Process(child.pid).children(recursive=True)
        child.expect("req/s")  # the dashboard's header
        child.expect("healthy.*healthy")  # one row per worker
        child.sendintr()
        child.expect(pexpect.EOF, timeout=20)
    finally:
        if child.isalive():
            os.killpg(child.pid, signal.SIGKILL)
    child.close()
    assert child.exitstatus == 0
    assert len(workers) >= 2
    wait_for(lambda: gone(workers), timeout=5, what="every worker gone")


def test_two_nodes_one_router(tmp_path: Path) -> None:
    """`--no-router --register-with`: this node's workers join a router elsewhere, and leave."""
    from tests.router.cluster import router_process

    with router_process([], "--admin-api-key", "adm", ready_workers=0) as router:
        argv = launch_argv(2, free_port(), tmp_path / "logs", "--no-dashboard", "--no-router",
                           "--register-with", router.url, "--admin-api-key", "adm")  # fmt: skip
        node = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(
                lambda: router.get("/readiness").json()["healthy_workers"] == 2,
                timeout=60,
                what="both workers registered and healthy",
            )
            reply = router.post("/generate", {"text": "from the other node"})
            assert reply.status == 200
            os.kill(node.pid, signal.SIGINT)
            assert node.wait(timeout=20) == 0
            admin = {"authorization": "Bearer adm"}
            assert router.get("/list_workers", headers=admin).json() == {"urls": []}
        finally:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
