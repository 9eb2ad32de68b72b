"""How a driver is stopped: SIGTERM (docker stop, systemd, Kubernetes) takes Ctrl-C's path, a KeyboardInterrupt in
the main thread, and which of the two arrived gives the exit status of work that did not finish.

Standard library only: an entry point installs the handler before anything imports Ray, and `cluster.runtime`
installs it again after `ray.init`, which replaces it with one that aborts the driver and leaves Ray's agents behind.
"""

from __future__ import annotations

import signal
import threading

_sigterm = threading.Event()  # a SIGTERM arrived: the graceful stop is under way


def stop_on_sigterm() -> None:
    """Make SIGTERM stop this process the way Ctrl-C does (only the main thread may install handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)


def on_sigterm(signum: int = signal.SIGTERM, frame: object = None) -> None:
    """The SIGTERM handler: KeyboardInterrupt the first time; a repeat must not cut the cleanup short (SIGKILL
    still ends everything)."""
    if _sigterm.is_set():
        return
    _sigterm.set()
    raise KeyboardInterrupt(f"signal {signum}")


def stop_signal() -> signal.Signals:
    """The signal a KeyboardInterrupt stands for: SIGTERM if one arrived, else SIGINT (Ctrl-C)."""
    return signal.SIGTERM if _sigterm.is_set() else signal.SIGINT


def interrupted_exit_status() -> int:
    """128 + that signal (130 for Ctrl-C, 143 for SIGTERM): what a shell reports for a process the signal ended,
    so a preempted Kubernetes Job or a drained systemd unit is not recorded as a success."""
    return 128 + stop_signal()
