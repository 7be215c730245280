"""Batched, KV-cached sampling of completions.

One prefill of the left-padded prompts, then one token per step for the whole batch with the model's
KV cache; rows that emitted EOS keep producing padding until every row is done or the length budget is
spent. A hand-written loop rather than ``model.generate``: it was faster for the demo model on a CPU,
and it keeps the sampler's random stream in one explicit generator so a run resumed from a checkpoint
samples exactly the same tokens.

Sampling follows the usual order: logits / temperature, then top-k, then top-p (nucleus), then a
categorical draw; temperature 0 (or greedy=True) takes the argmax.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from . import static_decode
from .decoding import LeanDecoder, sample_next_token, unsupported_reason
from .modeling import position_ids_from_mask

__all__ = ["Rollout", "encode_prompts", "generate", "sample_next_token"]


@dataclass
class Rollout:
    """Sampled completions of a batch of prompts.

    prompt_ids, prompt_mask: (B, P) left-padded prompts.
    completion_ids: (B, T) sampled tokens, padding after EOS; T = longest completion in the batch.
    completion_mask: (B, T) 1 for every token up to and including EOS, 0 after.
    truncated: (B,) bool, True where no EOS was produced within the length budget.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    truncated: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of completion tokens (EOS included)."""
        return self.completion_mask.sum(1)

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows ``index`` (a (K,) long tensor) of every field."""
        return Rollout(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    def trim(self) -> Rollout:
        """Without the prompt columns that are padding in every row and the completion columns past every
        row's end (both carry no information: positions come from the mask, and causal attention means
        trailing padding never influences earlier tokens)."""
        start = int((self.prompt_mask.sum(0) > 0).long().argmax())  # first column some row attends to
        width = int(self.lengths.max())
        return Rollout(self.prompt_ids[:, start:], self.prompt_mask[:, start:], self.completion_ids[:, :width],
                       self.completion_mask[:, :width], self.truncated)  # fmt: skip

    @staticmethod
    def cat(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
        """Concatenate rollouts row-wise, padding prompts on the left and completions on the right."""
        p = max(r.prompt_ids.shape[1] for r in rollouts)
        t = max(r.completion_ids.shape[1] for r in rollouts)

        def pad(x, width, value, left):
            extra = width - x.shape[1]
            return nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)

        return Rollout(
            torch.cat([pad(r.prompt_ids, p, pad_token_id, True) for r in rollouts]),
            torch.cat([pad(r.prompt_mask, p, 0, True) for r in rollouts]),
            torch.cat([pad(r.completion_ids, t, pad_token_id, False) for r in rollouts]),
            torch.cat([pad(r.completion_mask, t, 0, False) for r in rollouts]),
            torch.cat([r.truncated for r in rollouts]),
        )


def encode_prompts(tokenizer, prompts: list[str], max_length: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize and left-pad prompts; longer prompts keep their last ``max_length`` tokens (as TRL).

    A prompt with text the tokenizer can only encode as its unknown token is a ValueError naming the row
    (a small alphabet, such as the toy task's, would otherwise train on ``<unk>`` silently).

    Returns:
        (ids (B, P) int64, mask (B, P) int64).
    """
    rows = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    _check_known(tokenizer, prompts, rows)
    if max_length is not None:
        rows = [r[-max_length:] for r in rows]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt tokenized to zero tokens; every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _check_known(tokenizer, prompts: list[str], rows: list[list[int]]) -> None:
    unk = tokenizer.unk_token_id
    if unk is None or unk in (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id):
        return  # no unknown token of its own (byte-level BPE has none; GPT-2's is its end-of-text token)
    for i, row in enumerate(rows):
        if unk in row:
            raise ValueError(
                f"prompts[{i}] = {prompts[i]!r} has text the tokenizer does not know (it would be encoded as "
                f"{tokenizer.unk_token!r}); use a tokenizer that covers it or remove those characters"
            )


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    decode_graphs: str = "off",
) -> Rollout:
    """Sample one completion per row of ``prompt_ids`` (repeat rows for G samples per prompt).

    Args:
        model: a Hugging Face causal LM that takes a KV cache (``cache=``, or ``past_key_values=`` before
            transformers renamed it; put in eval mode while sampling, restored afterwards).
        prompt_ids, prompt_mask: (B, P) left-padded prompts (see ``encode_prompts``).
        max_new_tokens: length budget T_max >= 1.
        temperature: > 0 samples from softmax(logits / temperature); 0 is greedy decoding.
        top_p: nucleus mass in (0, 1]; top_k: keep the k most likely tokens (0 = all).
        generator: the random stream of the draws (on the model's device).
        uniforms: optional (B, max_new_tokens) draws in (0, 1], one per row and position; the token of row
            i at position t is then the inverse-CDF draw of ``uniforms[i, t]`` (instead of ``generator``),
            so a row's sample does not depend on the other rows of the batch (see grpo_fast.trainer.engines).
        decode_graphs: "on" runs Llama-family models as fixed-shape steps (grpo_fast.trainer.static_decode: a
            CUDA graph on CUDA, compiled on CPU), "off" as eager LeanDecoder steps, "auto" as
            ``static_decode.auto_mode`` decides (eager, with a one-line warning, where the step fails).
    Returns:
        Rollout; completion_ids is (B, T) with T <= max_new_tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if decode_graphs not in static_decode.SETTINGS:
        raise ValueError(f"decode_graphs must be one of {static_decode.SETTINGS}, got {decode_graphs!r}")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():  # no_grad's per-op bookkeeping (version counters, views) is skipped
            tokens = _decode_loop(
                model,
                prompt_ids,
                prompt_mask,
                max_new_tokens,
                eos_token_id,
                pad_token_id,
                temperature,
                top_p,
                top_k,
                generator,
                uniforms,
                decode_graphs,
            )
        tokens = tokens.clone()  # a normal tensor: the update's autograd may save it (embedding indices)
    finally:
        model.train(was_training)
    is_eos = tokens == eos_token_id  # (B, T)
    seen_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an EOS strictly earlier in the row
    completion_mask = (~seen_before).long()
    truncated = ~is_eos.any(1)
    return Rollout(prompt_ids, prompt_mask, tokens, completion_mask, truncated)


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache by: ``cache`` in current transformers, which keeps
    ``past_key_values`` as a deprecated alias for a few releases; ``past_key_values`` before the rename."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _decode_loop(
    model, prompt_ids, prompt_mask, max_new_tokens, eos, pad, temperature, top_p, top_k, generator, uniforms=None,
    decode_graphs="off",
):  # fmt: skip
    """(B, T) sampled tokens; pad after each row's EOS; stops early once every row is done."""
    args = (model, prompt_ids, prompt_mask, max_new_tokens, eos, pad, temperature, top_p, top_k, generator, uniforms)
    if unsupported_reason(model, prompt_ids.shape[1] + max_new_tokens) is None:
        mode = static_decode.step_mode(model, decode_graphs)
        if mode is None:
            return _lean_decode_loop(*args)
        if decode_graphs == "on":
            return _static_decode_loop(*args, mode)
        try:
            return _static_decode_loop(*args, mode)
        except Exception as error:  # auto: the step did not compile or capture here; eager from now on
            static_decode.fall_back(model, error)
            return _lean_decode_loop(*args)
    b, p = prompt_ids.shape
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(b, max_new_tokens)], dim=1)  # (B, P + T_max)
    cache = {cache_keyword(model): DynamicCache(config=model.config)}
    positions = position_ids_from_mask(prompt_mask)  # (B, P)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions,
        **cache,
        use_cache=True,
        logits_to_keep=1,
    )
    next_position = positions[:, -1:] + 1  # (B, 1)
    tokens = prompt_ids.new_full((b, max_new_tokens), pad)
    done = torch.zeros(b, dtype=torch.bool, device=prompt_ids.device)
    for t in range(max_new_tokens):
        uniform = None if uniforms is None else uniforms[:, t]
        token = sample_next_token(out.logits[:, -1], temperature, top_p, top_k, generator, uniform)  # (B,)
        token = token.masked_fill(done, pad)
        tokens[:, t] = token
        done |= token == eos
        if t + 1 == max_new_tokens or bool(done.all()):
            return tokens[:, : t + 1]
        out = model(
            input_ids=token[:, None],
            attention_mask=attention_mask[:, : p + t + 1],
            position_ids=next_position + t,
            **cache,
            use_cache=True,
        )
    return tokens


def _lean_decode_loop(
    model, prompt_ids, prompt_mask, max_new_tokens, eos, pad, temperature, top_p, top_k, generator, uniforms=None
):
    """``_decode_loop`` on the LeanDecoder (Llama-family models). Rows that have emitted EOS leave the batch
    once they are a quarter of it, so a mostly finished batch stops paying for them (the random draws
    then differ from the generic loop's, which keeps sampling, and discarding, for finished rows)."""
    b, p = prompt_ids.shape
    decoder, logits, run = _prefill(model, prompt_ids, prompt_mask, p + max_new_tokens)
    if decoder.batch < b:
        decoder.keep(run)
        logits = logits[run]
    next_position = position_ids_from_mask(prompt_mask)[:, -1] + 1  # (B,)
    tokens = prompt_ids.new_full((b, max_new_tokens), pad)
    rows = torch.arange(b, device=prompt_ids.device)  # original index of each row still in the decoder
    live = torch.ones(b, dtype=torch.bool, device=prompt_ids.device)  # per decoder row: no EOS yet
    for t in range(max_new_tokens):
        uniform = None if uniforms is None else uniforms[rows, t]  # per-row draws: unaffected by rows leaving
        token = sample_next_token(logits, temperature, top_p, top_k, generator, uniform).masked_fill(~live, pad)
        tokens[rows, t] = token
        live &= token != eos
        alive = int(live.sum())
        if t + 1 == max_new_tokens or alive == 0:
            return tokens[:, : t + 1]
        if 4 * (len(rows) - alive) >= len(rows):
            keep = live.nonzero().squeeze(1)
            decoder.keep(keep)
            rows, live, token, next_position = rows[keep], live[keep], token[keep], next_position[keep]
        logits = decoder.forward(token[:, None], (next_position + t)[:, None], torch.ones_like(live)[:, None])
    return tokens


def _prefill(model, prompt_ids, prompt_mask, capacity: int):
    """A LeanDecoder of ``capacity`` holding the prompts, their last logits (U, V) and run (B,): the prefilled
    row of each prompt row. Rows repeating the row above (G samples of a prompt) share its prefill: each
    distinct prompt runs once (U rows)."""
    b = prompt_ids.shape[0]
    positions = position_ids_from_mask(prompt_mask)  # (B, P)
    first = torch.ones(b, dtype=torch.bool, device=prompt_ids.device)
    first[1:] = (prompt_ids[1:] != prompt_ids[:-1]).any(1) | (prompt_mask[1:] != prompt_mask[:-1]).any(1)
    distinct = first.nonzero().squeeze(1)  # (U,) first row of each run
    decoder = LeanDecoder(model, len(distinct), capacity)
    logits = decoder.forward(prompt_ids[distinct], positions[distinct], prompt_mask[distinct].bool())  # (U, V)
    return decoder, logits, first.long().cumsum(0) - 1


def _static_decode_loop(
    model, prompt_ids, prompt_mask, max_new_tokens, eos, pad, temperature, top_p, top_k, generator, uniforms, mode
):
    """``_decode_loop`` as fixed-shape steps (grpo_fast.trainer.static_decode): no row leaves the batch, so the draws
    are those of the generic loop; per-row uniforms or the argmax are drawn inside the step."""
    b, p = prompt_ids.shape
    rows, capacity = static_decode.batch_bucket(b), static_decode.capacity_bucket(p + max_new_tokens)
    decoder, logits, run = _prefill(model, prompt_ids, prompt_mask, capacity)
    inside = temperature == 0 or uniforms is not None
    sampling = static_decode.Sampling(float(temperature), float(top_p), int(top_k), eos, pad, inside)
    runner = static_decode.runner_for(decoder, rows, capacity, sampling, mode)
    s = runner.state
    s.load(decoder, torch.cat([run, run.new_zeros(rows - b)]))  # bucket padding rows: copies of row 0, finished
    s.position.zero_()[:b] = position_ids_from_mask(prompt_mask)[:, -1] + 1
    first_uniform = None if uniforms is None else uniforms[:, 0]
    token = sample_next_token(logits[run], temperature, top_p, top_k, generator, first_uniform)
    tokens = prompt_ids.new_full((b, max_new_tokens), pad)
    tokens[:, 0] = token
    s.token.zero_()[:b] = token
    s.live.zero_()[:b] = token != eos
    for t in range(1, max_new_tokens):
        if not bool(s.live.any()):
            return tokens[:, :t]
        s.index.fill_(p + t - 1)  # the cache slot of the token fed in (the last sampled)
        if uniforms is not None:
            s.uniform[:b] = uniforms[:, t]
        _, token, live = _static_step(runner, generator, b)
        tokens[:, t] = token[:b]
        s.token.copy_(token)
        s.live.copy_(live)
        s.position.add_(1)
    return tokens


def _static_step(runner, generator, b: int):
    """One step of ``runner``; without a draw inside it, the multinomial draw runs here on the b real rows."""
    logits, token, live = runner()
    if runner.sampling.inside:
        return logits, token, live
    s = runner.sampling
    drawn = sample_next_token(logits[:b], s.temperature, s.top_p, s.top_k, generator).masked_fill(~live[:b], s.pad)
    token, live = token.clone(), live.clone()
    token[:b] = drawn
    live[:b] &= drawn != s.eos
    return logits, token, live
