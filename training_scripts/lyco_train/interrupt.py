"""Ctrl+C and SIGTERM during training: finish the current step, save it, then stop (a second Ctrl+C stops at once).

A scheduler that preempts a job (SLURM, Kubernetes, ``timeout``) sends SIGTERM and waits a while before killing it;
a user stops a run with Ctrl+C. Either way the steps since the last save would be lost, so the first signal only
asks the loop to stop after the step in progress, with that step saved.
"""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """While active (a context manager), the first SIGINT/SIGTERM sets ``signum`` instead of ending the process; a
    second SIGINT raises ``KeyboardInterrupt``. Outside the main thread (where Python cannot catch signals) it does
    nothing. The previous handlers are restored on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write: print() is not safe to re-enter if the signal arrived in the middle of a print
        os.write(
            2,
            f"\n{signal.Signals(signum).name}: stopping after this step, with it saved "
            "(Ctrl+C again stops at once, without saving)\n".encode(),
        )
