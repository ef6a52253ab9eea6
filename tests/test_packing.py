"""packing.py: first-fit-decreasing plans, the packed row and its unpacking, checked by hand and by brute force.
(That attention stays inside packed sequences is checked with the FSDP model in test_model_utils.py; that
packed training equals padded training, in test_train.py.)"""
import random

import pytest
import torch

import packing


def check_plan(bins, lengths, budget):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))                       # every sequence exactly once
    for b in bins:
        assert b and (sum(lengths[i] for i in b) <= budget or len(b) == 1)  # within budget, or alone


def test_plan_first_fit_decreasing_by_hand():
    lengths = [5, 9, 3, 7, 2, 12]
    bins = packing.plan(lengths, 10)
    # decreasing: 12 (over budget: alone), 9 (room 1: nothing fits), 7 (then 3 fills it), 5 (then 2 fits)
    assert bins == [[5], [1], [3, 2], [0, 4]]
    check_plan(bins, lengths, 10)
    assert packing.plan([4, 4, 4], 12) == [[0, 1, 2]]
    assert packing.plan([], 8) == []


def test_plan_random_is_valid_and_splits_to_the_asked_count():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 30))]
        budget = rng.randint(10, 80)
        bins = packing.plan(lengths, budget)
        check_plan(bins, lengths, budget)
        lower = sum(min(n, budget) for n in lengths) / budget  # no plan has fewer bins
        assert len(bins) >= lower - 1e-9
        target = rng.randint(len(bins), len(lengths))
        more = packing.plan(lengths, budget, num_bins=target)
        assert len(more) == target
        check_plan(more, lengths, budget)
    with pytest.raises(ValueError):
        packing.plan([3, 3], 10, num_bins=3)


def test_pack_targets_and_unpack_by_hand():
    seqs = [torch.tensor([10, 11, 12]), torch.tensor([20, 21]), torch.tensor([30])]
    p = packing.pack(seqs)
    assert p["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert p["lengths"] == [3, 2, 1]
    # targets: next tokens, never the first token of the next sequence
    assert packing.packed_targets(p["input_ids"], p["lengths"]).tolist() == [[11, 12, -100, 21, -100]]
    flat = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)  # one value per packed prediction
    rows = packing.unpack(flat, p["lengths"], width=3)
    assert rows.tolist() == [[1.0, 2.0], [4.0, 0.0], [0.0, 0.0]]
    rows.sum().backward()
    assert flat.grad.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]  # the boundary predictions get no gradient


def test_unpack_matches_a_loop_reference():
    rng = random.Random(1)
    for _ in range(50):
        lengths = [rng.randint(1, 9) for _ in range(rng.randint(1, 6))]
        width = max(lengths) + rng.randint(0, 3)
        flat = torch.randn(sum(lengths) - 1)
        want = torch.zeros(len(lengths), width - 1)
        start = 0
        for i, n in enumerate(lengths):
            want[i, :n - 1] = flat[start:start + n - 1]
            start += n
        assert torch.equal(packing.unpack(flat, lengths, width), want)
