"""Rollout engines: what samples the completions the trainer learns from.

An engine has two methods (the trainer calls nothing else):

    engine.sync_weights(model)          # before each step's sampling: make the engine sample from `model`
    engine.generate(prompt_ids, prompt_mask, group_seeds, group_size, settings) -> Generation

``prompt_ids``/``prompt_mask`` are (B, P) left-padded prompts laid out group by group (rows
g*G .. g*G+G-1 repeat prompt g); ``group_seeds[g]`` seeds the draws of group g, so what a group samples
does not depend on which other groups share the batch (or the process: see grpo_fast.trainer.distributed).
``Generation.sampling_logprobs`` is (B, T) log-probs of the sampled tokens under the sampler's own
(tempered) distribution, or None; when an engine returns them the trainer corrects for the
engine/policy mismatch with ``grpo_fast.rollout_importance_ratio`` (TRL's
``vllm_importance_sampling_*`` options).

Engines here:
- ``HFEngine``: the trainer's own batched, KV-cached sampler (grpo_fast.trainer.rollout.generate) on the
  policy itself; no weight copy, no sampling log-probs (its distribution *is* the policy's).
- ``VLLMEngine``: a colocated ``vllm.LLM`` (one per process), weights pushed from the policy before
  every step, ``SamplingParams(logprobs=0)`` for the sampling log-probs. Needs the ``vllm`` extra and a
  CUDA device; it is not exercised by the tests here (no GPU), only the trainer wiring is, with a fake.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .rollout import Rollout, generate


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample: the trainer's GRPOConfig fields plus the tokenizer's special tokens."""

    max_new_tokens: int
    eos_token_id: int
    pad_token_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    decode_graphs: str = "auto"  # grpo_fast.trainer.rollout.generate's setting (HFEngine)


@dataclass
class Generation:
    """rollout: the sampled completions; sampling_logprobs: (B, T) float32 sampler log-probs, or None."""

    rollout: Rollout
    sampling_logprobs: torch.Tensor | None = None


def group_uniforms(seeds: list[int], group_size: int, length: int, device) -> torch.Tensor:
    """(len(seeds) * group_size, length) draws in (0, 1]: group g's rows come from a generator seeded
    with seeds[g] alone, so a row's draws depend on its group's seed and nothing else."""
    rows = []
    for seed in seeds:
        gen = torch.Generator(device).manual_seed(int(seed))
        rows.append(1.0 - torch.rand((group_size, length), generator=gen, device=device))  # [0, 1) -> (0, 1]
    if not rows:
        return torch.empty((0, length), device=device)
    return torch.cat(rows)


class HFEngine:
    """Sampling with grpo_fast.trainer.rollout.generate on the policy model itself (the default engine).

    Each token of row i is the inverse-CDF draw of one uniform from its group's generator
    (``group_uniforms``), so the completions do not depend on how prompts are batched or sharded.
    """

    returns_logprobs = False

    def __init__(self, model: nn.Module):
        self.model = model

    def sync_weights(self, model: nn.Module) -> None:
        """Nothing to do: the engine samples from the policy's own parameters."""

    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        group_seeds: list[int],
        group_size: int,
        settings: SamplingSettings,
    ) -> Generation:
        s = settings
        uniforms = group_uniforms(group_seeds, group_size, s.max_new_tokens, prompt_ids.device)
        rollout = generate(
            self.model,
            prompt_ids,
            prompt_mask,
            s.max_new_tokens,
            s.eos_token_id,
            s.pad_token_id,
            s.temperature,
            s.top_p,
            s.top_k,
            uniforms=uniforms,
            decode_graphs=s.decode_graphs,
        )
        return Generation(rollout)


def rollout_from_token_lists(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completions: list[list[int]],
    eos_token_id: int,
    pad_token_id: int,
    logprobs: list[list[float]] | None = None,
) -> Generation:
    """A Generation from per-row token lists (as an external engine returns them).

    Tokens after the first EOS are dropped; a row without EOS is truncated. completion_mask covers the
    tokens up to and including EOS; sampling log-probs are 0 past a row's end.
    """
    b = len(completions)
    if b != prompt_ids.shape[0]:
        raise ValueError(f"{b} completions for {prompt_ids.shape[0]} prompt rows")
    ends = [row.index(eos_token_id) + 1 if eos_token_id in row else len(row) for row in completions]
    width = max([1, *ends])
    ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    lp = torch.zeros((b, width), dtype=torch.float32) if logprobs is not None else None
    for i, (row, n) in enumerate(zip(completions, ends)):
        ids[i, :n] = torch.tensor(row[:n], dtype=torch.long)
        mask[i, :n] = 1
        if lp is not None:
            lp[i, :n] = torch.tensor(logprobs[i][:n], dtype=torch.float32)
    truncated = torch.tensor([eos_token_id not in row for row in completions], dtype=torch.bool)
    device = prompt_ids.device
    rollout = Rollout(prompt_ids, prompt_mask, ids.to(device), mask.to(device), truncated.to(device))
    return Generation(rollout, None if lp is None else lp.to(device))


class VLLMEngine:
    """A colocated vLLM engine (one ``vllm.LLM`` per process, sharing the GPU with training).

    - weights: ``sync_weights`` loads the policy's parameters into vLLM's model before each step (LoRA
      adapters are merged for the copy and unmerged after), then resets vLLM's prefix cache;
    - sampling: one request per prompt group, ``SamplingParams(n=G, seed=group seed, logprobs=0)`` with
      ``logprobs_mode="processed_logprobs"`` so the returned log-probs are those of the tempered,
      top-k/top-p-filtered distribution that was sampled (what the importance ratio needs);
    - under torchrun, vLLM runs with ``distributed_executor_backend="external_launcher"`` (each rank
      its own engine, on its own prompt shard).

    Args:
        model: the policy (a transformers model loaded from a directory: vLLM loads ``name_or_path``,
            then receives the current weights), or a PeftModel around one.
        gpu_memory_utilization, max_model_len: passed to ``vllm.LLM``.
    """

    returns_logprobs = True

    def __init__(self, model: nn.Module, gpu_memory_utilization: float = 0.3, max_model_len: int | None = None):
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError("use_vllm=True needs vLLM: pip install 'grpo-fast[vllm]' (CUDA only)") from error
        base = _base_model(model)
        path = getattr(base, "name_or_path", "")
        if not path:
            raise ValueError("VLLMEngine needs a model loaded from a directory (model.name_or_path is empty)")
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        _torchrun_environment()  # the external launcher reads it, also in a single process
        self.llm = LLM(
            model=path,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            distributed_executor_backend="external_launcher",
            seed=rank,
            logprobs_mode="processed_logprobs",
            dtype="auto",
        )

    def sync_weights(self, model: nn.Module) -> None:
        vllm_model = _vllm_model(self.llm)
        peft = hasattr(model, "merge_adapter") and hasattr(model, "peft_config")
        if peft:
            model.merge_adapter()
        try:
            with torch.no_grad():
                for name, param in _vllm_named_parameters(model, peft):
                    vllm_model.load_weights([(name, param.data)])
        finally:
            if peft:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()

    def generate(self, prompt_ids, prompt_mask, group_seeds, group_size, settings: SamplingSettings) -> Generation:
        from vllm import SamplingParams

        s = settings
        requests, params = [], []
        for g, seed in enumerate(group_seeds):
            row = g * group_size
            tokens = prompt_ids[row][prompt_mask[row].bool()].tolist()
            requests.append({"prompt_token_ids": tokens})
            params.append(
                SamplingParams(
                    n=group_size,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=s.top_k if s.top_k > 0 else -1,
                    max_tokens=s.max_new_tokens,
                    seed=int(seed),
                    logprobs=0,
                )
            )
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False) if requests else []
        completions, logprobs = [], []
        for out in outputs:
            for sample in out.outputs:
                ids = list(sample.token_ids)
                lps = [float(step[tok].logprob) for step, tok in zip(sample.logprobs, ids)]
                if sample.finish_reason == "stop" and s.eos_token_id not in ids:  # EOS not reported: add it,
                    ids, lps = ids + [s.eos_token_id], lps + [math.nan]  # unscored (the trainer uses rho = 1)
                completions.append(ids)
                logprobs.append(lps)
        return rollout_from_token_lists(prompt_ids, prompt_mask, completions, s.eos_token_id, s.pad_token_id, logprobs)


def _torchrun_environment() -> None:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as torchrun sets them (kept when set)."""
    import os
    import socket

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def _vllm_model(llm) -> nn.Module:
    """The torch module inside a colocated vllm.LLM (the attribute path of vLLM's V1 engine, as TRL 1.16
    uses it; an older path as fallback)."""
    worker = llm.llm_engine.model_executor.driver_worker
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    return runner.model


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _vllm_named_parameters(model: nn.Module, peft: bool):
    """(name, tensor) pairs under the transformers names vLLM's ``load_weights`` expects (as TRL)."""
    for name, param in model.named_parameters():
        if peft:
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            if "lora_" in name or "original_module" in name:
                continue
            name = name.replace("modules_to_save.default.", "")
        yield name.replace("_checkpoint_wrapped_module.", ""), param


def build_engine(config, model: nn.Module):
    """The engine GRPOConfig asks for: VLLMEngine when ``use_vllm``, else HFEngine on ``model``."""
    if getattr(config, "use_vllm", False):
        return VLLMEngine(model, config.vllm_gpu_memory_utilization, config.vllm_max_model_length)
    return HFEngine(_base_model(model))
