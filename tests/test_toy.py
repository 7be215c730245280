"""The embedded demo task: tokenizer, scratchpad targets, splits, model config."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_fast.r1 import toy
from grpo_fast.trainer.rewards import accuracy_reward, format_reward


def test_tokenizer_tags_are_single_tokens_and_round_trip():
    tok = toy.build_tokenizer()
    text = toy.scratchpad(864, 394)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert [tok.convert_ids_to_tokens(i) for i in ids[:2]] == ["<think>", "4"]
    assert ids.count(tok.convert_tokens_to_ids("</answer>")) == 1
    assert len(ids) == len(text) - sum(len(t) - 1 for t in toy.TAGS)  # one token per character, one per tag
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.pad_token_id != tok.eos_token_id and len(tok) == len(toy.VOCAB)


def test_tokenizer_saves_and_loads(tmp_path):
    tok = toy.build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "864+394=" + toy.scratchpad(864, 394)
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)


def test_scratchpad_columns_and_carries():
    assert toy.scratchpad(864, 394) == "<think>4+4=8,6+9=15,8+3+1=12</think><answer>1258</answer>"
    assert toy.scratchpad(999, 999) == "<think>9+9=18,9+9+1=19,9+9+1=19</think><answer>1998</answer>"
    assert toy.scratchpad(100, 200) == "<think>0+0=0,0+0=0,1+2=3</think><answer>300</answer>"


def test_targets_earn_full_reward():
    data = toy.make_splits(num_train=64, num_dev=8, num_test=16)["train"]
    columns = {"answer": data["answer"]}
    assert accuracy_reward(data["prompt"], data["completion"], **columns) == [1.0] * 64
    assert format_reward(data["prompt"], data["completion"]) == [1.0] * 64
    wrong = [c.replace("<answer>", "<answer>9") for c in data["completion"]]
    assert accuracy_reward(data["prompt"], wrong, **columns) == [0.0] * 64


def test_splits_are_disjoint_and_held_out_is_fixed_across_seeds():
    a = toy.make_splits(num_train=3000, seed=0)
    b = toy.make_splits(num_train=3000, seed=1)
    train, dev, test = (set(a[k]["prompt"]) for k in ("train", "dev", "test"))
    assert len(test) == len(a["test"]) >= 200 and len(dev) == len(a["dev"]) and len(train) == 3000
    assert not (train & test) and not (train & dev) and not (dev & test)
    assert a["test"]["prompt"] == b["test"]["prompt"] and a["train"]["prompt"] != b["train"]["prompt"]
    assert not set(b["train"]["prompt"]) & test


def test_tiny_qwen2_matches_the_demo_spec(tmp_path):
    tok = toy.build_tokenizer()
    model = toy.build_model(tok, seed=0)
    n = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n < 0.56e6
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (128, 2, 4, 512)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([tok("123+456=")["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_prompts_outside_the_alphabet_are_refused_with_the_row_named(tmp_path):
    """The character tokenizer maps unknown characters to <unk>; encoding such a prompt for sampling is an
    error naming the row, also with the tokenizer saved and loaded again."""
    import pytest

    from grpo_fast.trainer.rollout import encode_prompts

    tok = toy.build_tokenizer()
    ids, _ = encode_prompts(tok, ["12+7=", "864+394="], None, "cpu")
    assert not bool((ids == tok.unk_token_id).any())
    tok.save_pretrained(tmp_path)
    for tokenizer in (tok, AutoTokenizer.from_pretrained(tmp_path)):
        with pytest.raises(ValueError, match=r"prompts\[1\] = 'What is 12 \+ 7\?' has text the tokenizer"):
            encode_prompts(tokenizer, ["12+7=", "What is 12 + 7?"], None, "cpu")
