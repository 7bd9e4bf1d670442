"""How a run ends when it is stopped: Ctrl-C, SIGTERM, scancel, or a Slurm requeue.

Whatever stops it, the record says `interrupted` (never `running`) and keeps what finished.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable


class Interrupted(BaseException):
    """SIGTERM, raised like KeyboardInterrupt: a local launcher must not take it for one
    failed job and go on with the rest of the sweep."""


class JobInterrupted(Exception):
    """SIGTERM inside a submitit job (scancel): an ordinary exception, so that submitit
    writes the job's failure and the waiting launcher returns instead of hanging."""


def is_interrupt(error: BaseException) -> bool:
    return isinstance(error, KeyboardInterrupt | Interrupted | JobInterrupted)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_marks(mark_requeued: Callable[[int], None]):
    """SIGTERM ends the run as `interrupted` (the exception reaches submitit, which reports it).
    Inside a submitit job, a SIGTERM that follows its requeue signal (USR2 before the time
    limit) is part of the requeue: `mark_requeued(signum)`, then hand the signal to submitit."""
    if not _main_thread():  # signal handlers can only be set from the main thread
        yield
        return
    requeue_signal = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").removeprefix("SIG"))
    previous_term, previous_requeue = signal.getsignal(signal.SIGTERM), signal.getsignal(requeue_signal)
    requeueing = False

    def on_requeue(signum, frame):
        nonlocal requeueing
        requeueing = True
        previous_requeue(signum, frame)

    def on_term(signum, frame):
        if not (requeueing and callable(previous_term)):
            raise (JobInterrupted if os.environ.get("SUBMITIT_EXECUTOR") else Interrupted)(f"signal {signum}")
        mark_requeued(signum)
        previous_term(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
    if callable(previous_requeue):
        signal.signal(requeue_signal, on_requeue)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(requeue_signal, previous_requeue)
