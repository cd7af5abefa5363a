"""The LIST + WATCH shell against the fake API server (real HTTP, kubernetes_asyncio's client):
events, bookmarks, 410 Gone, a severed watch, an API server restart, 403."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_dp.discovery.config import DiscoveryConfig
from sglang_dp.discovery.kube import (
    BACKOFF_CAP_S,
    ApiError,
    Backoff,
    DiscoveryError,
    PodWatcher,
    connect,
)
from tests.discovery.fake_kube import FakeKube
from tests.processes import free_port, until

LABELS = {"app": "sglang"}


def config(kube: FakeKube, tmp_path: Path, namespace: str | None = None) -> DiscoveryConfig:
    return DiscoveryConfig(
        service_discovery=True,
        selector=("app=sglang",),
        service_discovery_namespace=namespace,
        kubeconfig=kube.kubeconfig(str(tmp_path / "kubeconfig")),
    )


Scenario = Callable[[PodWatcher, list[tuple[str, str]]], Awaitable[None]]


def watching(
    kube: FakeKube, tmp_path: Path, scenario: Scenario, namespace: str | None = None
) -> None:
    """Run `scenario(watcher, states)` with a watcher running against `kube`."""

    async def main() -> None:
        api = await connect(config(kube, tmp_path, namespace))
        states: list[tuple[str, str]] = []
        watcher = PodWatcher(api, lambda: None, lambda s, e: states.append((s, e)))
        await watcher.first_sync()
        task = asyncio.create_task(watcher.run())
        try:
            await scenario(watcher, states)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await api.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def names(watcher: PodWatcher) -> set[str]:
    return {p.name for p in watcher.pods.values()}


def ready(watcher: PodWatcher, name: str) -> bool:
    return any(p.name == name and p.ready for p in watcher.pods.values())


def test_list_then_watch_follows_adds_changes_and_deletes(tmp_path: Path) -> None:
    with FakeKube(bookmark_s=0.05) as kube:
        kube.add_pod("a", "127.0.0.2", LABELS)
        kube.add_pod("other", "127.0.0.9", {"app": "else"})

        async def scenario(watcher: PodWatcher, states: list[tuple[str, str]]) -> None:
            assert names(watcher) == {"a"} and states == [("synced", "")]
            kube.add_pod("b", "127.0.0.3", LABELS, ready=False)
            await until(lambda: names(watcher) == {"a", "b"}, what="b added")
            kube.set_ready("b", True)
            await until(lambda: ready(watcher, "b"), what="b ready")
            kube.delete("a")
            await until(lambda: names(watcher) == {"b"}, what="a deleted")
            kube.add_pod("unselected", "127.0.0.8", {"app": "else"})  # no event for us ...
            latest = kube.resource_version()
            await until(lambda: watcher.resource_version == latest, what="a bookmark")
            assert kube.requests["list"] == 1 and names(watcher) == {"b"}

        watching(kube, tmp_path, scenario)


def test_a_namespace_limits_what_is_watched(tmp_path: Path) -> None:
    with FakeKube() as kube:
        kube.add_pod("a", "127.0.0.2", LABELS, namespace="llm")
        kube.add_pod("b", "127.0.0.3", LABELS, namespace="default")

        async def scenario(watcher: PodWatcher, states: list[tuple[str, str]]) -> None:
            assert names(watcher) == {"a"}
            kube.add_pod("c", "127.0.0.4", LABELS, namespace="default")
            kube.add_pod("d", "127.0.0.5", LABELS, namespace="llm")
            await until(lambda: names(watcher) == {"a", "d"}, what="d added")

        watching(kube, tmp_path, scenario, namespace="llm")


def test_410_gone_lists_again_once(tmp_path: Path) -> None:
    with FakeKube() as kube:
        kube.add_pod("a", "127.0.0.2", LABELS)

        async def scenario(watcher: PodWatcher, states: list[tuple[str, str]]) -> None:
            await until(lambda: kube.open_watches() == 1, what="a watch")
            kube.expire()  # the open watch gets an ERROR 410 event
            await until(lambda: kube.requests["list"] == 2, what="a second LIST")
            kube.add_pod("b", "127.0.0.3", LABELS)
            await until(lambda: names(watcher) == {"a", "b"}, what="b after the re-LIST")
            assert kube.requests["list"] == 2 and states == [("synced", "")]

        watching(kube, tmp_path, scenario)


def test_a_severed_watch_resumes_from_its_resource_version(tmp_path: Path) -> None:
    with FakeKube() as kube:
        kube.add_pod("a", "127.0.0.2", LABELS)

        async def scenario(watcher: PodWatcher, states: list[tuple[str, str]]) -> None:
            await until(lambda: kube.open_watches() == 1, what="a watch")
            kube.sever()
            kube.add_pod("b", "127.0.0.3", LABELS)  # while no watch is open
            await until(lambda: names(watcher) == {"a", "b"}, what="b after the cut")
            assert kube.requests["watch"] == 2 and kube.requests["list"] == 1

        watching(kube, tmp_path, scenario)


def test_an_api_server_restart_makes_discovery_stale_then_synced(tmp_path: Path) -> None:
    with FakeKube() as kube:
        kube.add_pod("a", "127.0.0.2", LABELS)

        async def scenario(watcher: PodWatcher, states: list[tuple[str, str]]) -> None:
            await until(lambda: kube.open_watches() == 1, what="a watch")
            outage = asyncio.create_task(asyncio.to_thread(kube.restart, 1.0))
            await until(lambda: watcher.state == "stale", what="stale")
            assert names(watcher) == {"a"}  # what it knew is kept
            await outage
            kube.add_pod("b", "127.0.0.3", LABELS)
            await until(lambda: names(watcher) == {"a", "b"}, what="b after the restart")
            assert watcher.state == "synced"
            assert [s for s, _ in states] == ["synced", "stale", "synced"]  # once per change
            assert "cannot reach the API server" in states[1][1]

        watching(kube, tmp_path, scenario)


def test_forbidden_at_start_is_a_clear_error(tmp_path: Path) -> None:
    with FakeKube() as kube:
        kube.forbidden = True

        async def main() -> None:
            api = await connect(config(kube, tmp_path))
            try:
                with pytest.raises(DiscoveryError, match=r"403.*pods: get, list, watch"):
                    await PodWatcher(api, lambda: None).first_sync()
            finally:
                await api.close()

        asyncio.run(main())


def test_forbidden_later_keeps_the_pods_and_backs_off(tmp_path: Path) -> None:
    with FakeKube() as kube:
        kube.add_pod("a", "127.0.0.2", LABELS)

        async def scenario(watcher: PodWatcher, states: list[tuple[str, str]]) -> None:
            await until(lambda: kube.open_watches() == 1, what="a watch")
            kube.forbidden = True
            kube.sever()
            await until(lambda: watcher.state == "stale", what="stale")
            await until(lambda: kube.requests["forbidden"] >= 3, what="retries")
            assert kube.requests["forbidden"] < 10  # backing off, not hammering
            assert names(watcher) == {"a"} and "403" in watcher.last_error
            assert [s for s, _ in states] == ["synced", "stale"]  # logged once

        watching(kube, tmp_path, scenario)


def test_no_configuration_is_a_clear_error(tmp_path: Path) -> None:
    cfg = DiscoveryConfig(
        service_discovery=True, selector=("app=x",), kubeconfig=str(tmp_path / "missing")
    )
    with pytest.raises(DiscoveryError, match="--kubeconfig"):
        asyncio.run(connect(cfg))


class ScriptedApi:
    """A PodApi whose watch yields what the script says (for answers no real server gives)."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.lists = 0

    async def list(self) -> tuple[list[dict[str, Any]], str]:
        self.lists += 1
        return [], "1"

    async def watch(self, resource_version: str, timeout_s: int) -> AsyncIterator[dict[str, Any]]:
        for event in self.events:
            yield event

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "event",
    [{"kind": "PodList", "items": []}, {"type": "ADDED", "object": "x"}, {"type": "ERROR"}],
)
def test_a_line_that_is_no_watch_event_is_a_failure_not_a_busy_loop(event: dict[str, Any]) -> None:
    async def main() -> None:
        api = ScriptedApi([event])
        states: list[tuple[str, str]] = []
        watcher = PodWatcher(api, lambda: None, lambda *s: states.append(s), random.Random(1))
        await watcher.first_sync()
        task = asyncio.create_task(watcher.run())
        await until(lambda: watcher.state == "stale", what="stale")
        await asyncio.sleep(0.5)  # the span measured, not a synchronisation
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert api.lists < 6, "backing off"
        assert all(error for state, error in states if state == "stale")

    asyncio.run(main())


def test_an_error_event_with_another_code_is_an_api_error() -> None:
    watcher = PodWatcher(ScriptedApi([]), lambda: None)
    with pytest.raises(ApiError) as caught:
        watcher._apply({"type": "ERROR", "object": {"code": 500, "message": "etcd down"}})
    assert caught.value.status == 500 and "etcd down" in str(caught.value)


@given(st.integers(0, 40), st.integers(0, 2**32))
def test_backoff_grows_to_its_cap_with_jitter(failures: int, seed: int) -> None:
    backoff = Backoff(failures=failures)
    ceiling = min(BACKOFF_CAP_S, 0.2 * 2 ** min(failures, 30))
    wait = backoff.next(random.Random(seed))
    assert ceiling / 2 <= wait <= ceiling and backoff.failures == failures + 1
    backoff.reset()
    assert backoff.next(random.Random(seed)) <= 0.2


def test_without_the_client_the_router_names_the_extra_to_install() -> None:
    code = (
        "import sys; sys.modules['kubernetes_asyncio'] = None\n"  # as if not installed
        "from sglang_dp.cli.main import main; main()"
    )
    argv = [sys.executable, "-c", code, "router", "--port", str(free_port()),
            "--service-discovery", "--selector", "app=sglang"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "pip install 'sglang-dp[kubernetes]'" in done.stderr


def test_in_a_cluster_without_a_service_account_token_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    cfg = DiscoveryConfig(service_discovery=True, selector=("app=x",))
    with pytest.raises(DiscoveryError, match="service account did not load"):
        asyncio.run(connect(cfg))
