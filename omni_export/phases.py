"""Wall time and peak resident memory of each phase of a long job (the main job's steps), so a
4B export says which phase its memory goes to. The kernel's high-water mark is reset at every
phase boundary (Linux: /proc/self/clear_refs); elsewhere only the process's peak so far is known
and each phase reports that."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Phase:
    component: str
    step: str
    seconds: float
    peak_rss_bytes: int | None  # the highest resident set while this phase ran
    rss_end_bytes: int | None


class PhaseMeter:
    def __init__(self) -> None:
        self.phases: list[Phase] = []
        self._open: tuple[str, str, float] | None = None

    def mark(self, component: str, step: str) -> None:
        """Close the running phase and open ``(component, step)``."""
        self.close()
        _reset_peak()
        self._open = (component, step, time.perf_counter())

    def close(self) -> None:
        if self._open is not None:
            c, s, t0 = self._open
            p = Phase(c, s, round(time.perf_counter() - t0, 2), _status("VmHWM"), _status("VmRSS"))
            self.phases.append(p)
            # in the log as it happens: a job killed for memory still says how far it got
            log.info("phase %s", json.dumps(asdict(p)))
            self._open = None

    def to_list(self) -> list[dict]:
        return [asdict(p) for p in self.phases]
