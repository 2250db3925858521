"""Unlearners (ESD, Concept Ablation, SalUn): losses against hand-computed values, trained subsets, SalUn's mask,
anchor/relabel prompts, several concepts at once, and the standalone `unlearn_model`."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import UnlearnContext
from bilevel.diffusion import image_sets
from bilevel.plugins.unlearners.concept_ablation import ANCHOR_CACHE, ConceptAblation, ConceptAblationConfig
from bilevel.plugins.unlearners.esd import ESD, ESDConfig, esd_target, select_parameters
from bilevel.plugins.unlearners.salun import SalUn, SalUnConfig, saliency_mask
from bilevel.toolkit import PromptBank
from bilevel.worlds.tiny.architecture import build_tiny_pipeline
from bilevel.worlds.tiny.dataset import PromptMix, make_dataset
from bilevel.worlds.tiny.palette import SHAPES, prompt_for


# --------------------------------------------------------------------------------------------------- fakes
class FakeUNet(nn.Module):
    """eps(x_t, c) = [x_t if identity] + w * mean(c): outputs known by hand for any x_t and t."""

    def __init__(self, w: float = 1.0, identity: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.identity = identity

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> SimpleNamespace:
        b = (encoder_hidden_states.mean(dim=(1, 2)) * self.w).view(-1, 1, 1, 1).expand_as(x)
        return SimpleNamespace(sample=b + x if self.identity else b + 0 * x)


VALUES = {"": 0.0, "a purple circle": 2.0, "a yellow circle": 0.5, "a red circle": 0.3, "a pink circle": -1.0,
          "a orange circle": 0.7}  # fmt: skip


def fake_encode(prompts: list[str]) -> torch.Tensor:
    return torch.tensor([VALUES[p] for p in prompts]).view(-1, 1, 1)


def fake_ctx(student: nn.Module, teacher: nn.Module, **overrides) -> UnlearnContext:
    """One concept prompt, alphas_cumprod = 0 so x_t = eps exactly."""
    base = {
        "student": student,
        "teacher": teacher,
        "concepts": ["purple"],
        "concept_prompts": ["a purple circle"],
        "retain_prompts": ["a red circle"],
        "encode": fake_encode,
        "concept_images": torch.zeros(4, 3, 2, 2),
        "concept_image_prompts": ["a purple circle"] * 4,
        "retain_images": torch.zeros(4, 3, 2, 2),
        "retain_image_prompts": ["a red circle"] * 4,
        "alphas_cumprod": torch.zeros(10),
        "scheduler_config": {},
        "sample_shape": (3, 2, 2),
        "run_dir": None,
        "device": torch.device("cpu"),
        "seed": 0,
    }
    base.update(overrides)
    return UnlearnContext(**base)


def tiny_ctx(pipe, run_dir: Path | None = None, concepts: tuple[str, ...] = ("purple",), n: int = 8) -> UnlearnContext:
    """A real (untrained) tiny UNet with small data sets."""
    bank = PromptBank(pipe.encode_prompts)
    concept = make_dataset(n, 1, include=list(concepts), mix=PromptMix(alias_share=0))  # primary names, as the world
    retain = make_dataset(n, 0, exclude=list(concepts))
    sched = pipe.scheduler
    student = copy.deepcopy(pipe.unet).train().requires_grad_(True)
    return UnlearnContext(
        student=student,
        teacher=pipe.unet.eval().requires_grad_(False),
        concepts=list(concepts),
        concept_prompts=[prompt_for(c, s) for c in concepts for s in SHAPES],
        retain_prompts=[prompt_for("red", s) for s in SHAPES],
        encode=bank,
        concept_images=concept.images,
        concept_image_prompts=concept.prompts,
        retain_images=retain.images,
        retain_image_prompts=retain.prompts,
        alphas_cumprod=sched.alphas_cumprod.float(),
        scheduler_config=dict(sched.config),
        sample_shape=(3, 8, 8),
        run_dir=run_dir,
        device=torch.device("cpu"),
        seed=0,
    )


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(0)


def one_step(unlearner, ctx: UnlearnContext, params: dict[str, nn.Parameter], steps: int = 1, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        loss = unlearner.loss(ctx, unlearner.draw(ctx, 4, torch.Generator().manual_seed(step)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        unlearner.before_step(ctx.student)
        opt.step()


def changed_names(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --------------------------------------------------------------------------------------------------- ESD
def test_esd_target_formula_on_fixed_tensors() -> None:
    e_u = torch.tensor([1.0, 2.0, -1.0])
    e_c = torch.tensor([3.0, 5.0, 1.0])
    assert torch.allclose(esd_target(e_u, e_c, 0.5), torch.tensor([0.0, 0.5, -2.0]))
    assert torch.allclose(esd_target(e_u, e_c, 1.0), torch.tensor([-1.0, -1.0, -3.0]))


def test_esd_loss_hand_computed_and_uses_each_images_prompt() -> None:
    teacher, student = FakeUNet(1.0), FakeUNet(3.0)
    ctx = fake_ctx(student, teacher, concepts=["purple", "pink"], concept_prompts=["a purple circle", "a pink circle"],
                   concept_images=torch.zeros(2, 3, 2, 2), concept_image_prompts=["a pink circle", "a pink circle"])  # fmt: skip
    esd = ESD(ESDConfig(xt_source="data", eta=1.0))
    esd.prepare(ctx)
    # every drawn image is pink: target = 0 - (-1 - 0) = 1, pred = 3 * -1 = -3 -> (−3 − 1)^2 = 16
    assert float(esd.loss(ctx, esd.draw(ctx, 4, torch.Generator().manual_seed(0))).detach()) == pytest.approx(16.0)


def test_esd_retain_term_hand_computed() -> None:
    ctx = fake_ctx(FakeUNet(1.0, identity=True), FakeUNet(2.0, identity=True))  # x_t = eps (alphas_cumprod = 0)
    esd = ESD(ESDConfig(xt_source="data", eta=1.0, retain_weight=1.0))
    esd.prepare(ctx)
    # target = e_u - (e_c - e_u) = x - 4, pred = x + 2 -> 36; retain: (x + 0.3) - (x + 0.6) -> 0.09
    assert float(esd.loss(ctx, esd.draw(ctx, 4, torch.Generator().manual_seed(0))).detach()) == pytest.approx(36.09)


def test_esd_variant_subsets_and_only_they_change(pipe) -> None:
    unet = pipe.unet
    names = set(dict(unet.named_parameters()))
    x, u, full = (set(select_parameters(unet, v)) for v in ("x", "u", "full"))
    assert x and all(".attn2." in k for k in x)
    assert u == names - x and full == names
    ctx = tiny_ctx(pipe, concepts=("purple", "pink"))
    for variant in ("x", "u"):
        esd = ESD(ESDConfig(variant=variant, pool_size=4, sample_steps=2))
        esd.prepare(ctx)
        params = esd.trainable_parameters(ctx.student)
        before = snapshot(ctx.student)
        one_step(esd, ctx, params)
        moved = changed_names(before, ctx.student)
        assert moved and moved <= set(params)


def test_esd_pool_covers_every_concept(pipe) -> None:
    ctx = tiny_ctx(pipe, concepts=("purple", "pink"))
    esd = ESD(ESDConfig(pool_size=6, sample_steps=2))
    esd.prepare(ctx)
    expected = ctx.encode([ctx.concept_prompts[i % 6] for i in range(6)])
    assert torch.equal(esd._pool_cond, expected)  # purple and pink prompts alternate in the pool


def test_esd_pool_is_sampled_once_per_run_folder_and_resampled_when_settings_change(pipe, tmp_path, monkeypatch) -> None:
    """A second arm of the run (same frozen model, prompts, settings) reuses the pool on disk bit for bit; another
    seed or guidance samples afresh, and a corrupt file is resampled rather than trusted."""
    import bilevel.plugins.unlearners.esd as esd_module

    first = ESD(ESDConfig(pool_size=6, sample_steps=2))
    first.prepare(tiny_ctx(pipe, run_dir=tmp_path))
    real, sampled = esd_module.sample_trajectories, []
    monkeypatch.setattr(esd_module, "sample_trajectories", lambda *a, **k: sampled.append(1) or real(*a, **k))
    again = ESD(ESDConfig(pool_size=6, sample_steps=2, retain_weight=5.0))  # options the pool does not depend on
    again.prepare(tiny_ctx(pipe, run_dir=tmp_path))
    assert not sampled
    for name in ("_pool", "_timesteps", "_pool_target", "_pool_cond"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    ESD(ESDConfig(pool_size=6, sample_steps=2, sample_guidance=2.0)).prepare(tiny_ctx(pipe, run_dir=tmp_path))
    assert len(sampled) == 1
    other_seed = tiny_ctx(pipe, run_dir=tmp_path)
    other_seed.seed = 1
    ESD(ESDConfig(pool_size=6, sample_steps=2)).prepare(other_seed)
    assert len(sampled) == 2
    (tmp_path / esd_module.POOL_CACHE).write_bytes(b"not safetensors")
    ESD(ESDConfig(pool_size=6, sample_steps=2)).prepare(tiny_ctx(pipe, run_dir=tmp_path))
    assert len(sampled) == 3


def test_esd_cached_targets_match_frozen_passes_and_skip_them(pipe) -> None:
    """The pool's cached targets equal the two frozen-model passes they replace, and no frozen pass is run."""
    ctx = tiny_ctx(pipe, concepts=("purple", "pink"))
    cached = ESD(ESDConfig(pool_size=6, sample_steps=3))
    live = ESD(ESDConfig(pool_size=6, sample_steps=3, cache_targets=False))
    cached.prepare(ctx)
    live.prepare(ctx)
    assert cached._pool_target is not None and live._pool_target is None
    assert torch.equal(cached._pool, live._pool)
    calls = []
    hook = ctx.teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        a = cached.loss(ctx, cached.draw(ctx, 5, torch.Generator().manual_seed(3)))
        assert not calls
        b = live.loss(ctx, live.draw(ctx, 5, torch.Generator().manual_seed(3)))
        assert len(calls) == 1  # cond and uncond batched into one frozen forward
    finally:
        hook.remove()
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-5, abs=1e-7)
    xt, t, cond = cached.draw_xt(ctx, 5, torch.Generator().manual_seed(4))
    _, _, _, target = cached._draw(ctx, 5, torch.Generator().manual_seed(4))
    with torch.no_grad():
        e_u = ctx.teacher(xt, t, encoder_hidden_states=ctx.encode([""]).expand(5, -1, -1)).sample
        e_c = ctx.teacher(xt, t, encoder_hidden_states=cond).sample
    assert torch.allclose(target, esd_target(e_u, e_c, 1.0), atol=1e-5)


# --------------------------------------------------------------------------------------------------- Concept Ablation
def ca_with_images(config: ConceptAblationConfig, ctx: UnlearnContext) -> ConceptAblation:
    ca = ConceptAblation(config)
    ca.load_state_dict({"anchor_images": torch.zeros(4, 3, 2, 2), "anchor_pairs": torch.zeros(4, dtype=torch.long)})
    ca.prepare(ctx)
    return ca


@pytest.mark.parametrize(
    ("loss", "prior", "retain", "expected"),
    [
        ("model", 0.0, 0.0, (2.0 - 0.5) ** 2),  # ||e(c*) - sg e(c)||^2
        ("model", 1.0, 0.0, (2.0 - 0.5) ** 2 + 0.5**2),  # + ||e(c) - eps||^2, e(c) = eps + 0.5
        ("noise", 0.0, 0.0, 2.0**2),  # ||e(c*) - eps||^2 with e(c*) = eps + 2
        ("noise", 2.0, 0.0, 2.0**2 + 2 * 0.5**2),
        ("model", 1.0, 3.0, (2.0 - 0.5) ** 2 + 0.5**2 + 3 * (0.3 - 0.6) ** 2),  # + retain: student w=1, frozen w=2
    ],
)
def test_concept_ablation_loss_hand_computed(loss: str, prior: float, retain: float, expected: float) -> None:
    student = FakeUNet(1.0, identity=True)
    ctx = fake_ctx(student, FakeUNet(2.0, identity=True))
    ca = ca_with_images(ConceptAblationConfig(loss=loss, prior_weight=prior, retain_weight=retain), ctx)
    assert ca.anchors == ["a yellow circle"]
    value = ca.loss(ctx, ca.draw(ctx, 8, torch.Generator().manual_seed(3)))
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)
    value.backward()
    assert student.w.grad is not None  # the concept branch is differentiable


def test_frozen_targets_hand_computed() -> None:
    student = FakeUNet(1.0, identity=True)
    ctx = fake_ctx(student, FakeUNet(2.0, identity=True))  # frozen anchor/relabel prediction: eps + 2 * 0.5
    ca = ca_with_images(ConceptAblationConfig(target_model="frozen", prior_weight=1.0), ctx)
    value = ca.loss(ctx, ca.draw(ctx, 4, torch.Generator().manual_seed(0)))
    assert float(value.detach()) == pytest.approx((2.0 - 1.0) ** 2 + 0.5**2)
    salun = SalUn(SalUnConfig(target_model="frozen", alpha=0.0, mask_samples=4))
    salun.prepare(ctx)
    value = salun.loss(ctx, salun.draw(ctx, 4, torch.Generator().manual_seed(0)))
    assert float(value.detach()) == pytest.approx((2.0 - 1.0) ** 2)


def test_concept_ablation_model_target_is_stop_gradient() -> None:
    student = FakeUNet(2.0)
    ctx = fake_ctx(student, FakeUNet(1.0))
    ca = ca_with_images(ConceptAblationConfig(prior_weight=0.0), ctx)
    ca.loss(ctx, ca.draw(ctx, 4, torch.Generator().manual_seed(0))).backward()
    # L = (w*2 - sg(w*0.5))^2 -> dL/dw = 2 (2w - 0.5w) * 2 = 12 at w = 2 (not 2 (1.5w) * 1.5 = 9)
    assert float(student.w.grad) == pytest.approx(12.0)


def test_anchor_prompts() -> None:
    prompts = ["a purple circle", "a purple square", "a pink triangle"]
    ca = ConceptAblation(ConceptAblationConfig())
    assert ca.anchor_prompts_for(prompts[:2], ["purple"]) == ["a yellow circle", "a yellow square"]
    # several concepts: each maps to its farthest colour that is not itself a concept
    assert ca.anchor_prompts_for(prompts, ["purple", "pink"]) == [
        "a yellow circle",
        "a yellow square",
        "a green triangle",
    ]
    assert ca.anchor_prompts_for(["a purple circle"], ["purple", "yellow"]) == ["a orange circle"]
    drop = ConceptAblation(ConceptAblationConfig(anchor="drop"))
    assert drop.anchor_prompts_for(["a purple circle", "a purple shape"], ["purple"]) == ["a circle", "a shape"]
    word = ConceptAblation(ConceptAblationConfig(anchor="red"))
    assert word.anchor_prompts_for(prompts, ["purple", "pink"]) == ["a red circle", "a red square", "a red triangle"]
    explicit = ConceptAblation(ConceptAblationConfig(anchor=["a blue circle"]))
    assert explicit.anchor_prompts_for(["a purple circle"], ["purple"]) == ["a blue circle"]
    with pytest.raises(BilevelError, match="one per concept prompt"):
        explicit.anchor_prompts_for(prompts, ["purple"])
    with pytest.raises(BilevelError, match="itself a concept"):
        ConceptAblation(ConceptAblationConfig(anchor="pink")).anchor_prompts_for(prompts, ["purple", "pink"])
    with pytest.raises(BilevelError, match="names none of the concepts"):
        ca.anchor_prompts_for(["a red circle"], ["purple"])
    with pytest.raises(ValueError, match="single word"):
        ConceptAblationConfig(anchor="two words")


def test_concept_ablation_subsets_and_only_they_change(pipe) -> None:
    unet = pipe.unet
    kv = ConceptAblation(ConceptAblationConfig(subset="cross-attention-kv")).trainable_parameters(unet)
    att = ConceptAblation(ConceptAblationConfig(subset="attention")).trainable_parameters(unet)
    full = ConceptAblation(ConceptAblationConfig(subset="full")).trainable_parameters(unet)
    assert kv and all((".attn2.to_k." in k or ".attn2.to_v." in k) for k in kv)
    n_cross = sum(1 for k, _ in unet.named_modules() if k.endswith(".attn2"))
    assert len(kv) == 2 * n_cross  # to_k and to_v weights (no bias) of every cross-attention
    assert set(kv) < set(att) and all((".attn1." in k or ".attn2." in k) for k in att)
    assert any(".attn1." in k for k in att) and set(full) == set(dict(unet.named_parameters()))
    ctx = tiny_ctx(pipe)
    for subset in ("cross-attention-kv", "attention"):
        ca = ConceptAblation(ConceptAblationConfig(subset=subset, num_anchor_images=4, anchor_steps=2))
        ca.prepare(ctx)
        params = ca.trainable_parameters(ctx.student)
        before = snapshot(ctx.student)
        one_step(ca, ctx, params)
        moved = changed_names(before, ctx.student)
        assert moved and moved <= set(params)


def test_anchor_images_cached_and_reused(pipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = tiny_ctx(pipe, run_dir=tmp_path)
    cfg = ConceptAblationConfig(num_anchor_images=5, anchor_steps=2)
    first = ConceptAblation(cfg)
    first.prepare(ctx)
    assert (tmp_path / ANCHOR_CACHE).is_file()
    assert first.state_dict()["anchor_images"].shape == (5, 3, 8, 8)

    def no_sampling(*args, **kwargs):
        raise AssertionError("anchor images should come from the cache")

    monkeypatch.setattr(image_sets, "sample_images", no_sampling)
    second = ConceptAblation(cfg)
    second.prepare(ctx)
    assert torch.equal(second.state_dict()["anchor_images"], first.state_dict()["anchor_images"])
    with pytest.raises(AssertionError, match="cache"):  # other settings -> regenerated, not silently reused
        ConceptAblation(ConceptAblationConfig(num_anchor_images=5, anchor_steps=3)).prepare(ctx)


def test_preparations_are_shared_across_runs_through_the_cache_dir(pipe, tmp_path, monkeypatch) -> None:
    """Two runs (own folders, other students: e.g. two pruners' cells of a grid) with one cache_dir sample ESD's
    pool and Concept Ablation's anchors once; another seed samples afresh, and nothing lands in the run folders."""
    import dataclasses

    import bilevel.plugins.unlearners.esd as esd_module

    shared = tmp_path / "cache"
    cell_a = dataclasses.replace(tiny_ctx(pipe, run_dir=tmp_path / "a"), cache_dir=shared)
    cell_b = dataclasses.replace(tiny_ctx(pipe, run_dir=tmp_path / "b"), cache_dir=shared)
    with torch.no_grad():  # the second cell's student differs (only the frozen teacher decides these tensors)
        next(cell_b.student.parameters()).add_(1.0)
    pools, anchors = [], []
    real_pool, real_images = esd_module.sample_trajectories, image_sets.sample_images
    monkeypatch.setattr(esd_module, "sample_trajectories", lambda *a, **k: pools.append(1) or real_pool(*a, **k))
    monkeypatch.setattr(image_sets, "sample_images", lambda *a, **k: anchors.append(1) or real_images(*a, **k))
    esd_cfg, ca_cfg = ESDConfig(pool_size=6, sample_steps=2), ConceptAblationConfig(num_anchor_images=5, anchor_steps=2)
    first_esd, first_ca = ESD(esd_cfg), ConceptAblation(ca_cfg)
    first_esd.prepare(cell_a)
    first_ca.prepare(cell_a)
    second_esd, second_ca = ESD(esd_cfg), ConceptAblation(ca_cfg)
    second_esd.prepare(cell_b)
    second_ca.prepare(cell_b)
    assert (len(pools), len(anchors)) == (1, 1)
    assert torch.equal(first_esd._pool, second_esd._pool)
    assert torch.equal(first_ca.state_dict()["anchor_images"], second_ca.state_dict()["anchor_images"])
    assert len(list((shared / "unlearner").glob("*.safetensors"))) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    ESD(esd_cfg).prepare(dataclasses.replace(cell_b, seed=1))  # another seed: another pool, beside the first
    assert len(pools) == 2
    assert len(list((shared / "unlearner").glob("esd*.safetensors"))) == 2


def test_anchor_images_from_png_folder(tmp_path: Path) -> None:
    from PIL import Image

    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (2, 2), colour).save(tmp_path / f"img{i}.png")
    (tmp_path / "img1.txt").write_text("a yellow circle\n")
    ctx = fake_ctx(FakeUNet(1.0), FakeUNet(1.0))
    ca = ConceptAblation(ConceptAblationConfig(anchor_images=tmp_path))
    ca.prepare(ctx)
    images = ca.state_dict()["anchor_images"]
    assert images.shape == (2, 3, 2, 2) and float(images[0, 0, 0, 0]) == 1.0 and float(images[1, 2, 0, 0]) == 1.0
    (tmp_path / "img1.txt").write_text("a red circle")
    with pytest.raises(BilevelError, match="accepted anchor prompts"):
        ConceptAblation(ConceptAblationConfig(anchor_images=tmp_path)).prepare(ctx)
    with pytest.raises(BilevelError, match="image folder not found"):
        ConceptAblation(ConceptAblationConfig(anchor_images=tmp_path / "missing")).prepare(ctx)


# --------------------------------------------------------------------------------------------------- SalUn
def test_salun_loss_hand_computed() -> None:
    student = FakeUNet(1.0, identity=True)
    ctx = fake_ctx(student, FakeUNet(1.0))
    salun = SalUn(SalUnConfig(alpha=0.5, mask_samples=4))
    salun.prepare(ctx)
    value = salun.loss(ctx, salun.draw(ctx, 6, torch.Generator().manual_seed(1)))
    # forget: e(c_f) - sg e(c') = (eps + 2) - (eps + 0.5); retain: e(c_r) - eps = 0.3
    assert float(value.detach()) == pytest.approx((2.0 - 0.5) ** 2 + 0.5 * 0.3**2, rel=1e-6)
    alone = SalUn(SalUnConfig(alpha=0.0, mask_samples=4))
    alone.prepare(ctx)
    value = alone.loss(ctx, alone.draw(ctx, 6, torch.Generator().manual_seed(1)))
    assert float(value.detach()) == pytest.approx(1.5**2, rel=1e-6)


def test_saliency_mask_is_global_top_fraction() -> None:
    scores = {"a": torch.tensor([5.0, 0.1, 3.0]), "b": torch.tensor([[0.2, 4.0], [0.3, 2.0]])}
    mask = saliency_mask(scores, 0.5)  # 7 entries -> top 4 (5, 4, 3, 2), ranked across both tensors
    assert mask["a"].tolist() == [True, False, True]
    assert mask["b"].tolist() == [[False, True], [False, True]]
    assert sum(int(m.sum()) for m in saliency_mask(scores, 1.0).values()) == 7


def test_salun_mask_uses_guided_forgetting_gradient() -> None:
    student = FakeUNet(1.0, identity=True)
    ctx = fake_ctx(
        student, FakeUNet(1.0), concept_images=torch.zeros(2, 3, 2, 2), concept_image_prompts=["a purple circle"] * 2
    )
    salun = SalUn(SalUnConfig(mask_guidance=1.0, mask_samples=2, mask_batch_size=2))
    salun._load_sets(ctx)
    scores = salun.compute_scores(ctx, dict(student.named_parameters()))
    # pred = 2 e(c) - e(0) = eps + 2*2w - 0 -> L = -(4w)^2, dL/dw = -32 w = -32, |.| = 32 (one batch)
    assert float(scores["w"]) == pytest.approx(32.0)


def test_salun_masked_weights_stay_unchanged(pipe) -> None:
    ctx = tiny_ctx(pipe)
    salun = SalUn(SalUnConfig(mask_fraction=0.3, mask_samples=8, mask_batch_size=8))
    salun.prepare(ctx)
    assert salun.mask is not None
    kept = sum(int(m.sum()) for m in salun.mask.values())
    total = sum(m.numel() for m in salun.mask.values())
    assert kept == round(0.3 * total)
    before = snapshot(ctx.student)
    one_step(salun, ctx, salun.trainable_parameters(ctx.student), steps=4)
    moved_masked = moved_kept = 0
    for k, p in ctx.student.named_parameters():
        diff = p.detach() != before[k]
        moved_masked += int((diff & ~salun.mask[k]).sum())
        moved_kept += int((diff & salun.mask[k]).sum())
    assert moved_masked == 0 and moved_kept > 0
    # the guarantee needs a weight-decay-free optimiser (the runner's and unlearn_model's AdamW use 0.0)
    opt = torch.optim.AdamW(ctx.student.parameters(), lr=1e-2, weight_decay=0.1)
    salun.loss(ctx, salun.draw(ctx, 4, torch.Generator().manual_seed(9))).backward()
    salun.before_step(ctx.student)
    opt.step()
    assert any(bool((p.detach() != before[k])[~salun.mask[k]].any()) for k, p in ctx.student.named_parameters())


def test_salun_mask_saved_reused_and_restored(pipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = tiny_ctx(pipe, run_dir=tmp_path)
    cfg = SalUnConfig(mask_samples=8, mask_batch_size=8)
    first = SalUn(cfg)
    first.prepare(ctx)
    assert len(list(tmp_path.glob("salun_mask-*.safetensors"))) == 1
    state = first.state_dict()
    assert state and all(v.dtype == torch.bool for v in state.values())

    def no_scores(*args, **kwargs):
        raise AssertionError("the saved mask should be reused")

    monkeypatch.setattr(SalUn, "compute_scores", no_scores)
    second = SalUn(cfg)
    second.prepare(ctx)
    assert second.mask is not None and all(torch.equal(second.mask[k], first.mask[k]) for k in first.mask)
    restored = SalUn(cfg)
    restored.load_state_dict(state)
    restored.prepare(replace_run_dir(ctx, None))  # no file, no recomputation: the restored mask is kept
    assert all(torch.equal(restored.mask[k], first.mask[k]) for k in first.mask)
    with pytest.raises(AssertionError, match="reused"):  # another fraction -> recomputed
        SalUn(SalUnConfig(mask_fraction=0.2, mask_samples=8, mask_batch_size=8)).prepare(ctx)
    # another student (a two-stage arm's KD student in the same run folder) -> its own saliency, not the saved one
    with torch.no_grad():
        next(ctx.student.parameters()).add_(0.01)
    with pytest.raises(AssertionError, match="reused"):
        SalUn(cfg).prepare(ctx)


def test_salun_masks_of_two_students_are_kept_apart(pipe, tmp_path: Path) -> None:
    ctx = tiny_ctx(pipe, run_dir=tmp_path)
    cfg = SalUnConfig(mask_samples=8, mask_batch_size=8)
    first = SalUn(cfg)
    first.prepare(ctx)
    with torch.no_grad():
        for p in ctx.student.parameters():
            p.mul_(-1.5)  # another model state: its saliency ranks weights differently
    second = SalUn(cfg)
    second.prepare(ctx)
    assert len(list(tmp_path.glob("salun_mask-*.safetensors"))) == 2
    assert any(not torch.equal(first.mask[k], second.mask[k]) for k in first.mask)


def replace_run_dir(ctx: UnlearnContext, run_dir: Path | None) -> UnlearnContext:
    import dataclasses

    return dataclasses.replace(ctx, run_dir=run_dir)


def test_salun_relabel_prompts() -> None:
    forget = ["a purple circle", "a pink square"]
    salun = SalUn(SalUnConfig())
    assert salun.relabelled(forget, ["purple", "pink"], forget) == {
        "a purple circle": "a yellow circle",
        "a pink square": "a green square",
    }
    word = SalUn(SalUnConfig(relabel="blue"))
    assert word.relabelled(forget, ["purple", "pink"], forget) == {
        "a purple circle": "a blue circle",
        "a pink square": "a blue square",
    }
    explicit = SalUn(SalUnConfig(relabel=["a red circle", "a red square"]))
    assert explicit.relabelled(forget, ["purple", "pink"], forget)["a pink square"] == "a red square"
    with pytest.raises(BilevelError, match="no entry in relabel.prompts"):
        explicit.relabelled(["a purple triangle"], ["purple"], forget)
    rnd = SalUn(SalUnConfig(relabel="random"))
    assert rnd.relabelled(forget, ["purple", "pink"], forget) == {}
    rnd._concepts = ["purple", "pink"]
    out = rnd.relabel_batch(["a purple circle"] * 64, torch.Generator().manual_seed(0))
    colours = {p.split()[1] for p in out}
    assert all(p.endswith(" circle") for p in out) and len(colours) > 2 and not colours & {"purple", "pink"}
    with pytest.raises(ValueError, match="single word"):
        SalUnConfig(relabel="")


# --------------------------------------------------------------------------------------------------- registry, command
def test_unlearners_registered() -> None:
    from bilevel.registry import get_registry

    reg = get_registry()
    assert {"esd", "concept-ablation", "salun"} <= set(reg.names("unlearner"))
    with pytest.raises(BilevelError, match="options"):
        reg.create("unlearner", "salun", {"mask_fraction": 0})


def test_unlearn_model_end_to_end(tmp_path: Path) -> None:
    from bilevel.commands.unlearn import unlearn_model
    from bilevel.compression.student_io import load_student

    src = tmp_path / "pipe"
    build_tiny_pipeline(0).save_pretrained(str(src), safe_serialization=True)
    kw = {"batch_size": 4, "finetune_size": 16, "concept_size": 8, "evaluate": False}
    out = tmp_path / "erased"
    res = unlearn_model(
        str(src),
        "concept-ablation",
        {"num_anchor_images": 4, "anchor_steps": 2},
        ["purple", "pink"],
        2,
        1e-3,
        out,
        **kw,
    )
    assert len(res.history) == 2 and (out / ANCHOR_CACHE).is_file()
    student, manifest = load_student(out)
    assert manifest["unlearned"][-1]["concepts"] == ["purple", "pink"] and manifest["feature_pairs"] == []
    original = build_tiny_pipeline(0).unet
    moved = {k for k, v in student.named_parameters() if not torch.equal(v, dict(original.named_parameters())[k])}
    assert moved and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in moved)
    # a student folder is erased further, paired with a pipeline's text encoder and scheduler
    again = unlearn_model(
        str(out), "salun", {"mask_samples": 8}, ["purple"], 1, 1e-3, tmp_path / "again", pipeline=str(src), **kw
    )
    assert [u["unlearner"] for u in load_student(again.out_dir)[1]["unlearned"]] == ["concept-ablation", "salun"]
    with pytest.raises(BilevelError, match="is the input model"):
        unlearn_model(str(out), "salun", {}, ["purple"], 1, 1e-3, out, pipeline=str(src), **kw)
    with pytest.raises(BilevelError, match="unknown concept"):
        unlearn_model(str(src), "salun", {}, ["mauve"], 1, 1e-3, tmp_path / "x", **kw)


def test_context_gives_token_level_methods_the_teachers_tokenizer(pipe) -> None:
    from bilevel.optim.problem import unlearn_context
    from bilevel.worlds.tiny.world import TinyWorld

    world = TinyWorld.build(pipe, ["purple"], 16, 8, seed=0)
    ctx = unlearn_context(copy.deepcopy(pipe.unet), pipe.unet, world, None, seed=0)
    ids = ctx.tokenizer(["a purple circle"])["input_ids"][0]
    assert ctx.tokenizer.convert_ids_to_tokens(ids).count("purple") == 1  # the concept is one known token
    assert ctx.tokenizer.unk_token_id not in ids


# --------------------------------------------------------------------------------------------------- draw / loss
SMALL = {
    "esd-sample": lambda: ESD(ESDConfig(pool_size=4, sample_steps=2)),
    "esd-data-retain": lambda: ESD(ESDConfig(xt_source="data", retain_weight=1.0)),
    "ca-frozen-retain": lambda: ConceptAblation(
        ConceptAblationConfig(num_anchor_images=4, anchor_steps=2, target_model="frozen", retain_weight=1.0)
    ),
    "ca-student-no-prior": lambda: ConceptAblation(
        ConceptAblationConfig(num_anchor_images=4, anchor_steps=2, prior_weight=0.0)
    ),
    "salun-random-frozen": lambda: SalUn(
        SalUnConfig(mask_samples=4, mask_batch_size=4, forget_source="data", relabel="random", target_model="frozen")
    ),
    "salun-student": lambda: SalUn(SalUnConfig(mask_samples=4, mask_batch_size=4, forget_source="data")),
}


@pytest.mark.parametrize("make", list(SMALL.values()), ids=list(SMALL))
def test_upper_loss_is_a_function_of_one_drawn_batch(make, pipe) -> None:
    """Solvers re-evaluate one upper batch: loss(batch) draws nothing, so the same batch gives the same value."""
    ctx = tiny_ctx(pipe)
    unlearner = make()
    unlearner.prepare(ctx)
    batch = unlearner.draw(ctx, 4, torch.Generator().manual_seed(5))
    first = unlearner.loss(ctx, batch)
    assert torch.equal(unlearner.loss(ctx, batch), first)
    assert torch.equal(unlearner.loss(ctx, unlearner.draw(ctx, 4, torch.Generator().manual_seed(5))), first)
    assert not torch.equal(unlearner.loss(ctx, unlearner.draw(ctx, 4, torch.Generator().manual_seed(6))), first)


@pytest.mark.parametrize("cls", [ESD, ConceptAblation, SalUn])
def test_using_an_unlearner_before_prepare_is_one_clear_error(cls, pipe) -> None:
    ctx = tiny_ctx(pipe)
    unlearner = cls()
    calls = {
        "draw": lambda: unlearner.draw(ctx, 2, torch.Generator().manual_seed(0)),
        "loss": lambda: unlearner.loss(ctx, None),
        "before_step": lambda: unlearner.before_step(ctx.student),
    }
    for what, call in calls.items():
        if what not in vars(cls):  # the base class's no-op before_step needs nothing prepared
            continue
        with pytest.raises(RuntimeError, match=rf"unlearner '{cls.name}': prepare\(ctx\) must run before {what}\(\)"):
            call()


def test_an_unlearner_without_prepare_needs_none() -> None:
    from bilevel.core.interfaces import Unlearner

    class Plain(Unlearner):
        name = "plain"
        api_version = 2

        def draw(self, ctx, batch_size, generator):
            return torch.randn(batch_size, generator=generator)

        def loss(self, ctx, batch):
            return batch.pow(2).mean()

    plain = Plain()
    batch = plain.draw(None, 3, torch.Generator().manual_seed(0))
    assert torch.equal(plain.loss(None, batch), batch.pow(2).mean())
