"""`launch --ray` options: what goes together, and what a user without Ray is told."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sglang_dp.launcher.config import RAY_LOCAL, LaunchConfig
from sglang_dp.launcher.process import LogRotation
from sglang_dp.launcher.ray_cluster import (
    INSTALL_HINT,
    LOOPBACK_ENV,
    address_is_loopback,
    requests_for,
    split_address,
    template_specs,
)
from sglang_dp.launcher.ray_worker import Started, local_pids_path
from sglang_dp.launcher.run import run_launch
from sglang_dp.router.config import RouterConfig
from tests.processes import free_port


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"placement": "spread"}, "--placement goes with --ray"),
        ({"ray": RAY_LOCAL, "no_router": True}, "drop --no-router"),
        ({"ray": RAY_LOCAL, "gpus": "0,1"}, "Ray assigns each worker its GPUs"),
    ],
)
def test_options_that_do_not_go_with_ray_are_refused(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LaunchConfig(simulate=True, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ray", "worker_host", "loopback"),
    [
        (RAY_LOCAL, "127.0.0.1", True),
        (RAY_LOCAL, "10.0.0.5", False),
        ("127.0.0.1:6379", "127.0.0.1", True),
        ("10.0.0.1:6379", "127.0.0.1", False),
        ("auto", "127.0.0.1", False),
        ("[::1]:6379", "127.0.0.1", True),
        ("ray://[::1]:10001", "127.0.0.1", True),
        ("ray://127.0.0.1:10001", "127.0.0.1", True),
        ("[2001:db8::1]:6379", "127.0.0.1", False),
        ("localhost:6379", "127.0.0.1", True),
    ],
)
def test_ray_is_kept_on_loopback_when_the_run_is(
    ray: str, worker_host: str, loopback: bool
) -> None:
    config = LaunchConfig(simulate=True, ray=ray, worker_host=worker_host)
    assert address_is_loopback(config) == loopback


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.1:6379", ("10.0.0.1", 6379)),
        ("10.0.0.1", ("10.0.0.1", None)),
        ("head.example:6379", ("head.example", 6379)),
        ("[::1]:6379", ("::1", 6379)),
        ("[::1]", ("::1", None)),
        ("::1", ("::1", None)),
        ("fe80::1:2", ("fe80::1:2", None)),
        ("ray://[::1]:10001", ("::1", 10001)),
        ("ray://head:10001", ("head", 10001)),
        ("auto", ("auto", None)),
        ("host:port", ("host", None)),
    ],
)
def test_a_ray_address_splits_into_host_and_port(
    address: str, expected: tuple[str, int | None]
) -> None:
    assert split_address(address) == expected


def test_the_driver_plans_every_worker_and_refuses_flags_the_launcher_owns(tmp_path: Path) -> None:
    config = LaunchConfig(simulate=True, dp=3, ray=RAY_LOCAL, worker_args=("--max-running", "4"))
    specs = template_specs(config, tmp_path)
    assert [s.log_path for s in specs] == [tmp_path / f"worker-{i}.log" for i in range(3)]
    bad = LaunchConfig(simulate=True, ray=RAY_LOCAL, worker_args=("--port", "1"))
    with pytest.raises(Exception, match="--port cannot be passed to the workers"):
        template_specs(bad, tmp_path)


def test_each_ray_worker_is_asked_to_rotate_its_log_as_a_local_one_would(tmp_path: Path) -> None:
    config = LaunchConfig(simulate=True, dp=2, ray=RAY_LOCAL, log_max_mb=0.5, log_keep=7)
    requests = requests_for(template_specs(config, tmp_path), config)
    assert {r.log_rotation for r in requests.values()} == {LogRotation(512 * 1024, 7)}


def test_a_ray_worker_on_this_machine_is_sampled_from_its_shims_record(tmp_path: Path) -> None:
    log = tmp_path / "worker-0.log"

    def started(host: str) -> Started:
        return Started(0, host, 31000, None, "node", (0,), 123, ("x",), str(log))

    assert local_pids_path(started("127.0.0.1")) == tmp_path / "worker-0.log.pids"
    assert local_pids_path(started("192.0.2.7")) is None  # another node: its pids are not ours


def test_without_ray_installed_ray_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    router = RouterConfig(port=free_port())
    config = LaunchConfig(simulate=True, ray=RAY_LOCAL, log_dir=str(tmp_path), router=router)
    assert run_launch(config) == 2
    assert "pip install 'sglang-dp[ray]'" in capsys.readouterr().out
    assert INSTALL_HINT.endswith("pip install 'sglang-dp[ray]'")


def test_a_ray_address_where_nothing_answers_is_a_clear_error_at_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    monkeypatch.setenv(LOOPBACK_ENV, "0")  # restored afterwards (launch --ray sets it)
    address = f"127.0.0.1:{free_port()}"
    router = RouterConfig(port=free_port())
    config = LaunchConfig(simulate=True, ray=address, log_dir=str(tmp_path), router=router)
    assert run_launch(config) == 2
    assert f"nothing answers at {address}" in capsys.readouterr().out


def test_the_router_keys_on_the_workers_tokens_when_they_publish_kv_events() -> None:
    simulated = LaunchConfig(simulate=True)
    assert simulated.router_settings(True).routing_key == "words"
    assert simulated.router_settings(True).cache_view == "events"  # a silent worker is reported
    assert simulated.router_settings(False).routing_key == "chars"
    real = LaunchConfig(model_path="/models/llama")
    tokens = real.router_settings(True)
    assert (tokens.routing_key, tokens.tokenizer_path) == ("tokens", "/models/llama")
    given = LaunchConfig(simulate=True, worker_args=("--tokenizer-path", "/tok"))
    assert given.router_settings(True).tokenizer_path == "/tok"
    chosen = LaunchConfig(model_path="/m", router=RouterConfig(cache_view="approx"))
    assert chosen.router_settings(True).routing_key == "chars"
    assert real.router_settings(True).worker_urls == ()
