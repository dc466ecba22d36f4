"""DPO-Iter on two processes: under FSDP2 the policy samples its round on weights gathered once (ranks whose
responses end early stop on their own: no collective hang), and the gathered pairs are in prompt order, so 2 x 8
pairs per step under DDP and FSDP2 end where 1 x 16 does, with a policy that really emits EOS (an SFT export)."""

import json

import pytest
import torch

from recipes.__main__ import cli_main
from recipes.datamodules.online_preference import OnlinePreferenceDataModule
from recipes.modules.generation import sample
from tests.conftest import REPO
from tests.recipes.test_distributed import FSDP2, TOLERANCE, _assert_same, _fit, _gap, _skip_without_gloo

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


class LayoutInvariantRounds(OnlinePreferenceDataModule):
    """Draws each response from a generator of its own, seeded by its prompt's tokens, its index among the prompt's
    k samples and the round, on the row without padding: the same responses on any number of ranks (the module's
    own generator is seeded per rank), so the test isolates what data parallelism does to a round."""

    def sample_responses(self, policy, seqs, device):
        hp, tok, out, run = self.hparams, self.tokenizer, [], 0
        for i, row in enumerate(seqs):
            run = run + 1 if i and seqs[i - 1] is row else 0
            ids = torch.tensor([row["input_ids"]], device=device)
            seed = sum((j + 1) * t for j, t in enumerate(row["input_ids"])) * 31 + run + 1000 * len(self.history)
            gen = sample(policy, ids, torch.ones_like(ids), self.max_new_tokens, tok.eos_token_id, tok.pad_token_id,
                         hp.temperature, hp.top_k, hp.top_p, generator=torch.Generator(device=device).manual_seed(seed))
            out.append(gen.response_ids[0, :int(gen.response_mask[0].sum())].tolist())
        return out


def _eos_rate(folder) -> float:
    """The share of 16 built-in prompts whose sampled response ends with EOS within 16 tokens."""
    from recipes.datamodules.prompts import PromptDataModule
    from recipes.modules.models import ModelSpec, build_causal_lm
    from recipes.modules.tokenizer import load_tokenizer

    tok = load_tokenizer(str(folder))
    model = build_causal_lm(ModelSpec(name_or_path=str(folder)), tok).eval()
    data = PromptDataModule(rollout_batch_size=16, max_length=64)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    gen = sample(model, batch["input_ids"], batch["attention_mask"], 16, tok.eos_token_id, tok.pad_token_id,
                 generator=torch.Generator().manual_seed(0))
    return gen.ended_with_eos.float().mean().item()


def test_dpo_iter_ddp_and_fsdp2_match_one_process_with_an_eos_emitting_policy(tmp_path):
    _skip_without_gloo()
    torch.set_num_threads(1)
    sft = tmp_path / "sft"
    cli_main(["fit", "--config", str(REPO / "yaml/tiny/sft.yaml"), "--trainer.max_steps", "150",
              "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
              "--trainer.enable_checkpointing", "false", "--trainer.limit_val_batches", "0",
              "--trainer.default_root_dir", str(sft), "--trainer.callbacks",
              json.dumps([{"class_path": "recipes.callbacks.hf_export.HFExport",
                           "init_args": {"dirpath": str(sft / "hf")}}])])
    rounds = ("--data.class_path", "tests.recipes.test_dpo_iter_distributed.LayoutInvariantRounds",
              "--data.init_args.prompts_per_round", "16", "--data.init_args.k", "4",
              "--model.init_args.model.name_or_path", str(sft / "hf"), "--model.init_args.model.config", "{}",
              "--trainer.max_epochs", "2")
    assert _eos_rate(sft / "hf") >= 0.5  # the case of the bug: ranks' responses end at different steps
    callbacks = ({"class_path": "recipes.callbacks.dpo_iter.DPOIterRound", "init_args": {"rounds": 2}},)
    kwargs = dict(config="yaml/tiny/dpo_iter.yaml", extra=rounds, steps=3, global_batch=8, callbacks=callbacks)
    single = _fit(tmp_path, "iter-single", 1, "auto", **kwargs)
    assert (tmp_path / "iter-single" / "hf" / "model.safetensors").exists()
    control = _fit(tmp_path, "iter-control", 1, "auto", **{**kwargs, "global_batch": 4})
    assert _gap(control, single) > 10 * TOLERANCE
    for label, strategy in (("ddp", "ddp"), ("fsdp2", FSDP2)):
        _assert_same(_fit(tmp_path, f"iter-{label}", 2, strategy, **kwargs), single, TOLERANCE, f"dpo-iter {label}")
