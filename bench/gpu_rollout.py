"""The rollout section of ``bench.gpu_check``: sampling tokens/s of grpo_fast's eager steps, of its
fixed-shape step (a CUDA graph replayed per token; on the CPU dry run, the step compiled by inductor) and of
``model.generate``, on a Qwen2.5-0.5B-shaped model with random weights (the dry run: ``tiny-qwen2``).

Every completion runs to the full length budget (EOS is an id the model cannot sample), so tokens/s =
rows x new tokens / seconds. The first call of each method is timed apart (compile or graph capture).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from bench import harness
from bench.trainer_models import build


@dataclass(frozen=True)
class RolloutShape:
    model: str
    rows: int  # prompts x G
    prompt: int  # prompt tokens per row
    new: int  # new tokens per row
    dtype: str
    rounds: int


def rollout_shape(dry_run: bool) -> RolloutShape:
    if dry_run:
        return RolloutShape("tiny-qwen2", 8, 6, 8, "float32", rounds=2)
    return RolloutShape("qwen2.5-0.5b", 128, 64, 128, "bfloat16", rounds=3)


def methods(device: torch.device) -> dict:
    """name -> what it runs: the static step is a CUDA graph on CUDA, compiled on CPU."""
    static = "graph-replayed" if device.type == "cuda" else "compiled (CPU)"
    return {"eager": "off", static: "on", "model.generate": None}


def run(ctx) -> None:
    """Fill ``ctx.state["rows"]`` with one row per method, saving after each."""
    shape = rollout_shape(ctx.dry_run)
    _, model, _ = build(shape.model, ctx.device)
    model = model.to(getattr(torch, shape.dtype)).eval()
    g = torch.Generator(ctx.device).manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (shape.rows, shape.prompt), generator=g, device=ctx.device)
    mask = torch.ones_like(ids)
    ctx.state.update(shape=asdict(shape), rows=[])
    for name, setting in methods(ctx.device).items():
        if ctx.left() < 10:
            ctx.state["reason"] = f"stopped before {name}: the time box is nearly over"
            break
        ctx.state["rows"].append({"method": name, **_time(model, ids, mask, shape, setting, ctx.device)})
        ctx.save()
    ctx.state["status"] = "ok"
    ctx.state.setdefault("reason", f"{shape.rounds} timed rollouts per method after a first (compile/capture) call")


def _time(model, ids, mask, shape: RolloutShape, setting: str | None, device) -> dict:
    sample = (lambda: _generate_hf(model, ids, mask, shape)) if setting is None else (
        lambda: _generate_ours(model, ids, mask, shape, setting))  # fmt: skip
    first = _clock(sample, device)
    times = [_clock(sample, device) for _ in range(shape.rounds)]
    median = statistics.median(times)
    return {"status": "ok", "first_call_s": first, "median_s": median, "times": times,
            "tokens_per_s": shape.rows * shape.new / median}  # fmt: skip


def _clock(fn, device) -> float:
    harness.synchronize(device)
    start = time.perf_counter()
    fn()
    harness.synchronize(device)
    return time.perf_counter() - start


def _generate_ours(model, ids, mask, shape: RolloutShape, setting: str) -> torch.Tensor:
    from grpo_fast.trainer.rollout import generate

    vocab = model.config.vocab_size  # never sampled: every row runs to the full budget
    out = generate(model, ids, mask, shape.new, vocab, 0, 1.0, decode_graphs=setting)
    if out.completion_ids.shape[1] != shape.new:
        raise RuntimeError(f"expected {shape.new} new tokens per row, got {out.completion_ids.shape[1]}")
    return out.completion_ids


def _generate_hf(model, ids, mask, shape: RolloutShape) -> torch.Tensor:
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=shape.new, min_new_tokens=shape.new, pad_token_id=0)  # fmt: skip
    return out[:, ids.shape[1] :]
