"""The update's forward pass with each prompt computed once per group instead of once per completion.

GRPO trains on G completions of every prompt, and a plain forward pass over ``[prompt; completion]``
runs every prompt G times. In a causal decoder a later token sees an earlier one only through each
layer's keys and values, so the prompt can run once: then every completion row attends to its group's
prompt keys/values followed by its own,

    layer l:  attention(q_c, [K_p(l)[group]; K_c(l)], [V_p(l)[group]; V_c(l)]),

and the hidden state at the prompt's last position (it predicts the first completion token) comes from
the prompt pass too. The arithmetic is that of the model's own modules (norms, projections, rotary
embedding, MLP, as in ``grpo_fast.trainer.decoding``); only the attention is called here, through
``scaled_dot_product_attention`` with an explicit mask. ``tests/test_shared_prefix.py`` checks hidden
states and every parameter gradient against the model's full forward pass.

Gradients: ``SharedPrompts`` runs the prompt pass once per optimizer step and hands the micro-batches
detached copies of its outputs (leaves that collect gradients); ``backward()`` then sends the summed
gradient through the prompt pass once. This holds the prompt pass's activations for the whole step,
which the trainer allows only when they are no larger than one micro-batch's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .decoding import project_qkv, unsupported_reason
from .modeling import position_ids_from_mask


@dataclass
class PromptPass:
    """Per prompt (one per group): each layer's keys and values, the last position's normed hidden state."""

    keys: list[torch.Tensor]  # per layer (P_n, H_kv, P, d)
    values: list[torch.Tensor]  # per layer (P_n, H_kv, P, d)
    last: torch.Tensor  # (P_n, H)
    mask: torch.Tensor  # (P_n, P) bool, False on left padding
    lengths: torch.Tensor  # (P_n,) number of prompt tokens

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, self.last]

    def detached(self) -> PromptPass:
        """The same values as leaves that collect the gradient of whatever is computed from them."""
        leaf = [t.detach().requires_grad_(t.requires_grad) for t in self.tensors()]
        n = len(self.keys)
        return PromptPass(leaf[:n], leaf[n : 2 * n], leaf[-1], self.mask, self.lengths)


class SharedPrefixForward:
    """Forward passes of a Llama-family causal LM (see ``decoding.unsupported_reason``) in two parts:
    ``prompt_pass`` over distinct prompts, ``completion_hidden`` over completions that point at them.

    checkpoint: activation checkpointing of each decoder layer of the completion passes (as the model's
    own gradient checkpointing: only each layer's input is kept, the layer reruns in backward); the
    prompt pass, whose keys and values the completions read, keeps its activations.
    """

    def __init__(self, model: nn.Module, max_length: float = math.inf, checkpoint: bool = False):
        reason = unsupported_reason(model, max_length, training=True)  # e.g. a sliding window below it
        if reason is not None:
            raise ValueError(f"shared-prefix forward cannot run this model: {reason}")
        self.model, self.inner, self.recompute = model, model.model, checkpoint
        self.heads = model.config.num_attention_heads
        self.kv_heads = getattr(model.config, "num_key_value_heads", None) or self.heads

    def prompt_pass(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> PromptPass:
        """Run the left-padded prompts (P_n, P); every prompt must end in a real token."""
        valid = prompt_mask.bool()
        if not bool(valid[:, -1].all()):
            raise ValueError("prompt_mask: every prompt must end with a real token (left padding only)")
        n = prompt_ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
        # a padding query sees itself only: finite, unused values (nothing real attends to it)
        mask = (valid[:, None, None, :] & causal) | torch.eye(n, dtype=torch.bool, device=valid.device)
        x = self.inner.embed_tokens(prompt_ids)
        keys, values, x = self._layers(x, position_ids_from_mask(prompt_mask), mask, None)
        return PromptPass(keys, values, self.inner.norm(x[:, -1]), valid, valid.sum(1))

    def completion_hidden(self, prompts: PromptPass, group: torch.Tensor, completion_ids: torch.Tensor,
                          lengths: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """(B, T, H) hidden states predicting ``completion_ids`` (B, T); row i continues prompt group[i].

        lengths: optional (B,) tokens per completion (EOS included). Positions at or past a row's length
        predict nothing: they are left out of every matrix product (the rows are packed) and come out 0.
        """
        b, t = completion_ids.shape
        # index_select, not [group]: its backward (index_add) sums a group's rows in a fixed order, where
        # indexing's (index_put with accumulate) varied between runs in the last bits, measured
        first = prompts.last.index_select(0, group)[:, None]  # (B, 1, H): predicts completion token 0
        if t == 1:
            return first
        n = t - 1  # the last token predicts nothing inside the completion
        steps = torch.arange(n, device=completion_ids.device)
        need = steps < (n if lengths is None else lengths[:, None] - 1)  # (B, n): positions whose output is read
        need = need.expand(b, n)
        positions = prompts.lengths[group][:, None] + steps  # (B, n)
        seen = prompts.mask[group][:, None, None, :].expand(b, 1, n, -1)
        causal = torch.ones(n, n, dtype=torch.bool, device=steps.device).tril().expand(b, 1, n, n)
        mask = torch.cat([seen, causal], dim=-1)  # (B, 1, n, P + n)
        flat = need.reshape(-1).nonzero().squeeze(1)  # (N,) the needed positions of the (B * n) layout
        x = self.inner.embed_tokens(completion_ids[:, :n].reshape(-1)[flat])[None]  # (1, N, H): packed
        _, _, x = self._layers(x, positions.reshape(-1)[flat][None], mask, (prompts, group, flat, (b, n)))
        out = _unpack(self.inner.norm(x[0]), flat, (b, n))  # (B, n, H)
        return torch.cat([first, out], dim=1)

    def _layers(self, x, positions, mask, prefix):
        """The decoder layers on x (B, L, H), or with ``prefix`` = (prompts, group, flat, (B, n)) on packed
        completion tokens x (1, N, H) whose attention runs on the padded (B, n) layout, where the packed
        tokens sit at the flat positions ``flat``. With ``checkpoint``, each completion layer keeps only
        its input and recomputes the rest in backward."""
        cos, sin = self.inner.rotary_emb(x, positions)
        keys, values = [], []
        for i in range(len(self.inner.layers)):
            if self.recompute and prefix is not None and torch.is_grad_enabled():
                x = checkpoint(lambda *a: self._layer(*a)[2], i, x, cos, sin, mask, prefix, use_reentrant=False)
                continue
            k, v, x = self._layer(i, x, cos, sin, mask, prefix)
            keys.append(k)
            values.append(v)
        return keys, values, x

    def _layer(self, i, x, cos, sin, mask, prefix):
        layer = self.inner.layers[i]
        attn = layer.self_attn
        q, k, v = project_qkv(attn, layer.input_layernorm(x), cos, sin, self.heads, self.kv_heads)
        keys, values = k, v
        if prefix is not None:
            prompts, group, flat, padded = prefix  # padded: (B, n)
            q, k, v = (_unpack(z[0].transpose(0, 1), flat, padded).transpose(1, 2) for z in (q, k, v))
            k = torch.cat([prompts.keys[i].index_select(0, group), k], dim=2)
            v = torch.cat([prompts.values[i].index_select(0, group), v], dim=2)
        out = _attend(q, k, v, mask, attn.scaling)  # (B, heads, L, d)
        out = out.transpose(1, 2)  # (B, L, heads, d)
        if prefix is not None:
            out = out.reshape(-1, *out.shape[2:]).index_select(0, flat)[None]  # (1, N, heads, d)
        x = x + attn.o_proj(out.reshape(*x.shape[:2], -1))
        return keys, values, x + layer.mlp(layer.post_attention_layernorm(x))


SMALL_SCORES = 1 << 22  # elements of the (B, heads, L, keys) score tensor below which CPU uses plain matmuls


def _attend(q, k, v, mask, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, where mask) v with grouped key/value heads (as the models' repeat_kv).

    On CPU, short sequences go through two matmuls and a float32 softmax (as the models' eager attention),
    which beat the CPU flash kernel on demo-sized updates here; anything larger, and every other device,
    through ``scaled_dot_product_attention``, which then must not fall back to its math kernel: that one
    saves the (B, heads, L, keys) probabilities for backward (0.7 GB per layer at 8 x 14 heads x 1024 x
    1536 fp32). On CUDA the flash kernel takes no mask and the memory-efficient one no grouped heads
    (``enable_gqa``), so the key/value heads are repeated to one per query head first: the
    memory-efficient kernel then runs, saving only its output and log-sum-exp, plus the repeated keys
    and values (B, heads, keys, d), a 1 / L share of the probabilities' size.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if q.device.type != "cpu" or q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] > SMALL_SCORES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul(scale).masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)


def _unpack(z: torch.Tensor, flat: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Packed rows z (N, ...) -> (B, n, ...) with z[i] at flat position flat[i] and zeros elsewhere.
    A real query attends only to earlier positions of its row, which are all real (causal mask)."""
    out = z.new_zeros(shape[0] * shape[1], *z.shape[1:]).index_copy(0, flat, z)
    return out.view(*shape, *z.shape[1:])


class SharedPrompts:
    """One optimizer step's prompt pass with gradients, shared by its micro-batches.

    ``hidden(rows, completion_ids)`` gives a micro-batch's hidden states (its rows are indices into the
    step's batch, whose rows come in groups of ``group_size`` with one prompt each); call ``backward()``
    once after the micro-batches' own backward passes to send their prompt gradients through the
    prompt pass.
    """

    def __init__(self, forward: SharedPrefixForward, prompt_ids, prompt_mask, group_size: int):
        self.forward, self.group_size = forward, group_size
        self.graph = forward.prompt_pass(prompt_ids[::group_size], prompt_mask[::group_size])
        self.leaves = self.graph.detached()

    def hidden(self, rows: torch.Tensor, completion_ids: torch.Tensor, lengths: torch.Tensor | None = None):
        """(b, T, H) hidden states of the batch rows ``rows`` (see ``completion_hidden`` for ``lengths``)."""
        return self.forward.completion_hidden(self.leaves, rows // self.group_size, completion_ids, lengths)

    def backward(self) -> None:
        pairs = [(out, leaf.grad) for out, leaf in zip(self.graph.tensors(), self.leaves.tensors())
                 if leaf.grad is not None]  # fmt: skip
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        self.graph = self.leaves = None


def groups_share_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int) -> bool:
    """True when rows come in consecutive groups of ``group_size`` with identical prompts ending in a token."""
    b, p = prompt_ids.shape
    if group_size < 2 or b % group_size or p == 0 or not bool(prompt_mask[:, -1].all()):
        return False
    ids, mask = prompt_ids.view(-1, group_size, p), prompt_mask.view(-1, group_size, p)
    return bool((ids == ids[:, :1]).all()) and bool((mask == mask[:, :1]).all())
