"""The shared AdamW (bilevel.optim.adamw): fused on a CPU, yet the same updates as torch's reference AdamW, and
a tensor whose gradient is masked to zero (SalUn) never moves."""

from __future__ import annotations

import torch

from bilevel.optim.adamw import adamw


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(16, 8), (8,), (3, 3, 4, 4)]]


def test_cpu_adamw_is_fused_and_matches_the_reference_updates() -> None:
    fused_params, ref_params, start = _params(0), _params(0), _params(0)
    fused = adamw(fused_params, lr=1e-2)
    reference = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.0, foreach=False)
    assert fused.defaults["fused"] and fused.defaults["weight_decay"] == 0.0
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        for a, b in zip(fused_params, ref_params):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        reference.step()
    for a, b, s in zip(fused_params, ref_params, start):
        assert (a - s).abs().max() > 0.05  # 20 steps of lr 1e-2 moved every tensor
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_masked_gradients_leave_their_weights_exactly_unchanged() -> None:
    params = _params(2)
    start = [p.detach().clone() for p in params]
    opt = adamw(params, lr=1e-1)
    for _ in range(10):
        for p in params:
            p.grad = torch.ones_like(p)
        params[1].grad.zero_()  # masked out, as SalUn's before_step does
        params[2].grad[0].zero_()
        opt.step()
    assert torch.equal(params[1], start[1])
    assert torch.equal(params[2][0], start[2][0])
    assert not torch.equal(params[2][1], start[2][1])
    assert not torch.equal(params[0], start[0])
