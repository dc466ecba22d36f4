"""pass@k and n@k against hand-computed combinatorics, and the torchmetrics wrappers' accumulation."""

from __future__ import annotations

import pytest
import torch

from recipes.modules.code.metrics import NAtK, PassAtK, n_at_k, pass_at_k


def test_pass_at_k_hand_computed():
    """n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7.
    n=10, c=1, k=1: 1 - C(9,1)/C(10,1) = 1/10.
    n=4, c=1, k=3: 1 - C(3,3)/C(4,3) = 1 - 1/4 = 0.75.
    n=3, c=2, k=2: n - c = 1 < k, so every 2-subset holds a pass: 1.
    n=6, c=0, k=3: 0."""
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert pass_at_k(4, 1, 3) == pytest.approx(0.75)
    assert pass_at_k(3, 2, 2) == 1.0 and pass_at_k(6, 0, 3) == 0.0


def test_pass_at_k_is_stable_for_large_n():
    """n=1000, c=1, k=100: 1 - C(999,100)/C(1000,100) = 1 - 900/1000 = 0.1 (no overflow in the product form)."""
    assert pass_at_k(1000, 1, 100) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


def test_n_at_k_hand_computed():
    """4 samples, 2 pass the public tests, 1 of those is correct; 1@2 (draw 2, submit 1 public-passer):
    draws (6 pairs) by public-passers j: j=0: 1 pair, j=1: 4 pairs, j=2: 1 pair.
    j=1: the passer drawn is the correct one in 2 of the 4 pairs -> 2 solved; j=2: submit 1 of 2 -> 1/2 solved.
    n@k = (0 + 2 + 1/2) / 6 = 5/12."""
    assert n_at_k(4, 2, 1, n=1, k=2) == pytest.approx(5 / 12)
    # n >= k: every public-passer drawn is submitted, so n@k = pass@k over the public-and-correct samples
    assert n_at_k(10, 4, 2, n=5, k=3) == pytest.approx(pass_at_k(10, 2, 3))
    assert n_at_k(10, 0, 0, n=10, k=10) == 0.0 and n_at_k(3, 3, 3, n=1, k=1) == 1.0


def test_pass_at_k_metric_accumulates_batches_and_skips_short_problems():
    metric = PassAtK(ks=(1, 2))
    metric.update(torch.tensor([5]), torch.tensor([2]))
    metric.update(torch.tensor([1, 5]), torch.tensor([1, 0]))  # the 1-sample problem counts for k=1 only
    out = metric.compute()
    assert out["pass@1"].item() == pytest.approx((0.4 + 1.0 + 0.0) / 3)
    assert out["pass@2"].item() == pytest.approx((0.7 + 0.0) / 2) and metric.skipped.tolist() == [0, 1]


def test_n_at_k_metric_matches_the_estimator():
    metric = NAtK(n=1, k=2)
    metric.update(torch.tensor([4, 4]), torch.tensor([2, 0]), torch.tensor([1, 0]))
    assert metric.compute().item() == pytest.approx(5 / 24)
    assert all(metric._reductions[name] is not None for name in ("total", "count", "skipped"))
