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
    from grpo_fast.r1 import toy
    from grpo_fast.trainer import GRPOConfig, GRPOTrainer
    from grpo_fast.trainer import update as trainer_module  # where the update calls the loss

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
    cfg = GRPOConfig(output_dir=str(tmp_path), seed=3, max_steps=1, per_device_train_batch_size=8,
                                    num_generations=4, max_completion_length=6, beta=0.04)  # fmt: skip
    trainer = GRPOTrainer(model, "format", cfg, data["train"], tokenizer=tok)
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
    from grpo_fast.trainer.modeling import attn_implementation

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


# ----------------------------------------------------------------------------------------------
# The torch backend under a caller's bf16 autocast: its fp32 reductions stay fp32
# ----------------------------------------------------------------------------------------------


def _head_inputs(seed=0, b=3, t=5, h=24, v=300):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (3.0 / h**0.5)  # logits of spread ~3
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.2).float()
    return hidden, weight, ids, mask, torch.randn(b, generator=g)


def test_token_stats_under_autocast_keep_fp32_accuracy(monkeypatch, one_thread):
    """The eager torch path (the torch backend on CUDA; on CPU when compilation is off) under bf16 autocast."""
    from tolerances import assert_close

    import grpo_fast as gf
    from grpo_fast import reference as R

    monkeypatch.setenv("GRPO_FAST_EAGER", "1")
    hidden, weight, ids, _, _ = _head_inputs()
    logits = (hidden @ weight.T).requires_grad_()  # (B, T, V) fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gf.token_logprobs(logits, ids, 0.7, return_entropy=True, backend="torch")
        (out.logprobs.sum() + 0.3 * out.entropy.sum()).backward()
    exact = logits.detach().double().requires_grad_()
    lp, ent = R.token_logprobs(exact, ids, 0.7), R.token_entropy(exact, 0.7)
    (lp.sum() + 0.3 * ent.sum()).backward()
    assert_close(out.logprobs, lp, torch.float32, "logprob: logprobs under autocast")
    assert_close(out.entropy, ent, torch.float32, "entropy: entropy under autocast")
    assert_close(logits.grad, exact.grad, torch.float32, "grad: logits grad under autocast")


def test_linear_head_under_autocast_keeps_fp32_accuracy(one_thread):
    from tolerances import assert_close

    import grpo_fast as gf

    hidden, weight, ids, mask, adv = _head_inputs(1)
    config = gf.LossConfig(loss_type="grpo", beta=0.0, entropy_coef=0.01)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = gf.linear_token_logprobs(hidden, weight, ids, return_entropy=True, backend="torch")
        out = gf.linear_grpo_loss(*leaves, ids, adv, mask, config=config, backend="torch")
    out.loss.backward()
    exact = [x.double().requires_grad_() for x in (hidden, weight)]
    ref = gf.linear_grpo_loss(*exact, ids, adv.double(), mask.double(), config=config, backend="reference")
    ref.loss.backward()
    ref_stats = gf.linear_token_logprobs(
        hidden.double(), weight.double(), ids, return_entropy=True, backend="reference"
    )
    assert_close(stats.logprobs, ref_stats.logprobs, torch.float32, "logprob: logprobs under autocast")
    assert_close(stats.entropy, ref_stats.entropy, torch.float32, "entropy: entropy under autocast")
    assert_close(out.loss, ref.loss, torch.float32, "loss: loss under autocast")
    for name, got, want in zip(("hidden", "weight"), leaves, exact, strict=True):
        assert_close(got.grad, want.grad, torch.float32, f"grad: grad {name} under autocast")


# ----------------------------------------------------------------------------------------------
# No host synchronisation inside the custom ops (CUDA graphs, torch.compile's reduce-overhead mode)
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _host_syncs_refused():
    """Tensor -> Python conversions (each a device-to-host copy and a stream sync on a GPU) raise."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"host synchronisation on a {tuple(self.shape)} tensor inside the op")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
            mp.setattr(torch.Tensor, name, refuse)
        yield


def _objective(adv, mask, config):
    from grpo_fast import reference as R

    def objective(logp, entropy):
        return R.grpo_objective(logp, entropy, adv, mask, None, None, config, None, None)

    return objective


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_linear_ops_do_not_synchronise(backend, device, one_thread):
    import grpo_fast as gf
    from grpo_fast.ops import linear_loss, linear_triton

    hidden, weight, ids, mask, adv = (x.to(device) for x in _head_inputs(2))
    b, t, h = hidden.shape
    config = gf.LossConfig(loss_type="grpo", beta=0.0, entropy_coef=0.01)
    objective, active = _objective(adv, mask, config), mask.bool()
    hidden2d = hidden.reshape(b * t, h).requires_grad_()
    weight.requires_grad_()
    rows = active.reshape(-1).nonzero().squeeze(1)  # (M,) outside the op, as linear_grpo_loss does
    standin = torch.zeros_like(mask)
    with _host_syncs_refused():
        if backend == "triton":
            loss, _ = linear_triton.LinearGRPOTritonFunction.apply(
                hidden2d, weight, None, ids.reshape(-1), active, standin, objective, 1.0, False, {}
            )
            linear_triton.forward_stats(
                hidden2d.detach(), weight.detach(), None, ids.reshape(-1), active.reshape(-1), 1.0, True
            )
        else:
            loss, _ = linear_loss.LinearGRPOFunction.apply(
                hidden2d, weight, None, ids.reshape(-1), rows, standin, objective, 1.0, 7, {}
            )
        (2.0 * loss).backward()
    exact = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    expected = gf.linear_grpo_loss(*exact, ids, adv.double(), mask.double(), config=config, backend="reference")
    (2.0 * expected.loss).backward()
    torch.testing.assert_close(loss.double(), expected.loss.double(), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(hidden2d.grad.view(b, t, h).double(), exact[0].grad, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), exact[1].grad, rtol=2e-4, atol=1e-6)


@pytest.mark.triton
def test_token_stats_op_does_not_synchronise(device, one_thread):
    from grpo_fast.ops import token_stats

    hidden, weight, ids, mask, _ = (x.to(device) for x in _head_inputs(3))
    logits = (hidden @ weight.T).requires_grad_()  # (B, T, V)
    with _host_syncs_refused():
        logp, entropy = token_stats.token_stats(logits, ids, mask.bool(), 1.0, True, use_triton=True)
        (logp * mask).sum().backward()  # the entropy unused: its gradient term is skipped
    expected = torch.log_softmax(logits.detach(), -1).gather(-1, ids[..., None])[..., 0] * mask
    torch.testing.assert_close(logp * mask, expected, rtol=1e-5, atol=1e-5)
    assert logits.grad is not None and bool(logits.grad.isfinite().all())


def test_second_backward_through_the_fused_head_is_refused(one_thread):
    import grpo_fast as gf

    hidden, weight, ids, mask, adv = _head_inputs(4)
    hidden.requires_grad_()
    loss = gf.linear_grpo_loss(
        hidden, weight, ids, adv, mask, config=gf.LossConfig(loss_type="grpo", beta=0.0), backend="torch"
    ).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


# ----------------------------------------------------------------------------------------------
# Smaller findings: the backend choice for an fp64 head, the RNG restore with fewer GPUs
# ----------------------------------------------------------------------------------------------


def test_auto_backend_with_fp32_hidden_and_fp64_weight_uses_torch_on_a_gpu_host(monkeypatch, one_thread):
    """auto on a CUDA host (simulated: check_backend resolves as for a CUDA tensor) must not hand an fp64
    head, which the kernels do not take, to Triton."""
    import grpo_fast as gf
    from grpo_fast import linear, validation

    chosen = []

    def on_cuda(backend, device, dtype=None):
        chosen.append(validation.check_backend(backend, torch.device("cuda"), dtype))
        return chosen[-1]

    monkeypatch.setattr(linear, "check_backend", on_cuda)
    monkeypatch.setattr(validation, "triton_available", lambda: True)
    hidden, weight, ids, mask, adv = _head_inputs(5)
    config = gf.LossConfig(loss_type="grpo", beta=0.0)
    out = gf.linear_grpo_loss(hidden, weight.double(), ids, adv, mask, config=config)
    stats = gf.linear_token_logprobs(hidden, weight.double(), ids)
    assert chosen == ["torch", "torch"]
    ref = gf.linear_grpo_loss(hidden.double(), weight.double(), ids, adv, mask, config=config, backend="reference")
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), rtol=1e-6, atol=1e-9)
    assert stats.logprobs.shape == ids.shape


def test_rng_restore_with_fewer_gpus_than_at_save(monkeypatch):
    """Saved on 2 GPUs, resumed with 1 visible: the first state is restored, nothing indexes past it."""
    from grpo_fast.trainer import checkpoint

    restored = []

    def set_rng_state(state, device):
        if torch.device("cuda", device).index >= 1:
            raise RuntimeError(f"CUDA error: invalid device ordinal {device}")
        restored.append((state.clone(), device))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    saved = torch.stack([torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)])
    checkpoint.set_rng_state({"torch": torch.get_rng_state(), "cuda": saved})
    assert len(restored) == 1 and torch.equal(restored[0][0], saved[0]) and restored[0][1] == 0


@pytest.mark.triton
@pytest.mark.parametrize("deterministic", [False, True])
def test_fp16_backward_keeps_gradients_below_fp16_range(deterministic, device, one_thread):
    """d loss / d logp of 1e-9 (a loss over ~1e9 tokens, or a tiny coefficient): every g is below fp16's
    smallest subnormal (6e-8), which a plain cast to fp16 flushes to 0; the kernels scale g per tile."""
    g = torch.Generator().manual_seed(6)
    n, h, v = 37, 40, 203
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * (3.0 / h**0.5)
    hidden, weight = hidden.half(), weight.half()
    ids, active = torch.randint(0, v, (n,), generator=g), torch.rand(n, generator=g) > 0.2
    grad_logp = torch.randn(n, generator=g) * 1e-9
    exact = [x.double().requires_grad_() for x in (hidden, weight)]
    logp = torch.log_softmax(exact[0] @ exact[1].T, -1).gather(1, ids[:, None])[:, 0]
    (grad_logp.double() * logp * active).sum().backward()
    args = [x.to(device) for x in (hidden, weight, ids, active, grad_logp)]
    hidden, weight, ids, active, grad_logp = args
    _, entropy, lse = lts.linear_stats_forward(hidden, weight, None, ids, active, 1.0, True)
    grad_h, grad_w, _ = lts.linear_stats_backward(
        hidden, weight, None, ids, active, lse, entropy, grad_logp, None, 1.0, deterministic
    )
    for got, want in ((grad_h, exact[0].grad), (grad_w, exact[1].grad)):
        scale = float(want.abs().max())
        assert scale > 0
        # fp16 rounding of g (2^-11 relative) summed over <= 203 terms; as tests/test_triton_linear.py's fp16 grad
        torch.testing.assert_close(got.double().cpu(), want, rtol=2.0**-10, atol=2.0**-9 * scale)


# ----------------------------------------------------------------------------------------------
# The test suite on a GPU host (tests/conftest.py): Triton tests on the GPU, every launch marked
# ----------------------------------------------------------------------------------------------


def test_factories_without_a_device_go_to_the_triton_device(tmp_path, monkeypatch):
    """What a CUDA host does to a Triton test's tensors, shown with the meta device: factories called by
    test code without ``device=`` land there (seeded draws made on the CPU first); those naming a device,
    and those called by library code, stay put."""
    from conftest import FactoriesOn

    (tmp_path / "library_code.py").write_text("import torch\n\ndef make():\n    return torch.zeros(2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import library_code

    g = torch.Generator().manual_seed(0)
    with FactoriesOn(torch.device("meta")):
        drawn = torch.randn(2, 3, generator=g)
        made = [torch.zeros(2), torch.arange(4), torch.tensor([1.0]), torch.randint(0, 5, (3,), generator=g)]
        kept = torch.ones(2, device="cpu")
        derived = torch.zeros_like(kept)
        library = library_code.make()
    assert drawn.device.type == "meta" and all(x.device.type == "meta" for x in made)
    assert kept.device.type == "cpu" and derived.device.type == "cpu" and library.device.type == "cpu"


def test_a_kernel_launch_in_an_unmarked_test_fails():
    """``pytest -m triton`` (the GPU run) must select every test that runs a kernel: one without the marker fails."""
    hidden, weight = torch.randn(4, 16), torch.randn(20, 16)
    ids, active = torch.randint(0, 20, (4,)), torch.ones(4, dtype=torch.bool)
    with pytest.raises(AssertionError, match="mark it @pytest.mark.triton"):
        lts.linear_stats_forward(hidden, weight, None, ids, active, 1.0, False)
