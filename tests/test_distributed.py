"""Two processes (gloo on CPU) train exactly what one process trains.

Two processes with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) run ``worker``: first
the CLI (``grpo-fast train`` joins the process group from that environment), then each scenario of
SCENARIOS with per_device_train_batch_size 4 on each rank. The tests run the same scenarios in one
process with per_device_train_batch_size 8 (the same global batch of 16 completions) and compare:
sampled completions (identical), normalisers and advantages, logged metrics, and the parameters after
3 steps (within fp32 reduction-order tolerance).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import yaml

import grpo_fast.trainer.update as trainer_module  # where the update calls the loss
from grpo_fast.advantages import group_advantages
from grpo_fast.r1 import toy
from grpo_fast.trainer import GRPOConfig, GRPOTrainer

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="the two processes are forked"),
    pytest.mark.skipif(
        importlib.util.find_spec("datasets") is None,
        reason="needs the datasets package (every run here trains on grpo_fast.r1.toy's datasets)",
    ),
    pytest.mark.usefixtures("one_thread"),  # tests/conftest.py
]

G = 4
BASE = dict(seed=3, max_steps=3, learning_rate=1e-2, num_generations=G, max_completion_length=10, logging_steps=1,
            gradient_accumulation_steps=2, adam_epsilon=1.0)  # fmt: skip
# adam_epsilon = 1: the first AdamW steps are ~ lr * g rather than lr * sign(g), so fp32 rounding in g (a
# different reduction order over 2 ranks) is not amplified into a different update.
SCENARIOS = {
    "dapo_batch_scaling": dict(loss_type="dapo", scale_rewards="batch", mask_truncated_completions=True, save_steps=2),
    "grpo_dynamic_sampling": dict(loss_type="grpo", dynamic_sampling=True, max_dynamic_sampling_tries=3),
    "dr_grpo_kl_two_iterations": dict(loss_type="dr_grpo", beta=0.04, num_iterations=2, epsilon=0.05),
    "fsdp2_dapo_kl": dict(loss_type="dapo", parallelism="fsdp2", save_steps=2, beta=0.04, num_iterations=2),
}
if importlib.util.find_spec("peft") is not None:
    SCENARIOS["lora_ddp_grpo"] = dict(loss_type="grpo", beta=0.04)
    SCENARIOS["lora_fsdp2_dapo"] = dict(loss_type="dapo", parallelism="fsdp2", beta=0.04, save_steps=2)
PARAM_ATOL = 2e-6  # max |difference| allowed between the 1- and 2-process parameters (fp32 reduction order)


def digit_share(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def odd_prompts_only(prompts, completions, **kwargs):
    """No spread (all 0) for prompts with an even first digit: dynamic sampling drops those groups."""
    shares = digit_share(prompts, completions)
    return [share if int(p[0]) % 2 else 0.0 for p, share in zip(prompts, shares)]


# the 2-process run also resumes these from checkpoint-2
RESUMED = tuple(n for n in ("dapo_batch_scaling", "fsdp2_dapo_kl", "lora_fsdp2_dapo") if n in SCENARIOS)


def run_scenario(name: str, per_device: int, out: Path, resume: bool = False) -> dict:
    """Train 3 steps (or resume from the first run's checkpoint-2 with a differently initialised model);
    returns what the comparison needs (this rank's view)."""
    data = toy.make_splits(num_train=200, num_dev=8, num_test=16)
    cfg = GRPOConfig(**{**BASE, **SCENARIOS[name], "per_device_train_batch_size": per_device,
                        "output_dir": str(out / (name + "-resumed" if resume else name))})  # fmt: skip
    tok = toy.build_tokenizer()
    # resumed: a different initialisation (LoRA: the same base model, other adapters); the checkpoint rules
    model = toy.build_model(tok, seed=0 if "lora" in name else int(resume), hidden_size=32, layers=1, heads=2, ffn=64)
    if resume:
        torch.manual_seed(123)
    reward = odd_prompts_only if "dynamic" in name else digit_share
    evaluation = data["test"] if "fsdp2" in name else None  # FSDP2: every rank evaluates (collective forwards)
    lora = None
    if "lora" in name:
        from peft import LoraConfig

        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    trainer = GRPOTrainer(model, reward, cfg, data["train"], evaluation, tokenizer=tok, peft_config=lora)
    seen: dict = {"completions": {}, "advantages": {}, "num_items": [], "rows": [], "local": []}

    rollout_and_score, advantages = trainer.rollout_and_score, trainer.compute_advantages

    def recording_rollout(rows, keys=None):
        batch = rollout_and_score(rows, keys)
        ids, lengths = batch.rollout.completion_ids.tolist(), batch.rollout.lengths.tolist()
        for i, key in enumerate(batch.keys.tolist()):
            seen["completions"][(trainer.state.step, key)] = [ids[r][: lengths[r]] for r in range(i * G, i * G + G)]
        return batch

    def recording_advantages(batch):
        adv = advantages(batch)
        for i, key in enumerate(batch.keys.tolist()):
            seen["advantages"][(trainer.state.step, key)] = adv[i * G : i * G + G].clone()
        seen["rows"].append(len(batch))
        # this rank's own loss-token count and its advantages as if the batch std were this rank's alone
        local = group_advantages(batch.rewards, G, cfg.scale_rewards) if len(batch) else adv
        seen["local"].append((float(trainer.loss_mask(batch.rollout).sum()), adv.clone(), local))
        return adv

    loss = trainer_module.linear_grpo_loss

    def recording_loss(*args, **kwargs):
        seen["num_items"].append((trainer.state.step, float(kwargs["num_items_in_batch"])))
        return loss(*args, **kwargs)

    trainer.rollout_and_score, trainer.compute_advantages = recording_rollout, recording_advantages
    trainer_module.linear_grpo_loss = recording_loss
    try:
        trainer.train(resume_from_checkpoint=str(out / name / "checkpoint-2") if resume else None)
    finally:
        trainer_module.linear_grpo_loss = loss
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}  # FSDP2
    seen["params"] = {k: v.detach().clone() for k, v in full.items()}
    metrics_file = Path(cfg.output_dir) / "metrics.jsonl"
    seen["metrics"] = [json.loads(x) for x in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    return seen


def worker(out: Path) -> None:
    """torchrun entry point: the CLI first (it initialises the process group from the environment)."""
    import torch.distributed as dist

    from grpo_fast.cli import main

    torch.set_num_threads(1)
    start = time.perf_counter()
    assert main(["train", "--config", str(out / "cli.yaml")]) == 0
    print(f"[worker] cli {time.perf_counter() - start:.1f} s", file=sys.stderr)
    assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == 2
    rank = dist.get_rank()
    for name in SCENARIOS:
        torch.save(run_scenario(name, 4, out), out / f"{name}-rank{rank}.pt")
        if name in RESUMED:
            torch.save(run_scenario(name, 4, out, resume=True), out / f"{name}-resumed-rank{rank}.pt")
        print(f"[worker] {name} {time.perf_counter() - start:.1f} s", file=sys.stderr)
    dist.barrier()
    dist.destroy_process_group()


def _child(rank: int, port: int, out: Path) -> None:
    """One of the two processes: torchrun's environment contract, then ``worker``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")  # fmt: skip
    try:
        worker(out)
    except BaseException:
        (out / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise


def _cli_config(out: Path, **changes) -> Path:
    cli = {"output_dir": str(out / "cli"), "max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4,
           "max_completion_length": 8, "learning_rate": 1e-3, "reward_funcs": ["accuracy", "format"],
           "eval_max_new_tokens": 4, **changes}  # fmt: skip
    (out / "cli.yaml").write_text(yaml.safe_dump(cli))
    return out / "cli.yaml"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """The 2-process run: two processes forked from this one (no second import of torch and transformers:
    ~10 s instead of 20-45 s for torchrun on the shared 2-core machine) with the environment torchrun
    sets, so ``grpo-fast train`` initialises the gloo group exactly as under torchrun (the README's
    ``torchrun --nproc_per_node 2 -m grpo_fast train`` commands were run by hand)."""
    out = tmp_path_factory.mktemp("two_processes")
    tracked = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"  # an optional package
    _cli_config(out, report_to=tracked, log_completions_steps=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = torch.multiprocessing.get_context("fork")
    processes = [context.Process(target=_child, args=(rank, port, out)) for rank in (0, 1)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=600)
    for p in processes:
        if p.is_alive():  # hung (a collective one rank never joined): do not leave it behind
            p.kill()
            p.join()
    errors = "".join(f.read_text() for f in sorted(out.glob("error-rank*.txt")))
    assert [p.exitcode for p in processes] == [0, 0], errors
    return out


def test_cli_train_in_torchrun_environment_writes_once(two_processes):
    run = two_processes / "cli"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run / "checkpoint-2" / "model.safetensors").exists()
    assert not list(run.glob(".checkpoint-*"))  # no leftover temporary directories


def test_cli_train_in_torchrun_environment_tracks_on_rank_0_only(two_processes):
    pytest.importorskip("tensorboard", reason="needs tensorboard: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_file,) = (two_processes / "cli" / "runs").glob("events.out.tfevents.*")  # one writer: rank 0's
    events = EventAccumulator(str(events_file), size_guidance={"tensors": 0}).Reload()
    assert [e.step for e in events.Scalars("reward")] == [1, 2]
    (table,) = events.Tensors("completions/text_summary")
    rows = table.tensor_proto.string_val[0].decode().splitlines()[2:]
    assert table.step == 2 and len(rows) == 8  # rank 0 sampled 8 of the 16 completions


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_equal_one(two_processes, tmp_path, name):
    one = run_scenario(name, 8, tmp_path)
    ranks = [torch.load(two_processes / f"{name}-rank{r}.pt", weights_only=False) for r in (0, 1)]
    # the same completions for every prompt group (each group sampled on exactly one rank)
    two_completions = {**ranks[0]["completions"], **ranks[1]["completions"]}
    assert len(two_completions) == len(ranks[0]["completions"]) + len(ranks[1]["completions"])
    assert two_completions == one["completions"]
    # global normalisers: every rank passes the 1-process token count to the loss
    for rank in ranks:
        steps = {s: n for s, n in one["num_items"]}
        assert all(n == steps[s] for s, n in rank["num_items"])
    # advantages (with scale_rewards="batch": the std of all ranks' rewards) equal the 1-process ones
    two_advantages = {**ranks[0]["advantages"], **ranks[1]["advantages"]}
    assert two_advantages.keys() == one["advantages"].keys()
    for key, adv in one["advantages"].items():
        torch.testing.assert_close(two_advantages[key], adv, rtol=0, atol=1e-6)
    # metrics (rank 0 logs what one process logs)
    assert [m["step"] for m in ranks[0]["metrics"]] == [1, 2, 3]
    for mine, theirs in zip(ranks[0]["metrics"], one["metrics"]):
        for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "num_groups_trained",
                    "loss", "entropy", "grad_norm"):  # fmt: skip
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    # parameters after 3 steps (rank 1's equal rank 0's: DDP/FSDP keep them in step)
    diff = max((ranks[0]["params"][k] - v).abs().max().item() for k, v in one["params"].items())
    print(f"{name}: max |2-process - 1-process| parameter difference {diff:.3g}")
    assert diff <= PARAM_ATOL
    for k, v in ranks[0]["params"].items():
        torch.testing.assert_close(ranks[1]["params"][k], v, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", RESUMED)
def test_two_processes_resume_bit_exact(two_processes, name):
    """Resumed from checkpoint-2 (a model or adapters initialised differently): the uninterrupted run's
    parameters, bit for bit."""
    for rank in (0, 1):
        full = torch.load(two_processes / f"{name}-rank{rank}.pt", weights_only=False)
        resumed = torch.load(two_processes / f"{name}-resumed-rank{rank}.pt", weights_only=False)
        assert [m["step"] for m in resumed["metrics"]] == [3]
        assert resumed["metrics"][0]["loss"] == full["metrics"][2]["loss"]
        for k, v in full["params"].items():
            assert torch.equal(resumed["params"][k], v), k


def test_dapo_and_batch_scaling_normalisers_are_global(two_processes):
    """dapo's num_items_in_batch is the sum of both ranks' token counts; scale_rewards="batch" divides by
    the std of both ranks' rewards, not of this rank's."""
    ranks = [torch.load(two_processes / f"dapo_batch_scaling-rank{r}.pt", weights_only=False) for r in (0, 1)]
    for step in range(3):
        tokens = [rank["local"][step][0] for rank in ranks]
        passed = {n for rank in ranks for s, n in rank["num_items"] if s == step}
        assert passed == {sum(tokens)} and min(tokens) < sum(tokens)
        for rank in ranks:
            _, used, local_only = rank["local"][step]
            assert not torch.allclose(used, local_only)


def test_dynamic_sampling_splits_groups_unevenly(two_processes):
    """The scenario the global normalisers are for: ranks end up with different numbers of rows."""
    ranks = [torch.load(two_processes / f"grpo_dynamic_sampling-rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert any(a != b for a, b in zip(ranks[0]["rows"], ranks[1]["rows"]))
