"""RewardModule: the loss on hand-set rewards with a margin, held-out accuracy on the built-in pairs, predict, and
the export that plain transformers and PPO's critic builder load."""

import csv
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from recipes.__main__ import cli_main
from recipes.datamodules.preference import PreferenceDataModule
from recipes.modules.models import LoRASpec, ModelSpec
from recipes.modules.reward import RewardModule
from recipes.modules.scalar_models import build_scalar_model, sequence_scores
from tests.conftest import TINY_LLAMA, quiet_trainer, write_jsonl


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on shared, busy cores two threads run 3-4x slower."""
    torch.set_num_threads(1)


def test_step_uses_chosen_first_rows_and_the_margin(monkeypatch):
    """Rewards chosen [2, 0], rejected [1, 1], margins [0.5, 0]: losses -log s(0.5) = 0.474077 and
    -log s(-1) = 1.313262; mean 0.893670; accuracy [1, 0]."""
    module = RewardModule(model=ModelSpec(config={"model_type": "llama"}))
    monkeypatch.setattr(RewardModule, "forward", lambda self, ids, mask: torch.tensor([2.0, 0.0, 1.0, 1.0]))
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long),
             "margin": torch.tensor([0.5, 0.0])}
    loss, accuracies, chosen, rejected = module._step(batch)
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6) and expected == pytest.approx(0.893670, abs=1e-6)
    assert accuracies.tolist() == [1.0, 0.0] and chosen.tolist() == [2.0, 0.0] and rejected.tolist() == [1.0, 1.0]


def test_tiny_reward_model_reaches_heldout_accuracy(tmp_path):
    """yaml/tiny/reward.yaml as shipped (100 steps, seeded): held-out val/rewards/accuracies >= 0.95 on the 100
    held-out pairs (measured 1.0 for seeds 0, 1, 2, reached by step 40; chance is 0.5; the rule needs the prompt
    and the response together, so accuracy sits near 0.55 until about step 35). The export loads in plain
    transformers and as a PPO critic and gives the same scores."""
    root = tmp_path / "run"
    cli = cli_main(["fit", "--config", "yaml/tiny/reward.yaml", "--trainer.val_check_interval", "50",
                    "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
                    "--trainer.logger.init_args.save_dir", str(root)])
    log_dir = Path(cli.trainer.log_dir)
    rows = list(csv.DictReader((log_dir / "metrics.csv").read_text().splitlines()))
    accuracies = [float(r["val/rewards/accuracies"]) for r in rows if r.get("val/rewards/accuracies")]
    assert len(accuracies) == 2 and accuracies[-1] >= 0.95, accuracies
    assert any(r.get("val/rewards/margins") for r in rows) and any(r.get("rewards/accuracies") for r in rows)

    batch = cli.datamodule.collate(cli.datamodule.val_set[:4])
    module = cli.model.eval()
    with torch.no_grad():
        ours = module(batch["input_ids"], batch["attention_mask"])
        hf = AutoModelForSequenceClassification.from_pretrained(log_dir / "hf").eval()
        critic = build_scalar_model(ModelSpec(name_or_path=str(log_dir / "hf"))).eval()
        for row in range(4):  # HF pools at the last non-pad token: feed each row unpadded
            n = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row: row + 1, :n]
            torch.testing.assert_close(hf(input_ids=ids).logits[0, 0], ours[row], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sequence_scores(critic, batch["input_ids"], batch["attention_mask"]), ours,
                                   atol=1e-5, rtol=1e-5)


def test_predict_scores_a_file_in_order(tmp_path):
    rows = [{"prompt": "Write abc in capital letters.\n", "response": "ABC"},
            {"prompt": "Write abc in capital letters.\n", "response": "abc"},
            {"prompt": "Write xyz in small letters.\n", "response": "xyz"}]
    data = PreferenceDataModule(max_length=48, batch_size=2, predict_data=str(write_jsonl(tmp_path / "p.jsonl", rows)))
    module = RewardModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=data.tokenizer)
    scores = torch.cat(quiet_trainer().predict(module, data))
    assert scores.shape == (3,)
    module.eval()
    ids = data.tokenizer(rows[2]["prompt"] + rows[2]["response"]).input_ids + [data.tokenizer.eos_token_id]
    alone = module(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    torch.testing.assert_close(scores[2:], alone, atol=1e-5, rtol=1e-5)


def test_predict_without_a_file_says_what_to_set():
    with pytest.raises(ValueError, match="predict_data"):
        PreferenceDataModule(max_length=48).setup("predict")


def test_lora_reward_model_trains_and_exports_merged(tmp_path):
    data = PreferenceDataModule(max_length=48, batch_size=4, max_rows=24, val_fraction=0.25)
    module = RewardModule(model=ModelSpec(config=dict(TINY_LLAMA), lora=LoRASpec(r=4, alpha=8, dropout=0.0)),
                          tokenizer=data.tokenizer, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    quiet_trainer(max_steps=2, limit_val_batches=1).fit(module, data)
    module.export_pretrained(str(tmp_path / "rm"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids = torch.tensor([data.train_set[0]["prompt_ids"] + data.train_set[0]["chosen_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits[0, 0],
                                   module.eval()(ids, torch.ones_like(ids))[0], atol=1e-5, rtol=1e-5)
