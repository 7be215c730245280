"""GRPOTrainer with a peft LoRA config: only adapters train, the KL reference is the base model (adapters
disabled, no copy), checkpoints hold the adapters and resume bit-exactly."""

import pytest
import torch

from grpo_fast.r1 import toy
from grpo_fast.trainer import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, 1 thread

peft = pytest.importorskip("peft")


def tiny(seed: int = 0):
    tok = toy.build_tokenizer()
    return tok, toy.build_model(tok, seed=seed, hidden_size=32, layers=1, heads=2, ffn=64)


def lora(**changes):
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    return peft.LoraConfig(**{**kwargs, **changes})


def digit_share(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def config(out, **changes) -> GRPOConfig:
    base = dict(output_dir=str(out), seed=3, max_steps=3, save_steps=2, learning_rate=1e-2, beta=0.04,
                per_device_train_batch_size=8, num_generations=4, max_completion_length=10)  # fmt: skip
    return GRPOConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def data():
    return toy.make_splits(num_train=200, num_dev=8, num_test=16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """(trainer after 3 steps, {id(parameter): value before training}, adapter values after wrapping)."""
    torch.set_num_threads(1)
    tok, model = tiny()
    before = {id(p): p.detach().clone() for p in model.parameters()}
    trainer = GRPOTrainer(model, digit_share, config(tmp_path_factory.mktemp("lora")), data["train"], tokenizer=tok,
                          peft_config=lora())  # fmt: skip
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    return trainer, before, adapters


def test_only_adapters_train(trained):
    trainer, before, adapters = trained
    assert trainer.ref_model is None  # the reference is the base model: no second copy
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert (
        trainable == set(adapters) and all("lora_" in n for n in trainable) and len(trainable) == 6
    )  # 3 modules x (A, B)
    named = dict(trainer.model.named_parameters())
    assert all(not torch.equal(named[n], v) for n, v in adapters.items())  # every adapter moved
    base = [p for p in trainer.model.parameters() if id(p) in before]
    assert len(base) == len(before)  # every base parameter is still the model's, unchanged
    for p in base:
        assert torch.equal(p, before[id(p)])


def test_reference_logprobs_are_the_base_models(trained):
    trainer, _, _ = trained
    trainer.seed_step()
    batch = trainer.sample_batch()[0]
    ref = trainer.ref_logprobs(batch)
    _, base = tiny()  # the same initialisation, never wrapped
    torch.testing.assert_close(ref, trainer.logprobs(base, batch), rtol=0, atol=1e-6)
    policy = trainer.logprobs(trainer.base_model, batch)  # adapters enabled again after the reference pass
    assert (policy - ref).abs().max() > 1e-4


def test_checkpoint_holds_adapters_that_load_with_peft(trained):
    trainer, _, _ = trained
    path = trainer.run_dir / "checkpoint-3"
    assert (path / "adapter_model.safetensors").exists() and (path / "adapter_config.json").exists()
    assert not (path / "model.safetensors").exists()
    _, base = tiny()
    loaded = peft.PeftModel.from_pretrained(base, path).eval()
    ids = torch.tensor([[9, 10, 11, 13, 12, 14, 18]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trainer.model.eval()(ids).logits, rtol=0, atol=1e-6)


def test_resume_from_adapter_checkpoint_is_bit_exact(trained, data, tmp_path):
    trainer, _, _ = trained
    tok, model = tiny()  # the same base model; the adapters come from the checkpoint
    torch.manual_seed(123)  # a different adapter initialisation
    resumed = GRPOTrainer(model, digit_share, config(tmp_path), data["train"], tokenizer=tok, peft_config=lora())
    resumed.train(resume_from_checkpoint=str(trainer.run_dir / "checkpoint-2"))
    expected = dict(trainer.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, expected[name]), name


def test_lora_on_the_lm_head_is_refused(data, tmp_path):
    for peft_config in (lora(target_modules=["q_proj", "lm_head"]), lora(modules_to_save=["lm_head"])):
        tok, model = tiny()
        with pytest.raises(ValueError, match="LM head 'lm_head'"):
            GRPOTrainer(model, digit_share, config(tmp_path), data["train"], tokenizer=tok, peft_config=peft_config)


def test_cli_trains_lora_and_evaluates_the_merged_adapters(tmp_path, capsys):
    """`grpo-fast train` with use_peft on a local model directory: the checkpoint holds adapters only,
    --resume continues from them, and `grpo-fast eval` loads base + adapters, merged."""
    import json

    import yaml

    from grpo_fast.cli import main

    tok, base = tiny()
    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(run_dir), "model_name_or_path": str(base_dir), "max_steps": 2,
                                    "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 8,
                                    "learning_rate": 1e-2, "use_peft": True, "lora_r": 4, "lora_alpha": 8,
                                    "lora_dropout": 0.0, "lora_target_modules": ["q_proj", "up_proj"]}))  # fmt: skip
    assert main(["train", "--config", str(path), "--max_steps", "1"]) == 0
    assert main(["train", "--config", str(path), "--resume"]) == 0  # continues to max_steps = 2
    ckpt = run_dir / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    adapter = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "up_proj"]
    assert adapter["base_model_name_or_path"] == str(base_dir)
    capsys.readouterr()
    assert main(["eval", "--model", str(ckpt), "--num-prompts", "4", "--max-new-tokens", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["prompts"] == 4


def test_load_model_merges_adapters_into_their_local_base(tmp_path):
    from grpo_fast.trainer.modeling import load_model

    _, base = tiny()
    base.save_pretrained(tmp_path / "base")
    _, fresh = tiny()
    fresh.name_or_path = str(tmp_path / "base")  # what from_pretrained would have set
    adapted = peft.get_peft_model(fresh, lora(init_lora_weights=False)).eval()  # random B: the adapters act
    adapted.save_pretrained(tmp_path / "adapters")
    merged = load_model(str(tmp_path / "adapters")).eval()
    ids = torch.tensor([[9, 10, 11, 13, 12, 14, 18]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=0, atol=1e-5)
        assert (merged(ids).logits - tiny()[1](ids).logits).abs().max() > 1e-3
    assert not any("lora" in name for name, _ in merged.named_parameters())  # merged, not wrapped


def test_adapters_without_a_local_base_model_are_refused(tmp_path):
    from grpo_fast.trainer.modeling import load_model

    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}')
    with pytest.raises(ValueError, match="not a local model directory"):
        load_model(str(tmp_path))
