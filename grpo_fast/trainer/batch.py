"""One generation batch (completions, rewards, advantages) and the counters saved with a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .rollout import Rollout


@dataclass
class Batch:
    """One generation batch, laid out group by group (rows g*G .. g*G+G-1 answer prompt g).

    rollout: the sampled completions (B = groups * G rows).
    rewards: (B,) weighted reward; rewards_per_func: (B, F), NaN where a function returned None.
    advantages: (B,), set once the batch is final.
    keys: (groups,) int64 position of each group's prompt in the training stream (the global order of
        the groups, the same with any number of processes); None = 0, 1, 2, ...
    sampling_logprobs: (B, T) the sampler's log-probs of the completion tokens, when the engine gives them.
    """

    rollout: Rollout
    rewards: torch.Tensor
    rewards_per_func: torch.Tensor
    advantages: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    sampling_logprobs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rewards)

    def group_keys(self, group_size: int) -> torch.Tensor:
        return self.keys if self.keys is not None else torch.arange(len(self.rewards) // group_size)

    def group_std(self, group_size: int) -> torch.Tensor:
        """(groups,) Bessel-corrected reward std of each group."""
        return self.rewards.view(-1, group_size).std(1) if group_size > 1 else torch.zeros(len(self.rewards))

    def select_groups(self, groups: torch.Tensor, group_size: int) -> Batch:
        rows = (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)  # (K * G,)
        device = self.rollout.prompt_ids.device
        return Batch(
            self.rollout.select(rows.to(device)),
            self.rewards[rows],
            self.rewards_per_func[rows],
            keys=self.group_keys(group_size)[groups],
            sampling_logprobs=None if self.sampling_logprobs is None else self.sampling_logprobs[rows.to(device)],
        )

    @staticmethod
    def cat(batches: list[Batch], pad_token_id: int, group_size: int = 1) -> Batch:
        sampling, filled = None, [b for b in batches if len(b)]
        if filled and all(b.sampling_logprobs is not None for b in filled):
            batches = filled  # (empty batches carry no sampling log-probs)
            width = max(b.rollout.completion_ids.shape[1] for b in batches)
            sampling = torch.cat(
                [nn.functional.pad(b.sampling_logprobs, (0, width - b.sampling_logprobs.shape[1])) for b in batches]
            )
        return Batch(
            Rollout.cat([b.rollout for b in batches], pad_token_id),
            torch.cat([b.rewards for b in batches]),
            torch.cat([b.rewards_per_func for b in batches]),
            keys=torch.cat([b.group_keys(group_size) for b in batches]),
            sampling_logprobs=sampling,
        )


@dataclass
class TrainerState:
    """Counters saved with every checkpoint. data_cursor = prompts consumed from the shuffled stream."""

    step: int = 0
    data_cursor: int = 0
    seed: int = 0
