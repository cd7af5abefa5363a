"""Launch planning (pure): argv, environment, log files, port bands, owned flags, moves."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_dp.launcher.config import LaunchConfig
from sglang_dp.launcher.plan import (
    KV_EVENTS_FLAG,
    STRIDE_WITH_NCCL_PORT,
    STRIDE_WITHOUT_NCCL_PORT,
    PortLayout,
    WorkerSpec,
    WorkerTemplate,
    api_key_from_args,
    check_worker_args,
    flag_value,
    owned_flag,
    plan_workers,
    spare_ports,
    with_ports,
)

LOGS = Path("/tmp/logs")
ENV = {"PATH": "/usr/bin", "HOME": "/home/u"}


def plan(**changes: object) -> list[WorkerSpec]:
    """plan_workers with a template of every shared setting and these changes to either."""
    shared: dict[str, object] = {
        "model_path": "meta-llama/Llama-3.1-8B-Instruct",
        "tp": 2,
        "worker_args": ("--mem-fraction-static", "0.8"),
        "simulate": False,
        "python": "/venv/bin/python",
        "environ": ENV,
    }
    layout: dict[str, object] = {
        "dp": 2,
        "gpus": [(0, 1), (2, 3)],
        "base_port": 31000,
        "log_dir": LOGS,
        "accepts_nccl_port": True,
    }
    template_fields = {f.name for f in dataclasses.fields(WorkerTemplate)}
    for name, value in changes.items():
        (shared if name in template_fields else layout)[name] = value
    shared["worker_args"] = tuple(cast(Sequence[str], shared["worker_args"]))
    return plan_workers(WorkerTemplate(**shared), **layout)  # type: ignore[arg-type]


def test_real_workers() -> None:
    first, second = plan()
    assert first.argv == (
        "/venv/bin/python",
        "-m",
        "sglang.launch_server",
        "--model-path",
        "meta-llama/Llama-3.1-8B-Instruct",
        "--host",
        "127.0.0.1",
        "--port",
        "31000",
        "--tp-size",
        "2",
        "--nccl-port",
        "31001",
        "--mem-fraction-static",
        "0.8",
    )
    assert (first.index, first.gpus, first.port, first.nccl_port) == (0, (0, 1), 31000, 31001)
    assert (second.index, second.gpus, second.port, second.nccl_port) == (1, (2, 3), 31010, 31011)
    assert second.argv[8] == "31010" and second.argv[12] == "31011"
    assert first.url == "http://127.0.0.1:31000"
    assert first.log_path == LOGS / "worker-0.log" and second.log_path == LOGS / "worker-1.log"
    assert not first.simulated
    assert first.gpu_label == "0-1"


def test_real_worker_environment() -> None:
    first, second = plan()
    assert first.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert second.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert first.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # ids mean what nvidia-smi says
    assert first.env["PYTHONUNBUFFERED"] == "1"
    assert first.env["PATH"] == "/usr/bin"
    assert "CUDA_VISIBLE_DEVICES" not in ENV  # the caller's mapping is not touched
    [only] = plan(dp=1, gpus=[(5, 7)], environ={**ENV, "CUDA_DEVICE_ORDER": "FASTEST_FIRST"})
    assert only.env["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"
    assert only.env["CUDA_VISIBLE_DEVICES"] == "5,7"


def test_simulated_workers() -> None:
    specs = plan(simulate=True, gpus=None, dp=3, tp=1, worker_args=["--time-scale", "100"])
    assert [s.argv[:3] for s in specs] == [("/venv/bin/python", "-m", "sglang_dp.sim")] * 3
    assert specs[2].argv[3:] == (
        "--model-path",
        "meta-llama/Llama-3.1-8B-Instruct",
        "--host",
        "127.0.0.1",
        "--port",
        "31020",
        "--tp-size",
        "1",
        "--nccl-port",
        "31021",
        "--time-scale",
        "100",
    )
    assert all(s.simulated for s in specs)
    assert [s.gpus for s in specs] == [(0,), (1,), (2,)]  # virtual ids
    assert specs[1].gpu_label == "sim 1"
    assert "CUDA_VISIBLE_DEVICES" not in specs[0].env
    assert specs[0].env["PYTHONUNBUFFERED"] == "1"


def test_without_nccl_port_the_bands_are_wide() -> None:
    specs = plan(accepts_nccl_port=False, dp=3, tp=1, gpus=[(0,), (1,), (2,)])
    assert [s.port for s in specs] == [31000, 32100, 33200]
    assert all(s.nccl_port is None and "--nccl-port" not in s.argv for s in specs)


def test_worker_host_for_other_nodes() -> None:
    [spec] = plan(dp=1, gpus=[(0, 1)], host="10.0.0.2")
    assert spec.argv[6] == "10.0.0.2"
    assert spec.url == "http://10.0.0.2:31000"  # where this node's router or another reaches it


def test_user_flags_pass_unchanged() -> None:
    flags = ["--api-key", "k", "--json-model-override-args", '{"a": 1}', "--disable-radix-cache"]
    [spec] = plan(dp=1, gpus=[(0, 1)], worker_args=flags)
    assert spec.argv[-5:] == tuple(flags)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--port", "1"], "--port"),
        (["--port=1"], "--port"),
        (["--host", "0.0.0.0"], "--host"),
        (["--tp-size", "2"], "--tp-size"),
        (["--tp", "2"], "--tp"),
        (["--tensor-parallel-size", "2"], "--tensor-parallel-size"),
        (["--model-path", "x"], "--model-path"),
        (["--model", "x"], "--model"),
        (["--dp", "2"], "--dp"),
        (["--dp-size", "2"], "--dp-size"),
        (["--nccl-port", "5"], "--nccl-port"),
        (["--base-gpu-id", "2"], "--base-gpu-id"),
        (["--log-level", "info", "--mod", "x"], r"--mod \(= --model"),  # argparse abbreviation
        (["--por", "1"], r"--por \(= --port\)"),
    ],
)
def test_owned_flags_are_refused(args: list[str], named: str) -> None:
    with pytest.raises(ValueError, match=f"^{named}"):
        plan(worker_args=args)


def test_owned_flag_details() -> None:
    with pytest.raises(ValueError, match="--worker-base-port"):
        check_worker_args(["--port", "1"])
    for fine in ["--portal", "--hostname", "--tokenizer-path", "--mem-fraction-static", "-h", "x"]:
        assert owned_flag(fine) is None, fine
    assert owned_flag("--tp=2") == "--tp"
    assert owned_flag("--po") is None  # too short to tell


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dp": 0}, "at least 1"),
        ({"tp": 0}, "at least 1"),
        ({"gpus": None}, "need GPUs"),
        ({"gpus": [(0, 1)]}, "expected 2 groups of 2 GPUs"),
        ({"gpus": [(0,), (1,)]}, "expected 2 groups of 2 GPUs"),
        ({"base_port": 0}, "not a port number"),
        ({"base_port": 65530}, "need ports up to 65549.*lower worker base port"),
        ({"reserved_ports": [31012]}, "port 31012 is in worker 1's ports 31010–31019"),
    ],
)
def test_impossible_plans(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(**changes)


def test_reserved_ports_in_a_hidden_port_band() -> None:
    # the router on 30000 and workers from 29500 without --nccl-port: worker 0's hidden
    # TCPStore port may be anything up to 30500
    with pytest.raises(ValueError, match="port 30000 is in worker 0's ports 29500–30599"):
        plan(accepts_nccl_port=False, base_port=29500, reserved_ports=[30000])
    assert plan(reserved_ports=[30000])  # the default layout leaves 30000 to the router
    assert LaunchConfig(simulate=True).base_port > 30000 + STRIDE_WITHOUT_NCCL_PORT - 1 - 1000


def test_api_key_from_args() -> None:
    assert api_key_from_args(["--api-key", "k1"]) == "k1"
    assert api_key_from_args(["--x", "--api-key=k2"]) == "k2"
    assert api_key_from_args(["--api-key"]) is None
    assert api_key_from_args([]) is None


def test_with_ports_rewrites_argv() -> None:
    spec = plan()[1]
    moved = with_ports(spec, 40000, 40001)
    assert (moved.port, moved.nccl_port, moved.url) == (40000, 40001, "http://127.0.0.1:40000")
    assert moved.argv[8] == "40000" and moved.argv[12] == "40001"
    assert moved.argv[:8] == spec.argv[:8] and moved.argv[13:] == spec.argv[13:]
    assert (moved.index, moved.gpus, moved.env, moved.log_path) == (
        spec.index,
        spec.gpus,
        spec.env,
        spec.log_path,
    )
    old = plan(accepts_nccl_port=False)[0]
    assert with_ports(old, 40000, 40001).nccl_port is None  # its sglang has no such flag
    # a user flag that looks like ours after `--` would have been refused; the first is ours
    assert with_ports(old, 40000, None).argv.count("40000") == 1


def test_spare_ports_follow_the_plan() -> None:
    specs = plan(dp=3, gpus=[(0, 1), (2, 3), (4, 5)])
    spares = spare_ports(specs)
    assert next(spares) == (31030, 31031)
    assert next(spares) == (31040, 31041)
    old = plan(accepts_nccl_port=False)
    assert next(spare_ports(old)) == (31000 + 2 * STRIDE_WITHOUT_NCCL_PORT, None)
    assert list(spare_ports([])) == []
    last = plan(dp=1, gpus=[(0, 1)], base_port=65500)
    assert list(spare_ports(last)) == [(65510, 65511), (65520, 65521)]


def occupied(spec: WorkerSpec) -> range:
    """Every port the worker or its hidden TCPStore may bind (sglang 0.3–0.5 behaviour)."""
    if spec.nccl_port is not None:
        return range(spec.port, spec.nccl_port + 1)
    return range(spec.port, spec.port + 1000 + 2 * 42 + 1)  # 0.4: +randint(100, 1000), +42 steps


@given(
    dp=st.integers(1, 32),
    base_port=st.integers(1024, 40000),
    accepts=st.booleans(),
    spare=st.integers(0, 3),
)
def test_port_plans_never_collide(dp: int, base_port: int, accepts: bool, spare: int) -> None:
    try:
        specs = plan(
            dp=dp, tp=1, gpus=None, simulate=True, base_port=base_port, accepts_nccl_port=accepts
        )
    except ValueError as exc:
        stride = STRIDE_WITH_NCCL_PORT if accepts else STRIDE_WITHOUT_NCCL_PORT
        assert base_port + dp * stride - 1 > 65535, exc
        return
    # a few workers moved to spare bands (as the supervisor does, one at a time) take part too
    for i in range(min(spare, dp)):
        move = next(spare_ports(specs), None)
        if move is not None:
            specs[i] = with_ports(specs[i], *move)
    ranges = sorted((occupied(s) for s in specs), key=lambda r: r.start)
    for lower, upper in itertools.pairwise(ranges):
        assert lower.stop <= upper.start  # no worker's ports reach into another's
    assert ranges[-1].stop - 1 <= 65535
    assert len({s.port for s in specs}) == dp
    assert all(str(s.port) in s.argv for s in specs)


@given(st.integers(1, 20), st.booleans())
def test_layout_bands_partition_the_ports(slots: int, accepts: bool) -> None:
    layout = PortLayout(30000, accepts)
    bands = [layout.band(i) for i in range(slots)]
    for i, band in enumerate(bands):
        assert layout.http_port(i) == band.start
        nccl = layout.nccl_port(i)
        assert (nccl is None) != accepts
        assert nccl is None or nccl in band
        if i:
            assert bands[i - 1].stop == band.start


def test_kv_events_each_worker_publishes_inside_its_own_band() -> None:
    specs = plan(kv_events=True, dp=3, tp=1, gpus=[(0,), (1,), (2,)])
    for spec in specs:
        config = json.loads(flag_value(spec.argv, KV_EVENTS_FLAG) or "")
        assert config == {
            "publisher": "zmq",
            "endpoint": f"tcp://*:{spec.port + 2}",
            "replay_endpoint": f"tcp://*:{spec.port + 3}",
            "topic": "kv",
        }
        assert spec.port + 3 in PortLayout(31000, True).band(spec.index)
        assert flag_value(spec.argv, "--page-size") == "16"
    mine = plan(kv_events=True, worker_args=["--page-size", "64"])[0]
    assert mine.argv.count("--page-size") == 1 and flag_value(mine.argv, "--page-size") == "64"
    assert KV_EVENTS_FLAG not in plan()[0].argv  # off unless asked
    moved = with_ports(specs[1], 40000, 40001)
    assert json.loads(flag_value(moved.argv, KV_EVENTS_FLAG) or "")["endpoint"] == "tcp://*:40002"
    with pytest.raises(ValueError, match="--kv-events-config cannot be passed"):
        plan(worker_args=["--kv-events-config", "{}"])


def test_flag_value() -> None:
    assert flag_value(["--a", "1", "--b=2"], "--b") == "2"
    assert flag_value(["--a", "1"], "--a") == "1"
    assert flag_value(["--a"], "--a") is None and flag_value(["--ab", "1"], "--a") is None
