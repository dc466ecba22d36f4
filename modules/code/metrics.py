"""pass@k (Chen et al. 2021, arXiv 2107.03374 Eq. 1) and n@k (AlphaCode, arXiv 2203.07814; the paper's 10@1k).

Pure estimators on counts, and torchmetrics `Metric`s that sum them across batches and processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` pass: ``1 - C(n - c, k) / C(n, k)`` (2107.03374 Eq. 1).

    Computed in the numerically stable product form ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``.

    Args:
        n: samples drawn for the problem (``n >= k``).
        c: samples that pass every test.
        k: the budget.
    """
    if not 0 <= c <= n or k < 1 or n < k:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def n_at_k(n_samples: int, n_public: int, n_correct: int, n: int, k: int) -> float:
    """Expected n@k: draw ``k`` of ``n_samples``, keep those passing the public tests, submit ``n`` of them at random;
    solved if a submission passes all tests (AlphaCode's n@k, estimated without resampling).

    Among the ``k`` drawn, the number ``j`` passing the public tests is hypergeometric(n_samples, n_public, k); the
    ``m = min(n, j)`` submissions are a uniform m-subset of the ``n_public`` public-passers, of which ``n_correct`` are
    correct, so ``P(fail | j) = C(n_public - n_correct, m) / C(n_public, m)`` and
    ``n@k = 1 - sum_j C(n_public, j) C(n_samples - n_public, k - j) / C(n_samples, k) * P(fail | j)``. Exact integers.

    Args:
        n_samples: samples drawn for the problem (``>= k``).
        n_public: samples that pass the public tests.
        n_correct: samples that pass the public tests *and* all hidden tests.
    """
    if not 0 <= n_correct <= n_public <= n_samples or n_samples < k or k < 1 or n < 1:
        raise ValueError(f"n@k needs 0 <= n_correct <= n_public <= n_samples >= k >= 1, n >= 1; got "
                         f"{n_samples=}, {n_public=}, {n_correct=}, {n=}, {k=}")
    fail = 0
    for j in range(max(0, k - (n_samples - n_public)), min(k, n_public) + 1):
        m = min(n, j)
        ways = math.comb(n_public, j) * math.comb(n_samples - n_public, k - j)
        fail += ways * math.comb(n_public - n_correct, m) * math.factorial(m) * math.factorial(n_public - m)
    total = math.comb(n_samples, k) * math.factorial(n_public)  # C(n_public, m) = n_public! / (m! (n_public - m)!)
    return 1.0 - fail / total


class PassAtK(Metric):
    """Mean pass@k over problems, for several k at once. ``update(num_samples, num_correct)`` takes one entry per
    problem; a problem with fewer than k samples is not counted for that k (see ``skipped``).

    Example::

        metric = PassAtK(ks=(1, 10))
        metric.update(torch.tensor([20, 20]), torch.tensor([0, 5]))
        metric.compute()  # {"pass@1": ..., "pass@10": ...}
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (1, 10, 100), **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(int(k) for k in ks)
        zeros = torch.zeros(len(self.ks), dtype=torch.float64)
        self.add_state("total", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("count", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("skipped", default=zeros.clone(), dist_reduce_fx="sum")

    def update(self, num_samples: torch.Tensor, num_correct: torch.Tensor) -> None:
        for n, c in zip(num_samples.tolist(), num_correct.tolist()):
            for i, k in enumerate(self.ks):
                if n < k:
                    self.skipped[i] += 1
                    continue
                self.total[i] += pass_at_k(int(n), int(c), k)
                self.count[i] += 1

    def compute(self) -> dict[str, torch.Tensor]:
        return {f"pass@{k}": self.total[i] / self.count[i].clamp(min=1) for i, k in enumerate(self.ks)}


class NAtK(Metric):
    """Mean n@k over problems (``n``: submissions, ``k``: samples; the paper's 10@1k is ``NAtK(10, 1000)``).

    ``update(num_samples, num_public, num_correct)``: per problem, samples drawn, samples passing the public tests,
    and samples passing the public and all hidden tests. Problems with fewer than k samples are counted in ``skipped``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, n: int = 10, k: int = 1000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n, self.k = int(n), int(k)
        for name in ("total", "count", "skipped"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, num_samples: torch.Tensor, num_public: torch.Tensor, num_correct: torch.Tensor) -> None:
        for s, p, c in zip(num_samples.tolist(), num_public.tolist(), num_correct.tolist()):
            if s < self.k:
                self.skipped += 1
                continue
            self.total += n_at_k(int(s), int(p), int(c), self.n, self.k)
            self.count += 1

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)
