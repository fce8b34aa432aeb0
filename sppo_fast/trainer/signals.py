"""Clean stops: SIGINT (Ctrl-C) and SIGTERM ask the run to stop at the next safe point (after the current RL
step, which is then checkpointed, or after the current warm-start step, whose progress is kept in the
cache); a second signal stops at once. The run then raises `RunInterrupted`, whose message says how to
resume."""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """A run stopped by SIGINT/SIGTERM after saving what it could; the message is the resume command."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)  # the shell's convention for "killed by signal N"


class StopRequest:
    """Installs the handlers while active (only in the main thread, where Python delivers signals, and not
    over a signal the process was told to ignore); `signum` is the first signal received, or None."""

    def __init__(self, log=None):
        self.signum = None
        self.log = log or (lambda message: None)
        self._previous = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second one: stop now, saving nothing more
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        self.log(f"received {signal.Signals(signum).name}: stopping after the current step and saving "
                 "(send it again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                if signal.getsignal(sig) is signal.SIG_IGN:  # e.g. SIGINT of a `nohup` or `&` job: stays ignored
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc):
        self.restore()
        return False
