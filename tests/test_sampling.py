"""DDP-safe samplers: disjoint shards of one draw per epoch, target class frequencies on every rank."""

import torch

from dogclf.data.sampling import EpochSampler, ShardSampler, class_sampling_weights

COUNTS = [1077, 126, 10, 5]  # the shared photos' class sizes
LABELS = [c for c, n in enumerate(COUNTS) for _ in range(n)]


def shards(weights: torch.Tensor, world_size: int, epoch: int, seed: int = 0) -> list[list[int]]:
    samplers = [EpochSampler(weights, seed=seed, rank=r, world_size=world_size) for r in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


def test_class_sampling_weights_hand_values() -> None:
    weights = class_sampling_weights([0, 1, 1, 2], [4, 16, 1], power=0.5)
    assert weights.tolist() == [0.5, 0.25, 0.25, 1.0]
    assert class_sampling_weights([0, 1], [4, 16], power=0.0).tolist() == [1.0, 1.0]


def test_uniform_epoch_is_a_permutation_split_between_ranks() -> None:
    weights = torch.ones(10)
    parts = shards(weights, world_size=3, epoch=0)
    assert [len(p) for p in parts] == [4, 4, 4]  # 10 padded to 12: every rank runs the same number of steps
    merged = sum(parts, [])
    assert sorted(set(merged)) == list(range(10)) and len(merged) - len(set(merged)) == 2
    whole = EpochSampler(weights, seed=0)
    assert sorted(whole) == list(range(10))  # one rank: exactly one pass over the data


def test_ranks_see_disjoint_shards_of_the_same_draw() -> None:
    weights = class_sampling_weights(LABELS, COUNTS, power=1.0)
    parts = shards(weights, world_size=2, epoch=3)
    draw = EpochSampler(weights, seed=0, world_size=2)
    draw.set_epoch(3)
    everything = draw.epoch_indices().tolist()
    assert parts[0] == everything[0::2] and parts[1] == everything[1::2]
    assert parts[0] != parts[1]


def test_epochs_differ_and_replay_identically() -> None:
    weights = torch.ones(50)
    assert shards(weights, 2, epoch=0) != shards(weights, 2, epoch=1)
    assert shards(weights, 2, epoch=1) == shards(weights, 2, epoch=1)  # a resumed run redraws the same epoch
    assert shards(weights, 2, epoch=1, seed=1) != shards(weights, 2, epoch=1, seed=0)


def test_resume_serves_the_rest_of_an_interrupted_epoch_then_whole_epochs() -> None:
    weights = class_sampling_weights(LABELS, COUNTS, power=1.0)
    sampler = EpochSampler(weights, seed=0, rank=1, world_size=2)
    sampler.resume(3, 10)  # a run stopped after 10 of this rank's samples of epoch 3
    assert list(sampler) == shards(weights, 2, epoch=3)[1][10:]
    assert len(sampler) == len(shards(weights, 2, epoch=3)[1])  # the epoch still counts all its batches
    sampler.set_epoch(4)
    assert list(sampler) == shards(weights, 2, epoch=4)[1]


def test_every_rank_sees_the_target_class_frequencies() -> None:
    labels = torch.tensor(LABELS)
    counts = torch.tensor(COUNTS, dtype=torch.double)
    for power, target in ((0.5, counts.sqrt()), (1.0, torch.ones(4, dtype=torch.double))):
        weights = class_sampling_weights(LABELS, COUNTS, power)
        target = target / target.sum()
        for rank in range(4):
            seen = torch.cat([labels[shards(weights, 4, epoch)[rank]] for epoch in range(40)])
            observed = torch.bincount(seen, minlength=4).double() / len(seen)
            assert torch.allclose(observed, target, atol=0.02), (power, rank, observed, target)


def test_shard_sampler_covers_evaluation_once() -> None:
    parts = [list(ShardSampler(7, rank=r, world_size=3)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(ShardSampler(7, rank=r, world_size=3)) for r in range(3)] == [3, 2, 2]
