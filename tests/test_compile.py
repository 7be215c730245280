"""torch.compile compatibility of the custom ops (CPU: the torch implementation behind the same op)."""

import pytest
import torch

import grpo_fast as gf
from grpo_fast.ops import token_stats as ts


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 37, generator=g, dtype=dtype)
    ids = torch.randint(0, 37, (2, 5), generator=g)
    active = torch.rand(2, 5, generator=g) > 0.2
    return logits, ids, active


def test_opcheck_token_stats_forward_and_backward():
    logits, ids, active = _inputs()
    logits.requires_grad_()
    torch.library.opcheck(ts._token_stats_op, (logits, ids, active, 1.25, True, False))
    norm = torch.stack([torch.randn(2, 5), torch.rand(2, 5)], dim=-1)  # (row max, log-normaliser)
    ent = torch.rand(2, 5)
    args = (logits.detach(), ids, active, norm, ent, torch.randn(2, 5), torch.randn(2, 5), 1.25, False)
    torch.library.opcheck(ts._token_stats_backward_op, args)


@pytest.mark.slow
def test_grpo_loss_compiles_fullgraph_and_matches_eager():
    logits, ids, _ = _inputs()
    adv, mask, ref = torch.randn(2), torch.ones(2, 5), torch.randn(2, 5) - 3

    def loss_fn(x):
        return gf.grpo_loss(x, ids, adv, mask, None, ref, config=gf.LossConfig(loss_type="grpo", beta=0.04),
                            backend="torch").loss  # fmt: skip

    eager_x = logits.clone().requires_grad_()
    loss_fn(eager_x).backward()
    compiled_x = logits.clone().requires_grad_()
    torch.compile(loss_fn, fullgraph=True)(compiled_x).backward()
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)
