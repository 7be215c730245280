"""Sampling as one fixed-shape step: replayed as a CUDA graph on CUDA, compiled by inductor on CPU.

Used by ``grpo_fast.trainer.rollout.generate(decode_graphs=...)`` (``GRPOConfig.decode_graphs``): "auto" is the CUDA
graph on CUDA and eager LeanDecoder steps on CPU (``CPU_AUTO``), "on" the fixed-shape step on either.

``LeanDecoder`` (grpo_fast.trainer.decoding) runs each one-token step as a hundred small operations whose shapes
change every step (the cache is sliced to its filled part) and whose batch shrinks as rows finish. Here
the same step is a pure function of tensors whose shapes never change within a rollout:

- the KV cache is preallocated as (B, Hkv, C, d) per layer and written at a position given as a tensor
  (``index_copy_``); attention runs over all C positions with a mask built from ``key_valid`` (B, C);
- sampling (temperature, top-k, top-p, the inverse-CDF draw of a per-row uniform, or the argmax) runs
  inside the step; finished rows are masked (they keep producing padding), never removed;
- B and C are rounded up to buckets (``batch_bucket``, ``capacity_bucket``), so rollouts whose prompt
  width or batch differ a little reuse the same compiled step or graph.

With the generator-driven draw (``torch.multinomial``, no per-row uniforms) the step returns the logits
and the draw runs eagerly on the real rows, so the random stream is the one the generic loop consumes.

``StepRunner`` keeps, per model, the buffers and the compiled step (CPU) or captured graph (CUDA) of each
(bucket, dtype, sampling settings), so they are built once per process and reused by every rollout.
"""

from __future__ import annotations

import os
import time
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .decoding import STATIC_ROPE_TYPES, LeanDecoder, project_qkv, sample_next_token

SETTINGS = ("auto", "on", "off")
# decode_graphs=auto on CPU: None = eager LeanDecoder steps. The compiled step did not pay on the 2-core CPU at
# the demo's shape (bench/results/rollout_cpu.txt): it keeps finished rows in the batch and its attention reads
# the whole bucket, which costs more there than the per-op overhead it removes.
CPU_AUTO: str | None = None
MIN_BATCH_BUCKET = 8
CAPACITY_STEP = 32
MAX_RUNNERS_PER_MODEL = 4  # buckets kept alive per model (each holds a full cache)


def batch_bucket(rows: int) -> int:
    """The batch a step is built for: the next power of two >= rows (at least ``MIN_BATCH_BUCKET``)."""
    return max(MIN_BATCH_BUCKET, 1 << (rows - 1).bit_length())


def capacity_bucket(length: int) -> int:
    """The cache length a step is built for: ``length`` rounded up to a multiple of ``CAPACITY_STEP``."""
    return -(-length // CAPACITY_STEP) * CAPACITY_STEP


@dataclass(frozen=True)
class Sampling:
    """The draw made inside the step. ``inside`` False: the step returns logits only (multinomial outside)."""

    temperature: float
    top_p: float
    top_k: int
    eos: int
    pad: int
    inside: bool


def decode_step(model, rotary, keys, values, key_valid, token, position, index, live, uniform, s: Sampling):
    """One token per row through ``model`` with a fixed-shape cache; returns (logits, next token, live).

    Args:
        rotary: (cos, sin) tables (C, d); keys, values: per layer (B, Hkv, C, d), written at ``index``.
        key_valid: (B, C) bool, written at ``index``; token, position, live: (B,); index: (1,) long.
        uniform: (B,) draws in (0, 1] (inverse CDF) or None (argmax at temperature 0, else no draw).
    """
    inner = model.model
    key_valid.index_fill_(1, index, True)
    x = inner.embed_tokens(token[:, None])  # (B, 1, H)
    cos, sin = (F.embedding(position[:, None], table) for table in rotary)
    bias = torch.zeros(key_valid.shape, dtype=x.dtype, device=x.device).masked_fill(~key_valid, float("-inf"))
    for i, layer in enumerate(inner.layers):
        h = layer.input_layernorm(x)
        x = x + _attend(layer.self_attn, h, cos, sin, bias, keys[i], values[i], index)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    logits = model.get_output_embeddings()(inner.norm(x[:, -1]))  # (B, V)
    if not s.inside:
        return logits, token, live
    nxt = sample_next_token(logits, s.temperature, s.top_p, s.top_k, None, uniform).masked_fill(~live, s.pad)
    return logits, nxt, live & (nxt != s.eos)


def _attend(attn, h, cos, sin, bias, keys, values, index):
    """Grouped-query attention of one new token per row over the whole cache (masked by ``bias`` (B, C))."""
    b, heads, kv_heads, d = h.shape[0], attn.config.num_attention_heads, keys.shape[1], attn.head_dim
    q, k, v = project_qkv(attn, h, cos, sin, heads, kv_heads)  # (B, Hq, 1, d), (B, Hkv, 1, d)
    keys.index_copy_(2, index, k)
    values.index_copy_(2, index, v)
    q = q.reshape(b, kv_heads, heads // kv_heads, d)  # query heads of a key/value head share its rows
    scores = torch.matmul(q, keys.transpose(-1, -2)) * attn.scaling + bias[:, None, None]  # (B, Hkv, G, C)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    out = torch.matmul(probs, values).reshape(b, 1, heads * d)  # (B, 1, Hq * d)
    return attn.o_proj(out)


@dataclass
class StepState:
    """The fixed-shape tensors of one bucket: cache, mask, and the step's inputs (graph replays read them)."""

    keys: list
    values: list
    key_valid: torch.Tensor
    token: torch.Tensor
    position: torch.Tensor
    index: torch.Tensor
    live: torch.Tensor
    uniform: torch.Tensor

    @staticmethod
    def empty(decoder: LeanDecoder, rows: int, capacity: int, dtype, device) -> StepState:
        d = decoder.inner.layers[0].self_attn.head_dim
        shape = (rows, decoder.kv_heads, capacity, d)
        n = len(decoder.inner.layers)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        long, flag = dict(dtype=torch.long, device=device), dict(dtype=torch.bool, device=device)
        return StepState(keys, values, torch.zeros(rows, capacity, **flag), torch.zeros(rows, **long),
                         torch.zeros(rows, **long), torch.zeros(1, **long), torch.zeros(rows, **flag),
                         torch.ones(rows, device=device))  # fmt: skip

    def load(self, decoder: LeanDecoder, rows: torch.Tensor) -> None:
        """Copy the prefilled cache of ``decoder`` (its rows ``rows``, in that order) into the buffers;
        positions past the prefill are zeroed (masked, but a garbage NaN would poison the softmax)."""
        n = decoder.length
        for mine, theirs in zip(self.keys + self.values, decoder.keys + decoder.values):
            mine[:, :, n:].zero_()
            torch.index_select(theirs[:, :, :n], 0, rows, out=mine[:, :, :n])
        self.key_valid.zero_()
        self.key_valid[:, :n] = decoder.key_valid[rows, :n]


class StepRunner:
    """The fixed-shape step of one model for one (bucket, dtype, sampling): compiled or graph-captured once.

    mode: "compile" (torch.compile, fullgraph, inductor), "graph" (CUDA graph of the eager step) or
    "eager" (the same step uncompiled: the reference the others are tested against).
    """

    def __init__(self, decoder: LeanDecoder, rows: int, capacity: int, sampling: Sampling, mode: str):
        weight = decoder.inner.embed_tokens.weight
        self.model, self.sampling, self.mode = decoder.model, sampling, mode
        self.state = StepState.empty(decoder, rows, capacity, _cache_dtype(decoder), weight.device)
        self.rotary = decoder.rotary
        self.fn = _compiled_step() if mode == "compile" else decode_step
        self.graph, self.outputs = None, None
        self.first_call_s: float | None = None  # compile or capture time, measured on the first call

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step on the state's inputs; returns (logits, token, live), valid until the next call."""
        if self.first_call_s is None:
            start = time.perf_counter()
            out = self._first_call()
            self.first_call_s = time.perf_counter() - start
            return out
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        return self._run()

    def _run(self):
        s = self.state
        uniform = s.uniform if self.sampling.temperature > 0 else None
        with torch._dynamo.config.patch(recompile_limit=64):  # a graph per (model, bucket, dtype, sampling)
            return self.fn(self.model, self.rotary, s.keys, s.values, s.key_valid, s.token, s.position, s.index,
                           s.live, uniform, self.sampling)  # fmt: skip

    def _first_call(self):
        if self.mode != "graph":
            return self._run()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (writing the cache at the same index twice changes nothing)
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self._run()
        self.graph.replay()
        return self.outputs


def _cache_dtype(decoder: LeanDecoder) -> torch.dtype:
    """The dtype of the keys the model's projections produce (autocast included)."""
    proj = decoder.inner.layers[0].self_attn.k_proj
    with torch.no_grad():
        return proj(decoder.inner.embed_tokens.weight[:1]).dtype


_COMPILED = None


def _compiled_step():
    """torch.compile of ``decode_step`` (one wrapper per process; dynamo keeps one graph per guard set)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(decode_step, fullgraph=True, dynamic=False)
    return _COMPILED


_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def runner_for(decoder: LeanDecoder, rows: int, capacity: int, sampling: Sampling, mode: str) -> StepRunner:
    """The model's runner for this (bucket, dtype, sampling, mode), built on first use; the least recently
    used beyond ``MAX_RUNNERS_PER_MODEL`` are dropped (their caches freed)."""
    runners = _RUNNERS.setdefault(decoder.model, {})
    device = decoder.inner.embed_tokens.weight.device.type
    key = (rows, capacity, _cache_dtype(decoder), torch.is_autocast_enabled(device), sampling, mode)
    runner = runners.pop(key, None) or StepRunner(decoder, rows, capacity, sampling, mode)
    runners[key] = runner  # most recently used last
    while len(runners) > MAX_RUNNERS_PER_MODEL:
        runners.pop(next(iter(runners)))
    return runner


def static_reason(model: nn.Module, mode: str) -> str | None:
    """Why the fixed-shape step cannot run ``model`` in ``mode`` (None = it can)."""
    rope = getattr(model.model.rotary_emb, "rope_type", None)
    if rope not in STATIC_ROPE_TYPES:
        return f"rotary type {rope!r} depends on the sequence length"
    device = model.get_output_embeddings().weight.device
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return "sharded parameters (DTensor, FSDP): a graph would keep reading one shard's addresses"
    if mode == "graph" and device.type != "cuda":
        return f"CUDA graphs need a CUDA device (the model is on {device.type})"
    if mode == "compile" and device.type != "cpu":
        return f"the compiled step is built for CPU (the model is on {device.type})"
    return None


_FAILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> why auto fell back to eager


def step_mode(model: nn.Module, setting: str) -> str | None:
    """The step for ``decode_graphs=setting``: "graph" (CUDA), "compile" (CPU), or None (eager LeanDecoder).

    "on" where the step cannot run is a ValueError naming the reason; "auto" is the CUDA graph on CUDA,
    ``CPU_AUTO`` on CPU (unless ``GRPO_FAST_EAGER=1``), and eager for a model whose step failed before
    (``fall_back``).
    """
    if setting == "off":
        return None
    device = model.get_output_embeddings().weight.device
    mode = "graph" if device.type == "cuda" else "compile"
    reason = static_reason(model, mode)
    if setting == "on":
        if reason is not None:
            raise ValueError(f"decode_graphs='on' cannot run this model: {reason}")
        return mode
    off = os.environ.get("GRPO_FAST_EAGER", "").lower() in ("1", "true", "yes", "on")  # compilation switched off
    if reason is not None or model in _FAILED or (device.type == "cpu" and (CPU_AUTO is None or off)):
        return None
    return mode


def fall_back(model: nn.Module, error: Exception) -> None:
    """Remember that ``model``'s step failed under decode_graphs=auto, and say so once (one line)."""
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    _FAILED[model] = reason
    _RUNNERS.pop(model, None)
    warnings.warn(f"decode_graphs=auto: eager decoding for this model, the fixed-shape step failed ({reason})",
                  RuntimeWarning, stacklevel=3)  # fmt: skip
