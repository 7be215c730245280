"""GRPO steps of grpo_fast's and TRL's GRPOTrainer, in alternation: each trainer in its own process, one
step at a time, so both see the same phase of a machine whose speed drifts within minutes.

The parent (``run_paired``) starts one child per trainer and waits until each has built its trainer
(model, optimizer, data). Then, per round, it tells one child to run one step and waits for that child
to be idle again, then the other; the order alternates between rounds. A child reports a step only when
it is blocked waiting for the next "go" (TRL's loop does bookkeeping between steps: that runs before
the report, so it never overlaps the other trainer's step). Each child measures its own peak memory
over its timed steps (the RSS high-water mark above the RSS when they start, ``harness.PeakMemory``).

Both trainers get the model ``shape.model`` names (``bench.trainer_models``; by default the demo's
0.53M-parameter Qwen2 and character tokenizer, grpo_fast.r1.toy), freshly initialised (step time depends on
the batch shape, not on what the model knows), P prompts x G completions of at most T new tokens at
temperature 1.0, the dapo loss, ``shape.beta`` (0 by default), one optimizer step per generation batch with
per_device_train_batch_size ``micro`` (TRL splits the update by rows; grpo_fast balances its passes by
tokens), the model's reward, fp32 (or bf16 autocast: ``shape.dtype``), and gradient checkpointing on or off on both
sides. A step = sampling + rewards + advantages + the update. Each child also reports the first part
("sampling"): grpo_fast's ``time/rollout`` metric, and for TRL the time in the one method that samples and
scores (``GRPOTrainer._generate_and_score_completions``, timed by a subclass); the rest of the step is the
update (forward/backward passes, optimizer step, bookkeeping).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench import harness
from bench.shapes import TrainerShape

ROOT = Path(__file__).resolve().parent.parent
TRAINERS = ("grpo_fast", "trl")
# grpo_fast variants: GRPOConfig fields over the common ones ("grpo_fast_compiled": the rollout's fixed-shape
# step compiled, grpo_fast.trainer.static_decode; the CPU default is eager steps)
VARIANTS = {"grpo_fast": {}, "grpo_fast_compiled": {"decode_graphs": "on"}}
LEARNING_RATE = 1e-4
MARK = "@@trainer_steps "  # the start of a protocol line on a child's stdout


def _model_and_data(device, shape: TrainerShape):
    """(tokenizer, model, data, reward function): the model ``shape.model`` names (bench.trainer_models)."""
    from bench import trainer_models
    from grpo_fast.r1 import toy

    tokenizer, model, reward = trainer_models.build(shape.model, device, seed=0)
    rows = toy.addition_rows(toy.split_pairs(num_train=2000, seed=0)["train"])
    data = [{"prompt": row["prompt"], "answer": row["answer"]} for row in rows]  # a list: no datasets needed
    return tokenizer, model, data, reward


def _common(shape: TrainerShape, out: str, gc: bool) -> dict:
    return {
        "output_dir": out,
        "max_steps": shape.warmup + shape.rounds,
        "learning_rate": LEARNING_RATE,
        "per_device_train_batch_size": shape.micro,
        "gradient_accumulation_steps": shape.prompts * shape.group // shape.micro,
        "num_generations": shape.group,
        "max_completion_length": shape.max_new,
        "temperature": 1.0,
        "loss_type": "dapo",
        "beta": shape.beta,  # > 0: reference log-probs from a frozen copy of the initial model, on both sides
        "logging_steps": 10**6,
        "seed": 0,
        "bf16": shape.dtype == "bfloat16",  # bf16 autocast (fp32 weights) on both sides, or fp32 on both
        "gradient_checkpointing": gc,  # TRL's default is True, grpo_fast's False: set on both
    }


# ---------------------------------------------------------------------------- the child
class _Gate:
    """The child's side of the protocol: one JSON line per message on stdout, one "go" line per step on stdin.

    ``sampling`` is the part of the current step spent sampling completions and scoring them (rewards and
    advantages), which the trainer's code adds in; the rest of the step is the update.
    """

    def __init__(self, device, warmup: int):
        self.device, self.warmup = device, warmup
        self.times: list[float] = []
        self.pending: dict | None = None
        self.peak = harness.PeakMemory(device)
        self.t0 = 0.0
        self.sampling: float | None = 0.0
        self.split = True  # False: the trainer cannot tell its sampling time (reported as None)

    @staticmethod
    def say(**message) -> None:
        print(MARK + json.dumps(message), flush=True)

    def begin(self) -> None:
        """Report the previous step (the child is idle from here on), wait for "go", start the clock."""
        if self.pending is not None:
            self.say(**self.pending)
            self.pending = None
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("bench.trainer_steps: the parent went away")
        if len(self.times) == self.warmup:
            self.peak.start()
        harness.synchronize(self.device)
        self.sampling = 0.0 if self.split else None
        self.t0 = time.perf_counter()

    def end(self) -> None:
        harness.synchronize(self.device)
        step = time.perf_counter() - self.t0
        self.pending = {"step_s": step, "sampling_s": self.sampling}
        self.times.append(step)

    def finish(self) -> None:
        used = self.peak.stop()  # before the last report: the parent may end this process after it
        self.say(**self.pending, peak_extra_bytes=max(used, 0), peak_reset=self.peak.reset_ok,
                 memory_kind=self.peak.kind, threads=torch.get_num_threads())  # fmt: skip


def _child_grpo_fast(shape: TrainerShape, gc: bool, out: str, device, gate: _Gate, variant: str) -> None:
    from grpo_fast.trainer import GRPOConfig, GRPOTrainer

    tokenizer, model, data, reward = _model_and_data(device, shape)
    config = GRPOConfig(**_common(shape, out, gc), **VARIANTS[variant])
    trainer = GRPOTrainer(model, [reward], config, data, tokenizer=tokenizer)
    gate.say(ready=True)
    for _ in range(shape.warmup + shape.rounds):
        gate.begin()
        metrics = trainer.step()
        gate.sampling = metrics["time/rollout"]  # completions, rewards, advantages (measured by the trainer)
        gate.end()


def _child_trl(shape: TrainerShape, gc: bool, out: str, device, gate: _Gate) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class Gated(TrainerCallback):  # TRL's loop cannot be entered one step at a time: its callbacks gate it
        def on_step_begin(self, *args, **kwargs):
            gate.begin()

        def on_step_end(self, *args, **kwargs):
            gate.end()

    class Timed(GRPOTrainer):  # the sampling part of a step: TRL samples and scores in this one method
        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                harness.synchronize(device)
                gate.sampling += time.perf_counter() - start

    gate.split = hasattr(GRPOTrainer, "_generate_and_score_completions")  # another TRL version: no split
    trainer_class = Timed if gate.split else GRPOTrainer
    tokenizer, model, data, reward = _model_and_data(device, shape)
    data = Dataset.from_list(data)  # TRL's trainer takes a Dataset (TRL needs datasets anyway)
    if shape.beta > 0:  # TRL loads its reference model by the policy's name: give it the same weights on disk
        model.save_pretrained(Path(out) / "initial")
        model = str(Path(out) / "initial")
    args = GRPOConfig(**_common(shape, out, gc), use_cpu=device.type == "cpu", report_to="none", save_strategy="no",
                      dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
    trainer = trainer_class(model=model, reward_funcs=[reward], args=args, train_dataset=data,
                            processing_class=tokenizer, callbacks=[Gated()])  # fmt: skip
    gate.say(ready=True)
    trainer.train()
    if len(gate.times) != shape.warmup + shape.rounds:
        raise RuntimeError(f"TRL ran {len(gate.times)} steps, expected {shape.warmup + shape.rounds}")


def child_main(argv: list[str]) -> None:
    trainer, gc, shape = argv[0], argv[1] == "gc", TrainerShape(**json.loads(argv[2]))
    device = harness.bench_device()
    gate = _Gate(device, shape.warmup)
    with tempfile.TemporaryDirectory() as out:
        if trainer in VARIANTS:
            _child_grpo_fast(shape, gc, out, device, gate, trainer)
        else:
            _child_trl(shape, gc, out, device, gate)
    gate.finish()


# ---------------------------------------------------------------------------- the parent
class _Child:
    def __init__(self, trainer: str, gc: bool, shape: TrainerShape):
        self.trainer = trainer
        cmd = [sys.executable, "-m", "bench.trainer_steps", "--child", trainer, "gc" if gc else "plain"]
        self.proc = subprocess.Popen([*cmd, json.dumps(asdict(shape))], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.times: list[float] = []
        self.sampling: list[float | None] = []
        self.last: dict = {}

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):  # the trainers print lines of their own
                return json.loads(line[len(MARK) :])
        self.proc.wait()
        raise RuntimeError(f"the {self.trainer} trainer process ended (exit code {self.proc.returncode})")

    def step(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.last = self.read()
        self.times.append(self.last["step_s"])
        self.sampling.append(self.last["sampling_s"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def trl_unusable() -> str | None:
    """Why TRL's GRPOTrainer cannot run here (trl, or a package its trainer imports: accelerate, datasets, ...
    is missing), or None."""
    try:
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    return None


def trl_available() -> bool:
    return trl_unusable() is None


def run_paired(shape: TrainerShape, gc: bool, trainers=TRAINERS, on_step=None) -> dict[str, dict]:
    """trainer -> {"times": timed steps (warm-up dropped), "sampling_times": the sampling part of each (None
    when the trainer cannot tell), "peak_extra_bytes", ...}, steps alternating. ``on_step(trainer, i, report)``,
    if given, is called after each step (i counts from 0, warm-up included): results as they come."""
    children = []
    try:
        for name in trainers:  # one at a time: a trainer's set-up never overlaps the other's
            children.append(_Child(name, gc, shape))
            children[-1].read()  # {"ready": true}
        for i in range(shape.warmup + shape.rounds):
            for c in children if i % 2 == 0 else children[::-1]:
                c.step()
                if on_step is not None:
                    on_step(c.trainer, i, c.last)
                if i == shape.warmup + shape.rounds - 1:
                    c.close()  # its exit (freeing, interpreter shutdown) must not overlap the other's step
        out = {}
        for c in children:
            out[c.trainer] = {
                **c.last,
                "times": c.times[shape.warmup :],
                "sampling_times": c.sampling[shape.warmup :],
                "warmup_s": round(sum(c.times[: shape.warmup]), 4),
            }
            out[c.trainer].pop("step_s")
            out[c.trainer].pop("sampling_s")
        return out
    finally:
        for c in children:
            if c.proc.poll() is None:
                c.proc.kill()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        raise SystemExit("bench.trainer_steps is used by bench/bench_trainer.py and bench.trainer_cpu")
