"""One GRPO step on the demo's tiny model: grpo_fast's GRPOTrainer vs TRL's GRPOTrainer, same batch shape.

Launch:  python -m bench.trainer_cpu [--steps 6 --warmup 2]
Both trainers: the 0.5M-parameter Qwen2 and character tokenizer of `grpo-fast demo` (untrained weights:
step time depends on batch shape, not on what the model knows), 32 prompts x G = 8 completions of at
most 40 tokens, temperature 1.0, dapo loss, beta 0, one optimizer step per generation batch
(per_device_train_batch_size 64 x gradient_accumulation_steps 4; grpo_fast balances its update passes by
tokens, TRL splits by rows), accuracy reward, fp32, no gradient checkpointing (TRL's defaults are bf16 autocast
and gradient checkpointing: set off here to match). Each trainer runs in its own subprocess; reported: median
step time after warm-up (sampling + rewards + update) and the peak RSS above the process after the
model, tokenizer and data exist.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

PROMPTS, GROUP, MAX_NEW, MICRO, ACCUM, LR = 32, 8, 40, 64, 4, 1e-4


def _setup():
    from grpo_fast import toy

    torch.manual_seed(0)
    tok = toy.build_tokenizer()
    model = toy.build_model(tok, seed=0)
    data = toy.make_splits(num_train=2000, seed=0)["train"]
    return tok, model, data


def run_ours(steps: int, out: str) -> list[float]:
    from grpo_fast.rewards import accuracy_reward
    from grpo_fast.trainer import GRPOConfig, GRPOTrainer

    tok, model, data = _setup()
    cfg = GRPOConfig(output_dir=out, max_steps=steps, learning_rate=LR, per_device_train_batch_size=MICRO,
                     gradient_accumulation_steps=ACCUM, num_generations=GROUP, max_completion_length=MAX_NEW,
                     temperature=1.0, loss_type="dapo", beta=0.0, logging_steps=10**6)  # fmt: skip
    trainer = GRPOTrainer(model, [accuracy_reward], cfg, data, tokenizer=tok)
    base = _rss_mib()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - t0)
    return times, base


def run_trl(steps: int, out: str) -> list[float]:
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_fast.rewards import accuracy_reward

    tok, model, data = _setup()
    args = GRPOConfig(output_dir=out, max_steps=steps, learning_rate=LR, per_device_train_batch_size=MICRO,
                      gradient_accumulation_steps=ACCUM, num_generations=GROUP, max_completion_length=MAX_NEW,
                      temperature=1.0, loss_type="dapo", beta=0.0, use_cpu=True, report_to="none", bf16=False,
                      gradient_checkpointing=False,  # as grpo_fast's default (TRL's default is True)
                      save_strategy="no", logging_steps=10**6, dataloader_num_workers=0, seed=0)  # fmt: skip
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy_reward], args=args, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])  # fmt: skip
    base = _rss_mib()
    trainer.train()
    # TRL generates a batch at the first micro-step of each optimizer step: a step is begin -> end
    return [end - begin for begin, end in zip(stamps[0::2], stamps[1::2])], base


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        times, base = (run_ours if args.method == "grpo_fast" else run_trl)(args.warmup + args.steps, out)
    return {"method": args.method, "step_s": times[args.warmup :], "peak_extra_mib": _rss_mib() - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["grpo_fast", "trl"])
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--out")
    args = p.parse_args()
    if args.method:
        print(json.dumps(child(args)))
        return
    rows = []
    for m in args.methods:
        flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        res = subprocess.run(
            [sys.executable, "-m", "bench.trainer_cpu", "--method", m, *flags], capture_output=True, text=True
        )
        if res.returncode != 0:
            print(f"{m}: failed\n{res.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"# one GRPO step: {PROMPTS} prompts x G={GROUP}, <= {MAX_NEW} new tokens, {args.threads} threads; "
          f"median of {args.steps} steps after {args.warmup} warm-up")  # fmt: skip
    print(f"{'trainer':10} {'median s':>9} {'min s':>7} {'max s':>7} {'peak extra MiB':>15}")
    for r in rows:
        s = r["step_s"]
        print(f"{r['method']:10} {statistics.median(s):9.3f} {min(s):7.3f} {max(s):7.3f} {r['peak_extra_mib']:15.0f}")
    if len(rows) == 2:
        print(f"speed-up (TRL median / grpo_fast median): "
              f"{statistics.median(rows[1]['step_s']) / statistics.median(rows[0]['step_s']):.2f}x")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
