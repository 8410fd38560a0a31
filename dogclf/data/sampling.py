"""Samplers that stay correct under DDP: one draw per epoch, the same on every rank, split between the ranks.

Lightning would otherwise wrap a custom sampler in its own distributed wrapper; the trainer is built with
`use_distributed_sampler=False` and these samplers do the sharding themselves.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

SAMPLER_POWERS = {"shuffle": 0.0, "sqrt": 0.5, "balanced": 1.0}


def class_sampling_weights(labels: Sequence[int], class_counts: Sequence[int], power: float) -> torch.Tensor:
    """Per-image weight `n_c ** -power`: 0 keeps the data's frequencies, 0.5 is square-root, 1 class-balanced."""
    counts = torch.tensor(class_counts, dtype=torch.double)
    return counts.pow(-power)[torch.as_tensor(labels, dtype=torch.long)]


class EpochSampler(Sampler[int]):
    """This rank's share of one epoch of training indices.

    Every epoch draws `len(weights)` indices rounded up to a multiple of `world_size` from a generator seeded by
    (seed, epoch) — identical on all ranks — and rank r takes positions r, r + W, r + 2W, ... so ranks see disjoint
    parts of one epoch and the same number of batches. Uniform weights give a permutation (every image once, a few
    repeated only to pad); otherwise images are drawn with replacement in proportion to their weight. A resumed
    run that calls `set_epoch` again replays exactly the epochs it has not trained yet; `resume` continues an epoch
    that was interrupted part-way.
    """

    def __init__(self, weights: torch.Tensor, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        self.weights = weights.double()
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.uniform = bool((self.weights == self.weights[0]).all())
        self.total = math.ceil(len(self.weights) / world_size) * world_size
        self.epoch = 0
        self.resume_point = (0, 0)  # (epoch, position in this rank's share) where an interrupted epoch continues

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, position: int) -> None:
        """Continue `epoch` at `position` of this rank's share: the indices not trained yet, in their original order
        (a run resumed from a mid-epoch checkpoint). Every other epoch is served whole; `len` stays the whole share."""
        self.epoch, self.resume_point = epoch, (epoch, position)

    def epoch_indices(self) -> torch.Tensor:
        """The whole epoch's draw, before it is split between ranks."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.weights)
        if self.uniform:
            order = torch.randperm(n, generator=generator)
            return torch.cat([order, order[: self.total - n]])  # pad by wrapping, as DistributedSampler does
        return torch.multinomial(self.weights, self.total, replacement=True, generator=generator)

    def __iter__(self) -> Iterator[int]:
        epoch, position = self.resume_point
        start = position if epoch == self.epoch else 0
        return iter(self.epoch_indices()[self.rank :: self.world_size][start:].tolist())

    def __len__(self) -> int:
        return self.total // self.world_size


class ShardSampler(Sampler[int]):
    """Evaluation: rank r takes items r, r + W, ... in order, nothing padded or repeated (metrics are exact)."""

    def __init__(self, length: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))
