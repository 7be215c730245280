"""Multi-process training on torch.distributed, as launched by ``torchrun``.

    torchrun --nproc_per_node 2 -m grpo_fast train --config run.yaml      # gloo on CPU, nccl on CUDA

What the trainer does with N processes (grpo_fast.trainer.GRPOTrainer; everything here is a no-op
with one process, so the single-process trainer needs no process group):

- Data: every rank draws the same global prompt list (the one a 1-process run draws) and keeps its
  contiguous slice (``Dist.shard_bounds``); the G completions of a prompt stay on one rank.
- Sampling: each prompt group is sampled from a generator seeded by (seed, step, position of the prompt
  in the training stream), so a 2-process run samples the completions a 1-process run samples.
- Normalisers: the dapo/cispo/vespo token count, the number of sequences (grpo, dr_grpo, luspo, sapo), the
  batch reward std (scale_rewards="batch"), the dynamic-sampling decisions and the logged metrics are
  computed over all ranks (all-reduce / all-gather), so the update equals the 1-process update up to
  fp32 reduction order.
- Gradients: the policy is wrapped in DistributedDataParallel (which averages gradients over ranks) or
  sharded with FSDP2 ``fully_shard`` (parallelism="fsdp2"; which also averages). The trainer scales each
  rank's loss so that the averaged gradient is the gradient of the global loss.
- Output: only rank 0 writes metrics, checkpoints and the progress bar.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .modeling import completion_hidden

PARALLELISM = ("ddp", "fsdp2")


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes, when WORLD_SIZE > 1 and no group exists yet.

    Backend: nccl for CUDA models, gloo otherwise. Returns the device this rank trains on: for a CUDA
    model, ``cuda:LOCAL_RANK`` (torchrun starts one process per GPU); otherwise ``device`` unchanged.
    """
    device = torch.device(device)
    if env_world_size() <= 1 or not dist.is_available():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=60))
    return device


class Dist:
    """This process' rank and the collectives the trainer needs; identity operations with one process."""

    def __init__(self, device: torch.device):
        self.enabled = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1
        # the device collectives run on: nccl only moves CUDA tensors
        self.device = device if self.enabled and dist.get_backend() == "nccl" else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard_bounds(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank's contiguous share of n items (the first n % world ranks get one more)."""
        base, extra = divmod(n, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Elementwise sum / max / min over ranks of a small tensor (a reduced copy, on values' device)."""
        if not self.enabled:
            return values.clone()
        out = values.detach().to(self.device, copy=True)
        dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        return out.to(values.device)

    def sum_int(self, n: int) -> int:
        return int(self.all_reduce(torch.tensor([n], dtype=torch.int64))[0])

    def max_int(self, n: int) -> int:
        return int(self.all_reduce(torch.tensor([n], dtype=torch.int64), op="max")[0])

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; for small per-step statistics)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


class PolicyHidden(nn.Module):
    """The policy as DDP / FSDP see it: ``forward`` returns the hidden states that predict the completion
    tokens (B, T, H); the loss then applies the LM-head weight itself (grpo_fast.linear_grpo_loss).

    It holds the whole causal LM, so the LM head's parameters are registered with DDP/FSDP too (their
    gradients come from the loss, in the same backward pass).
    """

    def __init__(self, model: nn.Module, backbone: nn.Module):
        super().__init__()
        self.model = model
        self.__dict__["backbone"] = backbone  # a submodule of model: not registered twice
        self.copy_output = False  # FSDP2 wants a fresh tensor, not a view, out of a sharded module

    def forward(self, prompt_ids, prompt_mask, completion_ids):
        hidden = completion_hidden(self.backbone, prompt_ids, prompt_mask, completion_ids)
        return hidden.clone() if self.copy_output else hidden


def wrap_policy(model: nn.Module, backbone: nn.Module, dist_: Dist, parallelism: str = "ddp") -> nn.Module:
    """PolicyHidden(model), wrapped in DDP or sharded with FSDP2 when there are several processes.

    DDP: no buffer broadcast (the rotary tables are identical on every rank, and broadcasting would make
    every forward a collective, including those of micro-batches one rank has and another has not).
    FSDP2: every decoder layer and the root are ``fully_shard``-ed (works on CPU with gloo in torch
    2.13 as well as on CUDA); the trainer keeps the parameters gathered while it samples (see
    ``gathered``).
    """
    policy = PolicyHidden(model, backbone)
    if not dist_.enabled:
        return policy
    if parallelism == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(backbone):
            fully_shard(layer)
        # the root (embeddings, final norm, LM head) stays gathered from forward to the end of backward: the
        # loss reads the LM-head weight after the forward returns
        fully_shard(policy, reshard_after_forward=False)
        policy.copy_output = True
        with torch.no_grad():  # FSDP2 sets itself up in the root's first forward: make that one come first
            one = torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device)
            policy(one, torch.ones_like(one), one)
        policy.reshard()
        return policy
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ids = [device] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:  # torch >= 2.13
        return DistributedDataParallel(policy, device_ids=ids, forward_sync_buffers=False)
    return DistributedDataParallel(policy, device_ids=ids, broadcast_buffers=False)


def _decoder_layers(backbone: nn.Module) -> list[nn.Module]:
    layers = getattr(backbone, "layers", None) or getattr(backbone, "h", None)
    if layers is None:
        raise ValueError(f"parallelism='fsdp2' needs the decoder layers at backbone.layers, got {type(backbone)}")
    return list(layers)


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def no_sync(policy: nn.Module, skip: bool):
    """Gradient accumulation without communication: DDP's ``no_sync``, FSDP2's reduce-scatter switch."""
    if not skip:
        return contextlib.nullcontext()
    if hasattr(policy, "no_sync"):
        return policy.no_sync()
    if is_fsdp(policy):
        return _fsdp_no_sync(policy)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(policy):
    policy.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        policy.set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered(policy: nn.Module):
    """FSDP2: keep every parameter unsharded (no per-forward all-gather, no reshard) for the block, so
    that sampling, evaluation and forward-only passes can run a different number of forwards on each
    rank. A no-op for DDP and single-process policies."""
    if not is_fsdp(policy):
        yield
        return
    modules = [m for m in policy.modules() if is_fsdp(m)]
    for m in modules:
        m.unshard()
    layers = [m for m in modules if m is not policy]  # the root never reshards after forward (wrap_policy)
    for m in layers:
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in layers:
            m.set_reshard_after_forward(True)
        for m in modules:
            m.reshard()
