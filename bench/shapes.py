"""Benchmark shapes per profile: real-model shapes for a GPU run, a subset that finishes on a 2-core CPU.

Profiles: ``gpu`` (declared for a CUDA machine), ``cpu`` (the published CPU tables: the whole run
fits in 15 minutes on a 2-core EPYC), ``smoke`` (tiny shapes: checks the machinery and that every
method computes the same loss as the float64 reference, in a minute or two).
"""

from __future__ import annotations

from dataclasses import dataclass

QWEN25_V = 151936  # Qwen2.5 / Qwen3 vocabulary
LLAMA3_V = 128256
GEMMA3_V = 262144  # the V = 2^18 case (Gemma 3)


@dataclass(frozen=True)
class LogitsShape:
    """(B, T, V) logits in ``dtype``; ``rounds`` timed calls; ``full_warmup``: a full-size warm-up call
    also for eager methods (compiled methods always get one: compilation specialises to the shape)."""

    b: int
    t: int
    v: int
    dtype: str
    rounds: int
    full_warmup: bool = True
    methods: tuple[str, ...] | None = None  # None: every method

    @property
    def n(self) -> int:
        return self.b * self.t

    @property
    def id(self) -> str:
        return f"N{self.n}xV{self.v}_{_short(self.dtype)}"


@dataclass(frozen=True)
class LinearShape:
    """(B, T, H) hidden states, a (V, H) LM head, both in ``dtype``. ``paired_rounds``: (log-probs, loss)
    rounds of the method timed alternating with the GEMM floor (None: ``rounds``)."""

    b: int
    t: int
    h: int
    v: int
    dtype: str
    rounds: int
    full_warmup: bool = True
    methods: tuple[str, ...] | None = None  # None: every method
    paired_rounds: tuple[int, int] | None = None

    @property
    def n(self) -> int:
        return self.b * self.t

    @property
    def id(self) -> str:
        return f"N{self.n}xH{self.h}xV{self.v}_{_short(self.dtype)}"


@dataclass(frozen=True)
class TrainerShape:
    """One GRPO step: ``prompts`` x ``group`` completions of at most ``max_new`` tokens, split into
    micro-batches of ``micro`` completions (``prompts * group / micro`` of them per optimizer step)."""

    prompts: int
    group: int
    max_new: int
    micro: int
    warmup: int
    rounds: int
    model: str = "toy"  # a name in bench.trainer_models.MODELS
    dtype: str = "float32"  # "bfloat16": bf16 autocast on both trainers (CUDA)

    @property
    def id(self) -> str:
        base = f"P{self.prompts}xG{self.group}xT{self.max_new}"
        return base if (self.model, self.dtype) == ("toy", "float32") else f"{base}_{self.model}_{_short(self.dtype)}"


@dataclass(frozen=True)
class Profile:
    logits: tuple[LogitsShape, ...]
    linear: tuple[LinearShape, ...]
    trainer: tuple[TrainerShape, ...]
    ceiling_copy_mib: int  # size of the tensor copied for the bandwidth ceiling
    ceiling_gemm: int  # M = N = K of the GEMMs for the flop ceilings
    ceiling_rounds: int


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]


# LM heads (H, V): Qwen2.5-0.5B, Qwen2.5-1.5B, Llama-3.2-1B, Gemma-3-4B
_GPU_HEADS = ((896, QWEN25_V), (1536, QWEN25_V), (2048, LLAMA3_V), (2560, GEMMA3_V))
_CPU_BIG = ("grpo_fast_torch", "naive", "liger")  # the GEMM floor runs paired with grpo_fast (bench_linear)
_CPU_N512 = (
    "grpo_fast_torch",
    "grpo_fast_triton",
    "naive",
    "naive_compile",
    "liger",
    "cce",
    "cce_torch_compile",
)  # every linear method but liger_compile
# Liger's torch path in bf16 takes ~70 s per call at N = 2048 on the AVX-512 machine: left out for time
_CPU_BF16 = ("grpo_fast_torch", "naive", "naive_compile")
PROFILES = {
    "gpu": Profile(
        logits=tuple(
            LogitsShape(b, 1024, v, "bfloat16", rounds=20) for v in (QWEN25_V, LLAMA3_V, GEMMA3_V) for b in (4, 16)
        ),
        linear=tuple(LinearShape(b, 1024, h, v, "bfloat16", rounds=10) for h, v in _GPU_HEADS for b in (4, 16)),
        trainer=(TrainerShape(32, 8, 40, 64, warmup=2, rounds=8),),
        ceiling_copy_mib=4096,
        ceiling_gemm=8192,
        ceiling_rounds=20,
    ),
    # Budget on the 2-core EPYC. Two kinds of machine have been seen: AVX-512 (~190 GFLOP/s fp32, ~400 bf16)
    # and AVX2-only (~95 GFLOP/s fp32, bf16 emulated: the bf16 shape is then reported as not run). One fp32
    # forward + backward at N = 1024, H = 896, V = 151936 is 6 N H V = 0.84 TFLOP, 5-9 s for the GEMMs
    # alone. So the large shapes get 2 rounds and no full-size warm-up for eager methods (their warm-up is a
    # 32-token call: imports, lazy init, and the correctness check); the compiled peers (a full-size compile
    # + warm-up call each) run at N = 512 only (CCE's fallback; Liger's compiled path, slower than its eager
    # one on both machines, is left out), plus torch.compile at N = 1024 in bf16. On the AVX2 machine
    # (2026-11-30) the previous profile (N = 2048, Liger compiled) took 18 min 24 s: hence N = 1024. A round
    # can vary by 10-30% here, so grpo_fast and the floor it is held to get more rounds: 5 of the forward-only
    # pass (~4 s a pair at N = 1024), 3 of the loss (~20 s a pair).
    "cpu": Profile(
        logits=(
            LogitsShape(1, 256, QWEN25_V, "float32", rounds=5),
            LogitsShape(4, 256, QWEN25_V, "float32", rounds=3),
        ),
        linear=(
            LinearShape(2, 256, 896, QWEN25_V, "float32", 2, False, methods=_CPU_N512, paired_rounds=(5, 3)),
            LinearShape(4, 256, 896, QWEN25_V, "float32", 2, False, methods=_CPU_BIG, paired_rounds=(5, 3)),
            LinearShape(4, 256, 896, QWEN25_V, "bfloat16", rounds=2, full_warmup=False, methods=_CPU_BF16),
        ),
        trainer=(TrainerShape(32, 8, 40, 64, warmup=2, rounds=6),),
        ceiling_copy_mib=1024,
        ceiling_gemm=4096,
        ceiling_rounds=3,
    ),
    "smoke": Profile(
        logits=(LogitsShape(2, 16, 1000, "float32", rounds=2), LogitsShape(2, 16, 1000, "bfloat16", rounds=2)),
        linear=(LinearShape(2, 16, 32, 1000, "float32", rounds=2), LinearShape(2, 16, 32, 1000, "bfloat16", rounds=2)),
        trainer=(TrainerShape(2, 4, 8, 8, warmup=1, rounds=1),),
        ceiling_copy_mib=64,
        ceiling_gemm=512,
        ceiling_rounds=2,
    ),
}
