"""The R1 toy world's non-reasoning family (r1_simple), the non-reasoning filters and the mix of the
rejection-sampled SFT set (sampling.filter_non_reasoning, mix_sets)."""

import pytest

pytest.importorskip("datasets", reason="needs the datasets package (the R1 recipe's data): pip install datasets")

from grpo_fast.r1 import simple as r1_simple  # noqa: E402
from grpo_fast.r1 import world as r1_toy  # noqa: E402
from grpo_fast.r1.language import reasoning_text  # noqa: E402
from grpo_fast.r1.rejection import NON_REASONING_FILTERS, filter_non_reasoning, mix_sets, mix_sizes  # noqa: E402
from grpo_fast.trainer.rewards import accuracy_reward, format_reward  # noqa: E402


def test_simple_queries_answers_and_splits():
    assert [r1_simple.answer(k, 472) for k in r1_simple.KINDS] == ["472", "2", "7", "4"]
    assert r1_simple.completion("hundreds", 905) == "<think></think><answer>9</answer>"
    assert r1_simple.completion("ones", 905, wrong=True) == "<think></think><answer>6</answer>"
    spelt = r1_simple.completion("copy", 905, reasoning=True, languages=("zh", "en", "zh"), tagged=False)
    assert spelt == "<think>百 9,tens 0,个 5</think>905"
    with pytest.raises(ValueError, match="kind"):
        r1_simple.answer("thousands", 472)
    splits, other_seed = r1_simple.make_splits(seed=0), r1_simple.make_splits(seed=1)
    assert len(splits["test"]) == 256 and len(splits["train"]) == 4 * 900 - 256
    assert splits["test"]["prompt"] == other_seed["test"]["prompt"]  # held out whatever the seed
    assert splits["train"]["prompt"] != other_seed["train"]["prompt"]
    assert not set(splits["test"]["prompt"]) & set(splits["train"]["prompt"])
    test = splits["test"]
    assert accuracy_reward(test["prompt"], test["completion"], answer=test["answer"]) == [1.0] * 256
    assert sum(format_reward(None, test["completion"])) == 256
    tok = r1_toy.build_tokenizer()
    ids = tok(test["prompt"][0] + test["completion"][0], add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == test["prompt"][0] + test["completion"][0]


def test_writers_styles_and_the_pretraining_corpus():
    train = r1_simple.make_splits()["train"]
    corpus = r1_simple.written(train, r1_simple.CORPUS_STYLE, seed=0)["completion"]
    thinks = sum(bool(reasoning_text(t)) for t in corpus) / len(corpus)
    untagged = 1 - sum(format_reward(None, corpus)) / len(corpus)
    assert abs(thinks - 0.5) < 0.04 and abs(untagged - 0.3) < 0.04
    assert accuracy_reward(None, corpus, answer=train["answer"]) == [1.0] * len(corpus)
    addition = r1_toy.make_splits(num_train=100, num_dev=4, num_test=4)["train"]
    mixed = r1_toy.pretraining_corpus(addition, seed=0, simple=train.select(range(50)))
    assert len(mixed) == 150 and mixed["prompt"][100:] == train["prompt"][:50]
    assert r1_toy.pretraining_corpus(addition, seed=0)["completion"] == mixed["completion"][:100]


def test_non_reasoning_filters_each_reject_their_failure():
    def row(prompt="tens 472=", text="<think></think><answer>7</answer>", answer="7"):
        return {"prompt": prompt, "completion": text, "answer": answer}

    rows = [
        row(),
        row(text="<think>hundreds 4,tens 7,ones 2</think><answer>7</answer>"),  # needless reasoning
        row(prompt="ones 472=", text="<think></think>2", answer="2"),  # untagged
        row(prompt="copy 472=", text="<think></think><answer>473</answer>", answer="472"),  # wrong
        row(),  # the same prompt again
        row(prompt="copy 472=", text="<think></think><answer>472</answer>", answer="472"),
        row(prompt="ones 472=", text="<think>2</think><answer>2</answer>", answer="2"),  # digits only: reasons
    ]
    kept, stats = filter_non_reasoning(rows)
    assert [r["prompt"] for r in kept] == ["tens 472=", "copy 472="]
    assert stats["rejected"] == {"format": 1, "correct": 1, "reasoning": 2, "duplicate": 1}
    assert tuple(stats["rejected"]) == NON_REASONING_FILTERS and stats["offered"] == 7 and stats["kept"] == 2
    assert stats["pass_rate"] == {"format": 6 / 7, "correct": 6 / 7, "reasoning": 5 / 7}
    assert filter_non_reasoning([])[1]["kept"] == 0
    # the curated source: mostly clean, each of its defects removed by its filter
    source = r1_simple.source_answer_set(r1_simple.make_splits()["train"], 2000, seed=0).to_list()
    kept, stats = filter_non_reasoning(source)
    assert 0.7 < stats["kept"] / 2000 < 0.85 and all(
        stats["rejected"][k] > 0 for k in ("format", "correct", "reasoning")
    )
    assert {r["completion"][:15] for r in kept} == {"<think></think>"}


def test_mix_ratio_size_and_the_same_size_control():
    assert mix_sizes(2000, 3.0) == (1500, 500) and mix_sizes(2000, 1.0) == (1000, 1000)
    with pytest.raises(ValueError, match="ratio"):
        mix_sizes(10, 0.0)
    reasoning = [{"prompt": f"{i}+1=", "kind": "r"} for i in range(400)]
    simple = [{"prompt": f"copy {i}=", "kind": "s"} for i in range(300)]
    mixed, control, stats = mix_sets(reasoning, simple, ratio=3.0)
    assert len(mixed) == len(control) == 400 and stats == {"reasoning": 300, "non_reasoning": 100, "size": 400,
                                                           "ratio": 3.0, "target_ratio": 3.0}  # fmt: skip
    assert [r for r in mixed if r["kind"] == "r"] == reasoning[:300] and control == reasoning
    assert [r for r in mixed if r["kind"] == "s"] == simple[:100]
    assert sum(r["kind"] == "s" for r in mixed[:40]) == 10  # spread evenly: every prefix has the ratio
    mixed, _, stats = mix_sets(reasoning, simple[:20], ratio=1.0)  # the source runs short: what it has
    assert stats["non_reasoning"] == 20 and stats["reasoning"] == 380 and len(mixed) == 400
