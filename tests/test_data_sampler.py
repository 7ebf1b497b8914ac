"""EpochSampler: orders depend only on (seed, epoch); resume yields exactly the rest; ranks partition the epoch."""

from __future__ import annotations

import pytest
import torch

from mmfm.data import EpochSampler, split_indices


def epoch(sampler: EpochSampler, number: int) -> list[tuple[int, int]]:
    sampler.set_epoch(number)
    return list(sampler)


def test_same_seed_same_order_other_seed_or_epoch_differs():
    a, b = EpochSampler(100, seed=3), EpochSampler(100, seed=3)
    torch.manual_seed(0)
    first = epoch(a, 0)
    torch.manual_seed(1)  # the global RNG plays no part
    assert epoch(b, 0) == first
    assert sorted(i for i, _ in first) == list(range(100))
    assert [i for i, _ in first] != list(range(100))
    assert epoch(EpochSampler(100, seed=4), 0) != first
    orders = [[i for i, _ in epoch(a, e)] for e in range(4)]
    assert len({tuple(o) for o in orders}) == 4
    assert epoch(a, 0) == first  # going back to an epoch replays it


def test_draws_vary_per_sample_and_no_shuffle_keeps_order():
    sampler = EpochSampler(50, seed=0, shuffle=False)
    keys = epoch(sampler, 2)
    assert [i for i, _ in keys] == list(range(50))
    assert len({d for _, d in keys}) > 40
    assert [d for _, d in keys] != [d for _, d in epoch(sampler, 3)]


def test_set_start_resumes_exactly_the_tail_of_the_same_epoch_only():
    sampler = EpochSampler(37, seed=1)
    full = epoch(sampler, 5)
    sampler.set_epoch(5)
    sampler.set_start(10)
    assert len(sampler) == 27
    assert list(sampler) == full[10:]
    sampler.set_epoch(6)  # the next epoch starts from its beginning
    assert len(sampler) == 37
    assert list(sampler) == epoch(EpochSampler(37, seed=1), 6)
    with pytest.raises(ValueError):
        sampler.set_start(38)


@pytest.mark.parametrize("num_items", [40, 43])
def test_two_ranks_get_disjoint_equal_shares_that_cover_the_epoch(num_items):
    ranks = [EpochSampler(num_items, seed=7, rank=r, world_size=2) for r in range(2)]
    for e in range(3):
        shares = [epoch(s, e) for s in ranks]
        indices = [[i for i, _ in share] for share in shares]
        assert len(indices[0]) == len(indices[1]) == num_items // 2 == len(ranks[0])
        assert not set(indices[0]) & set(indices[1])
        single = epoch(EpochSampler(num_items, seed=7), e)
        # together the ranks interleave the single-process order, truncated to a multiple of 2, draws included
        merged = [key for pair in zip(*shares) for key in pair]
        assert merged == single[: 2 * (num_items // 2)]
    resumed = ranks[1]
    resumed.set_epoch(2)
    resumed.set_start(5)
    assert list(resumed) == shares[1][5:]


def test_split_indices_is_deterministic_disjoint_and_covering():
    train, val = split_indices(101, 0.2, seed=0)
    assert len(val) == 20 and len(train) == 81
    assert sorted(train + val) == list(range(101))
    assert split_indices(101, 0.2, seed=0) == (train, val)
    assert split_indices(101, 0.2, seed=1) != (train, val)
    assert split_indices(10, 0.0) == (list(range(10)), [])
    with pytest.raises(ValueError):
        split_indices(10, 1.0)
