"""fp16 loss scaling in the shared optimiser step: a finite step equals the unscaled one, an overflow is skipped
and lowers the scale (torch's GradScaler; on the CPU here, the same logic the CUDA fp16 path uses)."""

from __future__ import annotations

import torch

from bilevel.core.precision import attach_loss_scaler, loss_scaler
from bilevel.core.steps import gradient_step


def _setup(scaled: bool):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(params.values(), lr=1e-2)  # not scale-invariant (Adam would hide a missing unscale)
    if scaled:
        attach_loss_scaler(opt, "cpu")
    return model, params, opt


def test_a_finite_scaled_step_equals_the_unscaled_one():
    x = torch.randn(8, 4)
    plain, p_params, p_opt = _setup(False)
    scaled, s_params, s_opt = _setup(True)
    for _ in range(3):
        gradient_step(plain(x).pow(2).mean(), p_params, p_opt)
        gradient_step(scaled(x).pow(2).mean(), s_params, s_opt)
    for name in p_params:
        torch.testing.assert_close(s_params[name], p_params[name], rtol=1e-5, atol=1e-6)
    assert loss_scaler(s_opt).get_scale() == 65536.0  # no overflow: the scale stays (grows only after 2000 steps)


def test_an_overflowing_step_is_skipped_and_the_scale_halves():
    model, params, opt = _setup(True)
    before = {k: v.detach().clone() for k, v in params.items()}
    loss = model(torch.full((2, 4), 1e30)).pow(2).mean()  # inf gradients
    gradient_step(loss, params, opt)
    for name, value in params.items():
        assert torch.equal(value, before[name])
    assert loss_scaler(opt).get_scale() == 32768.0
    assert all(p.grad is None for p in params.values())
