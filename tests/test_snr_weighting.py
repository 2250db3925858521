"""Min-SNR-gamma weighting of the lower level's task loss (training.weights.snr_gamma): the weights equal a hand
computation for epsilon and v-prediction, the weighted loss is diffusers' reduction, and snr_gamma=None leaves the
loss bit-identical to the unweighted MSE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bilevel.core.config import LossWeights, build_config
from bilevel.core.errors import BilevelError
from bilevel.diffusion.kd_objective import DrawCounter, make_lower_objective
from bilevel.diffusion.losses import KDTargets, ddpm_loss, kd_loss, min_snr_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GAMMA = 5.0


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's schedule (scaled_linear, 0.00085..0.012, 1000 steps): snr crosses 5 near t=130."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def hand_weight(alpha_bar: float, gamma: float, prediction_type: str) -> float:
    snr = alpha_bar / (1.0 - alpha_bar)
    return min(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_weights_equal_hand_computation(alphas_cumprod, prediction_type):
    t = torch.tensor([0, 10, 100, 130, 400, 999])
    got = min_snr_weights(alphas_cumprod, t, GAMMA, prediction_type)
    want = torch.tensor([hand_weight(float(alphas_cumprod[i]), GAMMA, prediction_type) for i in t.tolist()])
    assert got.shape == (6,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    if prediction_type == "epsilon":  # clipped where snr > gamma (small t), 1 where snr < gamma (large t)
        assert got[0] < 0.01 and got[-1] == 1.0
    else:  # v: gamma/(snr+1) at small t, snr/(snr+1) < 1 at large t
        assert got[0] < 0.01 and 0 < got[-1] < 0.01


def test_weights_match_diffusers_compute_snr(alphas_cumprod):
    """The same numbers as diffusers' training scripts (train_text_to_image.py, --snr_gamma)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.randint(1000, (64,), generator=torch.Generator().manual_seed(0))
    snr = compute_snr(scheduler, t)
    base = torch.stack([snr, GAMMA * torch.ones_like(t)], dim=1).min(dim=1)[0]
    assert torch.equal(min_snr_weights(scheduler.alphas_cumprod, t, GAMMA, "epsilon"), base / snr)
    assert torch.equal(min_snr_weights(scheduler.alphas_cumprod, t, GAMMA, "v_prediction"), base / (snr + 1))


def test_zero_terminal_snr_epsilon_weight_is_its_limit():
    ac = torch.tensor([0.99, 0.5, 0.0])
    w = min_snr_weights(ac, torch.tensor([0, 1, 2]), GAMMA, "epsilon")
    assert torch.isfinite(w).all() and w[2] == 1.0
    assert min_snr_weights(ac, torch.tensor([2]), GAMMA, "v_prediction")[0] == 0.0


def test_unknown_prediction_type_is_refused(alphas_cumprod):
    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(alphas_cumprod, torch.tensor([1]), GAMMA, "sample")


def test_weighted_loss_is_per_sample_mean_then_batch_mean():
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    w = torch.tensor([0.5, 1.0, 2.0])
    hand = sum(float(w[i]) * float(((pred[i] - target[i]) ** 2).mean()) for i in range(3)) / 3
    assert float(ddpm_loss(pred, target, w)) == pytest.approx(hand, rel=1e-6)
    assert torch.equal(ddpm_loss(pred, target), F.mse_loss(pred, target))  # no weights: today's loss


def test_kd_loss_weights_only_the_task_term():
    gen = torch.Generator().manual_seed(2)
    s, n, t_eps = (torch.randn(2, 3, 4, 4, generator=gen) for _ in range(3))
    w = torch.tensor([0.25, 3.0])
    total, parts = kd_loss(s, n, KDTargets(t_eps, {}), {}, [], 1.0, 2.0, 0.0, w)
    assert parts["task"] == pytest.approx(float(ddpm_loss(s, n, w)))
    assert parts["out_kd"] == pytest.approx(float(F.mse_loss(s, t_eps)))
    assert float(total) == pytest.approx(parts["task"] + 2.0 * parts["out_kd"], rel=1e-6)
    plain, _ = kd_loss(s, n, KDTargets(t_eps, {}), {}, [], 1.0, 2.0, 0.0)
    assert torch.equal(plain, kd_loss(s, n, KDTargets(t_eps, {}), {}, [], 1.0, 2.0, 0.0, None)[0])


def lower_objective(unet, weights: LossWeights, prediction_type: str, alphas_cumprod: torch.Tensor):
    gen = torch.Generator().manual_seed(3)
    cfg = unet.config
    images = torch.randn(6, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    cond = torch.randn(6, 4, cfg.cross_attention_dim, generator=gen)
    return make_lower_objective(
        unet, unet, images, cond, torch.zeros(4, cfg.cross_attention_dim), alphas_cumprod, weights, [], 4,
        DrawCounter(0, salt=1), prediction_type=prediction_type,
    )  # fmt: skip


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lower_objective_applies_the_weights(random_pipe, alphas_cumprod, prediction_type):
    unet = random_pipe.unet.eval()
    ddpm = {"task": 1.0, "output": 0.0, "feature": 0.0}
    off = lower_objective(unet, LossWeights(**ddpm), prediction_type, alphas_cumprod)
    on = lower_objective(unet, LossWeights(**ddpm, snr_gamma=GAMMA), prediction_type, alphas_cumprod)
    b_off, b_on = off.draw(), on.draw()
    assert b_off.task_weights is None
    assert torch.equal(b_off.t, b_on.t) and torch.equal(b_off.xt, b_on.xt)  # the weighting draws nothing extra
    want = torch.tensor([hand_weight(float(alphas_cumprod[i]), GAMMA, prediction_type) for i in b_on.t.tolist()])
    torch.testing.assert_close(b_on.task_weights, want, rtol=1e-5, atol=0)
    with torch.no_grad():
        pred = unet(b_on.xt, b_on.t, encoder_hidden_states=b_on.cond).sample
        plain = off.loss(b_off)
        weighted = on.loss(b_on)
    assert torch.equal(plain, F.mse_loss(pred, b_off.noise))  # snr_gamma=None: today's loss, bit for bit
    per_sample = ((pred - b_on.noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(weighted, (per_sample * want).mean(), rtol=1e-5, atol=0)
    assert not torch.allclose(weighted, plain)


def test_config_key_and_validation():
    config = build_config({"training": {"weights": {"snr_gamma": 5}}})
    assert config.training.weights.snr_gamma == 5.0
    assert build_config({}).training.weights.snr_gamma is None
    with pytest.raises(BilevelError, match=r"training\.weights\.snr_gamma"):
        build_config({"training": {"weights": {"snr_gamma": 0}}})
