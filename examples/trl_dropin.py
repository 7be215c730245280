"""grpo_fast's fused loss inside TRL: ``FusedGRPOTrainer`` in place of ``trl.GRPOTrainer``, same arguments.

Two GRPO steps of the demo's tiny Qwen2 (grpo_fast.r1.toy: built in code, nothing downloaded) on CPU, with
options TRL's old Liger loss path refused: a high-entropy token mask (top_entropy_quantile), the
off-policy sequence mask (off_policy_mask_threshold) and two updates per generation (num_iterations=2,
so the second update is off-policy against TRL's old log-probs).

    python examples/trl_dropin.py      # ~20 s of CPU time on 2 cores, most of it importing TRL
"""

from __future__ import annotations

import tempfile

import torch
from trl import GRPOConfig

from grpo_fast.integrations.trl import FusedGRPOTrainer
from grpo_fast.r1 import toy


def digit_reward(completions, **kwargs) -> list[float]:
    """Fraction of the completion's characters that are digits: a reward with spread even for an untrained model."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def main() -> None:
    torch.set_num_threads(2)
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, seed=0)  # 0.53M parameters, random init
    train = toy.make_splits(num_train=64, num_dev=8, num_test=8)["train"]  # prompts "a+b="
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            max_steps=2,
            per_device_train_batch_size=8,
            num_generations=8,
            max_completion_length=24,
            temperature=1.0,
            loss_type="dapo",
            epsilon_high=0.28,
            beta=0.0,
            num_iterations=2,
            top_entropy_quantile=0.8,
            off_policy_mask_threshold=0.5,
            learning_rate=1e-3,
            logging_steps=1,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            seed=0,
        )
        trainer = FusedGRPOTrainer(
            model=model, reward_funcs=[digit_reward], args=args, train_dataset=train, processing_class=tokenizer
        )
        trainer.train()
    keys = ("loss", "reward", "entropy", "clip_ratio/region_mean")  # no reward at step 2: it reuses step 1's batch
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']}: " + "  ".join(f"{k} {entry[k]:.4f}" for k in keys if k in entry))
    changed = sum(not torch.equal(p.detach(), before[name]) for name, p in model.named_parameters())
    print(f"FusedGRPOTrainer: 2 steps done, {changed}/{len(before)} parameter tensors updated")


if __name__ == "__main__":
    main()
