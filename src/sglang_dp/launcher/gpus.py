"""Which GPUs the launcher may use, and which of them each worker gets.

Pure functions, plus `run_nvidia_smi` (the one that runs a command).

Where the GPUs come from (`detect_gpus`), first match wins:
  1. `--gpus` — "0,1,3", "0-3", "0-3,6" (ranges inclusive, order kept, duplicates rejected);
  2. `CUDA_VISIBLE_DEVICES`, when set — integer ids as CUDA reads them: "" or a leading negative
     id means no GPU, and CUDA ignores everything after the first negative id;
     GPU UUIDs are rejected with a hint to use `--gpus` (workers are pinned by index);
  3. `nvidia-smi --query-gpu=index --format=csv,noheader` — no nvidia-smi, or a failing one,
     means no GPU.
The result is `()` when no GPU is found; the caller turns that into an error message.

Assignment (`assign_gpus`): worker i takes the tp GPUs `available[i*tp : (i+1)*tp]`, i.e. tp
consecutive entries of the list in the order given (users list GPUs that share an NVLink
island together). GPUs beyond dp × tp are left unused.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping

NVIDIA_SMI_ARGV = ("nvidia-smi", "--query-gpu=index", "--format=csv,noheader")
NVIDIA_SMI_TIMEOUT_S = 20.0  # nvidia-smi can take seconds while the driver wakes up


def parse_gpu_list(text: str) -> tuple[int, ...]:
    """GPU ids from "0,1,3", "0-3" or "0-3,6"; ValueError on anything else or on duplicates."""
    if not text.strip():
        raise ValueError(f"no GPU ids in {text!r}: expected a list like 0,1,3 or 0-3")
    ids: list[int] = []
    for part in text.split(","):
        ids.extend(_parse_gpu_item(part.strip(), text))
    _reject_duplicates(ids, text)
    return tuple(ids)


def _parse_gpu_item(item: str, text: str) -> range:
    first, dash, last = item.partition("-")
    if not first.isdigit() or (dash and not last.isdigit()):
        raise ValueError(f"bad GPU list {text!r}: {item!r} is not a GPU id or a range like 0-3")
    low, high = int(first), int(last) if dash else int(first)
    if high < low:
        raise ValueError(f"bad GPU list {text!r}: range {item!r} runs backwards")
    return range(low, high + 1)


def _reject_duplicates(ids: list[int], text: str) -> None:
    seen: set[int] = set()
    for gpu in ids:
        if gpu in seen:
            raise ValueError(f"bad GPU list {text!r}: GPU {gpu} is listed twice")
        seen.add(gpu)


def gpus_from_cuda_visible_devices(text: str) -> tuple[int, ...]:
    """GPU ids from a `CUDA_VISIBLE_DEVICES` value, read the way CUDA reads it."""
    ids: list[int] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        try:
            gpu = int(item)
        except ValueError:
            raise ValueError(
                f"CUDA_VISIBLE_DEVICES={text!r}: {item!r} is not a GPU index (UUIDs are not "
                "supported); pass the GPU indexes with --gpus"
            ) from None
        if gpu < 0:
            break  # CUDA hides an invalid id and every id after it
        ids.append(gpu)
    _reject_duplicates(ids, f"CUDA_VISIBLE_DEVICES={text}")
    return tuple(ids)


def gpus_from_nvidia_smi_output(text: str) -> tuple[int, ...]:
    """GPU ids from `nvidia-smi --query-gpu=index --format=csv,noheader` output.

    Lines that are not an index (e.g. "No devices were found") are not GPUs.
    """
    ids = [int(line.strip()) for line in text.splitlines() if line.strip().isdigit()]
    _reject_duplicates(ids, "nvidia-smi output")
    return tuple(ids)


def run_nvidia_smi() -> str | None:
    """nvidia-smi's GPU index list, or None when it is missing, fails or hangs."""
    try:
        done = subprocess.run(
            NVIDIA_SMI_ARGV,
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def detect_gpus(
    explicit: str | None,
    environ: Mapping[str, str],
    run_nvidia_smi: Callable[[], str | None],
) -> tuple[int, ...]:
    """The GPUs to use: `--gpus`, else `CUDA_VISIBLE_DEVICES`, else nvidia-smi; () if none."""
    if explicit is not None:
        return parse_gpu_list(explicit)
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return gpus_from_cuda_visible_devices(visible)
    output = run_nvidia_smi()
    return () if output is None else gpus_from_nvidia_smi_output(output)


def format_gpu_list(gpus: tuple[int, ...]) -> str:
    """A short form for messages and the dashboard: (0, 1, 2, 3, 6) -> "0-3,6"; () -> "none"."""
    if not gpus:
        return "none"
    parts: list[str] = []
    start = prev = gpus[0]
    for gpu in (*gpus[1:], None):
        if gpu is not None and gpu == prev + 1:
            prev = gpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if gpu is not None:
            start = prev = gpu
    return ",".join(parts)


def assign_gpus(available: tuple[int, ...], dp: int, tp: int) -> list[tuple[int, ...]]:
    """Worker i gets `available[i*tp:(i+1)*tp]`; ValueError when there are not enough GPUs."""
    if dp < 1 or tp < 1:
        raise ValueError(f"dp and tp must be at least 1 (got dp={dp}, tp={tp})")
    needed = dp * tp
    if needed > len(available):
        raise ValueError(
            f"dp × tp = {needed} GPUs needed but only {len(available)} available "
            f"({format_gpu_list(available)})"
        )
    return [available[i * tp : (i + 1) * tp] for i in range(dp)]
