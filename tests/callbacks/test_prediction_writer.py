"""JSONLPredictionWriter: tensors become numbers, and `python -m recipes predict` on a reward config writes one row
per text with its score (it crashed with "Tensor is not JSON serializable")."""

import json

import pytest
import torch

from recipes.__main__ import cli_main
from recipes.callbacks.prediction_writer import prediction_rows
from tests.conftest import write_jsonl


def test_prediction_rows_convert_tensors():
    scores = torch.tensor([0.5, -1.25], dtype=torch.bfloat16)
    assert prediction_rows(scores, [7, 3]) == [{"index": 7, "score": 0.5}, {"index": 3, "score": -1.25}]
    assert prediction_rows(torch.tensor([[1, 2], [3, 4]]), None, "logits") == [{"logits": [1, 2]},
                                                                                {"logits": [3, 4]}]
    columns = {"score": torch.tensor([1.0, 2.0]), "text": ["a", "b"]}
    assert prediction_rows(columns, [0, 1]) == [{"index": 0, "score": 1.0, "text": "a"},
                                                {"index": 1, "score": 2.0, "text": "b"}]
    rows = [{"prompt": "p", "response": "r", "logprob": torch.tensor(-0.5)}]
    assert prediction_rows(rows, [4]) == [{"prompt": "p", "response": "r", "logprob": -0.5}]  # no index added
    with pytest.raises(TypeError, match="per-example columns of one length"):
        prediction_rows({"score": torch.tensor([1.0, 2.0]), "text": ["a"]})
    with pytest.raises(TypeError, match="predict_step returned str"):
        prediction_rows("text")


def test_predict_on_a_reward_config_writes_one_scored_row_per_text(tmp_path):
    """Fit the tiny reward model 2 steps, then ``predict`` 5 texts (batch size 2: the last batch holds 1) through the
    CLI. Each written score equals the model's reward for that text scored alone (no padding): prompt ids with the
    tokenizer's special tokens, then the response's ids and EOS, as in training."""
    common = ["--config", "yaml/tiny/reward.yaml", "--trainer.logger", "false", "--trainer.enable_progress_bar",
              "false", "--trainer.default_root_dir", str(tmp_path), "--data.init_args.batch_size", "2"]
    cli = cli_main(["fit", *common, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.callbacks", "[]"])
    ckpt = str(tmp_path / "reward.ckpt")
    cli.trainer.save_checkpoint(ckpt)
    texts = [("Write abc in capital letters.\n", "ABC"), ("Write abc in capital letters.\n", "abc"),
             ("Say hi.", "hi"), ("Say hi.", "a much longer answer than the others"), ("x", "y")]
    data = write_jsonl(tmp_path / "texts.jsonl", [{"prompt": p, "response": r} for p, r in texts])
    out = tmp_path / "scores.jsonl"
    writer = {"class_path": "recipes.callbacks.prediction_writer.JSONLPredictionWriter", "init_args": {"path": str(out)}}
    predicted = cli_main(["predict", *common, "--ckpt_path", ckpt, "--data.init_args.predict_data", str(data),
                          "--trainer.callbacks", json.dumps([writer]), "--return_predictions", "false"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4] and all(set(r) == {"index", "score"} for r in rows)

    module, tok = predicted.model.eval(), cli.datamodule.tokenizer  # the checkpoint's weights, as trained
    trained = cli.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in module.state_dict().items())
    with torch.no_grad():
        for row, (prompt, response) in zip(rows, texts):
            ids = tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            alone = module(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
            assert row["score"] == pytest.approx(float(alone[0]), abs=1e-5)
    assert len({round(r["score"], 6) for r in rows}) > 1  # the texts get different scores
