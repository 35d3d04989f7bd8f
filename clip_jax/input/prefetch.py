"""Host->device prefetch: the next batches are already on the devices while the current step runs."""

import collections
import copy

from clip_jax import sharding


class DevicePrefetch:
    """Keeps `size` batches already placed on the devices ahead of the one being consumed, so the host->device
    copy of the next batches overlaps the current train step (JAX dispatches the copies asynchronously).

    Resumable like the iterator it wraps: get_state() is the wrapped iterator's state right after the batch
    last returned, not after the ones waiting on the devices, so a checkpoint resumes at the next unseen batch.
    """

    def __init__(self, iterator, size: int, mesh):
        if size < 0:
            raise ValueError(f"prefetch size must be >= 0, got {size}")
        self.iterator, self.size, self.mesh = iterator, size, mesh
        self._queue = collections.deque()  # (batch on devices, the wrapped iterator's state after it)
        self._state = iterator.get_state() if hasattr(iterator, "get_state") else None

    def _pull(self):
        batch = sharding.put_batch(next(self.iterator), self.mesh)
        # A copy: an iterator may hand out its live state object, which keeps changing as it advances.
        state = copy.deepcopy(self.iterator.get_state()) if hasattr(self.iterator, "get_state") else None
        self._queue.append((batch, state))

    def __iter__(self):
        return self

    def __next__(self):
        while len(self._queue) <= self.size:  # the one to return now, plus `size` in flight
            try:
                self._pull()
            except StopIteration:
                break
        if not self._queue:
            raise StopIteration
        batch, self._state = self._queue.popleft()
        return batch

    def get_state(self):
        return self._state

    def set_state(self, state):
        self._queue.clear()  # batches already on the devices belong to the old position
        self.iterator.set_state(state)
        self._state = state
