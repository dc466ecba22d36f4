"""Sampling with a KV cache: matches Hugging Face greedy decoding, ignores left padding, stops at EOS, filters
top-k / top-p as computed by hand, draws from that distribution by inverse CDF and scores tokens with its log-probs
(unchanged to the bit without filters), is reproducible from a generator, and its preallocated cache equals
transformers' DynamicCache."""

import math

import pytest
import torch
from torch import nn

from recipes.modules.generation import CACHE, GrowingKVLayer, draw_tokens, filter_logits, preallocated_cache, sample
from recipes.modules.policy import logprobs_from_logits, position_ids_from_mask
from recipes.modules.response_logprobs import filtered_logprobs, response_logprobs, sampling_logits
from tests.conftest import TINY_LLAMA


def test_greedy_matches_hf_generate_and_ignores_left_padding(tiny_model, byte_tokenizer):
    tok = byte_tokenizer
    enc = tok(["hello there", "a"], return_tensors="pt", padding=True, padding_side="left")
    ours = sample(tiny_model, enc.input_ids, enc.attention_mask, 8, tok.eos_token_id, tok.pad_token_id,
                  temperature=0)
    tiny_model.eval()
    hf = tiny_model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    width = ours.response_ids.shape[1]
    torch.testing.assert_close(ours.response_ids, hf[:, enc.input_ids.shape[1]:][:, :width])
    alone = tok(["a"], return_tensors="pt")
    single = sample(tiny_model, alone.input_ids, alone.attention_mask, 8, tok.eos_token_id, tok.pad_token_id,
                    temperature=0)
    torch.testing.assert_close(single.response_ids[0], ours.response_ids[1, :single.response_ids.shape[1]])


class Scripted(nn.Module):
    """A fake causal LM whose row i emits script[i][step] (one-hot logits), with a cache that counts steps."""

    def __init__(self, script, vocab=10):
        super().__init__()
        self.script, self.vocab = script, vocab

    def forward(self, input_ids, attention_mask, position_ids, use_cache=True, logits_to_keep=None, **cache):
        step = 0 if cache.get(CACHE) is None else cache[CACHE] + 1  # CACHE: the installed transformers' name
        logits = torch.full((len(self.script), 1, self.vocab), -1e9)
        for i, row in enumerate(self.script):
            logits[i, 0, row[min(step, len(row) - 1)]] = 0.0
        return type("Out", (), {"logits": logits, CACHE: step})()


def test_stops_at_eos_pads_after_it_and_flags_truncation():
    eos, pad = 2, 0
    model = Scripted([[5, 6, eos, 7], [7, 7, 7, 7, 7]])
    ids = torch.tensor([[0, 4], [3, 4]])
    out = sample(model, ids, torch.tensor([[0, 1], [1, 1]]), max_new_tokens=4, eos_token_id=eos, pad_token_id=pad)
    assert out.response_ids.tolist() == [[5, 6, eos, pad], [7, 7, 7, 7]]
    assert out.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert out.ended_with_eos.tolist() == [True, False]
    early = sample(Scripted([[5, eos], [eos]]), ids, torch.ones_like(ids), 6, eos, pad)
    assert early.response_ids.tolist() == [[5, eos], [eos, pad]]  # stops as soon as every row has ended


def test_filter_logits_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    inf = float("-inf")
    top2 = filter_logits(logits, top_k=2)
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    # nucleus 0.7: 0.5 < 0.7 so 0.3 is needed (cumulative 0.8 >= 0.7); 0.15 and 0.05 go
    nucleus = filter_logits(logits, top_p=0.7)
    assert nucleus[0].tolist()[2:] == [inf, inf] and torch.isfinite(nucleus[0, :2]).all()
    # nucleus 0.5: the first token alone reaches it
    assert torch.isfinite(filter_logits(logits, top_p=0.5)[0]).tolist() == [True, False, False, False]
    assert torch.equal(filter_logits(logits), logits)


def test_filtered_logprobs_by_hand():
    """Logits (2, 1, 0, -1), one position per token id. top_k=2 keeps {0, 1}: log p(0) = 2 - log(e^2 + e), log p(1)
    = 1 - log(e^2 + e); token 2 lies outside and is put back into the set: 0 - log(e^2 + e + 1). top_p=0.9 keeps
    {0, 1, 2} (probabilities 0.644, 0.237, 0.087, 0.032; mass before token 2 is 0.881 < 0.9, before token 3 0.968)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(1, 4, 4)  # (B=1, T=4, V=4): position t scores token t
    tokens = torch.tensor([[0, 1, 2, 3]])
    e = math.e
    top2 = filtered_logprobs(logits, tokens, top_k=2)[0]
    torch.testing.assert_close(top2[:3], torch.tensor([2 - math.log(e**2 + e), 1 - math.log(e**2 + e),
                                                       -math.log(e**2 + e + 1)]))
    torch.testing.assert_close(top2[3], torch.tensor(-1 - math.log(e**2 + e + e**-1)))
    nucleus = filtered_logprobs(logits, tokens, top_p=0.9)[0]
    torch.testing.assert_close(nucleus[:3], torch.tensor([2.0, 1.0, 0.0]) - math.log(e**2 + e + 1))


def test_filtered_logprobs_take_the_nucleus_of_the_temperature_scaled_logits():
    """Temperature 2 gives logits (1, 0.5, 0, -0.5), probabilities 0.455, 0.276, 0.167, 0.102: top_p=0.75 keeps
    {0, 1, 2} (mass before token 2 is 0.731 < 0.75), where unscaled probabilities would keep only {0, 1} (0.881).
    log p(0) = 1 - log(e + e^0.5 + 1)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(1, 1, 4)
    got = filtered_logprobs(logits, torch.tensor([[0]]), temperature=2.0, top_p=0.75)
    torch.testing.assert_close(got, torch.tensor([[1 - math.log(math.e + math.e**0.5 + 1)]]))
    # temperature alone, no filter: the scaled softmax, 1 - log(e + e^0.5 + 1 + e^-0.5)
    alone = filtered_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    torch.testing.assert_close(alone, torch.tensor([[1 - math.log(math.e + math.e**0.5 + 1 + math.e**-0.5)]]))


def test_without_filters_log_probs_and_entropy_are_the_plain_ones_to_the_bit(tiny_model, byte_tokenizer):
    """No top-k, no top-p, temperature 1: the same arithmetic as before the filters existed (the study's runs stay
    bit-identical); a top_k as large as the vocabulary is no filter either."""
    logits = torch.randn(2, 5, 260, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 260, (2, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(filtered_logprobs(logits, tokens), logprobs_from_logits(logits, tokens))
    assert torch.equal(filtered_logprobs(logits, tokens, top_k=260), logprobs_from_logits(logits, tokens))
    ids = byte_tokenizer(["hello there"], return_tensors="pt").input_ids
    logprobs, entropy = response_logprobs(tiny_model, ids, torch.ones_like(ids), 4, with_entropy=True)
    logits = tiny_model(input_ids=ids).logits[:, 3:-1]
    assert torch.equal(logprobs, logprobs_from_logits(logits, ids[:, 4:]))
    torch.testing.assert_close(entropy, torch.distributions.Categorical(logits=logits).entropy(), rtol=0, atol=0)


def test_filtered_entropy_is_that_of_the_renormalised_set():
    """top_k=2 on probabilities (0.5, 0.3, 0.15, 0.05): the set {0, 1} renormalised is (0.625, 0.375), entropy
    -(0.625 log 0.625 + 0.375 log 0.375) = 0.66166."""
    from recipes.modules.response_logprobs import filtered_entropy

    kept = sampling_logits(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), torch.tensor([0]), top_k=2)
    assert torch.isinf(kept[0, 2:]).all()
    torch.testing.assert_close(filtered_entropy(kept), torch.tensor([-(0.625 * math.log(0.625)
                                                                        + 0.375 * math.log(0.375))]))


def test_sampling_is_reproducible_from_a_generator(tiny_model, byte_tokenizer):
    tok = byte_tokenizer
    enc = tok(["xy", "hello"], return_tensors="pt", padding=True, padding_side="left")
    runs = [sample(tiny_model, enc.input_ids, enc.attention_mask, 6, tok.eos_token_id, tok.pad_token_id,
                   top_k=50, generator=torch.Generator().manual_seed(7)).response_ids for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert tiny_model.training  # mode restored


def test_draw_tokens_inverts_the_cdf_by_hand():
    """p = [0.5, 0.3, 0.15, 0.05] splits [0, 1) into [0, .5) -> 0, [.5, .8) -> 1, [.8, .95) -> 2, [.95, 1) -> 3;
    each row's token is the interval holding its uniform, read from a clone of the generator."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(64, 4)
    generator = torch.Generator().manual_seed(11)
    u = torch.rand(64, 1, dtype=torch.float64, generator=torch.Generator().set_state(generator.get_state()))
    tokens, mass = draw_tokens(logits, generator=generator)
    expected = [0 if x < 0.5 else 1 if x < 0.8 else 2 if x < 0.95 else 3 for x in u.flatten().tolist()]
    assert tokens.tolist() == expected
    torch.testing.assert_close(mass, torch.full((64,), 2.0, dtype=torch.float64))  # weights p / max p sum to 2


@pytest.mark.parametrize("settings, expected", [
    ({}, [0.5, 0.3, 0.15, 0.05]),
    ({"temperature": 0.5}, [0.25 / 0.365, 0.09 / 0.365, 0.0225 / 0.365, 0.0025 / 0.365]),  # p^2, renormalized
    ({"top_k": 2}, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),
    ({"top_p": 0.7}, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # mass before 0.15 is 0.8 >= 0.7
    ({"top_k": 3, "top_p": 0.9}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),  # within top-3: before 0.15 is 0.84
])
def test_draw_tokens_follows_the_filtered_distribution(settings, expected):
    """20 000 draws per setting: frequencies within 4.5 binomial standard deviations (at most 0.016) of the
    hand-computed probabilities, and a filtered token is never drawn."""
    n = 20_000
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(n, 4)
    tokens, _ = draw_tokens(logits, generator=torch.Generator().manual_seed(0), **settings)
    freq = torch.bincount(tokens, minlength=4).double() / n
    for f, p in zip(freq.tolist(), expected):
        assert abs(f - p) <= 4.5 * (p * (1 - p) / n) ** 0.5 + 1e-12, (settings, freq.tolist(), expected)
    expected_filtered = torch.tensor(expected) == 0
    assert (freq[expected_filtered] == 0).all()
    # the same distribution as softmax(filter_logits(...)) that a torch.multinomial sampler would use
    temperature = settings.get("temperature", 1.0)
    filtered = filter_logits(logits[:1] / temperature, settings.get("top_k", 0), settings.get("top_p", 1.0))
    torch.testing.assert_close(filtered.softmax(-1)[0], torch.tensor(expected), rtol=1e-5, atol=1e-6)
    # and filtered_logprobs scores each token the sampler can draw with the same probabilities
    kept = [i for i, p in enumerate(expected) if p > 0]
    scored = filtered_logprobs(logits[:1, None].expand(1, len(kept), 4), torch.tensor([kept]), **settings)
    torch.testing.assert_close(scored.exp()[0], torch.tensor(expected)[kept], rtol=1e-5, atol=1e-6)


def test_preallocated_cache_matches_the_dynamic_cache(tiny_model, byte_tokenizer):
    """Prompt prefill plus three one-token steps: the preallocated layers hold the same keys and values, and give the
    same logits, as transformers' DynamicCache, without growing their buffers."""
    from transformers.cache_utils import DynamicCache

    tiny_model.eval()
    enc = byte_tokenizer(["hello there", "a"], return_tensors="pt", padding=True, padding_side="left")
    caches = [preallocated_cache(tiny_model, enc.input_ids.shape[1] + 3), DynamicCache(config=tiny_model.config)]
    assert all(isinstance(layer, GrowingKVLayer) for layer in caches[0].layers)
    logits = []
    for cache in caches:
        ids, mask, steps = enc.input_ids, enc.attention_mask, []
        positions = position_ids_from_mask(mask)
        for _ in range(4):
            out = tiny_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{CACHE: cache})
            steps.append(out.logits[:, -1])
            ids, positions = out.logits[:, -1].argmax(-1, keepdim=True), positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits.append(torch.stack(steps))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(ours.keys, theirs.keys)
        torch.testing.assert_close(ours.values, theirs.values)
        assert ours.get_seq_length() == theirs.get_seq_length() == enc.input_ids.shape[1] + 3
    with pytest.raises(RuntimeError, match="exceed the preallocated"):
        caches[0].layers[0].update(*(torch.zeros(2, 2, 1, 8),) * 2)


def test_sliding_window_model_keeps_its_own_cache_and_matches_hf(byte_tokenizer):
    """A Mistral with a 4-token sliding window needs transformers' sliding cache: no preallocated cache is built,
    and greedy sampling still equals HF's greedy generate past the window."""
    from recipes.modules.models import ModelSpec, build_causal_lm

    model = build_causal_lm(ModelSpec(config={**TINY_LLAMA, "model_type": "mistral", "sliding_window": 4}),
                            byte_tokenizer)
    assert preallocated_cache(model, 32) is None and preallocated_cache(Scripted([[1]]), 8) is None
    enc = byte_tokenizer(["sliding window", "ab"], return_tensors="pt", padding=True, padding_side="left")
    ours = sample(model, enc.input_ids, enc.attention_mask, 10, byte_tokenizer.eos_token_id,
                  byte_tokenizer.pad_token_id, temperature=0)
    model.eval()
    hf = model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=10, do_sample=False,
                        pad_token_id=byte_tokenizer.pad_token_id, eos_token_id=byte_tokenizer.eos_token_id)
    width = ours.response_ids.shape[1]
    torch.testing.assert_close(ours.response_ids, hf[:, enc.input_ids.shape[1]:][:, :width])


class Counting(Scripted):
    """Scripted, counting its forwards."""

    calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return super().forward(*args, **kwargs)


def test_one_forward_per_sampled_token_and_none_after_the_last():
    """4 new tokens need the prefill and 3 one-token forwards; no forward runs for a 5th token."""
    model = Counting([[5, 6, 7, 8, 9]])
    out = sample(model, torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.long), 4, eos_token_id=2,
                 pad_token_id=0)
    assert out.response_ids.tolist() == [[5, 6, 7, 8]] and model.calls == 4


class NaNModel(Scripted):
    """Scripted, but row 1's logits are NaN."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits[1] = float("nan")
        return out


def test_bad_settings_and_unusable_logits_are_clear_errors():
    ids, mask = torch.tensor([[3, 4], [3, 4]]), torch.ones(2, 2, dtype=torch.long)
    for bad in ({"top_p": 0.0}, {"temperature": -1.0}, {"top_k": -1}, {"max_new_tokens": 0}):
        kwargs = {"max_new_tokens": 3, **bad}
        with pytest.raises(ValueError, match="sampling settings"):
            sample(Scripted([[5], [5]]), ids, mask, eos_token_id=2, pad_token_id=0, **kwargs)
    with pytest.raises(ValueError, match=r"at new token 1, rows \[1\] have no token to sample from"):
        sample(NaNModel([[5], [5]]), ids, mask, 3, eos_token_id=2, pad_token_id=0)
