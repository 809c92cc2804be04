"""SIGTERM / SIGINT during training: finish the current logical step, checkpoint, then stop.

A second signal while the first is being handled stops at once (the default behaviour), so an
impatient Ctrl-C twice still works.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):  # noqa: N818 (a stop on request, not a failure of the run)
    """Training stopped on request after ``step``; the state of that step is checkpointed."""

    def __init__(self, signum: int | None, step: int, total_steps: int, run_dir: str):
        name = signal.Signals(signum).name if signum else "a stop request"
        super().__init__(
            f"stopped by {name} after logical step {step} of {total_steps}; checkpoint in {run_dir}"
        )
        self.signum = signum
        self.step = step
        self.total_steps = total_steps
        self.run_dir = run_dir

    @property
    def exit_status(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)


class StopSignals:
    """Context manager: while active, SIGTERM and SIGINT only set ``requested`` (main thread only)."""

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.requested = signum
        log.warning(
            "received %s: finishing the current logical step, then checkpointing and stopping "
            "(send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
