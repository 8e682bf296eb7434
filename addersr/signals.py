"""SIGINT and SIGTERM (Ctrl-C, ``kill``, ``timeout``, batch schedulers, machine leases).

Two ways to stop, both losing nothing already done:

- :func:`interruptible`: SIGTERM raises :class:`KeyboardInterrupt` like Ctrl-C, so one
  ``except KeyboardInterrupt`` writes what was finished (bench, upscale); :func:`received`
  says which signal came.
- :class:`StopRequest`: the first signal only sets a flag, which the training loop reads
  after each step (it then checkpoints and exits); a second one raises KeyboardInterrupt.

The exit status after a signal is ``128 + signal number`` (130 for SIGINT, 143 for
SIGTERM), as the shell reports a process the signal ended.
"""

import contextlib
import signal
import sys

__all__ = ["StopRequest", "exit_status", "ignore_in_worker", "interruptible", "name", "received"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_last = [signal.SIGINT]  # the signal that raised the last KeyboardInterrupt


def name(signum):
    """``"SIGTERM"``, ``"SIGINT"``, ..."""
    return signal.Signals(signum).name


def exit_status(signum):
    """The exit status of a process stopped by ``signum``: ``128 + signum``."""
    return 128 + int(signum)


def received():
    """The signal behind the last KeyboardInterrupt (SIGINT unless SIGTERM raised it)."""
    return _last[0]


def _raise(signum, frame):
    _last[0] = signum
    raise KeyboardInterrupt(name(signum))


@contextlib.contextmanager
def _handlers(handler):
    """Install ``handler`` for SIGINT and SIGTERM (main thread only), restore on exit."""
    try:
        previous = {s: signal.signal(s, handler) for s in SIGNALS}
    except ValueError:  # not the main thread: signals stay as they are
        previous = {}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextlib.contextmanager
def interruptible():
    """Within the block SIGTERM raises KeyboardInterrupt as SIGINT does."""
    _last[0] = signal.SIGINT
    with _handlers(_raise):
        yield


class StopRequest:
    """A context manager: within it the first SIGINT/SIGTERM sets :attr:`signum` (and says
    so on stderr); a second raises KeyboardInterrupt (stop at once), unless :meth:`hold`
    was called (the work is saved and the process is ending: signals are then ignored)."""

    def __init__(self, what="stopping after this step"):
        self.signum, self.what, self.held = None, what, False

    def hold(self):
        """From now on signals are ignored."""
        self.held = True

    def _handle(self, signum, frame):
        if self.held:
            return
        if self.signum is not None:
            _raise(signum, frame)
        self.signum = signum
        print(f"\n{name(signum)} received: {self.what}; send it again to stop at once",
              file=sys.stderr, flush=True)

    def __enter__(self):
        self._context = _handlers(self._handle)
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def ignore_in_worker(_worker_id=None):
    """DataLoader ``worker_init_fn``: workers ignore SIGINT (Ctrl-C reaches the whole process
    group; the main process decides when to stop and ends its workers itself)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
