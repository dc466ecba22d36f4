"""ResumableSampler: off, the order of `DistributedSampler` (what every run so far used); grouped by length, a
deterministic, resumable order whose ranks cover the data once with as many batches each, padding less."""

import random

import pytest
from torch.utils.data import DataLoader, DistributedSampler

from recipes.datamodules.collate import pad_prompt_response
from recipes.datamodules.sampler import ResumableSampler, padding_fraction


def _distributed(n, world, rank, seed, epoch):
    """The order the project's sampler produced before grouping existed: a plain `DistributedSampler`."""
    s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    s.set_epoch(epoch)
    return list(s)


def _grouped(n, lengths, world, rank, seed=0, epoch=0, batch_size=2, group_batches=3):
    s = ResumableSampler(range(n), num_replicas=world, rank=rank, seed=seed, lengths=lengths, batch_size=batch_size,
                         group_batches=group_batches)
    s.set_epoch(epoch)
    return list(s)


def _long_tailed(n, seed=0):
    """Mostly short lengths, a few very long ones (a Pareto tail)."""
    rng = random.Random(seed)
    return [min(400, int(4 * rng.paretovariate(1.2))) for _ in range(n)]


@pytest.mark.parametrize("n", [1, 7, 10, 33])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_off_is_the_distributed_sampler_order_exactly(n, world):
    for seed in (0, 3, 1234):
        for epoch in (0, 1, 5):
            for rank in range(world):
                s = ResumableSampler(list(range(n)), num_replicas=world, rank=rank, seed=seed)
                s.set_epoch(epoch)
                assert list(s) == _distributed(n, world, rank, seed, epoch)
                assert s.order() == _distributed(n, world, rank, seed, epoch)


@pytest.mark.parametrize("n,world", [(40, 1), (40, 2), (41, 2), (50, 3), (7, 4)])
def test_grouped_ranks_cover_the_data_once_with_as_many_samples_as_before(n, world):
    """Together the ranks see exactly the samples `DistributedSampler` gives them (its padding repeats included),
    each rank as many as before."""
    lengths = _long_tailed(n)
    for epoch in (0, 1):
        grouped = [_grouped(n, lengths, world, r, epoch=epoch) for r in range(world)]
        before = [_distributed(n, world, r, 0, epoch) for r in range(world)]
        seen = sorted(i for order in grouped for i in order)
        assert seen == sorted(i for order in before for i in order)
        assert [len(g) for g in grouped] == [len(b) for b in before]
        if n % world == 0:
            assert seen == list(range(n))


def test_grouped_is_deterministic_and_differs_across_epochs_and_seeds():
    lengths = _long_tailed(60)
    assert _grouped(60, lengths, 2, 1, seed=4, epoch=2) == _grouped(60, lengths, 2, 1, seed=4, epoch=2)
    assert _grouped(60, lengths, 2, 1, seed=4, epoch=2) != _grouped(60, lengths, 2, 1, seed=4, epoch=3)
    assert _grouped(60, lengths, 2, 1, seed=4, epoch=2) != _grouped(60, lengths, 2, 1, seed=5, epoch=2)


def test_each_step_of_all_ranks_is_one_run_of_sorted_lengths():
    """16 samples of lengths 0..15, batch 2 x 2 ranks, one megabatch holding all: sorted descending, the global
    batches are {15, 14, 13, 12}, {11, 10, 9, 8}, {7..4}, {3..0} in a shuffled order; rank 0 takes the 1st and 3rd of
    each, rank 1 the 2nd and 4th."""
    lengths = list(range(16))
    r0, r1 = (_grouped(16, lengths, 2, r, seed=9, batch_size=2, group_batches=4) for r in (0, 1))
    steps = [sorted(r0[i:i + 2] + r1[i:i + 2]) for i in range(0, 8, 2)]
    assert sorted(steps) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    for i in range(0, 8, 2):
        assert r0[i] > r1[i] > r0[i + 1] > r1[i + 1]
    assert steps != sorted(steps, reverse=True)  # the batch order is shuffled (seed 9), not longest first


def test_a_partial_last_batch_stays_last_and_random():
    """11 samples, batch 4: the last 3 of the permutation form the last batch, so a drop_last loader drops a random
    3, not the shortest ones."""
    lengths = list(range(11))
    for epoch in range(4):
        order = _grouped(11, lengths, 1, 0, seed=0, epoch=epoch, batch_size=4, group_batches=50)
        perm = _distributed(11, 1, 0, 0, epoch)
        assert sorted(order[8:]) == sorted(perm[8:])
        assert sorted(order[:8]) == sorted(perm[:8])


def test_grouped_batches_pad_less_measured_on_the_collated_batches():
    """On long-tailed lengths, the attention masks of the collated grouped batches hold far fewer padding cells."""
    lengths = _long_tailed(400)
    examples = [{"prompt_ids": [1] * (1 + n // 3), "response_ids": [2] * (1 + n - n // 3)} for n in lengths]
    sizes = [len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples]

    def measured(grouped):
        s = ResumableSampler(examples, seed=1, lengths=sizes if grouped else None, batch_size=8)
        s.set_epoch(1)
        masks = [b["attention_mask"] for b in DataLoader(examples, batch_size=8, sampler=s,
                                                           collate_fn=lambda b: pad_prompt_response(b, 0))]
        return 1 - sum(m.sum().item() for m in masks) / sum(m.numel() for m in masks)

    plain, grouped = measured(False), measured(True)
    assert plain > 0.7 and grouped < plain / 3, (plain, grouped)  # measured: 0.74 and 0.20


def test_skip_after_k_batches_gives_exactly_the_rest_then_the_whole_next_epoch():
    lengths = _long_tailed(45)
    for world, rank in ((1, 0), (2, 1), (3, 2)):
        s = ResumableSampler(range(45), num_replicas=world, rank=rank, seed=2, lengths=lengths, batch_size=4)
        s.set_epoch(3)
        full = list(s)
        for k in (0, 1, 3):
            s.skip(4 * k)
            assert list(s) == full[4 * k:]
        assert list(s) == full and len(s) == len(full)  # the skip applies to one iteration; len is the whole shard
        s.set_epoch(4)
        assert list(s) != full


def test_on_epoch_sees_the_epoch_and_the_full_order_also_when_skipping():
    seen = []
    s = ResumableSampler(range(10), seed=0, lengths=list(range(10)), batch_size=2,
                         on_epoch=lambda epoch, order: seen.append((epoch, order)))
    s.set_epoch(2)
    s.skip(4)
    rest = list(s)
    assert seen == [(2, seen[0][1])] and len(seen[0][1]) == 10 and rest == seen[0][1][4:]


def test_padding_fraction_hand_computed():
    """Batches [0, 1] and [2] with (tokens, cells) (3 + 1, 2 x 3) and (2, 1 x 2): 1 - 6 / 8 = 0.25."""
    widths = [3, 1, 2]
    cells = lambda batch: (sum(widths[i] for i in batch), len(batch) * max(widths[i] for i in batch))
    assert padding_fraction([[0, 1], [2]], cells) == pytest.approx(0.25)
    assert padding_fraction([], cells) == 0.0


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="3 lengths for 4 samples"):
        ResumableSampler(range(4), lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="batch_size .0."):
        ResumableSampler(range(4), lengths=[1, 2, 3, 4], batch_size=0)
