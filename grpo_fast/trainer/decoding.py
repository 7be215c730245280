"""A lean KV-cached decoder for Llama-family causal LMs (Llama, Qwen2, Qwen3, Mistral), used for rollouts.

Sampling is a loop of one-token forward passes, so on small models its cost is per-op overhead, not
arithmetic: with a ``DynamicCache`` every step concatenates each layer's keys and values onto the whole
cache (quadratic copying; 39% of a 256 x 40-token rollout of the demo model, profiled here) and the
attention goes through a general-purpose dispatcher. This decoder runs the same modules of the model
(norms, projections, rotary embedding, MLP — so its numbers are the model's own) with a preallocated
cache written in place and a direct grouped-query attention over the filled part of it.

The equations are those of the Hugging Face implementation of each architecture: for layer l,
    x <- x + o_proj(softmax(q k^T * scaling + mask) v),  q, k = rope(q_proj(norm(x)), k_proj(norm(x)))
    x <- x + mlp(post_norm(x))
with the mask hiding left padding and future positions. ``tests/test_decoding.py`` checks its logits
against the model's full forward pass.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # cos/sin of a position depend on it alone


def unsupported_reason(model: nn.Module, max_length: float, training: bool = False) -> str | None:
    """Why ``LeanDecoder`` cannot run ``model`` for sequences of ``max_length`` tokens (None = it can).

    training=True: for a forward pass with gradients (grpo_fast.trainer.shared_prefix), which accepts a model
    in training mode but no attention dropout (the MLPs of these families have none).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if model.training and not training:
        return "the model is in training mode (dropout)"
    if training and getattr(config, "attention_dropout", 0.0):
        return f"attention dropout {config.attention_dropout} (not reproduced)"
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", model_type == "mistral")
    if uses_window and window is not None and window < max_length:
        return f"sliding-window attention ({window} < {max_length} tokens)"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "layers other than full attention"
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "not the standard <Arch>ForCausalLM(model=<Arch>Model) layout"
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        return "the output embeddings are not an nn.Linear"
    return None


class LeanDecoder:
    """Incremental forward passes of a Llama-family model over a batch, with a preallocated KV cache.

    Args:
        model: a supported ``*ForCausalLM`` in eval mode (see ``unsupported_reason``).
        batch: rows B.
        max_length: capacity of the cache in tokens (prompt width + new tokens).
    """

    def __init__(self, model: nn.Module, batch: int, max_length: int):
        reason = unsupported_reason(model, max_length)
        if reason is not None:
            raise ValueError(f"LeanDecoder cannot run this model: {reason}")
        self.model, self.inner = model, model.model
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.batch, self.capacity, self.length = batch, max_length, 0
        self.keys: list[torch.Tensor | None] = [None] * len(self.inner.layers)
        self.values: list[torch.Tensor | None] = [None] * len(self.inner.layers)
        self.key_valid = torch.zeros(batch, max_length, dtype=torch.bool, device=model.device)
        self.rotary = self._rotary_table()

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Append L tokens per row and return the logits (B, V) at each row's last appended position.

        Args:
            ids, positions: (B, L) token ids and their rotary positions (below ``max_length``: a token's
                position never exceeds its index in the cache).
            valid: (B, L) bool, False for left padding (never attended to by later tokens).
        """
        b, n = ids.shape
        start, end = self.length, self.length + n
        if b != self.batch or end > self.capacity:
            raise ValueError(f"ids of shape {tuple(ids.shape)} do not fit the cache ({self.batch}, {self.capacity})")
        self.key_valid[:, start:end] = valid
        x = self.inner.embed_tokens(ids)  # (B, L, H)
        if self.rotary is None:
            cos, sin = self.inner.rotary_emb(x, positions)
        else:  # rows of the table: one op instead of the module's dozen per step
            cos, sin = (F.embedding(positions, table) for table in self.rotary)
        mask = self._attention_bias(start, end, x.dtype)  # (B, 1, L, end)
        for i, layer in enumerate(self.inner.layers):
            x = x + self._attention(i, layer.self_attn, layer.input_layernorm(x), cos, sin, mask, start, end)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.length = end
        return self.model.get_output_embeddings()(self.inner.norm(x[:, -1]))  # (B, V)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the rows ``rows`` (B' indices, repeats allowed), in that order: finished rows leave (and stop
        costing compute), and a prompt's prefill is copied to each of its samples."""
        self.batch = len(rows)
        self.key_valid = self.key_valid[rows]
        self.keys = [self._rows(k, rows) for k in self.keys]
        self.values = [self._rows(v, rows) for v in self.values]

    def _rows(self, cache: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
        """A new cache of the same capacity holding ``rows``' filled positions (the rest is never read)."""
        if cache is None:
            return None
        out = cache.new_empty((len(rows), *cache.shape[1:]))
        # straight into the filled part of the new cache (indexing, then copying, made a temporary: 6x slower)
        torch.index_select(cache[:, :, : self.length], 0, rows, out=out[:, :, : self.length])
        return out

    def _rotary_table(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary module's (cos, sin) at positions 0 .. capacity - 1, each (capacity, d), or None for
        rotary types whose frequencies depend on the sequence length (dynamic, longrope): those run per call."""
        rotary = self.inner.rotary_emb
        if getattr(rotary, "rope_type", None) not in STATIC_ROPE_TYPES:
            return None
        weight = self.inner.embed_tokens.weight
        positions = torch.arange(self.capacity, device=weight.device)[None]
        cos, sin = rotary(weight[:0], positions)  # the input only gives the device and dtype
        return cos[0], sin[0]

    def _attention_bias(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, L, end) additive mask: 0 where query start+i may see key j (valid and j <= start+i).

        A query always sees itself, so a left-padding position gets finite (unused) values, never NaN.
        """
        if end - start == 1:  # one new token per row (decoding): every valid key, and itself
            bias = torch.zeros(self.batch, end, dtype=dtype, device=self.key_valid.device)
            bias.masked_fill_(~self.key_valid[:, :end], float("-inf"))[:, start] = 0
            return bias[:, None, None]
        query = torch.arange(start, end, device=self.key_valid.device)[:, None]  # (L, 1)
        key = torch.arange(end, device=self.key_valid.device)[None, :]  # (1, end)
        allowed = (self.key_valid[:, None, :end] & (key <= query)) | (key == query)  # (B, L, end)
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
        return bias.masked_fill_(~allowed, float("-inf"))[:, None].to(dtype)

    def _attention(self, i, attn, h, cos, sin, mask, start: int, end: int) -> torch.Tensor:
        b, n, _ = h.shape
        d = attn.head_dim
        q, k, v = project_qkv(attn, h, cos, sin, self.heads, self.kv_heads)
        keys, values = self._cache(i, k, v, start, end)  # (B, Hkv, end, d)
        group = self.heads // self.kv_heads
        # query heads h * group .. (h + 1) * group - 1 share key/value head h (as repeat_kv); rows (g, L)
        q = q.reshape(b, self.kv_heads, group * n, d)
        scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(attn.scaling)  # (B, Hkv, G * L, end)
        scores = scores + (mask.repeat(1, 1, group, 1) if group > 1 else mask)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        out = torch.matmul(probs, values).view(b, self.heads, n, d)  # (B, Hq, L, d)
        return attn.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * d))

    def _cache(self, i: int, k: torch.Tensor, v: torch.Tensor, start: int, end: int):
        if self.keys[i] is None:
            shape = (self.batch, self.kv_heads, self.capacity, k.shape[-1])
            self.keys[i] = k.new_empty(shape)
            self.values[i] = v.new_empty(shape)
        self.keys[i][:, :, start:end] = k
        self.values[i][:, :, start:end] = v
        return self.keys[i][:, :, :end], self.values[i][:, :, :end]


def project_qkv(attn: nn.Module, h: torch.Tensor, cos, sin, heads: int, kv_heads: int):
    """Queries (B, Hq, L, d), keys and values (B, Hkv, L, d) of attention module ``attn`` on normed input
    h (B, L, H), with the rotary embedding (cos, sin) applied as the model's own module does."""
    b, n, _ = h.shape
    d = attn.head_dim
    q = attn.q_proj(h).view(b, n, heads, d)
    k = attn.k_proj(h).view(b, n, kv_heads, d)
    v = attn.v_proj(h).view(b, n, kv_heads, d).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before the rotary embedding
        q, k = attn.q_norm(q), attn.k_norm(k)
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q, k, v


def sample_next_token(
    logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0, generator=None, uniform=None
) -> torch.Tensor:
    """Draw one token per row from (B, V) logits. temperature 0 = argmax. Returns (B,) int64.

    uniform: optional (B,) draws in (0, 1]: row i takes the first token whose cumulative probability
    reaches uniform[i] (inverse CDF; a zero-probability token is never chosen), ignoring ``generator``.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature  # (B, V)
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the top one stays).
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    if uniform is not None:
        cdf = probs.cumsum(-1)  # (B, V)
        target = (uniform.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)  # (B, 1), in (0, total]
        return torch.searchsorted(cdf, target).squeeze(1).clamp(max=cdf.shape[-1] - 1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
