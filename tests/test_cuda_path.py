"""What the CUDA path needs that a CPU run would not show by itself, each checked on CPU.

- every Triton launch goes through ``kernels/launch.py``, which makes the tensors' GPU current;
- no bool tensor reaches ``torch.argsort`` (CUDA sorts none before torch 2.6).
Tests marked ``triton`` run the kernels on the ``device`` fixture (tests/conftest.py): the GPU with
real kernels where CUDA is present, else the CPU under the interpreter.
Run: pytest tests/test_cuda_path.py
"""

from __future__ import annotations

import ast
import contextlib
import sys
from pathlib import Path

import pytest
import torch

from grpo_fast.kernels import launch as launch_module
from grpo_fast.kernels import linear_token_stats as lts

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _direct_launches(path: Path) -> list[str]:
    """``kernel[grid](...)`` calls (and ``kernel.run(...)``) in a file: launches that bypass the guard."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        direct = isinstance(node.func, ast.Subscript)
        run = isinstance(node.func, ast.Attribute) and node.func.attr in ("run", "warmup")
        if direct or run:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node.func)}")
    return found


def test_every_kernel_launch_goes_through_the_device_guard():
    files = sorted(p for p in KERNELS.glob("*.py") if p.name != "launch.py")
    assert len(files) >= 2, files  # token_stats.py and linear_token_stats.py at least
    bypass = [hit for p in files for hit in _direct_launches(p)]
    assert not bypass, f"launch these through kernels/launch.py's launch(): {bypass}"
    calls = [n for p in files for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Call)]
    guarded = [n for n in calls if isinstance(n.func, ast.Name) and n.func.id == "launch"]
    assert len(guarded) == 7, "two token_stats launches, five linear ones (forward, merge, three backward)"


def test_launch_makes_the_tensors_gpu_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(device):  # stands in for torch.cuda.device, which needs a GPU
        entered.append(torch.device(device))
        yield

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **meta):
                calls.append((grid, args, meta, list(entered)))

            return run

    calls = []
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    launch_module.launch(Kernel(), (3,), torch.device("cuda", 1), "x", 2, BLOCK=4)
    assert calls == [((3,), ("x", 2), {"BLOCK": 4}, [torch.device("cuda", 1)])]
    entered.clear()
    launch_module.launch(Kernel(), (1,), torch.device("cpu"), "y")  # the interpreter: no guard
    assert calls[-1] == ((1,), ("y",), {}, [])


@pytest.mark.triton
def test_no_bool_tensor_is_argsorted(monkeypatch, device, one_thread):
    real = torch.argsort

    def argsort(x, *args, **kwargs):  # torch < 2.6 on CUDA: "Sort currently does not support bool dtype"
        if x.dtype == torch.bool:
            raise RuntimeError("argsort of a bool tensor")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch, "argsort", argsort)
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(9, 16, generator=g), torch.randn(40, 16, generator=g)
    ids, active = torch.randint(0, 40, (9,), generator=g), torch.rand(9, generator=g) > 0.3
    hidden, weight, ids, active = (x.to(device) for x in (hidden, weight, ids, active))
    logp, entropy, lse = lts.linear_stats_forward(hidden, weight, None, ids, active, 1.0, True)
    grads = lts.linear_stats_backward(hidden, weight, None, ids, active, lse, entropy, torch.ones_like(lse), None, 1.0)
    expected = torch.log_softmax(hidden @ weight.T, -1).gather(1, ids[:, None])[:, 0] * active
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    assert grads[0].shape == hidden.shape and bool(grads[1].isfinite().all())


def test_trainer_head_loss_runs_in_the_autocast_dtype(tmp_path, monkeypatch, one_thread):
    """bf16 autocast (forced on here, CPU autocast): the fused loss and the forward-only log-probs get bf16
    operands, though Qwen2's final norm hands over fp32 hidden states; the fp32 head keeps fp32 gradients."""
    from grpo_fast import toy
    from grpo_fast import trainer as trainer_module

    seen = []

    def recorder(fn, name):
        def wrapped(hidden, weight, *args, **kwargs):
            seen.append((name, hidden.dtype, weight.dtype))
            return fn(hidden, weight, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(trainer_module, "linear_grpo_loss", recorder(trainer_module.linear_grpo_loss, "loss"))
    monkeypatch.setattr(
        trainer_module, "linear_token_logprobs", recorder(trainer_module.linear_token_logprobs, "logprobs")
    )
    tok = toy.build_tokenizer()
    model = toy.build_model(tok, seed=0, hidden_size=32, layers=1, heads=2, ffn=64)
    data = toy.make_splits(num_train=16, num_dev=4, num_test=4)
    cfg = trainer_module.GRPOConfig(output_dir=str(tmp_path), seed=3, max_steps=1, per_device_train_batch_size=8,
                                    num_generations=4, max_completion_length=6, beta=0.04)  # fmt: skip
    trainer = trainer_module.GRPOTrainer(model, "format", cfg, data["train"], tokenizer=tok)
    trainer.use_bf16 = True  # bf16 autocast, which the trainer turns on by itself only on a bf16-capable GPU
    trainer.step()
    assert {name for name, *_ in seen} == {"loss", "logprobs"}
    assert all(dtypes == [torch.bfloat16, torch.bfloat16] for _, *dtypes in seen), seen
    assert model.lm_head.weight.grad.dtype == torch.float32


def _flash_attn_package(root: Path, body: str) -> Path:
    (root / "flash_attn").mkdir(parents=True)
    (root / "flash_attn" / "__init__.py").write_text(body)
    return root


@pytest.mark.parametrize("package", ["present", "absent", "broken"])
def test_attention_choice_by_model_dtype_and_flash_attn(package, tmp_path, monkeypatch):
    from grpo_fast.modeling import attn_implementation

    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    if package == "present":
        monkeypatch.syspath_prepend(str(_flash_attn_package(tmp_path, "")))
    elif package == "broken":  # installed, built for another torch: fails on import
        body = "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice')\n"
        monkeypatch.syspath_prepend(str(_flash_attn_package(tmp_path, body)))
    flash = "flash_attention_2" if package == "present" else "sdpa"
    assert attn_implementation("cuda", torch.bfloat16) == flash
    assert attn_implementation("cuda:1", torch.float16) == flash
    assert attn_implementation("cuda", torch.float32) == "sdpa"  # flash-attn has no fp32 kernels
    assert attn_implementation("cuda") == "sdpa"  # the default: an fp32 model
    assert attn_implementation("cpu", torch.bfloat16) == "sdpa"
