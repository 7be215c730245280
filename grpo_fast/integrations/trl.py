"""TRL drop-in: ``FusedGRPOTrainer``, TRL's ``GRPOTrainer`` with its loss computed by ``linear_grpo_loss``.

    from grpo_fast.integrations.trl import FusedGRPOTrainer
    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=trl.GRPOConfig(...), train_dataset=...)

Everything but the loss is TRL's: generation, rewards, advantages, old/reference log-probs, the vLLM
importance-sampling ratio, logging, checkpoints. ``_compute_loss`` runs the model's backbone (through the
wrapped model, so DDP/FSDP/DeepSpeed see a forward, as TRL's own fused LM head does) and hands the last
hidden states of the completion positions and ``lm_head.weight`` (+ bias) to ``linear_grpo_loss``: the
(B, T, V) logits are never built, and the gradient of the head is formed chunk by chunk at forward time.

TRL 1.16 options and how they map (tests/test_trl_trainer.py checks loss, parameter gradients and logged
metrics against ``trl.GRPOTrainer.compute_loss`` on the same model and batch):

- loss_type grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, vespo; importance_sampling_level token/sequence;
  epsilon, epsilon_high, delta, sapo temperatures, vespo_k_pos/neg and vespo_lambda_pos/neg, beta (k3 KL to
  ``ref_per_token_logps``),
  use_bias_correction_kl, temperature, gradient accumulation / steps_per_generation / world size,
  train vs eval normalisers: fields of ``grpo_fast.LossConfig``.
- old_per_token_logps (num_iterations > 1, misaligned generation, vLLM): ``old_logprobs``.
- the vLLM importance-sampling correction (``importance_sampling_ratio`` in the inputs): ``importance_ratio``.
  Like TRL, grpo_fast multiplies the per-token policy loss by it before adding the KL term, except for vespo,
  where it is folded into the sequence weight w of the gamma function (``objective.vespo_weights``).
- the off-policy sequence mask (``off_policy_mask_threshold``) and the high-entropy token mask
  (``top_entropy_quantile``): TRL multiplies the per-token policy loss by both (every loss type, vespo
  included), so their product is passed as ``policy_mask``; the high-entropy mask is also ``entropy_mask``,
  the tokens TRL averages the entropy bonus over. The masks need the current log-probs / entropies first:
  one forward-only pass of ``linear_token_logprobs`` (one more GEMM) computes them, and TRL's own
  ``get_off_policy_mask`` / ``get_high_entropy_mask`` turn them into masks.
- entropy_coef and use_adaptive_entropy: ``LossConfig.entropy_coef`` (the coefficient TRL would apply
  this step); the adaptive controller's state is updated as TRL updates it (over the high-entropy tokens
  when top_entropy_quantile < 1, as TRL).
- tool_mask: multiplies the completion mask, as in TRL. PEFT models (an adapter on the backbone), logit
  scales (``logit_scale`` and the like), cast_lm_head_to_fp32 and autocast behave as in TRL's fused head.

- a MoE model's router load-balancing loss (router_aux_loss_coef, the model's output_router_logits): the
  backbone returns its router logits, the model's own ``load_balancing_loss_func`` turns them into the
  aux_loss its forward would return, and ``router_aux_loss_coef * aux_loss / GA`` is added, as TRL adds it
  (TRL's own fused head drops it, trl#7009); metric aux_loss.

Refused with a ValueError at construction (and again if changed later), because the result would differ
from TRL's: final_logit_softcapping (the fused kernels do not soft-cap), vision-language models, MoE
models whose modeling module has no ``load_balancing_loss_func`` (or no num_experts / num_experts_per_tok),
and values LossConfig rejects that TRL accepts (delta <= 1 + epsilon_high, a vespo lambda <= 0, which TRL
clamps to 1e-4 without a word). Options of LossConfig that TRL lacks (other KL estimators) are
simply not reachable from a GRPOConfig.

Numerics: the log importance weight is clamped to +-20 before exp (grpo_fast's ``log_ratio_clamp``),
where TRL would overflow to inf; elsewhere float32 results are TRL's to float32 rounding. Under bf16
autocast the head GEMMs run in bf16 (fp32 accumulation) like TRL's: same loss, gradients equal to bf16
rounding. Cost: the masks above add one forward-only GEMM pass; so does sequence-level importance sampling
with old log-probs (inside ``linear_grpo_loss``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
import types

from packaging.version import Version

# The TRL releases whose GRPOTrainer internals (_compute_loss, the sampling step, the loss helpers imported
# below) this module overrides and was tested against: 1.15 and 1.16 (tests/test_trl_trainer.py and
# tests/test_trl_parity.py pass on both; on 1.14 the logit-scale parity test fails; 1.13 and older are
# untested: the parity tests use a TRL function they lack).
TRL_SUPPORTED = ((1, 15), (1, 16))
TRL_REQUIREMENT = "trl>=1.15,<1.17"


def check_trl_version(version: str) -> None:
    """ImportError naming the installed TRL and the supported range unless ``version`` is in it."""
    if Version(version).release[:2] not in TRL_SUPPORTED:
        raise ImportError(
            f"grpo_fast.integrations.trl supports {TRL_REQUIREMENT} (it overrides GRPOTrainer internals that "
            f"change between TRL releases); the installed trl is {version}: pip install '{TRL_REQUIREMENT}'"
        )


check_trl_version(importlib.metadata.version("trl"))

import torch  # after the version check: a wrong TRL fails with its versions named, not in an import
from accelerate.utils import is_peft_model
from torch.distributed.tensor import DTensor
from trl import GRPOTrainer
from trl.trainer.utils import maybe_gather_lm_head_ctx, nanmax, nanmin

from ..config import LOSS_TYPES, PPO_CLIP_LOSS_TYPES, LossConfig
from ..linear import linear_grpo_loss, linear_token_logprobs
from ..objective import vespo_weights
from ..validation import BACKENDS

__all__ = ["FusedGRPOTrainer"]

# Inputs of vision-language batches; the hidden-state forward below is text-only.
_MULTIMODAL_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
# Keyword the patched forward recognises: ``model(..., grpo_fast_head=fn)`` returns fn(hidden, weight, bias).
_HEAD_KWARG = "grpo_fast_head"


class FusedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is grpo_fast's fused linear GRPO loss (see the module docstring).

    Takes exactly ``GRPOTrainer``'s arguments, plus two keyword-only ones:

    Args:
        loss_backend: ``linear_grpo_loss`` backend: "auto" (Triton on CUDA, chunked torch elsewhere),
            "triton", "torch" or "reference" (materialised logits, for debugging).
        loss_chunk_size: token rows per chunk of the torch backend (None: about 2^25 / vocabulary size).
    Raises:
        ValueError: for a TRL option whose loss grpo_fast cannot reproduce exactly (named in the message).
    """

    def __init__(self, *args, loss_backend: str = "auto", loss_chunk_size: int | None = None, **kwargs):
        if loss_backend not in BACKENDS:
            raise ValueError(f"loss_backend must be one of {BACKENDS}, got {loss_backend!r}")
        if loss_chunk_size is not None and (
            isinstance(loss_chunk_size, bool) or not isinstance(loss_chunk_size, int) or loss_chunk_size < 1
        ):
            raise ValueError(f"loss_chunk_size must be None or an int >= 1, got {loss_chunk_size!r}")
        super().__init__(*args, **kwargs)
        self.loss_backend = loss_backend
        self.loss_chunk_size = loss_chunk_size
        text_config = self.model.config.get_text_config()
        self._fused_logit_scale = _logit_scale(text_config)
        self._fused_softcap = getattr(text_config, "final_logit_softcapping", None)
        # TRL patched this model's forward with its fused LM head; ours wraps that one (PEFT: the base model,
        # whose forward the adapter calls).
        self._fused_causal_lm = self.model.get_base_model() if is_peft_model(self.model) else self.model
        self._check_fused_support()
        _add_head_forward(self._fused_causal_lm)

    # ------------------------------------------------------------------ options

    def _check_fused_support(self) -> None:
        """ValueError naming every TRL option set on this trainer that the fused loss cannot reproduce."""
        problems = []
        if self.loss_type not in LOSS_TYPES:
            problems.append(f"loss_type={self.loss_type!r} (supported: {', '.join(LOSS_TYPES)})")
        if self.aux_loss_enabled and _router_aux_loss_parts(self._fused_causal_lm) is None:
            problems.append(
                f"router_aux_loss_coef={self.router_aux_loss_coef} on {type(self._fused_causal_lm).__name__}, whose "
                "modeling module has no load_balancing_loss_func (or no num_experts / num_experts_per_tok)"
            )
        if self._fused_softcap is not None:
            problems.append(f"final_logit_softcapping={self._fused_softcap} in the model config")
        if self._is_vlm:
            problems.append("a vision-language model (processing_class is a processor)")
        if problems:
            raise ValueError(
                "FusedGRPOTrainer cannot reproduce TRL's loss with " + "; ".join(problems) + ". Use trl.GRPOTrainer."
            )
        try:
            self._fused_loss_config("train", float(self.entropy_coef))
        except (TypeError, ValueError) as err:
            message = f"FusedGRPOTrainer: this GRPOConfig has no grpo_fast.LossConfig equivalent: {err}"
            raise ValueError(message) from err

    def _fused_loss_config(self, mode: str, entropy_coef: float) -> LossConfig:
        """The LossConfig of TRL's ``_compute_loss`` in this mode ("train": accumulation normalisers; "eval": none)."""
        train = mode == "train"
        grad_accum = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        return LossConfig(
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            epsilon=float(self.epsilon_low),
            epsilon_high=float(self.epsilon_high),
            delta=self.args.delta if self.loss_type in PPO_CLIP_LOSS_TYPES else None,  # TRL ignores it elsewhere
            beta=float(self.beta),
            kl_estimator="k3",
            temperature=float(self.temperature),
            max_completion_length=self.max_completion_length,
            use_bias_correction_kl=bool(self.args.use_bias_correction_kl),
            sapo_temperature_pos=float(self.args.sapo_temperature_pos),
            sapo_temperature_neg=float(self.args.sapo_temperature_neg),
            **self._vespo_fields(),
            entropy_coef=entropy_coef,
            gradient_accumulation_steps=int(grad_accum) if train else 1,
            steps_per_generation=int(self.args.steps_per_generation) if train else 1,
            world_size=self.accelerator.num_processes,
        )

    def _vespo_fields(self) -> dict:
        """LossConfig's vespo_* fields from the GRPOConfig; TRL releases without vespo get LossConfig's defaults."""
        defaults = {
            f: getattr(LossConfig, f) for f in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
        }
        return {name: float(getattr(self.args, name, default)) for name, default in defaults.items()}

    def _entropy_coef_now(self) -> float:
        """The entropy-bonus coefficient TRL applies in this step (0 when the bonus is off or gated off)."""
        if not self._entropy_bonus_enabled:
            return 0.0
        if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
            return 0.0
        return float(self.entropy_coef)

    # ------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs):
        self._check_fused_support()  # options may have been changed on the trainer since construction
        multimodal = [key for key in _MULTIMODAL_INPUTS if inputs.get(key) is not None]
        if multimodal:
            raise ValueError(f"FusedGRPOTrainer is text-only; the batch carries {multimodal}")
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        entropy_coef = self._entropy_coef_now()
        config = self._fused_loss_config(mode, entropy_coef)
        head = functools.partial(self._head_loss, inputs=inputs, mask=mask, config=config)
        router = {"output_router_logits": True} if self.aux_loss_enabled else {}
        with self.accelerator.autocast():
            (loss, logprobs, mean_entropy, bonus_stats), aux_loss = model(
                input_ids=input_ids, attention_mask=attention_mask, **router, **{_HEAD_KWARG: head}
            )
        self._log_fused_metrics(mode, inputs, mask, config, loss.detach(), logprobs, mean_entropy, bonus_stats)
        if aux_loss is not None:  # TRL: + coef * aux / GA (train), logged as aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss / config.gradient_accumulation_steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        return loss

    def _head_loss(self, hidden, weight, bias, *, inputs, mask, config: LossConfig):
        """linear_grpo_loss on the backbone's last hidden states (B, P + T, H); runs inside the model forward."""
        completion_ids = inputs["completion_ids"]
        hidden = hidden[:, -completion_ids.size(1) - 1 : -1]  # position t predicts completion token t
        device_type = hidden.device.type
        if getattr(self.args, "cast_lm_head_to_fp32", False):
            hidden = hidden.float()
        elif torch.is_autocast_enabled(device_type):  # the head GEMMs in the autocast dtype, as TRL's head runs
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if self._fused_logit_scale != 1.0:  # logits = scale * (h W^T + b) = (scale h) W^T + scale b
            hidden = hidden * self._fused_logit_scale
            bias = None if bias is None else bias * self._fused_logit_scale
        with torch.autocast(device_type, enabled=False):  # grpo_fast controls its own precision (fp32 accumulation)
            policy_mask, entropy_mask, entropies = self._loss_masks(hidden, weight, bias, inputs, mask, config)
            out = linear_grpo_loss(
                hidden,
                weight,
                completion_ids,
                inputs["advantages"],
                mask,
                inputs.get("old_per_token_logps"),
                inputs.get("ref_per_token_logps") if config.beta != 0.0 else None,
                bias=bias,
                config=config,
                importance_ratio=self._importance_ratio(inputs),
                num_items_in_batch=inputs.get("num_items_in_batch"),
                policy_mask=policy_mask,
                entropy_mask=entropy_mask,
                backend=self.loss_backend,
                chunk_size=self.loss_chunk_size,
            )
        # the tokens the entropy bonus averages over: (sum of their entropies, their count), for TRL's metrics
        effective = mask.float() if entropy_mask is None else mask.float() * entropy_mask
        if entropies is None:
            bonus_stats = torch.stack([out.metrics["entropy"] * effective.sum(), effective.sum()])
        else:
            bonus_stats = torch.stack([(entropies * effective).sum(), effective.sum()])
        return out.loss, out.logprobs.detach(), out.metrics["entropy"], bonus_stats

    def _importance_ratio(self, inputs):
        """TRL's vLLM importance-sampling ratio, or None. grpo_fast's ``importance_ratio`` is the same factor: it
        multiplies the per-token policy loss, or for vespo is folded into the sequence weight, as in TRL."""
        if self.use_vllm and self.vllm_importance_sampling_correction:
            return inputs["importance_sampling_ratio"].float()
        return None

    def _loss_masks(self, hidden, weight, bias, inputs, mask, config: LossConfig):
        """(policy_mask, entropy_mask, entropies): the off-policy sequence mask times the high-entropy token mask,
        which TRL multiplies the per-token policy loss by (or None); the high-entropy mask alone, over which TRL
        averages the entropy bonus (or None); the current entropies when they were computed for it (or None)."""
        weights = []
        entropy_mask = entropies = None
        quantile_mask = self.top_entropy_quantile < 1.0
        if self.off_policy_mask_threshold is not None or quantile_mask:
            current = linear_token_logprobs(  # forward-only: the masks need the current policy's values first
                hidden.detach(),
                weight.detach(),
                inputs["completion_ids"],
                None if bias is None else bias.detach(),
                temperature=config.temperature,
                return_entropy=quantile_mask,
                backend=self.loss_backend,
                mask=mask,
                chunk_size=self.loss_chunk_size,
            )
            if self.off_policy_mask_threshold is not None:
                advantages = inputs["advantages"]
                old = inputs.get("old_per_token_logps")
                sampling = inputs.get("sampling_per_token_logps")
                if sampling is None:
                    sampling = current.logprobs if old is None else old
                weights.append(
                    self.get_off_policy_mask(
                        advantages=advantages.unsqueeze(1) if advantages.dim() == 1 else advantages,
                        per_token_logps=current.logprobs,
                        sampling_per_token_logps=sampling,
                        mask=mask,
                        off_policy_threshold=self.off_policy_mask_threshold,
                    )
                )
            if quantile_mask:
                entropies = current.entropy
                entropy_mask = self.get_high_entropy_mask(entropies, mask, 1.0 - self.top_entropy_quantile).float()
                weights.append(entropy_mask)
        if not weights:
            return None, None, None
        product = weights[0].float()
        for w in weights[1:]:
            product = product * w.float()
        return product, entropy_mask, entropies

    # ------------------------------------------------------------------ metrics

    def _log_fused_metrics(
        self, mode, inputs, mask, config: LossConfig, loss, logprobs, mean_entropy, bonus_stats
    ) -> None:
        """TRL's loss metrics under TRL's names and reductions, from the fused path's detached log-probs."""
        metrics = self._metrics[mode]
        mask = mask.float()
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old = inputs.get("old_per_token_logps")
        log_ratio = torch.zeros_like(logprobs) if old is None else logprobs - old
        if config.importance_sampling_level == "sequence":
            log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        ratio = torch.exp(log_ratio)  # (B, T) or (B, 1)

        def reduce_mean(local_sum, local_count):
            totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def global_mean(x):
            """Masked mean over all processes; a (B, 1) tensor counts one value per sequence, as in TRL."""
            if x.shape[1] == 1:
                return reduce_mean(x.sum(), x.new_tensor(float(x.shape[0])))
            return reduce_mean((x * mask).sum(), mask.sum())

        def per_sequence(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        if self._entropy_bonus_enabled:
            self._log_policy_loss_and_update_entropy_coef(mode, config, loss, bonus_stats)
        if config.beta != 0.0:
            diff = inputs["ref_per_token_logps"] - logprobs
            kl = torch.exp(diff) - diff - 1
            metrics["kl"].append(global_mean(kl * ratio if config.use_bias_correction_kl else kl))
        # TRL's masked sum of the per-token entropies; with one-token completions (T = 1) it divides by the
        # number of sequences instead of the number of tokens.
        count = mask.sum() if mask.shape[1] != 1 else mask.new_tensor(float(mask.shape[0]))
        metrics["entropy"].append(reduce_mean(mean_entropy * mask.sum(), count))
        if config.loss_type in PPO_CLIP_LOSS_TYPES:
            low = ((ratio < 1 - config.epsilon) & (advantages < 0)).float()
            high = ((ratio > 1 + config.eps_high) & (advantages > 0)).float()
            metrics["clip_ratio/low_mean"].append(global_mean(low))
            metrics["clip_ratio/high_mean"].append(global_mean(high))
            metrics["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))
            metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(per_sequence(low))).item())
            metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(per_sequence(high))).item())
        elif config.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_mean(((ratio > config.eps_high) & (advantages > 0)).float()))
        elif config.loss_type == "vespo":  # the detached weight, recomputed from the detached log-probs
            log_ratio = torch.zeros_like(logprobs) if old is None else logprobs - old
            phi = vespo_weights(log_ratio, advantages.float(), mask, config, self._importance_ratio(inputs))
            metrics["vespo/phi_seq_mean"].append(global_mean(phi))

    def _log_policy_loss_and_update_entropy_coef(self, mode, config: LossConfig, loss, bonus_stats) -> None:
        """TRL's bookkeeping when the entropy bonus is on: the policy_loss metric, the adaptive coefficient
        controller (its window statistics and step-boundary update) and the entropy_coef metric. bonus_stats:
        (sum of the entropies, count) of the tokens the bonus averages over."""
        accumulation = config.gradient_accumulation_steps
        bonus = bonus_stats[0] / bonus_stats[1].clamp(min=1.0)
        policy_loss = loss + config.entropy_coef * bonus / accumulation  # the loss without the bonus
        if config.loss_type not in ("dapo", "cispo", "vespo"):  # TRL logs these before the accumulation division
            policy_loss = policy_loss * accumulation
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            stats = bonus_stats.detach()
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if self.accelerator.sync_gradients:
                totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
                args = self.args
                if world_entropy <= args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)


def _logit_scale(text_config) -> float:
    """The constant a model multiplies its logits by (1.0 for most), read from the config as TRL's fused head
    reads it: logit_scale / output_multiplier / lm_head_multiplier, or 1 / logits_scaling (HyperCLOVA X: x)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is None:
        return 1.0
    return float(scaling) if text_config.model_type == "hyperclovax" else 1.0 / float(scaling)


def _router_aux_loss_parts(model):
    """(load_balancing_loss_func, num_experts, num_experts_per_tok) of a transformers MoE causal LM (Mixtral,
    Qwen2-MoE, ...: its forward adds ``load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)``
    as ``aux_loss``), or None when the model does not have them."""
    balance = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    num_experts = getattr(model, "num_experts", None)
    top_k = getattr(model, "num_experts_per_tok", None)
    if balance is None or num_experts is None or top_k is None:
        return None
    return balance, num_experts, top_k


def _add_head_forward(model) -> None:
    """Make ``model(..., grpo_fast_head=fn)`` run the backbone and return ``fn(last_hidden_state, weight, bias)``.

    The loss then runs inside the model's forward: DDP, FSDP (the head's DTensor weight is gathered) and
    DeepSpeed ZeRO-3 (``maybe_gather_lm_head_ctx``) see one forward, as with TRL's fused head. Any other
    call goes to the previous forward (TRL's), so generation and TRL's log-prob passes are unchanged.
    Returns (fn's result, the MoE load-balancing loss when called with output_router_logits=True, else None).
    """
    previous_forward = model.forward

    @functools.wraps(type(model).forward)  # keep the signature: generate() validates model kwargs against it
    def forward(self, *args, **kwargs):
        head_loss = kwargs.pop(_HEAD_KWARG, None)
        if head_loss is None:
            return previous_forward(*args, **kwargs)
        for key in ("labels", "shift_labels", "num_items_in_batch"):  # PEFT passes labels=None along
            kwargs.pop(key, None)
        kwargs["use_cache"] = False
        outputs = self.base_model(*args, **kwargs)
        hidden = outputs.last_hidden_state  # (B, P + T, H)
        aux_loss = None
        if kwargs.get("output_router_logits"):  # as the model's own forward computes its aux_loss
            balance, num_experts, top_k = _router_aux_loss_parts(self)
            aux_loss = balance(outputs.router_logits, num_experts, top_k, kwargs.get("attention_mask"))
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        with maybe_gather_lm_head_ctx(weight, bias):
            if isinstance(weight, DTensor):
                weight = weight.full_tensor()
                bias = None if bias is None else bias.full_tensor()
            return head_loss(hidden.to(weight.device), weight, bias), aux_loss

    model.forward = types.MethodType(forward, model)
