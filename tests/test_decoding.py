"""LeanDecoder (grpo_fast/trainer/decoding.py) against the model's own full forward pass, and the rollout loop on it.

Each architecture is a tiny random model built from a transformers config (no download): Qwen2 (biases
on q/k/v), Llama with grouped-query attention, Qwen3 (per-head q/k norms), Mistral. The logits of every
incremental step must equal the full-sequence forward's logits at that position, with left padding.
"""

from __future__ import annotations

import pytest
import torch
from llama_family import CONFIGS, V
from transformers import GPT2Config, GPT2LMHeadModel

from grpo_fast.trainer import rollout
from grpo_fast.trainer.decoding import LeanDecoder, unsupported_reason
from grpo_fast.trainer.modeling import position_ids_from_mask


def _model(name: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = CONFIGS[name]()
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


def _batch(b=5, p=7, t=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (b, p + t), generator=g)
    mask = torch.ones(b, p + t, dtype=torch.long)
    mask[1 % b, :3] = 0  # left padding of different widths
    mask[3 % b, :6] = 0
    return ids, mask


@pytest.mark.parametrize("name", list(CONFIGS))
def test_incremental_logits_equal_full_forward(name):
    model = _model(name)
    ids, mask = _batch()
    b, n = ids.shape
    p = 7
    positions = position_ids_from_mask(mask)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits  # (B, L, V)
    decoder = LeanDecoder(model, b, n)
    logits = decoder.forward(ids[:, :p], positions[:, :p], mask[:, :p].bool())
    torch.testing.assert_close(logits, full[:, p - 1], rtol=1e-5, atol=1e-5)
    for t in range(p, n):
        logits = decoder.forward(ids[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1].bool())
        torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rotary_table_rows_equal_the_module(name):
    """The decoder reads cos/sin from a table of positions 0 .. capacity - 1: its rows must be exactly what
    the model's rotary module gives at those positions (as called per step before)."""
    model = _model(name)
    decoder = LeanDecoder(model, 3, 20)
    assert decoder.rotary is not None
    positions = torch.tensor([[0, 5, 19], [7, 7, 1], [12, 3, 18]])
    x = model.model.embed_tokens(positions)
    cos, sin = model.model.rotary_emb(x, positions)
    assert torch.equal(torch.nn.functional.embedding(positions, decoder.rotary[0]), cos)
    assert torch.equal(torch.nn.functional.embedding(positions, decoder.rotary[1]), sin)


def test_length_dependent_rotary_is_computed_per_call():
    """Dynamic NTK scaling changes the frequencies with the sequence length: no table, the module per call."""
    config = CONFIGS["llama_gqa"]()
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    config.max_position_embeddings = 8
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).eval()
    ids, mask = _batch(p=12, t=0)
    positions = position_ids_from_mask(mask)
    decoder = LeanDecoder(model, ids.shape[0], 14)
    assert decoder.rotary is None
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    logits = decoder.forward(ids, positions, mask.bool())
    torch.testing.assert_close(logits, full[:, -1], rtol=1e-5, atol=1e-5)


def test_one_token_mask_sees_valid_keys_and_itself():
    """The one-new-token mask (decoding) equals the general rule: valid keys up to the query, and the query
    itself even when it is padding."""
    model = _model("qwen2")
    decoder = LeanDecoder(model, 3, 6)
    decoder.key_valid[:, :4] = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    bias = decoder._attention_bias(3, 4, torch.float32)  # (B, 1, 1, 4)
    allowed = decoder.key_valid[:, :4].clone()
    allowed[:, 3] = True
    assert bias.shape == (3, 1, 1, 4)
    assert torch.equal(bias[:, 0, 0] == 0, allowed)
    assert torch.equal(bias[:, 0, 0] == float("-inf"), ~allowed)


def test_keep_drops_rows_without_changing_the_others():
    model = _model("llama_gqa")
    ids, mask = _batch()
    positions = position_ids_from_mask(mask)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    decoder = LeanDecoder(model, ids.shape[0], ids.shape[1])
    decoder.forward(ids[:, :7], positions[:, :7], mask[:, :7].bool())
    rows = torch.tensor([0, 3, 4])
    decoder.keep(rows)
    logits = decoder.forward(ids[rows, 7:8], positions[rows, 7:8], mask[rows, 7:8].bool())
    torch.testing.assert_close(logits, full[rows, 7], rtol=1e-5, atol=1e-5)


def test_greedy_rollout_same_tokens_as_the_generic_loop(monkeypatch):
    """Greedy decoding (temperature 0) through the lean loop and through the DynamicCache loop give the
    same completions, EOS handling and padding included."""
    model = _model("qwen2")
    ids, mask = _batch(b=6, p=9, t=0, seed=4)
    lean = rollout.generate(model, ids, mask, 12, eos_token_id=5, pad_token_id=0, temperature=0.0)
    monkeypatch.setattr(rollout, "unsupported_reason", lambda *args: "forced generic path")
    generic = rollout.generate(model, ids, mask, 12, eos_token_id=5, pad_token_id=0, temperature=0.0)
    assert torch.equal(lean.completion_ids, generic.completion_ids)
    assert torch.equal(lean.completion_mask, generic.completion_mask)
    assert torch.equal(lean.truncated, generic.truncated)


def test_rows_leaving_the_batch_keep_their_tokens():
    """With an EOS that most rows hit early, the lean loop drops finished rows from its cache; every row's
    greedy tokens must still equal those of a batch where no row is dropped (each row decoded alone)."""
    model = _model("qwen2")
    ids, mask = _batch(b=6, p=9, t=0, seed=4)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
    eos = int(first.argmax(-1).mode().values)  # the most common first greedy token: several rows stop at once
    batch = rollout.generate(model, ids, mask, 10, eos_token_id=eos, pad_token_id=0, temperature=0.0)
    assert int(batch.completion_mask[:, 1:].sum()) < batch.completion_mask[:, 1:].numel()  # some rows stopped
    for i in range(ids.shape[0]):
        alone = rollout.generate(model, ids[i : i + 1, mask[i].argmax() :], mask[i : i + 1, mask[i].argmax() :], 10,
                                 eos_token_id=eos, pad_token_id=0, temperature=0.0)  # fmt: skip
        t = alone.completion_ids.shape[1]
        assert torch.equal(batch.completion_ids[i, :t], alone.completion_ids[0])
        assert bool((batch.completion_ids[i, t:] == 0).all())


def test_unsupported_models_use_the_generic_loop():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=1)
    ).eval()
    assert "model_type" in unsupported_reason(gpt2, 20)
    with pytest.raises(ValueError, match="LeanDecoder cannot run this model"):
        LeanDecoder(gpt2, 2, 20)
    ids, mask = _batch(b=3, p=5, t=0)
    out = rollout.generate(gpt2, ids, mask, 4, eos_token_id=1, pad_token_id=0, temperature=1.0)
    assert out.completion_ids.shape[0] == 3
    window = _model("mistral")
    window.config.sliding_window, window.config.use_sliding_window = 8, True
    assert "sliding-window" in unsupported_reason(window, 20)
    assert unsupported_reason(_model("qwen2").train(), 20) is not None


def test_samples_of_one_prompt_share_its_prefill(monkeypatch):
    """Rows repeating a prompt (G samples) are prefilled once per distinct prompt; every row's tokens equal
    those of the generic loop, which prefills each row, greedy and with per-row uniform draws."""
    model = _model("llama_gqa")
    ids, mask = _batch(b=4, p=9, t=0, seed=5)
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)  # 4 prompts x G = 3
    uniforms = torch.rand(12, 8, generator=torch.Generator().manual_seed(0))
    prefill_rows = []
    real = LeanDecoder.forward
    monkeypatch.setattr(LeanDecoder, "forward", lambda self, i, *a: prefill_rows.append(i.shape) or real(self, i, *a))
    lean = [rollout.generate(model, ids, mask, 8, 5, 0, temperature=t, uniforms=uniforms) for t in (0.0, 1.0)]
    assert prefill_rows[0] == (4, 9)  # the prefill ran on the 4 distinct prompts
    monkeypatch.setattr(rollout, "unsupported_reason", lambda *args: "forced generic path")
    generic = [rollout.generate(model, ids, mask, 8, 5, 0, temperature=t, uniforms=uniforms) for t in (0.0, 1.0)]
    for a, b in zip(lean, generic):
        assert torch.equal(a.completion_ids, b.completion_ids)
        assert torch.equal(a.completion_mask, b.completion_mask)
    assert not torch.equal(lean[1].completion_ids[0], lean[1].completion_ids[1])  # samples of a prompt differ


def test_generic_loop_passes_the_cache_under_the_current_keyword(monkeypatch):
    """The generic loop hands the KV cache over by the keyword this transformers declares (``cache``;
    ``past_key_values`` is its deprecated alias), so it raises no deprecation warning; a model whose
    forward still takes ``past_key_values`` gets that keyword."""
    import inspect
    import warnings

    model = _model("qwen2")
    ids, mask = _batch(b=3, p=6, t=0)
    monkeypatch.setattr(rollout, "unsupported_reason", lambda *args: "forced generic path")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning / DeprecationWarning would fail the test
        out = rollout.generate(model, ids, mask, 4, eos_token_id=5, pad_token_id=0, temperature=0.0)
    assert out.completion_ids.shape[0] == 3

    class Old(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None):
            return input_ids

    assert rollout.cache_keyword(Old()) == "past_key_values"
    takes = inspect.signature(model.forward).parameters  # 5.24 says cache (5.17 still past_key_values)
    assert rollout.cache_keyword(model) == ("cache" if "cache" in takes else "past_key_values")


# ---------------------------------------------------------------------------- the fixed-shape step (static_decode)
def _mid_batch_eos(model, ids, mask):
    """The most common first greedy token: used as EOS, several rows stop at once while others go on."""
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
    return int(first.argmax(-1).mode().values)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_step_same_tokens_and_logits_as_eager(name):
    """decode_graphs="on" (the step compiled by inductor) against the eager LeanDecoder loop: the same
    completions with per-row uniform draws, top-k and top-p, left padding, G samples per prompt and an EOS
    that stops rows mid-batch; and at every step the compiled step's logits equal the eager decoder's fed the
    same tokens."""
    model = _model(name)
    ids, mask = _batch(b=3, p=9, t=0, seed=6)
    ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)  # 3 prompts x G = 2: 6 rows, bucket 8
    eos = _mid_batch_eos(model, ids, mask)
    uniforms = 1.0 - torch.rand(6, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=0.9, top_p=0.9, top_k=6, uniforms=uniforms)
    on = rollout.generate(model, ids, mask, 8, eos, 0, decode_graphs="on", **kw)
    off = rollout.generate(model, ids, mask, 8, eos, 0, decode_graphs="off", **kw)
    assert torch.equal(on.completion_ids, off.completion_ids)
    assert torch.equal(on.completion_mask, off.completion_mask)
    assert 0 < int(on.truncated.sum()) < 6 or bool((on.lengths < on.lengths.max()).any())  # EOS mid-batch
    _check_step_logits(model, ids, mask, on.completion_ids, eos, kw)


def _check_step_logits(model, ids, mask, tokens, eos, kw):
    """Feed ``tokens`` to the compiled runner and to an eager LeanDecoder; compare logits at every step."""
    from grpo_fast.trainer import static_decode

    b, p = ids.shape
    t_max = 8
    rows, capacity = static_decode.batch_bucket(b), static_decode.capacity_bucket(p + t_max)
    sampling = static_decode.Sampling(kw["temperature"], kw["top_p"], kw["top_k"], eos, 0, True)
    positions = position_ids_from_mask(mask)
    with torch.inference_mode():
        decoder = LeanDecoder(model, b, capacity)
        decoder.forward(ids, positions, mask.bool())
        runner = static_decode.runner_for(decoder, rows, capacity, sampling, "compile")
        state = runner.state
        state.load(decoder, torch.cat([torch.arange(b), torch.zeros(rows - b, dtype=torch.long)]))
        for t in range(tokens.shape[1] - 1):
            state.token[:b], state.position[:b], state.live[:] = tokens[:, t], positions[:, -1] + 1 + t, True
            state.index.fill_(p + t)
            logits, _, _ = runner()
            eager = decoder.forward(tokens[:, t : t + 1], positions[:, -1:] + 1 + t, torch.ones(b, 1, dtype=torch.bool))
            torch.testing.assert_close(logits[:b], eager, rtol=1e-5, atol=1e-5)


def test_compiled_step_with_a_generator_draws_the_generic_loops_tokens(monkeypatch):
    """Without per-row uniforms the draw is torch.multinomial on the batch's real rows, every step (no row
    leaves the batch): the random stream, and so the tokens, are those of the generic DynamicCache loop."""
    model = _model("llama_gqa")
    ids, mask = _batch(b=5, p=7, t=0, seed=2)
    eos = _mid_batch_eos(model, ids, mask)
    on = rollout.generate(model, ids, mask, 8, eos, 0, 1.0, generator=torch.Generator().manual_seed(7),
                          decode_graphs="on")  # fmt: skip
    monkeypatch.setattr(rollout, "unsupported_reason", lambda *args: "forced generic path")
    generic = rollout.generate(model, ids, mask, 8, eos, 0, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(on.completion_ids, generic.completion_ids)


def test_no_recompilation_across_rollouts_within_a_bucket():
    """Two rollouts of different prompt widths and batch sizes within one (batch, capacity) bucket run the same
    compiled step: dynamo's count of compiled graphs does not move after the first."""
    from torch._dynamo.utils import counters

    model = _model("qwen2")
    first_ids, first_mask = _batch(b=6, p=9, t=0, seed=8)
    kw = dict(temperature=1.0, uniforms=torch.full((6, 6), 0.5), decode_graphs="on")
    rollout.generate(model, first_ids, first_mask, 6, 1, 0, **kw)
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["ok"]
    assert graphs >= 1
    ids, mask = _batch(b=5, p=12, t=0, seed=9)  # wider prompts, fewer rows: bucket (8 rows, 32 positions) again
    rollout.generate(model, ids, mask, 6, 1, 0, **{**kw, "uniforms": torch.full((5, 6), 0.25)})
    assert (counters["stats"]["unique_graphs"], counters["frames"]["ok"]) == (graphs, frames)


def test_decode_graphs_setting_is_checked_and_auto_falls_back_with_a_warning(monkeypatch):
    from grpo_fast.trainer import static_decode

    model = _model("mistral")
    ids, mask = _batch(b=3, p=5, t=0)
    with pytest.raises(ValueError, match="decode_graphs must be one of"):
        rollout.generate(model, ids, mask, 4, 1, 0, decode_graphs="yes")
    reason = static_decode.static_reason(model, "graph")
    assert "CUDA graphs need a CUDA device" in reason
    monkeypatch.setattr(static_decode, "static_reason", lambda *args: "no step here")
    with pytest.raises(ValueError, match="decode_graphs='on' cannot run this model: no step here"):
        rollout.generate(model, ids, mask, 4, 1, 0, decode_graphs="on")
    monkeypatch.undo()

    def broken():
        raise RuntimeError("inductor is missing\nsecond line")

    monkeypatch.setattr(static_decode, "_compiled_step", broken)
    monkeypatch.setattr(static_decode, "CPU_AUTO", "compile")
    greedy = dict(temperature=0.0)
    with pytest.warns(RuntimeWarning, match=r"eager decoding .*RuntimeError: inductor is missing\)$"):
        auto = rollout.generate(model, ids, mask, 4, 1, 0, decode_graphs="auto", **greedy)
    assert torch.equal(auto.completion_ids, rollout.generate(model, ids, mask, 4, 1, 0, **greedy).completion_ids)
    assert static_decode.step_mode(model, "auto") is None  # remembered: no second try, no second warning


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
@pytest.mark.parametrize("name", ["qwen2", "llama_gqa"])
def test_cuda_graph_step_same_tokens_as_eager(name):
    """On CUDA, decode_graphs="on" captures the fixed-shape step as a CUDA graph and replays it per token:
    the completions equal the eager loop's (fp32, per-row uniforms, top-p, EOS mid-batch), over two rollouts
    (the second replays the graph captured by the first)."""
    from grpo_fast.trainer import static_decode

    model = _model(name).cuda()
    ids, mask = (x.cuda() for x in _batch(b=6, p=9, t=0, seed=6))
    eos = _mid_batch_eos(model, ids, mask)
    for seed in (3, 4):
        uniforms = 1.0 - torch.rand(6, 8, generator=torch.Generator().manual_seed(seed)).cuda()
        kw = dict(temperature=0.9, top_p=0.9, uniforms=uniforms)
        on = rollout.generate(model, ids, mask, 8, eos, 0, decode_graphs="on", **kw)
        off = rollout.generate(model, ids, mask, 8, eos, 0, decode_graphs="off", **kw)
        assert torch.equal(on.completion_ids, off.completion_ids)
    runners = list(static_decode._RUNNERS[model].values())
    assert len(runners) == 1 and runners[0].graph is not None
