"""Sampling with a KV cache: matches Hugging Face greedy decoding, ignores left padding, stops at EOS, filters
top-k / top-p as computed by hand, and is reproducible from a generator."""

import torch
from torch import nn

from modules.generation import filter_logits, sample


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

    def forward(self, input_ids, attention_mask, position_ids, use_cache=True, past_key_values=None,
                logits_to_keep=None):
        step = 0 if past_key_values is None else past_key_values + 1
        logits = torch.full((len(self.script), 1, self.vocab), -1e9)
        for i, row in enumerate(self.script):
            logits[i, 0, row[min(step, len(row) - 1)]] = 0.0
        return type("Out", (), {"logits": logits, "past_key_values": step})()


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


def test_sampling_is_reproducible_from_a_generator(tiny_model, byte_tokenizer):
    tok = byte_tokenizer
    enc = tok(["xy", "hello"], return_tensors="pt", padding=True, padding_side="left")
    runs = [sample(tiny_model, enc.input_ids, enc.attention_mask, 6, tok.eos_token_id, tok.pad_token_id,
                   top_k=50, generator=torch.Generator().manual_seed(7)).response_ids for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert tiny_model.training  # mode restored
