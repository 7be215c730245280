"""GRPO from logits: the methods the logits suite compares, on the same inputs and the same objective.

Every loss method computes DeepSeekMath GRPO (``LossConfig(loss_type="grpo", beta=0.04)``: per-sequence
token mean, clip 0.2, k3 KL with beta 0.04) with old and reference log-probs given, and ends in ``loss.backward()``.
Modes: ``logprobs`` = per-token log-probs and entropy, forward only (old/ref log-probs, metrics);
``loss`` = the GRPO loss forward + backward (the split is recorded).

Memory traffic floor (the cost model), N = B * T rows of V elements:
    logprobs: 1 read of N x V; loss forward + backward: 2 reads + 1 write of N x V.
What the plain-PyTorch methods move instead (their own passes, for reading the results):
    naive loss:  x.float() (bf16 only: R + W), log_softmax (R + W), gather; backward: softmax-grad
                 (R log_softmax + R grad + W) -> about 2x the floor in fp32.
    TRL:         logsumexp per sequence (R), gather; backward of logsumexp (R + W softmax, R + W grad).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import grpo_fast as gf
from grpo_fast import reference

CONFIG = gf.LossConfig(loss_type="grpo", beta=0.04)  # DeepSeekMath GRPO: per-sequence mean, epsilon 0.2, k3


@dataclass
class LogitsInputs:
    logits: torch.Tensor  # (B, T, V) leaf, requires grad
    ids: torch.Tensor  # (B, T) int64
    mask: torch.Tensor  # (B, T) float32, all ones
    adv: torch.Tensor  # (B,)
    old: torch.Tensor  # (B, T)
    ref: torch.Tensor  # (B, T)

    def leaves(self) -> list[torch.Tensor]:
        return [self.logits]


def randn_filled(shape, scale: float, dtype: torch.dtype, device, g: torch.Generator) -> torch.Tensor:
    """N(0, scale^2) in ``dtype``, filled 4096 rows at a time: no full-size float32 temporary, so the
    memory measured after the inputs exist is the inputs themselves."""
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1, shape[-1])
    for i in range(0, flat.shape[0], 4096):
        rows = flat[i : i + 4096]
        rows.copy_(torch.randn(rows.shape, generator=g, device=g.device).mul_(scale))
    return out


def make_inputs(b: int, t: int, v: int, dtype: torch.dtype, device, seed: int = 0) -> LogitsInputs:
    g = torch.Generator(device).manual_seed(seed)
    logits = randn_filled((b, t, v), 2.0, dtype, device, g).requires_grad_()
    ids = torch.randint(0, v, (b, t), generator=g, device=device)
    adv = torch.randn(b, generator=g, device=device)
    # old/ref near the log-probs of random logits (~ -log V - 2): ratios spread around the clip range
    old = -torch.rand(b, t, generator=g, device=device) * 3 - 12
    ref = old + 0.1 * torch.randn(b, t, generator=g, device=device)
    return LogitsInputs(logits, ids, torch.ones(b, t, device=device), adv, old, ref)


def objective(logp, entropy, x: LogitsInputs) -> torch.Tensor:
    return reference.grpo_objective(logp, entropy, x.adv, x.mask, x.old, x.ref, CONFIG)[0]


# ---------------------------------------------------------------------------- the methods
def grpo_fast_loss(backend: str):
    def loss(x: LogitsInputs) -> torch.Tensor:
        return gf.grpo_loss(x.logits, x.ids, x.adv, x.mask, x.old, x.ref, config=CONFIG, backend=backend).loss

    return loss


def grpo_fast_logprobs(backend: str):
    def logprobs(x: LogitsInputs):
        return gf.token_logprobs(x.logits, x.ids, return_entropy=True, backend=backend)

    return logprobs


def naive_loss(x: LogitsInputs) -> torch.Tensor:
    """Plain PyTorch: log_softmax over the whole (B, T, V) in fp32, gather, the objective. No entropy
    (less work than grpo_fast, which also returns the entropy metric)."""
    logp = torch.log_softmax(x.logits.float(), -1).gather(-1, x.ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return objective(logp, None, x)


def naive_logprobs(x: LogitsInputs):
    logp_all = torch.log_softmax(x.logits.float(), -1)  # (B, T, V): written once, read twice
    logp = logp_all.gather(-1, x.ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def trl_loss(x: LogitsInputs) -> torch.Tensor:
    """TRL's GRPOTrainer path: selective_log_softmax for the log-probs, entropy_from_logits (no grad)
    for the entropy metric. On CUDA both dispatch to TRL's fused Triton kernel."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    logp = selective_log_softmax(x.logits, x.ids)
    with torch.no_grad():
        entropy = entropy_from_logits(x.logits)
    return objective(logp, entropy, x)


def trl_logprobs(x: LogitsInputs):
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    return selective_log_softmax(x.logits, x.ids), entropy_from_logits(x.logits)


def liger_loss(x: LogitsInputs) -> torch.Tensor:
    """Liger's triton_grpo_loss (CUDA only). It takes (B, T + 1, V) logits and ignores the last
    position; the benchmark's logits are padded once, outside the timing (see ``liger_inputs``).
    inplace=False, as grpo_fast's default (both can write the gradient into the logits)."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    loss, _ = triton_grpo_loss(
        x.logits,
        x.old,
        x.ref,
        x.ids,
        x.adv,
        x.mask,
        temperature=1.0,
        beta=CONFIG.beta,
        eps_low=CONFIG.epsilon,
        eps_high=CONFIG.eps_high,
        inplace=False,
        loss_type="grpo",
        reduce=True,
    )
    return loss


def liger_logprobs(x: LogitsInputs):
    """Liger's fused_selective_log_softmax (CUDA only): log-probs without the entropy."""
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

    return fused_selective_log_softmax(x.logits, x.ids, temperature=1.0), None


def liger_inputs(x: LogitsInputs) -> LogitsInputs:
    b, t, v = x.logits.shape
    padded = torch.empty(b, t + 1, v, dtype=x.logits.dtype, device=x.logits.device)
    with torch.no_grad():
        padded[:, :t].copy_(x.logits)
        padded[:, t:].zero_()
    return LogitsInputs(padded.requires_grad_(), x.ids, x.mask, x.adv, x.old, x.ref)


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    loss: Callable | None  # (inputs) -> scalar loss; None: the method has no loss from logits
    logprobs: Callable | None  # (inputs) -> (logp, entropy or None), called under no_grad
    needs_cuda: bool = False
    compiled: bool = False
    prepare: Callable[[LogitsInputs], LogitsInputs] | None = None
    package: str | None = None  # an optional dependency; missing = skipped with the reason
    note: str = ""


def methods(device: torch.device) -> list[Method]:
    """Every method, in table order; CUDA-only ones are listed everywhere and skipped with a reason."""
    ours = [
        Method("grpo_fast_torch", "grpo_fast (torch backend)", grpo_fast_loss("torch"), grpo_fast_logprobs("torch"))
    ]
    if device.type == "cuda":
        ours.append(
            Method(
                "grpo_fast_triton",
                "grpo_fast (triton backend)",
                grpo_fast_loss("triton"),
                grpo_fast_logprobs("triton"),
                needs_cuda=True,
            )
        )
    return ours + [
        Method("naive", "naive torch (log_softmax + gather)", naive_loss, naive_logprobs),
        Method(
            "naive_compile",
            "torch.compile(naive)",
            lazy_compile(naive_loss),
            lazy_compile(naive_logprobs),
            compiled=True,
        ),
        Method(
            "trl",
            "TRL selective_log_softmax + entropy_from_logits",
            trl_loss,
            trl_logprobs,
            package="trl.trainer.utils",  # the module itself: `import trl` succeeds where its helpers' imports fail
            note="on CUDA TRL dispatches to its fused Triton kernel",
        ),
        Method(
            "liger_triton",
            "Liger triton_grpo_loss",
            liger_loss,
            liger_logprobs,
            needs_cuda=True,
            prepare=liger_inputs,
            package="liger_kernel",
            note="Triton kernels launched on CUDA tensors: needs a GPU",
        ),
    ]


def lazy_compile(fn: Callable) -> Callable:
    """torch.compile(fn), created at the first call: building the method list then imports no dynamo
    (~3 s per benchmark process that never compiles)."""
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args)

    return call
