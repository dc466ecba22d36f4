"""PPOModule: the terminal score and the truncation penalty inside the rollout, whole-batch advantage whitening,
the training contract, learning on the tiny config, re-tokenizing reward models, and exact resume after SIGKILL."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from recipes.__main__ import cli_main
from recipes.datamodules.prompts import PromptDataModule
from recipes.modules.models import ModelSpec
from recipes.modules.ppo import PPOModule
from recipes.modules.reward_functions import CharacterFractionReward, SequenceClassifierReward
from recipes.modules.rl_utils import masked_mean, masked_var
from recipes.modules.types import Generation
from tests.conftest import REPO, TINY_LLAMA, quiet_trainer


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and two spinning threads collapse on a shared, loaded CPU."""
    torch.set_num_threads(1)


class FixedReward:
    """Returns the given scores and records what it was called with."""

    def __init__(self, scores):
        self.scores, self.calls = torch.tensor(scores), []

    def __call__(self, prompts, responses, metadata=None):
        self.calls.append((list(prompts), list(responses), metadata))
        return self.scores[: len(responses)]


def make_module(tokenizer, reward=None, **kwargs):
    module = PPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), critic=ModelSpec(config=dict(TINY_LLAMA)),
                       reward=reward or CharacterFractionReward(), tokenizer=tokenizer, **kwargs)
    module.configure_model()
    return module


def prompt_batch(tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "prompts": texts,
            "metadata": [{} for _ in texts]}


def test_score_lands_on_eos_and_penalty_on_truncated_response(byte_tokenizer):
    """Row 0 ends with EOS at index 2, row 1 is cut at 4 tokens. kl_coef 0, so the per-token rewards are the
    terminal scores alone: row 0 gets its score 30 clipped to 20 on the EOS token; row 1 gets the penalty -1 on its
    last token instead of its score 5."""
    tok, eos, pad = byte_tokenizer, byte_tokenizer.eos_token_id, byte_tokenizer.pad_token_id
    reward = FixedReward([30.0, 5.0])
    module = make_module(tok, reward, kl_coef=0.0, reward_clip=20.0, missing_eos_penalty=-1.0, max_new_tokens=4)
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    module.forward = lambda batch: Generation(torch.tensor([[a, b, eos, pad], [b, b, b, b]]),
                                              torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), torch.tensor([True, False]))
    traj = module.rollout(prompt_batch(tok, ["q1", "question 2"]))
    torch.testing.assert_close(traj.rewards, torch.tensor([[0.0, 0.0, 20.0, 0.0], [0.0, 0.0, 0.0, -1.0]]))
    torch.testing.assert_close(traj.scores, torch.tensor([20.0, -1.0]))
    assert reward.calls[0][1] == ["ab", "bbbb"]  # decoded without the stop token
    assert traj.input_ids.shape == (2, 10 + 4) and traj.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def _unpadded_response_logprobs(model, prompt_ids, response_ids):
    """log p(response token t | prompt, earlier tokens) from one forward of the unpadded sequence: log_softmax of
    the logits at the position before each response token, gathered at that token."""
    ids = torch.tensor([prompt_ids + response_ids])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1]  # (R, V)
    return logits.log_softmax(-1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0]


def test_kl_penalty_is_taken_against_the_reference_not_the_policy(byte_tokenizer):
    """The policy is moved away from the reference (its final norm scaled by 3), so every response token has a KL
    ``k1 = log pi(y_t) - log pi_ref(y_t)`` far from 0, computed here from unpadded forwards of the policy and of a copy
    of the initial policy. kl_coef 0.1: each real token's reward is ``-0.1 k1``, plus on the last real token the
    clipped score (row 0, ended by EOS: 30 clipped to 20) or the truncation penalty (row 1: -1); padding gets 0. With
    the reference equal to the policy, k1 = 0 and the rewards are the scores alone, which this test rejects."""
    import copy

    tok, eos, pad = byte_tokenizer, byte_tokenizer.eos_token_id, byte_tokenizer.pad_token_id
    module = make_module(tok, FixedReward([30.0, 5.0]), kl_coef=0.1, reward_clip=20.0, missing_eos_penalty=-1.0,
                         max_new_tokens=4)
    initial = copy.deepcopy(module.policy).eval()
    with torch.no_grad():
        module.policy.model.norm.weight.mul_(3.0)
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    responses, mask = [[a, b, eos], [b, b, b, b]], [[1, 1, 1, 0], [1, 1, 1, 1]]
    module.forward = lambda batch: Generation(torch.tensor([[a, b, eos, pad], [b, b, b, b]]), torch.tensor(mask),
                                              torch.tensor([True, False]))
    prompts = ["q1", "question 2"]
    traj = module.rollout(prompt_batch(tok, prompts))

    expected = torch.zeros(2, 4)
    terminal = [20.0, -1.0]
    with torch.no_grad():
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            p_ids = tok(prompt)["input_ids"]
            k1 = (_unpadded_response_logprobs(module.policy.eval(), p_ids, response)
                  - _unpadded_response_logprobs(initial, p_ids, response))  # (R,)
            assert k1.abs().min() > 1e-2, k1  # the penalty is not 0 anywhere
            expected[row, :len(response)] = -0.1 * k1
            expected[row, len(response) - 1] += terminal[row]
    torch.testing.assert_close(traj.rewards, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(traj.scores, torch.tensor(terminal))


@pytest.mark.parametrize("normalize", [True, False])
def test_normalize_advantages_whitens_the_whole_rollout_batch(byte_tokenizer, normalize):
    module = make_module(byte_tokenizer, normalize_advantages=normalize, max_new_tokens=6)
    traj = module.rollout(prompt_batch(byte_tokenizer, [f"prompt {i}" * (i % 3 + 1) for i in range(8)]))
    mask = traj.response_mask
    mean, var = masked_mean(traj.advantages, mask), masked_var(traj.advantages, mask)
    if normalize:
        assert abs(float(mean)) < 1e-5 and abs(float(var) - 1.0) < 1e-4
    else:
        assert abs(float(var) - 1.0) > 1e-2
    assert (traj.advantages * (1 - mask)).abs().sum() == 0


def test_fit_two_iterations_counts_iterations_and_changes_both_models(byte_tokenizer):
    module = make_module(byte_tokenizer, max_new_tokens=6, ppo_epochs=2, mini_batch_size=4, micro_batch_size=2,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                         critic_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    dm = PromptDataModule(rollout_batch_size=8, max_length=64)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, dm)
    assert trainer.global_step == 2  # iterations, not the 2 x 2 x 2 inner optimizer steps
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("policy.") for n in changed) and any(n.startswith("critic.") for n in changed)
    assert not any(n.startswith("reference.") for n in changed)
    for key in ("ppo/reward", "ppo/score", "ppo/kl", "ppo/approx_kl", "ppo/clipfrac", "ppo/value_clipfrac",
                "ppo/entropy", "ppo/eos_rate", "ppo/value_loss", "ppo/policy_loss", "ppo/response_length",
                "ppo/advantage_mean", "ppo/updates", "time/generate_s", "time/score_s", "time/rollout_s",
                "time/train_s", "rollout/tokens_per_s"):  # issue #5's metric list
        assert key in trainer.callback_metrics, key


def test_micro_batches_accumulate_to_the_minibatch(byte_tokenizer):
    """micro_batch_size 1 x 4 accumulated equals one micro-batch of 4 (token-weighted), after one iteration."""
    params = []
    for micro in (None, 1):
        torch.manual_seed(0)
        module = make_module(byte_tokenizer, max_new_tokens=5, ppo_epochs=1, micro_batch_size=micro,
                             sampling_seed=3, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                             critic_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        quiet_trainer(max_steps=1).fit(module, PromptDataModule(rollout_batch_size=4, max_length=64))
        params.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-4, atol=1e-6)


def _tiny_ppo_rewards(tmp_path, steps):
    cli = cli_main(["fit", "--config", "yaml/tiny/ppo.yaml", "--trainer.max_steps", str(steps),
                    "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    rows = list(csv.DictReader(open(os.path.join(cli.trainer.log_dir, "metrics.csv"))))
    return [float(r["ppo/reward"]) for r in rows], [float(r["ppo/kl"]) for r in rows]


def test_tiny_ppo_reward_rises_fast(tmp_path):
    """Shortened tiny run (seed 0, CPU): the mean reward of the last 3 of 10 iterations beats the first 3 by 0.5."""
    rewards, kls = _tiny_ppo_rewards(tmp_path, 10)
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.5, rewards
    assert max(kls) < 10.0


@pytest.mark.slow
def test_tiny_ppo_reward_rises(tmp_path):
    """The full tiny config (40 iterations): reward (10 x the fraction of lowercase/space characters) rises by more
    than 3 from about 0.9, and the per-sequence KL stays below the KL of the KL-regularized optimum.

    That optimum is pi*(y) = pi_ref(y) exp(r(y)/beta) / Z, so KL(pi* || pi_ref) = E_pi*[r]/beta - log Z, and
    Jensen gives log Z >= E_ref[r]/beta; hence KL* <= (r_max - E_ref[r]) / beta = (10 - r_0) / 0.1 (about 89 nats
    here). A policy drifting past that bound would be chasing something other than the penalized objective.
    Measured on seed 0 (inverse-CDF sampler): the mean reward of the last 5 iterations is 7.6 against 1.2 for the
    first 5 (responses shorten to 2-3 tokens, which a fraction reward allows), and the KL peaks at 15 nats."""
    rewards, kls = _tiny_ppo_rewards(tmp_path, 40)
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 3.0, rewards
    kl_coef, r_max = 0.1, 10.0
    assert max(kls) < (r_max - rewards[0]) / kl_coef, kls


def _save_reward_model(path, tokenizer, hidden=32):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.for_model(**{**TINY_LLAMA, "hidden_size": hidden}, vocab_size=len(tokenizer), num_labels=1,
                               pad_token_id=tokenizer.pad_token_id)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_reward_model_with_another_tokenizer_is_retokenized(byte_tokenizer, tmp_path):
    from recipes.modules.scalar_models import sequence_scores
    from recipes.modules.tokenizer import build_byte_tokenizer

    rm_tok = build_byte_tokenizer()
    rm_tok.add_tokens(["hello"])  # "hello" is one token for the reward model, five for the policy
    path = _save_reward_model(tmp_path / "rm", rm_tok)
    reward = SequenceClassifierReward(path)
    scores = reward(["say hello", "x"], [" world", " hello"])
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(path).eval()
    for i, text in enumerate(["say hello world", "x hello"]):
        ids = reward.tokenizer(text)["input_ids"] + [rm_tok.eos_token_id]
        assert ids != byte_tokenizer(text)["input_ids"] + [byte_tokenizer.eos_token_id]
        expected = sequence_scores(rm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        torch.testing.assert_close(scores[i], expected[0])
    # the critic reads policy token ids, so a critic from that folder is refused with a clear error
    with pytest.raises(ValueError, match="different tokenizer than the policy"):
        PPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), critic=ModelSpec(name_or_path=path),
                  reward=reward, tokenizer=byte_tokenizer).configure_model()


def test_reward_model_folder_without_tokenizer_is_a_clear_error(byte_tokenizer, tmp_path):
    path = _save_reward_model(tmp_path / "rm", byte_tokenizer)
    for f in os.listdir(path):
        if "token" in f:
            os.remove(os.path.join(path, f))
    with pytest.raises(FileNotFoundError, match="no tokenizer could be loaded"):
        SequenceClassifierReward(path)(["a"], ["b"])


# --- exact resume after SIGKILL -------------------------------------------------------------------------------------
RESUME_OVERRIDES = """
trainer:
  max_steps: 8
  enable_progress_bar: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: 1, save_top_k: -1, dirpath: {root}/ckpt}}{callbacks}
  default_root_dir: {root}
  logger: {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {root}, name: ""}}}}
model:
  init_args: {{max_new_tokens: 8, ppo_epochs: 2, mini_batch_size: 8, normalize_rewards: true, normalize_values: true}}
data:
  init_args: {{rollout_batch_size: 16}}
"""


EMA_CALLBACK = """
    - class_path: recipes.callbacks.ema_reference.EMAReference
      init_args: {eta: 0.3, update_every_n_steps: 2, start_step: 1}"""


def _launch(tmp_path, name, *extra, ema=False):
    root = tmp_path / name
    root.mkdir()
    (root / "override.yaml").write_text(RESUME_OVERRIDES.format(root=root, callbacks=EMA_CALLBACK if ema else ""))
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # this checkout first
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "recipes", "fit", "--config", "yaml/tiny/ppo.yaml", "--config",
           str(root / "override.yaml"), *extra]
    return root, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _ckpts(root):
    files = list((root / "ckpt").glob("*step=*.ckpt")) if (root / "ckpt").exists() else []  # not last.ckpt
    return sorted(files, key=lambda p: int(p.stem.split("step=")[1].split("-")[0]))


def _metrics(root):
    rows = list(csv.DictReader(open(next(root.rglob("metrics.csv")))))
    return {int(r["step"]): {k: float(v) for k, v in r.items() if k.startswith("ppo/") and v} for r in rows}


@pytest.mark.slow  # three CLI processes: about 40 s on an idle 2-core machine, minutes under load
@pytest.mark.parametrize("ema", [False, True], ids=["frozen-reference", "ema-reference"])
def test_killed_run_resumes_exactly(tmp_path, ema):
    """kill -9 after a few iterations, resume from a complete checkpoint: the final weights (policy, critic and the
    reference), the running moments and every logged metric equal an uninterrupted run's. With ``EMAReference``
    (eta 0.3 every 2nd step, so a resume must also restore which step it last updated at) the reference moves, and
    its averaged weights resume exactly too."""
    full_root, full = _launch(tmp_path, "full", ema=ema)
    killed_root, killed = _launch(tmp_path, "killed", ema=ema)
    deadline = time.time() + 300
    while len(_ckpts(killed_root)) < 3 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    resume_from = _ckpts(killed_root)[-2]  # the newest may be half-written; the one before it is complete
    step = int(resume_from.stem.split("step=")[1])
    assert step < 8, "the run finished before it could be killed"
    resumed_root, resumed = _launch(tmp_path, "resumed", "--ckpt_path", str(resume_from), ema=ema)
    for proc in (full, resumed):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]
    final_full = torch.load(_ckpts(full_root)[-1], weights_only=False)
    final_resumed = torch.load(_ckpts(resumed_root)[-1], weights_only=False)
    assert final_full["global_step"] == final_resumed["global_step"] == 8
    for key, value in final_full["state_dict"].items():
        torch.testing.assert_close(final_resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
    assert final_full["ppo"]["reward_moments"] == final_resumed["ppo"]["reward_moments"]
    first = torch.load(_ckpts(full_root)[0], weights_only=False)["state_dict"]
    moved = [k for k in first if k.startswith("reference.") and not torch.equal(first[k], final_full["state_dict"][k])]
    assert bool(moved) == ema  # the EMA reference moves between step 1 and step 8; a frozen one does not
    if ema:
        ema_state = next(v for k, v in final_resumed["callbacks"].items() if "EMAReference" in k)
        assert ema_state == {"last_updated_step": 7}  # steps 1, 3, 5, 7
    full_metrics, resumed_metrics = _metrics(full_root), _metrics(resumed_root)
    assert sorted(resumed_metrics) == list(range(step, 8))
    for s in resumed_metrics:
        assert resumed_metrics[s] == pytest.approx(full_metrics[s], rel=0, abs=0), s
