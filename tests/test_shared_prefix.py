"""The shared-prompt forward (grpo_fast/trainer/shared_prefix.py) against the model's own full forward pass.

Tiny random Llama-family models built from configs (no download): Qwen2 (q/k/v biases), Llama with
grouped-query attention, Qwen3 (per-head q/k norms), Mistral with one key/value head. Prompts are left
padded to different widths; micro-batches take rows from several groups in scrambled order. Hidden states
and every parameter gradient must equal those of ``completion_hidden`` (the model's forward over
[prompt; completion] for each row), and the trainer's update must not depend on the switch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from llama_family import CONFIGS, V
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM

from grpo_fast.r1 import toy
from grpo_fast.trainer import GRPOConfig, GRPOTrainer, shared_prefix
from grpo_fast.trainer.modeling import backbone_and_head, completion_hidden
from grpo_fast.trainer.shared_prefix import SharedPrefixForward, SharedPrompts, groups_share_prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, 1 thread


def _model(name: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config).train()


def _grouped_batch(prompts=4, g=3, p=7, t=6, seed=1):
    """(B, P) prompts repeated g times (left padding of different widths), (B, T) random completions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (prompts, p), generator=gen)
    mask = torch.ones(prompts, p, dtype=torch.long)
    mask[1, :3] = 0
    mask[3 % prompts, : p - 1] = 0  # a one-token prompt
    ids = ids.masked_fill(mask == 0, 0)
    completions = torch.randint(1, V, (prompts * g, t), generator=gen)
    return ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0), completions


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["matmul", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_hidden_states_and_gradients_equal_the_full_forward(name, attention, monkeypatch):
    """Micro-batches with rows of several groups in scrambled order, cut to different widths; the second
    passes completion lengths, so its tokens are packed and positions past a row's end come out 0."""
    if attention == "sdpa":
        monkeypatch.setattr(shared_prefix, "SMALL_SCORES", 0)  # the branch long sequences take
    model = _model(name)
    g = 3
    ids, mask, completions = _grouped_batch(g=g)
    weights = torch.randn(completions.shape + (model.config.hidden_size,), generator=torch.Generator().manual_seed(2))
    cuts = [
        (torch.tensor([11, 0, 5, 7]), 4, None),
        (torch.tensor([3, 1, 9, 2, 10, 4, 8, 6]), 6, [6, 1, 3, 6, 2, 5, 4, 1]),
    ]
    backbone = backbone_and_head(model)[0]
    full = []
    for rows, t, lengths in cuts:  # the reference: the model's own forward over [prompt; completion] per row
        width = torch.tensor(lengths if lengths is not None else [t] * len(rows))
        read = (torch.arange(t) < width[:, None])[..., None]  # (b, t, 1) bool: the positions a loss reads
        full.append((completion_hidden(backbone, ids[rows], mask[rows], completions[rows, :t]), read))
        (full[-1][0] * read * weights[rows, :t]).sum().backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    shared = SharedPrompts(SharedPrefixForward(model), ids, mask, g)
    for (rows, t, lengths), (reference, read) in zip(cuts, full):
        hidden = shared.hidden(rows, completions[rows, :t], None if lengths is None else torch.tensor(lengths))
        torch.testing.assert_close(hidden * read, reference * read, rtol=1e-5, atol=1e-5)
        assert not bool(hidden[~read.expand_as(hidden)].any())  # unread positions are exactly 0
        (hidden * weights[rows, :t]).sum().backward()
    before = _grads(model)
    shared.backward()
    after = _grads(model)
    assert set(after) == set(expected)
    for n in expected:  # fp32 rounding: the sums run in another order; scale by the gradient's size
        scale = float(expected[n].abs().max())
        torch.testing.assert_close(after[n], expected[n], rtol=1e-4, atol=5e-6 * scale, msg=n)
    # the prompt pass's share arrived in backward(): the embedding gradient changed there
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def _cuda_sdpa_dispatch(real):
    """Stands in for CUDA's choice of kernel for a masked ``scaled_dot_product_attention``: the flash kernel
    takes no mask and the memory-efficient one no grouped heads (``enable_gqa``), so masked grouped-head
    attention gets the math kernel (which saves the probabilities for backward); other masked calls a
    fused kernel (here the CPU flash one, which saves only its output and log-sum-exp)."""

    def sdpa(q, k, v, attn_mask=None, *args, enable_gqa=False, **kwargs):
        grouped = enable_gqa and q.shape[1] != k.shape[1]
        backend = SDPBackend.MATH if attn_mask is not None and grouped else SDPBackend.FLASH_ATTENTION
        with sdpa_kernel(backend):
            return real(q, k, v, attn_mask, *args, enable_gqa=enable_gqa, **kwargs)

    return sdpa


@pytest.mark.parametrize("name", ["llama_gqa", "mistral"])  # grouped key/value heads
def test_cuda_attention_path_saves_no_probabilities(name, monkeypatch):
    """The branch CUDA takes (SDPA with the prompt/causal mask), with CUDA's kernel choice: no saved
    (B, heads, n, P + n) (or prompt pass (P_n, heads, P, P)) tensor, and the model's own hidden states
    and gradients."""
    monkeypatch.setattr(shared_prefix, "SMALL_SCORES", 0)
    monkeypatch.setattr(F, "scaled_dot_product_attention", _cuda_sdpa_dispatch(F.scaled_dot_product_attention))
    model, g = _model(name), 3
    ids, mask, completions = _grouped_batch(g=g)
    weights = torch.randn(completions.shape + (model.config.hidden_size,), generator=torch.Generator().manual_seed(2))
    full = completion_hidden(backbone_and_head(model)[0], ids, mask, completions)
    (full * weights).sum().backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    saved = []
    forward = SharedPrefixForward(model)
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        prompts = forward.prompt_pass(ids[::g], mask[::g])
        hidden = forward.completion_hidden(prompts, torch.arange(len(ids)) // g, completions)
    (hidden * weights).sum().backward()
    b, p, n, heads = len(ids), ids.shape[1], completions.shape[1] - 1, model.config.num_attention_heads
    probabilities = {(b, heads, n, p + n), (b // g, heads, p, p)}
    assert not probabilities & {tuple(s) for s in saved}, "the attention saved its probabilities"
    torch.testing.assert_close(hidden, full, rtol=1e-5, atol=1e-5)
    grads = _grads(model)
    assert set(grads) == set(expected)
    for key in expected:
        scale = float(expected[key].abs().max())
        torch.testing.assert_close(grads[key], expected[key], rtol=1e-4, atol=5e-6 * scale, msg=key)


def test_forward_only_pass_keeps_no_graph_and_matches():
    model = _model("qwen3").eval()
    ids, mask, completions = _grouped_batch(g=2, prompts=3)
    forward = SharedPrefixForward(model)
    with torch.no_grad():
        prompts = forward.prompt_pass(ids[::2], mask[::2])
        hidden = forward.completion_hidden(prompts, torch.arange(6) // 2, completions)
        full = completion_hidden(backbone_and_head(model)[0], ids, mask, completions)
    assert not hidden.requires_grad
    torch.testing.assert_close(hidden, full, rtol=1e-5, atol=1e-5)


def test_one_token_completions():
    model = _model("qwen2")
    ids, mask, completions = _grouped_batch(t=1)
    forward = SharedPrefixForward(model)
    hidden = forward.completion_hidden(forward.prompt_pass(ids[::3], mask[::3]), torch.arange(12) // 3, completions)
    full = completion_hidden(backbone_and_head(model)[0], ids, mask, completions)
    assert hidden.shape == (12, 1, 32)
    torch.testing.assert_close(hidden, full, rtol=1e-5, atol=1e-5)


def test_what_it_refuses():
    ids, mask, _ = _grouped_batch(g=3)
    assert groups_share_prompts(ids, mask, 3)
    assert not groups_share_prompts(ids, mask, 1)  # nothing to share
    assert not groups_share_prompts(ids[:-1], mask[:-1], 3)  # rows not a multiple of G
    other = ids.clone()
    other[1, -1] = (other[1, -1] % (V - 1)) + 1  # one sample of group 0 has another prompt
    assert not groups_share_prompts(other, mask, 3)
    right = mask.clone()
    right[0, -1] = 0  # a prompt ending in padding
    assert not groups_share_prompts(ids, right, 3)
    with pytest.raises(ValueError, match="prompt_mask"):
        SharedPrefixForward(_model("qwen2")).prompt_pass(ids, right)
    dropout = _model("llama_gqa")
    dropout.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match="attention dropout"):
        SharedPrefixForward(dropout)
    window = _model("mistral")
    window.config.sliding_window, window.config.use_sliding_window = 8, True
    with pytest.raises(ValueError, match="sliding-window"):
        SharedPrefixForward(window)  # full attention would differ beyond the window
    SharedPrefixForward(window, max_length=8)  # within the window it is full attention


def _trainer(tmp_path, share: bool, **changes):
    tok = toy.build_tokenizer()
    model = toy.build_model(tok, seed=0, hidden_size=32, layers=2, heads=2, ffn=64)
    base = dict(output_dir=str(tmp_path / str(share)), seed=3, max_steps=2, learning_rate=1e-2, adam_epsilon=1.0,
                per_device_train_batch_size=6, gradient_accumulation_steps=2, num_generations=4,
                max_completion_length=10, share_prompt_prefix=share)  # fmt: skip

    def digit_share(prompts, completions, **kwargs):
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    data = toy.make_splits(num_train=64, num_dev=8, num_test=8)["train"]
    return GRPOTrainer(model, digit_share, GRPOConfig(**{**base, **changes}), data, tokenizer=tok)


@pytest.mark.parametrize("changes", [{}, {"beta": 0.04, "num_iterations": 2, "loss_type": "grpo"}])
def test_trainer_update_does_not_depend_on_the_switch(tmp_path, changes, monkeypatch):
    """Two steps with the prompt shared and with the model's own forward: the same parameters (the shared
    path is really taken: its prompt passes are counted), the same metrics. With beta and mu = 2 the old
    and reference log-probs take the shared path too."""
    calls, real = [], SharedPrefixForward.prompt_pass
    monkeypatch.setattr(SharedPrefixForward, "prompt_pass", lambda *a: calls.append(1) or real(*a))
    results = []
    for share in (True, False):
        trainer = _trainer(tmp_path, share, **changes)
        metrics = [trainer.step() for _ in range(2)]
        results.append(({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, metrics))
    (shared, m_shared), (plain, m_plain) = results
    assert len(calls) == (2 * (2 + 1 + 1) if changes else 2)  # per step: mu updates (+ old + ref log-probs)
    for k in plain:
        torch.testing.assert_close(shared[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)
    for a, b in zip(m_shared, m_plain):
        for k in ("loss", "kl", "reward", "grad_norm", "completions/mean_length"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_trainer_falls_back_when_the_prompt_pass_would_cost_memory(tmp_path):
    """Prompts longer than an average micro-batch's completion tokens: holding the prompt pass's
    activations for the whole step would cost more than one pass, so the update runs the model's own
    forward."""
    trainer = _trainer(tmp_path, True, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    trainer.seed_step()
    batch, _ = trainer.sample_batch()  # 4 prompts of 8 tokens x G = 4
    for width, shared in ((10, True), (1, False)):  # average micro-batch: 8 rows x width completion tokens
        ids = torch.full((16, width), 9)
        batch.rollout.completion_ids, batch.rollout.completion_mask = ids, torch.ones_like(ids)
        assert (trainer.shared_prompts(batch) is not None) == shared  # 32 prompt tokens vs 80, then 8
    assert _trainer(tmp_path, False)._prefix is None
    assert _trainer(tmp_path, True, gradient_checkpointing=True)._prefix.recompute


@pytest.mark.parametrize("name", ["qwen2", "llama_gqa"])
def test_checkpointed_completion_layers_give_the_same_gradients_and_keep_less(name):
    """checkpoint=True: the same gradients (prompt pass included), and the completion pass saves only each
    layer's input for backward (counted through saved-tensor hooks) instead of every activation."""
    ids, mask, completions = _grouped_batch(g=3)
    lengths = torch.tensor([6, 1, 3, 6, 2, 5, 4, 1, 6, 6, 3, 2])
    grads, saved = [], []
    for checkpoint in (False, True):
        model = _model(name)
        shared = SharedPrompts(SharedPrefixForward(model, checkpoint=checkpoint), ids, mask, 3)
        sizes = []

        def keep(t, sizes=sizes):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            hidden = shared.hidden(torch.arange(12), completions, lengths)
        (hidden * torch.linspace(-1, 1, hidden.numel()).view_as(hidden)).sum().backward()
        shared.backward()
        grads.append(_grads(model))
        saved.append(sum(sizes))
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)
    assert saved[1] < saved[0] / 3


_ONE_STEP = """
import hashlib, sys, tempfile, torch
from grpo_fast.r1 import toy
from grpo_fast.trainer import GRPOConfig, GRPOTrainer
torch.set_num_threads(2)
tok = toy.build_tokenizer()
model = toy.build_model(tok, seed=0)
data = toy.make_splits(num_train=64, num_dev=8, num_test=8)["train"]
cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), seed=0, max_steps=1, learning_rate=1e-3, num_generations=8,
                 per_device_train_batch_size=64, gradient_accumulation_steps=2, max_completion_length=24)
share = lambda prompts, completions, **kw: [sum(c.isdigit() for c in x) / (1 + len(x)) for x in completions]
GRPOTrainer(model, share, cfg, data, tokenizer=tok).step()
print(hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest())
"""


def test_the_update_is_bit_identical_across_processes():
    """Two fresh processes, one step each with the demo's model at 2 threads: the same parameters to the
    bit. (Gathering the prompt keys by indexing made the gradient's last bits vary between runs: its
    backward accumulated a group's rows in a thread-dependent order.)"""
    import subprocess
    import sys

    runs = [subprocess.run([sys.executable, "-c", _ONE_STEP], capture_output=True, text=True, timeout=300)
            for _ in range(2)]  # fmt: skip
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert runs[0].stdout.split()[-1] == runs[1].stdout.split()[-1]
