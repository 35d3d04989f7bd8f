"""Preemption: SIGTERM / SIGINT become a clean stop after the current step, with a checkpoint, on every process."""

import logging
import signal
import threading

import jax
import numpy as np


class Preemption:
    """SIGTERM/SIGINT (a preemption, or Ctrl-C) only set a flag: the loop finishes the step it is in, saves a
    checkpoint at that step, waits for it and returns. A second signal acts as it normally would. `received` names
    the signal (on several processes, one that reached another process: 'SIGTERM to process 1')."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received, self._signum, self._previous = None, 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python only installs handlers there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.received, self._signum = signal.Signals(signum).name, int(signum)
        logging.warning("received %s: stopping after this step with a checkpoint", self.received)
        self.__exit__()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def requested(self) -> bool:
        """Whether to stop after this step. Every process writes its shards of the same checkpoint, so all must
        stop at the same step: on several hosts the signal numbers are combined each step (one small all-gather),
        and a signal to any process (preemption notices can reach hosts at different times) stops them all."""
        if jax.process_count() == 1:
            return self.received is not None
        from jax.experimental import multihost_utils

        signums = np.asarray(multihost_utils.process_allgather(np.int32(self._signum)))
        if signums.any() and self.received is None:  # the signal went to other processes only
            first = int(np.flatnonzero(signums)[0])
            self.received = f"{signal.Signals(int(signums[first])).name} to process {first}"
        return bool(signums.any())
