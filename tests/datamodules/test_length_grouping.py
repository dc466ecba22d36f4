"""`group_by_length` in the data modules: off, the loaders' order is unchanged; each epoch's padding fraction equals
the one measured on the collated batches (every module, grouped or not, any rank); grouped, exact resume holds."""

import logging
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler

from recipes.datamodules.preference import PreferenceDataModule
from recipes.datamodules.prompts import PromptDataModule
from recipes.datamodules.ranking import RankingDataModule
from recipes.datamodules.resumable import ResumableLoaderMixin
from recipes.datamodules.sft import SFTDataModule
from recipes.datamodules.unpaired import UnpairedDataModule
from tests.conftest import TINY_LLAMA, quiet_trainer, write_jsonl


def _text(rng, letter):
    """A long-tailed text length: mostly a few characters, now and then a hundred."""
    return letter * min(100, int(2 * rng.paretovariate(1.1)))


def _rows(kind, n=37, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt, a, b = _text(rng, "p") + str(i), _text(rng, "a"), _text(rng, "b") + "b"
        rows.append({
            "sft": {"prompt": prompt, "response": a},
            "preference": {"prompt": prompt, "chosen": a, "rejected": b},
            "ranking": {"prompt": prompt, "responses": [a, b, "c" * (1 + i % 5)][:2 + i % 2],
                        "scores": [1.0, 0.5, 0.0][:2 + i % 2]},  # k = 2 or 3
            "unpaired": {"prompt": prompt, "completion": a, "label": bool(i % 2)},
            "prompts": {"prompt": prompt},
        }[kind])
    return rows


def _module(kind, path, **kw):
    common = {"tokenizer": "builtin:byte", "data": str(path), "max_length": 256, **kw}
    if kind == "prompts":
        return PromptDataModule(rollout_batch_size=4, **common)
    cls = {"sft": SFTDataModule, "preference": PreferenceDataModule, "ranking": RankingDataModule,
           "unpaired": UnpairedDataModule}[kind]
    extra = {"sft": {"source_format": "prompt_response", "prompt_format": "plain"},
             "unpaired": {"source_format": "unpaired"}}.get(kind, {})
    return cls(val_fraction=0.0, batch_size=3, **extra, **common)


def _ready(kind, tmp_path, world=1, rank=0, **kw):
    path = write_jsonl(Path(tmp_path) / f"{kind}.jsonl", _rows(kind))
    dm = _module(kind, path, **kw)
    dm.trainer = SimpleNamespace(training=True, world_size=world, global_rank=rank)
    dm.setup("fit")
    return dm


def _measured(batches):
    """1 - real / all cells of every attention mask the collate built (KTO's mismatched KL batch included)."""
    masks = [v for b in batches for k, v in b.items() if k.endswith("attention_mask")]
    return 1 - sum(m.sum().item() for m in masks) / sum(m.numel() for m in masks)


KINDS = ["sft", "preference", "ranking", "unpaired", "prompts"]


@pytest.mark.parametrize("kind", KINDS)
def test_off_by_default_and_the_loader_order_is_unchanged(kind, tmp_path):
    for world, rank in ((1, 0), (2, 1)):
        dm = _ready(kind, tmp_path, world, rank)
        assert dm.group_by_length is False
        sampler = dm.train_dataloader().sampler
        before = DistributedSampler(dm.train_set, num_replicas=world, rank=rank, shuffle=True, seed=0)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            before.set_epoch(epoch)
            assert list(sampler) == list(before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grouped", [False, True])
def test_padding_fraction_is_the_one_of_the_collated_batches(kind, grouped, tmp_path, caplog):
    for world, rank in ((1, 0), (2, 1)):
        dm = _ready(kind, tmp_path, world, rank, group_by_length=grouped)
        loader = dm.train_dataloader()
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            with caplog.at_level(logging.INFO):
                batches = list(loader)
            assert dm.padding_fraction == pytest.approx(_measured(batches), abs=1e-12)
            assert f"{type(dm).__name__}: epoch {epoch} padding fraction {dm.padding_fraction:.3f} (grouped by " \
                   f"length: {grouped})" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
def test_grouping_pads_less(kind, tmp_path):
    fractions = {}
    for grouped in (False, True):
        dm = _ready(kind, tmp_path, group_by_length=grouped)
        fractions[grouped] = _measured(list(dm.train_dataloader()))
    # measured: sft .36 -> .17, preference .52 -> .31, ranking .63 -> .48, unpaired .40 -> .27, prompts .43 -> .16
    # (what is left of pairs, rankings and KTO's mismatched rows is padding inside one example)
    assert fractions[True] < fractions[False] - 0.1, fractions


@pytest.mark.parametrize("kind", ["sft", "preference", "unpaired"])
def test_grouped_exact_resume_skips_the_consumed_batches(kind, tmp_path):
    """Consume 3 batches of rank 1 of 2, save the state, restore it into a fresh module: its loader yields the rest
    of the uninterrupted epoch, then the uninterrupted next epoch."""
    first, batches = _ready(kind, tmp_path, 2, 1, group_by_length=True), []
    loader = first.train_dataloader()
    loader.sampler.set_epoch(2)
    for batch in loader:
        batches.append(first.on_before_batch_transfer(batch, 0))
        if len(batches) == 3:
            state = first.state_dict()
    assert state == {"consumed_batches": 3} and len(batches) > 4
    fraction = first.padding_fraction
    loader.sampler.set_epoch(3)
    next_epoch = list(loader)
    resumed = _ready(kind, tmp_path, 2, 1, group_by_length=True)
    resumed.load_state_dict(state)
    resumed_loader = resumed.train_dataloader()
    resumed_loader.sampler.set_epoch(2)
    rest = list(resumed_loader)
    assert resumed.padding_fraction == fraction  # of the whole epoch, the skipped batches included
    for a, b in zip(rest, batches[3:], strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    resumed_loader.sampler.set_epoch(3)
    for a, b in zip(list(resumed_loader), next_epoch, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_a_module_without_lengths_refuses_to_group():
    class NoLengths(ResumableLoaderMixin):
        batch_size, seed, num_workers, group_by_length = 2, 0, 0, True

    with pytest.raises(ValueError, match="NoLengths: group_by_length needs the examples' lengths"):
        NoLengths().resumable_loader([1, 2, 3], list)
    plain = NoLengths()
    plain.group_by_length = False
    list(plain.resumable_loader([1, 2, 3], list))  # not grouped: no lengths needed, no fraction measured
    assert plain.padding_fraction != plain.padding_fraction  # NaN


def _fit_sft(tmp_path, max_steps, ckpt_path=None, save_every=None, **trainer_kw):
    """A tiny SFT fit on long-tailed rows, grouped by length (12 batches an epoch); returns the module, its data
    and the attention masks of the batches the model trained on, by epoch."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from recipes.modules.models import ModelSpec
    from recipes.modules.sft import SFTModule

    class Record(Callback):
        def __init__(self):
            self.batches = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches.setdefault(trainer.current_epoch, []).append({"attention_mask": batch["attention_mask"]})

    L.seed_everything(7, verbose=False)
    path = write_jsonl(Path(tmp_path) / "sft.jsonl", _rows("sft"))
    data = _module("sft", path, group_by_length=True)
    module = SFTModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=data.tokenizer,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    record = Record()
    callbacks = [record] + ([ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_every, save_top_k=-1)]
                            if save_every else [])
    quiet_trainer(max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(save_every),
                  limit_val_batches=0, **trainer_kw).fit(module, data, ckpt_path=ckpt_path)
    return module, data, record.batches


def test_grouped_fit_resumed_mid_epoch_matches_uninterrupted(tmp_path):
    """Stop after 5 steps (mid-epoch: 13 batches an epoch), resume to step 8: the parameters of 8 uninterrupted
    steps."""
    full, _, _ = _fit_sft(tmp_path, 8)
    _fit_sft(tmp_path, 5, save_every=5)
    resumed, _, _ = _fit_sft(tmp_path, 8, ckpt_path=str(next(Path(tmp_path).glob("*step=5*.ckpt"))))
    for (name, p), (_, q) in zip(full.policy.named_parameters(), resumed.policy.named_parameters(), strict=True):
        torch.testing.assert_close(q, p, msg=name)


def test_the_fraction_of_each_fitted_epoch_is_the_one_the_model_trained_on(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="recipes.datamodules.sft"):
        _, data, batches = _fit_sft(tmp_path, -1, max_epochs=2)
    assert sorted(batches) == [0, 1] and len(batches[1]) == 13
    assert data.padding_fraction == pytest.approx(_measured(batches[1]), abs=1e-12)
    logged = [r.getMessage() for r in caplog.records if "padding fraction" in r.getMessage()]
    assert logged == [f"SFTDataModule: epoch {e} padding fraction {_measured(batches[e]):.3f} (grouped by length: True)"
                    for e in (0, 1)]
