"""Launch planning: the argv, environment, ports and log file of every worker (pure).

`plan_workers(template, ...)` returns one frozen `WorkerSpec` per data-parallel rank, each made by
`plan_worker(template, index, gpus, port, nccl_port, log_path)` (which a Ray actor calls too, on
its node, with that node's Python, address, GPUs and free ports); `WorkerTemplate` is what every
worker of a launch shares (model, tp, the flags after `--`, simulated or not, the Python, the
environment, the host, KV events):

    real:      python -m sglang.launch_server --model-path M --host 127.0.0.1 --port P_i
                      --tp-size T [--nccl-port N_i] <flags after -->
               env: CUDA_VISIBLE_DEVICES=<worker i's GPUs>, CUDA_DEVICE_ORDER=PCI_BUS_ID
    simulated: python -m sglang_dp.sim <the same flags>       (no GPU; virtual GPU ids 0..dp×tp-1)

Every worker also gets PYTHONUNBUFFERED=1 (its log file is complete when it dies) and logs to
`log_dir/worker-<i>.log`. CUDA_DEVICE_ORDER=PCI_BUS_ID (unless already set) makes CUDA number
GPUs as nvidia-smi does, so the ids the user gives are the GPUs the workers get.

Port layout (`PortLayout`). Worker i owns the band of ports [P_i, P_i + stride), P_i = base + i ×
stride, binds its HTTP port P_i and keeps every hidden port inside its band:
- sglang accepts `--nccl-port` (0.5+): stride 10, `--nccl-port P_i + 1` (the TCPStore port is
  then never random). Ten ports leave room for what other sglang versions derive from `--port`.
- it does not: stride 1100. Old sglang picks the TCPStore port itself, after checking it is free
  but binding it later, so workers started together can collide (sglang #37215): 0.3.x uses
  P + 42, 0.4.x P + randint(100, 1000), both stepping by +42 while the port is taken. A band of
  1100 holds P + 42 … P + 1000 plus two +42 steps, so no worker's hidden port can land on another
  worker's HTTP or hidden port.
Keep the base at 30000 or above: sglang 0.5 without `--nccl-port` picks random ports in
22000–29999. `reserved_ports` (the router's port) must not fall in any band. A worker that dies
with "address already in use" moves to the next free band after the plan (`spare_ports`,
`with_ports`).

KV events (`WorkerTemplate.kv_events`: launch turns them on where the installed SGLang has
`--kv-events-config`): every worker publishes its cache events at P_i + 2 with replay at P_i + 3
(`kv_events_config`), topic "kv", and gets `--page-size 16` unless the user gave a page size.

The launcher owns --model-path, --host, --port, --tp-size, --nccl-port, --dp-size,
--base-gpu-id and --kv-events-config (and their aliases, `--flag=value` forms and the
abbreviations argparse would expand to them): finding one in the user's flags after `--` is a
ValueError naming the flag.
Everything else is passed to every worker unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from sglang_dp.launcher.gpus import format_gpu_list

WORKER_HOST = "127.0.0.1"
MAX_PORT = 65535
NCCL_PORT_OFFSET = 1
STRIDE_WITH_NCCL_PORT = 10
STRIDE_WITHOUT_NCCL_PORT = 1100  # > port+1000 (sglang 0.4's farthest hidden port) + 2 × 42
REAL_MODULE = "sglang.launch_server"
SIM_MODULE = "sglang_dp.sim"

_MODEL = "use sglang-dp's --model-path"
_TP = "use sglang-dp's --tp"
_DP = "use sglang-dp's --dp: every worker is one data-parallel rank"
# flag -> why the user may not pass it to the workers
OWNED_FLAGS: Mapping[str, str] = MappingProxyType(
    {
        "--model-path": _MODEL,
        "--model": _MODEL,
        "--host": "workers listen on 127.0.0.1 behind the router (sglang-dp's --host is the "
        "router's)",
        "--port": "use --worker-base-port: sglang-dp gives each worker its own port",
        "--tp-size": _TP,
        "--tp": _TP,
        "--tensor-parallel-size": _TP,
        "--dp-size": _DP,
        "--dp": _DP,
        "--data-parallel-size": _DP,
        "--nccl-port": "sglang-dp gives each worker its own",
        "--base-gpu-id": "use --gpus: each worker sees only its own GPUs (CUDA_VISIBLE_DEVICES)",
        "--kv-events-config": "sglang-dp gives each worker its own ports (--no-kv-events: none)",
    }
)
KV_EVENTS_FLAG = "--kv-events-config"
PAGE_SIZE_FLAG = "--page-size"
KV_EVENTS_PAGE_SIZE = 16  # tokens per KV page, and so per event block (see README)
KV_EVENTS_PORT_OFFSET = 2  # publisher at P_i + 2, replay at P_i + 3: inside every band
KV_EVENTS_TOPIC = "kv"
MIN_ABBREVIATION = 3  # argparse expands unique prefixes; "--mod" would mean --model-path


@dataclass(frozen=True)
class WorkerSpec:
    """Everything needed to start worker `index` (see the module docstring)."""

    index: int
    gpus: tuple[int, ...]  # virtual ids when simulated
    port: int
    nccl_port: int | None  # None: the installed sglang does not accept --nccl-port
    argv: tuple[str, ...]
    env: Mapping[str, str]  # the child's whole environment
    log_path: Path
    simulated: bool
    host: str = WORKER_HOST  # where it listens, and where routers reach it
    node: str = ""  # the Ray node it runs on ("address id"); "" when started locally

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def gpu_label(self) -> str:
        """GPUs for display: "0-1", or "sim 0-1" for a simulated worker."""
        ids = format_gpu_list(self.gpus)
        return f"sim {ids}" if self.simulated else ids


@dataclass(frozen=True)
class PortLayout:
    """Worker i's band of ports [http_port(i), http_port(i) + stride)."""

    base_port: int
    uses_nccl_port: bool

    @property
    def stride(self) -> int:
        return STRIDE_WITH_NCCL_PORT if self.uses_nccl_port else STRIDE_WITHOUT_NCCL_PORT

    def http_port(self, slot: int) -> int:
        return self.base_port + slot * self.stride

    def nccl_port(self, slot: int) -> int | None:
        return self.http_port(slot) + NCCL_PORT_OFFSET if self.uses_nccl_port else None

    def band(self, slot: int) -> range:
        """Every port worker `slot` (or its hidden TCPStore) may bind."""
        return range(self.http_port(slot), self.http_port(slot) + self.stride)

    def check(self, slots: int, reserved_ports: Collection[int]) -> None:
        """ValueError when the bands do not fit below 65536 or cover a reserved port."""
        if not 1 <= self.base_port <= MAX_PORT:
            raise ValueError(f"worker base port {self.base_port} is not a port number")
        last = self.band(slots - 1)
        if last.stop - 1 > MAX_PORT:
            raise ValueError(
                f"{slots} workers spaced {self.stride} ports apart from {self.base_port} need "
                f"ports up to {last.stop - 1} (> {MAX_PORT}): choose a lower worker base port"
            )
        for port in sorted(reserved_ports):
            for slot in range(slots):
                if port in self.band(slot):
                    raise ValueError(
                        f"port {port} is in worker {slot}'s ports {self.band(slot).start}–"
                        f"{self.band(slot).stop - 1}: choose another worker base port "
                        "or router port"
                    )


def owned_flag(arg: str) -> str | None:
    """The launcher-owned flag `arg` sets (exact, `--flag=value` or abbreviation), if any."""
    if not arg.startswith("--"):
        return None
    name = arg.split("=", 1)[0]
    if name in OWNED_FLAGS:
        return name
    if len(name) - 2 >= MIN_ABBREVIATION:
        for flag in OWNED_FLAGS:
            if flag.startswith(name):
                return flag
    return None


def check_worker_args(worker_args: Sequence[str]) -> None:
    """ValueError naming the first flag after `--` that the launcher sets itself."""
    for arg in worker_args:
        flag = owned_flag(arg)
        if flag is not None:
            given = arg.split("=", 1)[0]
            alias = "" if given == flag else f" (= {flag})"
            raise ValueError(f"{given}{alias} cannot be passed to the workers: {OWNED_FLAGS[flag]}")


def api_key_from_args(argv: Sequence[str]) -> str | None:
    """The value of `--api-key` in a worker's argv (health checks must send it), if any."""
    return flag_value(argv, "--api-key")


def kv_events_config(port: int) -> str:
    """The `--kv-events-config` of the worker whose HTTP port is `port` (see the module
    docstring): SGLang binds a `*` endpoint (any other host would make it connect instead)."""
    publish, replay = port + KV_EVENTS_PORT_OFFSET, port + KV_EVENTS_PORT_OFFSET + 1
    return (
        f'{{"publisher": "zmq", "endpoint": "tcp://*:{publish}", '
        f'"replay_endpoint": "tcp://*:{replay}", "topic": "{KV_EVENTS_TOPIC}"}}'
    )


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of `flag` in an argv (`--flag value` or `--flag=value`), if given."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def worker_env(
    environ: Mapping[str, str], gpus: tuple[int, ...], simulated: bool
) -> Mapping[str, str]:
    """The child's environment: the launcher's, plus its GPUs and unbuffered output."""
    env = dict(environ)
    env["PYTHONUNBUFFERED"] = "1"
    if not simulated:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return MappingProxyType(env)


@dataclass(frozen=True)
class WorkerTemplate:
    """What every worker of a launch shares (see the module docstring)."""

    model_path: str
    tp: int
    worker_args: tuple[str, ...]
    simulate: bool
    python: str
    environ: Mapping[str, str]  # the launcher's: each child's environment starts from it
    host: str = WORKER_HOST
    kv_events: bool = False  # publish KV events (the installed SGLang has --kv-events-config)


def plan_worker(
    template: WorkerTemplate,
    index: int,
    gpus: tuple[int, ...],
    port: int,
    nccl_port: int | None,
    log_path: Path,
) -> WorkerSpec:
    """Worker `index` on its GPUs and ports: its argv and environment."""
    return WorkerSpec(
        index=index,
        gpus=gpus,
        port=port,
        nccl_port=nccl_port,
        argv=_worker_argv(template, port, nccl_port),
        env=worker_env(template.environ, gpus, template.simulate),
        log_path=log_path,
        simulated=template.simulate,
        host=template.host,
    )


def _worker_argv(template: WorkerTemplate, port: int, nccl_port: int | None) -> tuple[str, ...]:
    module = SIM_MODULE if template.simulate else REAL_MODULE
    argv = [template.python, "-m", module, "--model-path", template.model_path]
    argv += ["--host", template.host, "--port", str(port), "--tp-size", str(template.tp)]
    if nccl_port is not None:
        argv += ["--nccl-port", str(nccl_port)]
    if template.kv_events:
        argv += [KV_EVENTS_FLAG, kv_events_config(port)]
        if flag_value(template.worker_args, PAGE_SIZE_FLAG) is None:
            argv += [PAGE_SIZE_FLAG, str(KV_EVENTS_PAGE_SIZE)]
    return (*argv, *template.worker_args)


def plan_workers(
    template: WorkerTemplate,
    *,
    dp: int,
    gpus: list[tuple[int, ...]] | None,
    base_port: int,
    log_dir: Path,
    accepts_nccl_port: bool,
    reserved_ports: Collection[int] = (),
) -> list[WorkerSpec]:
    """One WorkerSpec per worker; ValueError on an impossible plan (message says why)."""
    if dp < 1 or template.tp < 1:
        raise ValueError(f"dp and tp must be at least 1 (got dp={dp}, tp={template.tp})")
    check_worker_args(template.worker_args)
    assigned = _worker_gpus(gpus, dp, template.tp, template.simulate)
    layout = PortLayout(base_port, accepts_nccl_port)
    layout.check(dp, reserved_ports)
    return [
        plan_worker(
            template, i, assigned[i], layout.http_port(i), layout.nccl_port(i),
            log_dir / f"worker-{i}.log",
        )
        for i in range(dp)
    ]  # fmt: skip


def _worker_gpus(
    gpus: list[tuple[int, ...]] | None, dp: int, tp: int, simulate: bool
) -> list[tuple[int, ...]]:
    if gpus is None:
        if not simulate:
            raise ValueError("real workers need GPUs (gpus=None is only for simulate)")
        return [tuple(range(i * tp, (i + 1) * tp)) for i in range(dp)]
    if len(gpus) != dp or any(len(ids) != tp for ids in gpus):
        raise ValueError(f"expected {dp} groups of {tp} GPUs, got {gpus}")
    return [tuple(ids) for ids in gpus]


def with_ports(spec: WorkerSpec, port: int, nccl_port: int | None) -> WorkerSpec:
    """The same worker on other ports (its argv's --port and --nccl-port rewritten)."""
    argv = list(spec.argv)
    _set_flag_value(argv, "--port", str(port))
    if KV_EVENTS_FLAG in argv:
        _set_flag_value(argv, KV_EVENTS_FLAG, kv_events_config(port))
    if spec.nccl_port is not None and nccl_port is not None:
        _set_flag_value(argv, "--nccl-port", str(nccl_port))
    else:
        nccl_port = None  # the worker's sglang does not take one
    return dataclasses.replace(spec, port=port, nccl_port=nccl_port, argv=tuple(argv))


def _set_flag_value(argv: list[str], flag: str, value: str) -> None:
    # The launcher wrote its own flags once, before the user's, so the first match is ours.
    position = argv.index(flag)
    argv[position + 1] = value


def spare_ports(specs: Sequence[WorkerSpec]) -> Iterator[tuple[int, int | None]]:
    """(HTTP port, nccl port) of the bands after every worker's, lowest first."""
    if not specs:
        return
    layout = PortLayout(max(s.port for s in specs), specs[0].nccl_port is not None)
    slot = 1
    while layout.band(slot).stop - 1 <= MAX_PORT:
        yield layout.http_port(slot), layout.nccl_port(slot)
        slot += 1
