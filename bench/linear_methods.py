"""GRPO from hidden states (the fused LM head): the methods the linear suite compares.

Every loss method computes the same DeepSeekMath GRPO objective as the logits suite
(``logits_methods.CONFIG``) of ``logits = hidden @ W.T`` and ends in ``loss.backward()``, leaving
grad_hidden and grad_W. Modes: ``loss`` = forward + backward; ``logprobs`` = old/ref log-probs,
forward only.

Flop floor: forward + backward = the three GEMMs a loss needs, logits = h W^T,
grad_h = g W, grad_W = g^T h: 6 N H V flops; forward-only log-probs: 1 GEMM, 2 N H V flops.
``gemm_floor`` runs exactly those GEMMs with grpo_fast's chunking and reused output buffers, and
nothing else: the time no fused implementation on this machine can beat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import grpo_fast as gf
from bench.logits_methods import CONFIG, lazy_compile, randn_filled
from grpo_fast import reference
from grpo_fast.ops.linear_loss import _GRAD_W_BLOCK, default_chunk_rows, narrow_in_place


@dataclass
class LinearInputs:
    hidden: torch.Tensor  # (B, T, H) leaf, requires grad
    weight: torch.Tensor  # (V, H) leaf, requires grad
    ids: torch.Tensor  # (B, T) int64
    mask: torch.Tensor  # (B, T) float32, all ones
    adv: torch.Tensor  # (B,)
    old: torch.Tensor  # (B, T)
    ref: torch.Tensor  # (B, T)

    def leaves(self) -> list[torch.Tensor]:
        return [self.hidden, self.weight]


def make_inputs(b: int, t: int, h: int, v: int, dtype: torch.dtype, device, seed: int = 0) -> LinearInputs:
    g = torch.Generator(device).manual_seed(seed)
    hidden = randn_filled((b, t, h), 1.0, dtype, device, g).requires_grad_()
    weight = randn_filled((v, h), 2.0 * h**-0.5, dtype, device, g).requires_grad_()  # logits ~ N(0, 4)
    ids = torch.randint(0, v, (b, t), generator=g, device=device)
    adv = torch.randn(b, generator=g, device=device)
    old = -torch.rand(b, t, generator=g, device=device) * 3 - 12  # near log p of N(0, 4) logits
    ref = old + 0.1 * torch.randn(b, t, generator=g, device=device)
    return LinearInputs(hidden, weight, ids, torch.ones(b, t, device=device), adv, old, ref)


def objective(logp, entropy, x: LinearInputs) -> torch.Tensor:
    return reference.grpo_objective(logp, entropy, x.adv, x.mask, x.old, x.ref, CONFIG)[0]


# ---------------------------------------------------------------------------- the floor
class GemmFloor:
    """The three GEMMs per chunk of ``default_chunk_rows(V)`` rows, outputs in reused buffers; in low
    precision the grad_W product goes per vocabulary block into a small buffer, summed in fp32 (as
    grpo_fast does). ``loss`` returns None: there is no loss, only the GEMMs."""

    def __init__(self):
        self.buffers = None

    def _buffers(self, x: LinearInputs):
        h2 = x.hidden.detach().reshape(-1, x.hidden.shape[-1])  # (N, H)
        w = x.weight.detach()
        chunk = min(default_chunk_rows(w.shape[0]), h2.shape[0])
        key = (h2.shape, w.shape, w.dtype)
        if self.buffers is None or self.buffers[0] != key:
            z = torch.empty(chunk, w.shape[0], dtype=w.dtype, device=w.device)  # (C, V)
            gw_low = w.new_empty((min(_GRAD_W_BLOCK, w.shape[0]), w.shape[1]))
            self.buffers = (key, z, gw_low)
        return h2, w, chunk, self.buffers[1], self.buffers[2]

    def loss(self, x: LinearInputs) -> None:
        h2, w, chunk, z_buf, gw_low = self._buffers(x)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        grad_h = torch.empty_like(h2)
        for s in range(0, h2.shape[0], chunk):
            hc = h2[s : s + chunk]  # (C, H)
            z = torch.mm(hc, w.T, out=z_buf[: hc.shape[0]])  # (C, V)
            torch.mm(z, w, out=grad_h[s : s + chunk])  # (C, H)
            if w.dtype == torch.float32:
                grad_w.addmm_(z.T, hc)
            else:
                for v0 in range(0, w.shape[0], gw_low.shape[0]):
                    v1 = min(v0 + gw_low.shape[0], w.shape[0])
                    grad_w[v0:v1].add_(torch.mm(z[:, v0:v1].T, hc, out=gw_low[: v1 - v0]))
        x.hidden.grad, x.weight.grad = grad_h.view_as(x.hidden), narrow_in_place(grad_w, w.dtype)

    def logprobs(self, x: LinearInputs):
        h2, w, chunk, z_buf, _ = self._buffers(x)
        for s in range(0, h2.shape[0], chunk):
            torch.mm(h2[s : s + chunk], w.T, out=z_buf[: min(chunk, h2.shape[0] - s)])
        return None, None


# ---------------------------------------------------------------------------- losses
def grpo_fast_loss(backend: str):
    def loss(x: LinearInputs) -> torch.Tensor:
        return gf.linear_grpo_loss(
            x.hidden, x.weight, x.ids, x.adv, x.mask, x.old, x.ref, config=CONFIG, backend=backend
        ).loss

    return loss


def grpo_fast_logprobs(backend: str):
    def logprobs(x: LinearInputs):
        return gf.linear_token_logprobs(x.hidden, x.weight, x.ids, backend=backend)

    return logprobs


def naive_loss(x: LinearInputs) -> torch.Tensor:
    """Materialised (B, T, V) logits upcast to fp32, log_softmax, gather, the objective."""
    logits = (x.hidden @ x.weight.T).float()  # (B, T, V)
    logp = torch.log_softmax(logits, -1).gather(-1, x.ids.unsqueeze(-1)).squeeze(-1)
    return objective(logp, None, x)


def naive_logprobs(x: LinearInputs):
    logits = (x.hidden @ x.weight.T).float()  # (B, T, V)
    return torch.log_softmax(logits, -1).gather(-1, x.ids.unsqueeze(-1)).squeeze(-1), None


def liger_loss(compiled: bool):
    """Liger's LigerFusedLinearGRPOLoss (chunked over sequences, torch.func.grad per chunk); its torch
    path runs on CPU. chunk_size=1: one sequence per chunk, Liger's default."""
    module = None

    def loss(x: LinearInputs) -> torch.Tensor:
        nonlocal module
        if module is None:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            module = LigerFusedLinearGRPOLoss(
                beta=CONFIG.beta,
                compiled=compiled,
                use_ref_model=True,
                epsilon_low=CONFIG.epsilon,
                epsilon_high=CONFIG.eps_high,
                loss_type="grpo",
                temperature=1.0,
            )
        out = module(x.hidden, x.weight, x.ids, x.mask, x.adv, ref_per_token_logps=x.ref, old_per_token_logps=x.old)
        return out[0] if isinstance(out, tuple) else out

    return loss


def cce_loss(impl: str):
    """Cut Cross-Entropy's per-token cross-entropy (= -log p) fed to the same objective. impl "cce" is
    its Triton kernel (CUDA only); "torch_compile" is its CPU-capable fallback: torch.compile of
    materialised logits + F.cross_entropy."""

    def loss(x: LinearInputs) -> torch.Tensor:
        from cut_cross_entropy import linear_cross_entropy

        logp = -linear_cross_entropy(x.hidden, x.weight, x.ids, reduction="none", impl=impl)  # (B, T)
        return objective(logp.float(), None, x)

    return loss


def cce_logprobs(impl: str):
    def logprobs(x: LinearInputs):
        from cut_cross_entropy import linear_cross_entropy

        return -linear_cross_entropy(x.hidden, x.weight, x.ids, reduction="none", impl=impl).float(), None

    return logprobs


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    loss: Callable | None
    logprobs: Callable | None  # None: the peer has no forward-only log-prob function
    needs_cuda: bool = False
    compiled: bool = False
    is_floor: bool = False
    package: str | None = None  # an optional dependency; missing = skipped with the reason
    note: str = ""


def methods(device: torch.device) -> list[Method]:
    floor = GemmFloor()
    naive_c, naive_lp_c = lazy_compile(naive_loss), lazy_compile(naive_logprobs)
    return [
        Method("gemm_floor", "GEMM floor (3 bare GEMMs; 1 forward-only)", floor.loss, floor.logprobs, is_floor=True),
        Method(
            "grpo_fast_torch", "grpo_fast linear (torch backend)", grpo_fast_loss("torch"), grpo_fast_logprobs("torch")
        ),
        Method(
            "grpo_fast_triton",
            "grpo_fast linear (triton backend)",
            grpo_fast_loss("triton"),
            grpo_fast_logprobs("triton"),
            needs_cuda=True,
            note="Triton kernels; on CPU they run only under the interpreter (a test, not a benchmark)",
        ),
        Method("naive", "naive torch (fp32 logits materialised)", naive_loss, naive_logprobs),
        Method("naive_compile", "torch.compile(naive)", naive_c, naive_lp_c, compiled=True),
        Method(
            "liger",
            "Liger LigerFusedLinearGRPOLoss (compiled=False)",
            liger_loss(False),
            None,
            package="liger_kernel",
            note="no forward-only log-prob function",
        ),
        Method(
            "liger_compile",
            "Liger LigerFusedLinearGRPOLoss (compiled=True)",
            liger_loss(True),
            None,
            compiled=True,
            package="liger_kernel",
            note="no forward-only log-prob function",
        ),
        Method(
            "cce",
            "Cut Cross-Entropy (Triton kernel)",
            cce_loss("cce"),
            cce_logprobs("cce"),
            needs_cuda=True,
            package="cut_cross_entropy",
            note="its Triton kernels need a GPU",
        ),
        Method(
            "cce_torch_compile",
            "Cut Cross-Entropy impl=torch_compile",
            cce_loss("torch_compile"),
            cce_logprobs("torch_compile"),
            compiled=True,
            package="cut_cross_entropy",
            note="CCE's CPU fallback: torch.compile of materialised logits + cross_entropy",
        ),
    ]
