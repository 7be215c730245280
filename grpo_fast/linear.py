"""Public GRPO API from hidden states: ``linear_grpo_loss``, ``linear_token_logprobs``, ``LinearGRPOLoss``.

The (N x V) logits of the LM head are never materialised whole: see grpo_fast/ops/linear_loss.py for
the chunked algorithm (three GEMMs per forward + backward, gradients formed at forward time).
Backends: "torch" (chunked PyTorch, any device), "triton" (Cut-Cross-Entropy-style kernels,
grpo_fast/ops/linear_triton.py; CUDA, or CPU under TRITON_INTERPRET=1), "reference" (materialised
logits + plain autograd), "auto" (triton on CUDA, torch elsewhere).
"""

from __future__ import annotations

import torch
from torch import nn

from . import objective, reference
from .config import LossConfig
from .loss import LossOutput, TokenLogprobs, token_logprobs
from .ops import linear_loss as ops
from .ops import linear_triton as triton_ops
from .validation import (
    FLOAT_DTYPES,
    as_float,
    check_backend,
    check_config,
    check_config_inputs,
    check_float,
    check_loss_inputs,
    check_shape,
    check_tensor,
    check_token_masks,
    checked_ids,
)


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    config: LossConfig | None = None,
    importance_ratio: torch.Tensor | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    policy_mask: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    deterministic: bool = False,
) -> LossOutput:
    """GRPO loss of the LM head ``hidden @ weight.T + bias`` without building the (N, V) logits.

    Args:
        hidden: (B, T, H) or (B * T, H) hidden states; ``hidden[:, t]`` predicts ``completion_ids[:, t]``.
        weight: (V, H), e.g. ``model.lm_head.weight``; float32 with bfloat16 hidden is computed in fp32.
        completion_ids, advantages, completion_mask, old_logprobs, ref_logprobs, config,
        importance_ratio, num_items_in_batch, policy_mask, entropy_mask: as in ``grpo_loss``.
        bias: optional (V,) LM-head bias.
        backend: "auto" | "torch" | "reference".
        chunk_size: token rows per chunk of the torch backend (default from V: about 2^25 / V, so two
            float32 chunk buffers take ~256 MB).
        deterministic: triton backend without atomics (bit-identical run to run; one more GEMM).
    Returns:
        LossOutput(loss, metrics, logprobs); logprobs is detached on the torch backend.
    """
    config = check_config(config)
    b, t, hidden2d = _check_head(hidden, weight, bias, completion_ids)
    check_loss_inputs(b, t, completion_ids, advantages, old_logprobs, ref_logprobs, importance_ratio, "hidden")
    check_token_masks(b, t, policy_mask, entropy_mask)
    check_config_inputs(config, ref_logprobs, num_items_in_batch)
    scores = {"hidden": hidden, "weight": weight, "bias": bias}
    active, ids = checked_ids(scores, weight.shape[0], "completion_ids", completion_ids, "completion_mask",
                              completion_mask, advantages=advantages, old_logprobs=old_logprobs,
                              ref_logprobs=ref_logprobs, importance_ratio=importance_ratio,
                              policy_mask=policy_mask, entropy_mask=entropy_mask)  # fmt: skip
    backend = check_backend(backend, hidden.device, _head_dtype(hidden, weight, bias))
    if backend == "reference":
        logits = _reference_logits(hidden2d, weight, bias).view(b, t, weight.shape[0])  # (B, T, V)
        mask = active.to(logits.dtype)
        loss, metrics, logp = reference.grpo_loss(
            logits, ids, advantages, mask, old_logprobs, ref_logprobs, config, importance_ratio, num_items_in_batch,
            policy_mask, entropy_mask,
        )  # fmt: skip
        return _finish_linear(loss.float(), logp.float(), active.float(), metrics, hidden2d, weight, bias)
    mask = active.float()
    cast = {"dtype": torch.float32}
    adv, old, ref = advantages.to(**cast), as_float(old_logprobs), as_float(ref_logprobs)
    ratio, keep, bonus = as_float(importance_ratio), as_float(policy_mask), as_float(entropy_mask)

    def loss_of(logp, entropy):
        return objective.grpo_objective(
            logp, entropy, adv, mask, old, ref, config, ratio, num_items_in_batch, keep, bonus
        )

    inv_tau = 1.0 / config.temperature
    metrics: dict[str, torch.Tensor] = {}
    if backend == "triton":
        standin = torch.zeros_like(mask) if old is None else old  # log-probs the objective sees at masked tokens
        loss, logp = triton_ops.LinearGRPOTritonFunction.apply(
            hidden2d, weight, bias, ids.reshape(-1), active, standin, loss_of, inv_tau, deterministic, metrics
        )
        return _finish_linear(loss, logp, mask, metrics, hidden2d, weight, bias)
    rows = active.reshape(-1).nonzero().squeeze(1)  # (M,) flat indices of the tokens in the loss
    chunk = _chunk(chunk_size, weight.shape[0])
    standin = _standin(hidden2d, weight, bias, ids, rows, mask, old, config, inv_tau, chunk)
    loss, logp = ops.LinearGRPOFunction.apply(
        hidden2d, weight, bias, ids.reshape(-1), rows, standin, loss_of, inv_tau, chunk, metrics
    )
    return _finish_linear(loss, logp, mask, metrics, hidden2d, weight, bias)


def _finish_linear(loss, logp, mask, metrics, hidden2d, weight, bias) -> LossOutput:
    if mask.numel() == 0:  # an empty batch: 0 with zero gradients, not the NaN of a mean over no sequences
        loss = sum(x.sum() for x in (hidden2d, weight, bias) if x is not None).float() * 0
    return LossOutput(loss, metrics, logp * mask)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> TokenLogprobs:
    """Forward-only per-token log-probs (and entropy) of ``hidden @ weight.T + bias``: one GEMM, chunked.

    For old-policy and reference-model log-probs. Nothing is kept for backward.

    Args:
        hidden: (B, T, H) or (B * T, H); weight: (V, H); ids: (B, T) int64; bias: (V,) or None.
        temperature: > 0. return_entropy: also return the entropy. mask: (B, T), 0 = skip (output 0).
    Returns:
        TokenLogprobs(logprobs (B, T) float32, entropy (B, T) float32 or None).
    """
    temperature = check_float("temperature", temperature, minimum=0.0, strict=True)
    b, t, hidden2d = _check_head(hidden, weight, bias, ids)
    scores = {"hidden": hidden, "weight": weight, "bias": bias}
    active, ids = checked_ids(scores, weight.shape[0], "ids", ids, "mask", mask)
    backend = check_backend(backend, hidden.device, _head_dtype(hidden, weight, bias))
    with torch.no_grad():
        if backend == "reference":
            logits = _reference_logits(hidden2d, weight, bias).view(b, t, weight.shape[0])
            return token_logprobs(logits, ids, temperature, return_entropy, "reference", active)
        if backend == "triton":
            lp, ent = triton_ops.forward_stats(
                hidden2d, weight, bias, ids.reshape(-1), active.reshape(-1), 1.0 / temperature, return_entropy
            )
            return TokenLogprobs(lp.view(b, t), ent.view(b, t) if return_entropy else None)
        rows = active.reshape(-1).nonzero().squeeze(1)
        chunk = _chunk(chunk_size, weight.shape[0])
        lp, ent = ops.forward_stats(
            hidden2d, weight, bias, ids.reshape(-1), rows, 1.0 / temperature, chunk, return_entropy
        )
        logp = hidden2d.new_zeros(b * t, dtype=torch.float32).index_put_((rows,), lp).view(b, t)
        entropy = None
        if return_entropy:
            entropy = hidden2d.new_zeros(b * t, dtype=torch.float32).index_put_((rows,), ent).view(b, t)
    return TokenLogprobs(logp, entropy)


class LinearGRPOLoss(nn.Module):
    """``linear_grpo_loss`` as a module: ``LinearGRPOLoss(config)(hidden, lm_head.weight, ids, adv, ...)``."""

    def __init__(self, config: LossConfig | None = None, backend: str = "auto", chunk_size: int | None = None):
        super().__init__()
        self.config = check_config(config)
        self.backend = backend
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden,
        weight,
        completion_ids,
        advantages,
        completion_mask=None,
        old_logprobs=None,
        ref_logprobs=None,
        **kwargs,
    ) -> LossOutput:
        kwargs.setdefault("backend", self.backend)
        kwargs.setdefault("chunk_size", self.chunk_size)
        return linear_grpo_loss(
            hidden,
            weight,
            completion_ids,
            advantages,
            completion_mask,
            old_logprobs,
            ref_logprobs,
            config=self.config,
            **kwargs,
        )


def _standin(hidden2d, weight, bias, ids, rows, mask, old, config, inv_tau, chunk):
    """(B, T) log-prob stand-ins for tokens not yet computed (see ops.linear_loss.chunk_coefficients).

    Sequence-level importance sampling couples a sequence's tokens through their values when the
    weight exp(mean_t(logp - old)) is off-policy, or when the KL term is multiplied by it (bias
    correction); so does vespo's weight phi(exp(sum_t (logp - old))) when off-policy: then the true
    log-probs come first, from one extra forward-only GEMM pass.
    """
    bias_corrected_kl = config.beta != 0.0 and config.use_bias_correction_kl
    sequence_weight = config.importance_sampling_level == "sequence" and (old is not None or bias_corrected_kl)
    if sequence_weight or (config.loss_type == "vespo" and old is not None):
        with torch.no_grad():
            lp, _ = ops.forward_stats(hidden2d, weight, bias, ids.reshape(-1), rows, inv_tau, chunk, False)
        return torch.zeros_like(mask).view(-1).index_put_((rows,), lp).view_as(mask)
    return torch.zeros_like(mask) if old is None else old.clone()


def _check_head(hidden, weight, bias, ids):
    """Validate the LM-head inputs; returns (B, T, hidden as (B * T, H))."""
    check_tensor("hidden", hidden, (2, 3), FLOAT_DTYPES)
    check_tensor("weight", weight, 2, FLOAT_DTYPES)
    check_tensor("completion_ids" if ids.dim() == 2 else "ids", ids, 2)
    b, t = ids.shape
    h = hidden.shape[-1]
    if hidden.dim() == 3:
        check_shape("hidden", hidden, (b, t, h), "(B, T, H) with (B, T) = ids.shape")
    else:
        check_shape("hidden", hidden, (b * t, h), "(B * T, H) with (B, T) = ids.shape")
    if weight.shape[1] != h:
        raise ValueError(f"weight must have shape (V, {h}) (V, hidden size of `hidden`), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, 1, FLOAT_DTYPES)
        check_shape("bias", bias, (weight.shape[0],), "(V,) like weight.shape[0]")
    return b, t, hidden.reshape(b * t, h)


def _head_dtype(hidden, weight, bias) -> torch.dtype:
    """The dtype the head computes in, the widest of its operands: with an fp64 weight or bias it is fp64,
    which the kernels do not take, so ``auto`` must not pick them for fp32 hidden states."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return dtype if bias is None else torch.promote_types(dtype, bias.dtype)


def _chunk(chunk_size, vocab: int) -> int:
    if chunk_size is None:
        return ops.default_chunk_rows(vocab)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return chunk_size


def _reference_logits(hidden2d, weight, bias):
    dtype = torch.promote_types(torch.promote_types(hidden2d.dtype, weight.dtype), torch.float32)  # fp16 overflows
    logits = hidden2d.to(dtype) @ weight.to(dtype).T
    return logits if bias is None else logits + bias.to(dtype)
