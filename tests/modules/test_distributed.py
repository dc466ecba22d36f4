"""One-process behaviour of the `recipes.modules.distributed` helpers (their multi-process behaviour is checked in
tests/recipes/test_distributed.py with two gloo processes)."""

import logging

import torch

import recipes.modules.distributed as distributed


def test_per_rank_state_round_trip_and_other_world_sizes(monkeypatch, caplog):
    state = torch.Generator().manual_seed(3).get_state()
    saved = distributed.per_rank_state(state)
    assert len(saved) == 1 and torch.equal(saved[0], state)
    assert torch.equal(distributed.own_state(saved, 0, "gen"), state)
    assert distributed.own_state(state, 0, "gen") is state  # a checkpoint from before per-rank states
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert distributed.own_state(["a", "b"], 1, "gen") == "b"
    with caplog.at_level(logging.WARNING, logger="recipes.modules.distributed"):
        assert distributed.own_state(["a", "b", "c"], 1, "PPO sampling generator") is None
    assert "PPO sampling generator: the checkpoint holds 3 ranks' states, this run has 2" in caplog.text
