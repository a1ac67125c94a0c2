"""The order in which samples are drawn: a pure function of (seed, micro-step, rank).

The stream of sample indices is the concatenation of one seeded permutation per epoch; micro-step
j of the whole job takes the next ``batch_size * world_size`` entries and rank r its slice. Since
nothing but the step is needed to know where the stream stands, resuming needs no sampler state,
and a dataset smaller than a global batch simply wraps into the next epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class StepBatches(Sampler[list[int]]):
    """Index lists for micro-steps ``start..stop-1`` of one rank."""

    def __init__(self, size: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, stop: int, offset: int = 0):  # fmt: skip
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.start, self.stop = rank, world_size, start, stop
        self.offset = offset  # added to every index (a second dataset concatenated after a first)
        self._cache: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return self._cache[epoch]

    def indices(self, micro_step: int) -> list[int]:
        first = (micro_step * self.world_size + self.rank) * self.batch_size
        out = []
        for position in range(first, first + self.batch_size):
            epoch, within = divmod(position, self.size)
            out.append(int(self._permutation(epoch)[within]) + self.offset)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for micro_step in range(self.start, self.stop):
            yield self.indices(micro_step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class JointBatches(Sampler[list[int]]):
    """Two step-batch streams side by side: each micro-batch is the first's indices then the second's."""

    def __init__(self, first: StepBatches, second: StepBatches):
        self.first, self.second = first, second

    def __iter__(self) -> Iterator[list[int]]:
        for a, b in zip(self.first, self.second):
            yield a + b

    def __len__(self) -> int:
        return min(len(self.first), len(self.second))
