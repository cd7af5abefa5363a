"""CPU and memory of a worker's whole process tree, as the dashboard shows them (shell: psutil).

`TreeUsage.sample(pids_path, pid, now)` refreshes `cpu_percent` (100 = one core, since the last
sample: 0.0 the first time) and `rss_bytes` of the processes the worker's shim records in
`pids_path` (launcher/shim.py; no scan of /proc here). The record is re-read every
TREE_RESCAN_S (5 s); until the shim has written one, the shim alone (`pid`) is sampled and the
record is looked for again at the next sample. psutil.Process objects are kept from one sample to
the next, since they hold the CPU times the percentage is measured from. Memory is the sum of RSS,
so pages shared between a worker's processes count more than once. The caller decides how often
to sample (the supervisor: at most once a second) and calls `forget_tree()` when a new run starts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from sglang_dp.launcher.process import read_record

TREE_RESCAN_S = 5.0


@dataclass
class TreeUsage:
    """The last sample of one worker's tree, and the processes it was taken from."""

    cpu_percent: float = 0.0
    rss_bytes: int = 0
    tree: dict[int, psutil.Process] = field(default_factory=dict)
    tree_read_at: float = float("-inf")

    def forget_tree(self) -> None:
        """A new run: its tree is read afresh at the next sample."""
        self.tree, self.tree_read_at = {}, float("-inf")

    def sample(self, pids_path: Path, pid: int, now: float) -> None:
        """Refresh the figures from the tree `pids_path` records (the shim `pid` until then)."""
        if now - self.tree_read_at >= TREE_RESCAN_S:
            self.tree = _read_tree(pids_path, self.tree)
            if self.tree:
                self.tree_read_at = now
            else:  # no record yet (its shim has just started): the shim alone, and look again soon
                self.tree = _read_tree_of(pid)
        cpu, rss = 0.0, 0
        for member, proc in list(self.tree.items()):
            try:
                with proc.oneshot():
                    cpu += proc.cpu_percent(None)  # since the last call: 0.0 the first time
                    rss += proc.memory_info().rss
            except psutil.Error:
                del self.tree[member]
        self.cpu_percent, self.rss_bytes = cpu, rss


def _read_tree_of(pid: int) -> dict[int, psutil.Process]:
    try:
        return {pid: psutil.Process(pid)}
    except psutil.Error:
        return {}


def _read_tree(pids_path: Path, known: dict[int, psutil.Process]) -> dict[int, psutil.Process]:
    """The processes the shim recorded, reusing known Process objects (they hold cpu times)."""
    tree: dict[int, psutil.Process] = {}
    for pid, _ in read_record(pids_path).get("processes", []):
        with contextlib.suppress(psutil.Error):
            tree[pid] = known.get(pid) or psutil.Process(pid)
    return tree
