"""Where a run's time goes, stage by stage: the result JSON carries it and the server logs it, so a
radiologist's "why is this slow" has an answer without a profiler."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


class Stages:
    """A stopwatch with named laps, each logged as it ends (a server's log shows a long run move
    on); a stage met again adds up (one per label, say). ``log`` False: a stopwatch for many short
    laps (a batch each) whose sums another one logs (:meth:`absorb`)."""

    def __init__(self, name: str = "", log: bool = True) -> None:
        self.name = name
        self.log = log
        self.started = self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, stage: str) -> float:
        """Charge the time since the previous lap to ``stage``; returns that time."""
        now = time.perf_counter()
        spent, self._last = now - self._last, now
        self.seconds[stage] = self.seconds.get(stage, 0.0) + spent
        if self.log:
            self._log(stage, spent)
        return spent

    def absorb(self, stages: dict[str, float], log: bool = False) -> None:
        """The time since the previous lap went to a run that timed its own ``stages``: those stand
        for it (``log``: and are logged here, where that run did not)."""
        self._last = time.perf_counter()
        for stage, spent in stages.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + spent
            if log:
                self._log(stage, spent)

    def _log(self, stage: str, spent: float) -> None:
        logger.info("%s%s: %.3f s", f"{self.name} " if self.name else "", stage, spent)

    @property
    def total(self) -> float:
        return self._last - self.started
