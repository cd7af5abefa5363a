"""Machine CPU utilisation over a bench run: the mean from psutil's cumulative CPU times before
and after (exact however short the run), the busiest moment from 0.5 s samples, and this
process's CPU seconds (the client's own cost)."""

from __future__ import annotations

import asyncio
from typing import Any

from sglang_dp.bench.report import CpuUsage

CPU_SAMPLE_S = 0.5


class CpuMeter:
    """Whole-machine CPU utilisation between `start` and `stop` (from cumulative CPU times, so
    exact however short the run), its busiest sample, and this process's CPU seconds."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._process = psutil.Process()
        self._start = psutil.cpu_times()
        self._client_start = self._client_seconds()
        self._samples: list[float] = []
        psutil.cpu_percent(None)  # the first call only sets the baseline for the samples
        self._sampler = asyncio.ensure_future(self._sample())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(CPU_SAMPLE_S)
            self._samples.append(self._psutil.cpu_percent(None))

    def _client_seconds(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> CpuUsage:
        self._sampler.cancel()
        end = self._psutil.cpu_times()
        total = sum(end) - sum(self._start)
        idle = _idle(end) - _idle(self._start)
        mean = 100.0 * (1 - idle / total) if total > 0 else None
        return CpuUsage(
            mean,
            max(self._samples) if self._samples else None,
            self._client_seconds() - self._client_start,
        )


def _idle(times: Any) -> float:
    return float(times.idle + getattr(times, "iowait", 0.0))
