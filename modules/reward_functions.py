"""The programmatic reward protocol: texts in, one score per response out.

PPO (step 3 of a rollout), DPO-Iter (pair labelling) and the study's gold reward all call rewards through this
protocol; a reward model wrapped by `recipes.modules.reward` satisfies it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # transformers loads with the reward model, not with this protocol
    from transformers import PreTrainedTokenizerBase


@runtime_checkable
class RewardFunction(Protocol):
    """Scores responses to prompts.

    Args:
        prompts: the prompt texts, one per response.
        responses: the generated texts (prompt excluded, stop token stripped).
        metadata: optional per-row records from the prompt dataset (unit tests of a code problem, a target value),
            aligned with ``prompts``; ``None`` when the prompt set carries none.

    Returns:
        A float tensor of shape ``(B,)`` on the CPU.
    """

    def __call__(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> torch.Tensor: ...


class CharacterFractionReward:
    """``scale`` times the fraction of a response's characters that belong to ``chars`` (0 for an empty response).

    A dense programmatic reward for CPU smoke runs: a random-init byte-level model starts near
    ``len(chars) / 256`` and PPO can raise it within tens of iterations, so learning is visible in minutes.

    Example::

        CharacterFractionReward("ab")(["q", "q"], ["aab", "xy"])  # tensor([1.0, 0.0])

    Args:
        chars: the characters that earn reward.
        scale: the reward of a response made only of ``chars`` (the paper's code reward gives 10 for a pass).
    """

    def __init__(self, chars: str = "abcdefghijklmnopqrstuvwxyz ", scale: float = 1.0) -> None:
        if not chars:
            raise ValueError("CharacterFractionReward: chars is empty; give at least one character.")
        self.chars, self.scale = frozenset(chars), float(scale)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> torch.Tensor:
        """Score each response by its share of characters in ``chars``."""
        return self.scale * torch.tensor([sum(c in self.chars for c in r) / len(r) if r else 0.0 for r in responses])


def prompt_response_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], responses: Sequence[str],
                        append_eos: bool = True) -> list[list[int]]:
    """The token ids of each ``prompt + response`` as the preference data modules build them for training
    (`recipes.datamodules.preference.PreferenceDataModule.tokenize`): the prompt tokenized on its own with the
    tokenizer's special tokens (a BOS where it adds one), the response on its own without, then EOS if ``append_eos``.

    Tokenizing the joined text instead gives other ids wherever a response does not start with a space: SentencePiece
    marks a word that starts a text with ``▁``, so a response ``"Put it"`` after ``"...Assistant:"`` is ``▁Put`` on its
    own (training) but ``Put`` glued to the colon; and PPO's decoded responses lose their leading space (Llama's
    decoder drops it). For a byte-level tokenizer without special tokens both ways give the same ids.

    Args:
        tokenizer: the reward model's tokenizer.
        prompts, responses: aligned texts.
        append_eos: append ``tokenizer.eos_token_id`` to every row.

    Returns:
        One list of ids per row.
    """
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if append_eos else []
    return [p + r + eos for p, r in zip(prompt_ids, response_ids)]


class SequenceClassifierReward:
    """A reward-model folder (an exported ``RewardModule`` or any Hugging Face sequence-classification model with
    one label) as a `RewardFunction`.

    Texts are tokenized with the reward model's own tokenizer, loaded from its folder (or ``tokenizer``): the policy's
    token ids are never fed to it, so a reward model with a different vocabulary scores correctly. Prompt and response
    are tokenized separately, exactly as in the reward model's training (`prompt_response_ids`), so PPO and evaluation
    feed it the ids it was trained on. The score is the head's output at the last real token of
    ``prompt + response (+ eos)``.

    Example::

        reward = SequenceClassifierReward("runs/rm/hf")
        reward.to("cuda")
        reward(["\\n\\nHuman: hi\\n\\nAssistant:"], [" Hello!"])  # tensor([0.83])

    Args:
        path: the reward model folder (``config.json``, weights, and normally the tokenizer).
        tokenizer: a tokenizer id or folder when ``path`` holds none.
        append_eos: append the reward tokenizer's EOS token, as the preference data modules do in training.
        batch_size: rows per forward pass.
        max_length: truncate longer texts from the left (counted in ``truncated``); None keeps everything.
        dtype: weight dtype (``float32``, ``bfloat16``, ``float16``).
        sharded: under FSDP2 (`shard`, called by ``PPOModule.configure_model`` with the strategy's mesh), split the
            weights over the ranks instead of holding a full copy on each: 1/N of the memory, one all-gather per
            layer per forward. False keeps a full copy per rank (no communication while scoring).
    """

    def __init__(self, path: str, tokenizer: str | None = None, append_eos: bool = True, batch_size: int = 16,
                 max_length: int | None = None, dtype: str = "float32", sharded: bool = True) -> None:
        self.path, self.tokenizer_path, self.append_eos = path, tokenizer, append_eos
        self.batch_size, self.max_length, self.dtype, self.sharded = batch_size, max_length, dtype, sharded
        self.model, self.tokenizer, self.device = None, None, torch.device("cpu")
        self.truncated = 0

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification

        from recipes.modules.tokenizer import load_tokenizer

        try:
            self.tokenizer = load_tokenizer(self.tokenizer_path or self.path)
        except (OSError, ValueError, TypeError) as e:
            raise FileNotFoundError(
                f"Reward model '{self.path}': no tokenizer could be loaded from it ({e.__class__.__name__}). Save the "
                "reward model's tokenizer in its folder, or set the reward's `tokenizer` to its tokenizer folder."
            ) from e
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=getattr(torch, self.dtype))
        if self.model.config.num_labels != 1:
            raise ValueError(f"Reward model '{self.path}' has {self.model.config.num_labels} labels; a reward model "
                             "has one scalar output (num_labels=1).")
        self.model.requires_grad_(False).eval().to(self.device)

    def to(self, device: torch.device | str) -> SequenceClassifierReward:
        """Move the reward model (loaded on first use) to ``device``; a sharded model stays where FSDP2 put its
        shards (the mesh's device) and only its inputs go to ``device``."""
        self.device = torch.device(device)
        if self.model is not None and not self.is_sharded:
            self.model.to(self.device)
        return self

    @property
    def is_sharded(self) -> bool:
        """Whether `shard` split the loaded reward model over the ranks."""
        from recipes.modules.sharding import is_sharded

        return self.model is not None and is_sharded(self.model)

    def shard(self, device_mesh: Any) -> SequenceClassifierReward:
        """Load the reward model and shard it with FSDP2 over ``device_mesh`` (each decoder layer a unit, the head
        another: `recipes.modules.sharding.fsdp2_shard_scalar`). Each forward then all-gathers one layer at a time, so
        every rank must score the same number of rows per call (PPO's per-rank rollouts are equal). No-op when
        ``sharded`` is False or there is no mesh."""
        if not self.sharded or device_mesh is None or self.is_sharded:
            return self
        from recipes.modules.sharding import fsdp2_shard_scalar

        if self.model is None:
            self._load()
        fsdp2_shard_scalar(self.model, device_mesh)
        return self

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> torch.Tensor:
        """Score ``prompt + response`` pairs with the reward model, re-tokenized with its own tokenizer."""
        from recipes.modules.scalar_models import sequence_scores

        if self.model is None:
            self._load()
        tok, scores, prompts = self.tokenizer, [], list(prompts)
        if len(prompts) != len(responses):
            raise ValueError(f"SequenceClassifierReward: {len(prompts)} prompts but {len(responses)} responses; pass "
                             "one prompt per response.")
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            ids = prompt_response_ids(tok, prompts[start:end], responses[start:end], self.append_eos)
            if self.max_length is not None:
                self.truncated += sum(len(row) > self.max_length for row in ids)
                ids = [row[-self.max_length:] for row in ids]
            width = max(len(row) for row in ids)
            input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for i, row in enumerate(ids):
                input_ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
            scores.append(sequence_scores(self.model, input_ids.to(self.device), mask.to(self.device)).float().cpu())
        if self.is_sharded:  # FSDP2 keeps a root unit's weights gathered after a forward with no backward
            from recipes.modules.sharding import reshard

            reshard(self.model)
        return torch.cat(scores)
