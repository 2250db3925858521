"""The World protocol and the world plugin kind: a third-party world registered by entry point runs every command;
prune, unlearn, eval and export on the SD-format mini pipeline; exported pipelines load with stock diffusers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from sd_fixtures import IMAGE_SIZE, build_tiny_clip, build_tiny_sd, write_random_pngs

from bilevel.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONCEPT = "van gogh"

# A third-party world, as a package would ship it: its own data (full-frame colour fields), its own teacher (the
# tiny architecture, freshly initialised) and its own evaluator (mean colour -> nearest palette entry).
SOLID_WORLD = '''
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

import bilevel
from bilevel.diffusion.conditioning import PromptBank
from bilevel.diffusion.sampling import sample_images
from bilevel.core.world import EvalOutput, Evaluation, WorldPlugin
from bilevel.registry import hookimpl

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "purple": (0.2, -1.0, 0.8)}


@dataclass
class Fields:
    images: torch.Tensor
    prompts: list

    def __len__(self):
        return len(self.prompts)


def fields(colours, n, seed):
    gen = torch.Generator().manual_seed(seed)
    picks = [colours[i] for i in torch.randint(len(colours), (n,), generator=gen).tolist()]
    images = torch.stack([torch.tensor(COLOURS[c]).view(3, 1, 1).expand(3, 8, 8) for c in picks])
    return Fields(images.clone(), [f"a {c} square" for c in picks])


@dataclass
class SolidWorld:
    pipe: Any
    concepts: list
    bank: Any
    finetune: Any
    concept_data: Any
    device: torch.device
    name: str = "solid"
    clamp_samples: bool = True
    quality_metric: str = "l2"

    teacher = property(lambda self: self.pipe.unet)
    tokenizer = property(lambda self: self.pipe.tokenizer)
    scheduler_config = property(lambda self: dict(self.pipe.scheduler.config))
    alphas_cumprod = property(lambda self: self.pipe.scheduler.alphas_cumprod.float())
    sample_shape = property(lambda self: (3, 8, 8))
    image_shape = property(lambda self: (3, 8, 8))

    def encode_images(self, pixels):
        return pixels

    def concept_prompts(self, concept=None):
        return [f"a {c} square" for c in ([concept] if concept else self.concepts)]

    def retain_prompts(self):
        return [f"a {c} square" for c in COLOURS if c not in self.concepts]

    def pipeline_parts(self):
        return {"text_encoder": self.pipe.text_encoder, "tokenizer": self.pipe.tokenizer}

    def evaluate(self, unet, settings):
        names = list(COLOURS)
        n = settings.samples_per_prompt
        prompts = [f"a {c} square" for c in names for _ in range(n)]
        images = sample_images(unet, self.scheduler_config, self.bank(prompts), self.bank.empty(1),
                               steps=settings.steps, guidance=settings.guidance_or(2.0),
                               generator=torch.Generator().manual_seed(settings.seed), channels=3, size=8)
        palette = torch.tensor([COLOURS[c] for c in names])
        nearest = torch.cdist(images.mean(dim=(2, 3)), palette).argmin(dim=1)
        per = {c: float((nearest[i * n:(i + 1) * n] == i).float().mean()) for i, c in enumerate(names)}
        retain = [c for c in names if c not in self.concepts]
        ev = Evaluation(
            concept_rate=sum(per[c] for c in self.concepts) / len(self.concepts),
            concept_rates={c: per[c] for c in self.concepts},
            retained_accuracy=sum(per[c] for c in retain) / len(retain),
            quality_distance=float((images.mean(dim=(2, 3)) - palette[nearest]).norm(dim=1).mean()),
            quality_metric="l2", per_group=per, samples=n)
        return EvalOutput(ev, {c: images[i * n:(i + 1) * n] for i, c in enumerate(names)})


class SolidWorldPlugin(WorldPlugin):
    name: ClassVar[str] = "solid"
    description: ClassVar[str] = "full-frame colour fields (a test world)"
    api_version = bilevel.PLUGIN_API_VERSION
    priority: ClassVar[int] = 20

    def accepts(self, source):
        return source == "solid"

    def check(self, config, purpose):
        from bilevel.core.errors import BilevelError

        unknown = [c for c in config.concepts if c not in COLOURS]
        if unknown:
            raise BilevelError(f"unknown colour {unknown[0]!r} for the solid world; accepted: {', '.join(COLOURS)}")

    def build(self, config, purpose):
        from bilevel.worlds.tiny.architecture import build_tiny_pipeline

        pipe = build_tiny_pipeline(3)
        pipe.unet.eval().requires_grad_(False)
        pipe.text_encoder.eval().requires_grad_(False)
        keep = [c for c in COLOURS if c not in config.concepts]
        return SolidWorld(pipe, list(config.concepts), PromptBank(pipe.encode_prompts), fields(keep, 32, 0),
                          fields(list(config.concepts), 8, 1), torch.device("cpu"))


class EvalOnlyWorld(SolidWorldPlugin):
    name: ClassVar[str] = "solid-eval-only"
    api_version = bilevel.PLUGIN_API_VERSION
    serves: ClassVar[frozenset] = frozenset({"eval"})

    def accepts(self, source):
        return False


class BrokenWorld(SolidWorldPlugin):
    name: ClassVar[str] = "solid-broken"
    api_version = bilevel.PLUGIN_API_VERSION

    def accepts(self, source):
        return False

    def build(self, config, purpose):
        return object()


@hookimpl
def register_worlds(register):
    register(SolidWorldPlugin)
    register(EvalOnlyWorld)
    register(BrokenWorld)
'''

FAST_PRUNE = ["--set", "evaluation.latency_repeats=1"]
SMALL_EVAL = ["--set", "evaluation.samples_per_prompt=2", "--set", "evaluation.steps=2", "--set",
              "evaluation.latency_repeats=1"]  # fmt: skip


@pytest.fixture()
def solid_world(tmp_path, monkeypatch):
    """The solid world installed as a distribution with a `bilevel` entry point (a .dist-info on sys.path)."""
    from bilevel.registry import manager

    site = tmp_path / "site"
    site.mkdir()
    (site / "solid_world.py").write_text(textwrap.dedent(SOLID_WORLD))
    info = site / "solid_world-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: solid-world\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[bilevel]\nsolid = solid_world\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(manager, "_REGISTRY", None)
    monkeypatch.setenv("BILEVEL_STRICT_PLUGINS", "1")
    yield site
    sys.modules.pop("solid_world", None)


def test_third_party_world_by_entry_point_runs_every_command(solid_world, tmp_path, capsys):
    from bilevel.registry import get_registry

    info = get_registry().get("world", "solid")
    assert info.source == "solid-world" and info.version == "0.1"
    out = tmp_path / "run"
    code = main(["run", "--model", "solid", "--concept", "purple", "--steps", "2", "--out", str(out),
                 "--arms", "teacher,kd,bilevel", "--set", "training.batch_size=4", "--set", "training.upper_batch_size=2",
                 "--set", "unlearner.options.pool_size=2", "--set", "unlearner.options.sample_steps=2", *SMALL_EVAL])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = {r["model"]: r for r in json.loads((out / "metrics.json").read_text())["rows"]}
    assert set(rows) == {"teacher", "kd", "bilevel"}
    for row in rows.values():  # the world's own evaluator, under the common keys
        assert row["quality_metric"] == "l2" and set(row["per_group"]) == {"red", "green", "blue", "purple"}
        assert 0 <= row["concept_rate/purple"] <= 1 and 0 <= row["retained_accuracy"] <= 1
    manifest = json.loads((out / "students" / "kd" / "manifest.json").read_text())
    assert manifest["world"] == "solid" and manifest["teacher"] == "solid"

    assert main(["eval", "solid", "--concept", "purple", "--out", str(tmp_path / "ev"), *SMALL_EVAL]) == 0
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["world"] == "solid"
    assert main(["eval", str(out / "students" / "bilevel"), "--concept", "purple", *SMALL_EVAL]) == 0  # via manifest
    assert main(["prune", "--model", "solid", "--pruner", "bk-sdm", "--out", str(tmp_path / "st"), *FAST_PRUNE]) == 0
    assert json.loads((tmp_path / "st" / "prune_report.json").read_text())["world"] == "solid"
    capsys.readouterr()

    # a world that serves only eval, and one that breaks the protocol: one line each
    code = main(["prune", "--model", "solid", "--world", "solid-eval-only", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "world 'solid-eval-only' cannot serve `bilevel prune`; it serves: eval" in err, err
    assert err.count("\n") == 1
    code = main(["eval", "solid", "--world", "solid-broken", *SMALL_EVAL])
    err = capsys.readouterr().err
    assert code == 2 and "lacks" in err and "concept_prompts" in err and err.count("\n") == 1, err
    code = main(["eval", "solid", "--concept", "mauve"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown colour 'mauve' for the solid world" in err and err.count("\n") == 1, err


def test_unknown_world_and_unserved_source_are_one_line(tmp_path, capsys):
    code = main(["eval", "tiny", "--world", "tiyn"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown world 'tiyn'" in err and "did you mean 'tiny'" in err, err
    folder = tmp_path / "empty"
    folder.mkdir()
    code = main(["eval", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "neither a pipeline folder" in err and err.count("\n") == 1, err
    code = main(["eval", "owner-without-slash"])
    err = capsys.readouterr().err
    assert code == 2 and "no world serves model 'owner-without-slash'" in err, err


# ------------------------------------------------------------------------------------------------ SD-format commands
@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdw")
    data = root / "data"
    data.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(4):
        arr = (torch.rand(IMAGE_SIZE, IMAGE_SIZE, 3, generator=gen) * 255).byte().numpy()
        Image.fromarray(arr).save(data / f"{i:03d}.png")
        (data / f"{i:03d}.txt").write_text(["a photo of a dog", "a red house"][i % 2])
    return {"root": root, "model": build_tiny_sd(root / "sd"), "clip": build_tiny_clip(root / "clip"), "data": data}


def sd_eval_sets(sd: dict[str, Path]) -> list[str]:
    return ["--set", f"evaluation.sd.clip_model={sd['clip']}", *SMALL_EVAL]


def stock_load(folder: Path, *kwargs: str) -> dict:
    """Load a pipeline folder with stock diffusers in a fresh interpreter that never imports bilevel."""
    code = textwrap.dedent(f"""
        import json, sys, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}{''.join(', ' + k for k in kwargs)})
        print(json.dumps({{"cls": type(pipe).__name__, "params": sum(p.numel() for p in pipe.unet.parameters()),
                          "bilevel": sorted(m for m in sys.modules if m.split('.')[0] == 'bilevel')}}))
    """)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=folder.parent, env=env,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_prune_eval_unlearn_export_on_a_stable_diffusion_folder(sd, capsys):
    from bilevel import load_pipeline
    from bilevel.compression.student_io import load_student

    root = sd["root"]
    student = root / "bk"
    assert main(["prune", "--model", str(sd["model"]), "--pruner", "bk-sdm", "--out", str(student), *FAST_PRUNE]) == 0
    report = json.loads((student / "prune_report.json").read_text())
    assert report["world"] == "stable-diffusion" and report["ratios"]["params"] < 1

    code = main(["eval", str(student), "--concept", CONCEPT, "--out", str(root / "ev"), *sd_eval_sets(sd)])
    assert code == 0, capsys.readouterr().err
    ev = json.loads((root / "ev" / "report.json").read_text())
    assert ev["world"] == "stable-diffusion" and ev["pipeline"] == str(sd["model"].resolve())
    assert 0 <= ev[f"concept_rate/{CONCEPT}"] <= 1 and ev["clip_score"] >= 0 and "per_colour" not in ev
    assert ev["retained_accuracy"] is None and set(ev["per_group"]) == {CONCEPT}

    erased = root / "erased"
    code = main(["unlearn", str(student), "--concept", CONCEPT, "--unlearner", "esd", "--steps", "2",
                 "--batch-size", "2", "--set", "pool_size=2", "--set", "sample_steps=2", "--set", "data.concept_size=2",
                 "--set", f"data.finetune_data={sd['data']}", "--out", str(erased), *sd_eval_sets(sd)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    result = json.loads((erased / "unlearn.json").read_text())
    assert result["world"] == "stable-diffusion" and result["options"]["retain_weight"] == 5.0  # recommended kept
    assert result["options"]["pool_size"] == 2

    exported = root / "exported"
    assert main(["export", str(erased), "--out", str(exported)]) == 0
    assert "stock diffusers pipeline" in capsys.readouterr().out
    loaded = stock_load(exported)
    assert loaded["bilevel"] == [] and loaded["cls"] == "StableDiffusionPipeline"
    unet, _ = load_student(erased)
    assert loaded["params"] == sum(p.numel() for p in unet.parameters())
    pipe = load_pipeline(exported)  # the same weights through bilevel's loader: identical outputs
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    c = torch.randn(1, 16, 32)
    torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=c).sample,
                               unet(x, t, encoder_hidden_states=c).sample, rtol=0, atol=0)  # fmt: skip

    # an exported pipeline is itself a model every command accepts
    assert main(["eval", str(exported), "--concept", CONCEPT, *sd_eval_sets(sd)]) == 0


@pytest.mark.slow  # 35 s: SD-format export of a channel-pruned student: the separate CI step
def test_channel_pruned_sd_export_loads_with_bilevel_load_pipeline(sd, capsys):
    from bilevel import load_pipeline
    from bilevel.compression.student_io import load_student

    root = sd["root"]
    student = root / "mag"
    assert main(["prune", "--model", str(sd["model"]), "--pruner", "magnitude", "--out", str(student), *FAST_PRUNE]) == 0
    exported = root / "mag-exported"
    assert main(["export", str(student), "--out", str(exported)]) == 0
    out = capsys.readouterr().out
    assert "channel-pruned student" in out and "bilevel.load_pipeline" in " ".join(out.split())
    assert not (exported / "unet" / "config.json").exists()  # stock loaders fail loudly, not with a wrong model
    pipe = load_pipeline(exported)
    unet, _ = load_student(student)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 16, 32)
    torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=c).sample,
                               unet(x, t, encoder_hidden_states=c).sample, rtol=0, atol=0)  # fmt: skip
    assert main(["eval", str(exported), "--concept", CONCEPT, *sd_eval_sets(sd)]) == 0


def test_diff_pruning_on_sd_without_data_and_an_unknown_word_are_one_line(sd, capsys, tmp_path):
    code = main(["prune", "--model", str(sd["model"]), "--pruner", "diff-pruning", "--out", str(tmp_path / "dp")])
    err = capsys.readouterr().err
    assert code == 2 and "needs calibration data" in err and err.count("\n") == 1, err
    code = main(["prune", "--model", str(sd["model"]), "--pruner", "diff-pruning", "--out", str(tmp_path / "dp"),
                 "--set", f"data.finetune_data={sd['data']}", "--set", "ratio=0.3", *FAST_PRUNE])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    code = main(["eval", str(sd["model"]), "--concept", "café", *sd_eval_sets(sd)])
    err = capsys.readouterr().err
    assert code == 2 and "does not know the word 'café'" in err and "known words:" in err, err
    assert err.count("\n") == 1


def test_tiny_export_loads_with_stock_diffusers_and_no_bilevel(tmp_path, capsys):
    student = tmp_path / "bk"
    assert main(["prune", "--pruner", "bk-sdm", "--out", str(student), *FAST_PRUNE]) == 0
    exported = tmp_path / "exported"
    assert main(["export", str(student), "--out", str(exported)]) == 0
    capsys.readouterr()
    loaded = stock_load(exported, f"custom_pipeline={str(exported)!r}", "trust_remote_code=True")
    assert loaded["bilevel"] == [] and loaded["cls"] == "TinyTextToImagePipeline"
    assert loaded["params"] == json.loads((student / "prune_report.json").read_text())["student_stats"]["params"]
    # the pipeline class shipped in the folder samples exactly like bilevel's evaluator (same DDIM, guidance, noise)
    from bilevel import load_pipeline
    from bilevel.toolkit import sample_images

    pipe = load_pipeline(exported)
    images = pipe(["a purple circle"], num_inference_steps=5, generator=torch.Generator().manual_seed(0))
    cond, uncond = pipe.encode_prompts(["a purple circle"]), pipe.encode_prompts([""])
    same = sample_images(pipe.unet, dict(pipe.scheduler.config), cond, uncond, steps=5, guidance=1.0,
                         generator=torch.Generator().manual_seed(0), channels=3, size=8)  # fmt: skip
    torch.testing.assert_close(images, same)
    code = main(["export", str(student), "--out", str(exported)])
    assert code == 2 and "not empty" in capsys.readouterr().err


def test_concept_ablation_anchor_folder_is_vae_encoded_on_stable_diffusion(sd, tmp_path, capsys):
    """A PNG folder of anchor images (pixels) becomes latents through the world's VAE, as every SD image does."""
    from bilevel.core.interfaces import UnlearnContext
    from bilevel.plugins.unlearners.concept_ablation import ConceptAblation, ConceptAblationConfig

    anchors = tmp_path / "anchors"
    write_random_pngs(anchors, 3, seed=1)
    out = tmp_path / "erased"
    code = main(["unlearn", str(sd["model"]), "--concept", CONCEPT, "--unlearner", "concept-ablation", "--steps", "1",
                 "--batch-size", "2", "--set", f"anchor_images={anchors}", "--set", "anchor=drop",
                 "--set", "retain_weight=0", "--out", str(out), *sd_eval_sets(sd)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "unlearn.json").read_text())["options"]["anchor_images"] == str(anchors)
    seen: dict[str, torch.Tensor] = {}

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        seen["pixels"] = pixels
        return torch.zeros(len(pixels), 4, 8, 8)

    unlearner = ConceptAblation(ConceptAblationConfig(anchor_images=anchors, anchor="drop", retain_weight=0))
    ctx = UnlearnContext(
        student=torch.nn.Linear(1, 1), teacher=torch.nn.Linear(1, 1), concepts=[CONCEPT], concept_prompts=[CONCEPT],
        retain_prompts=[], encode=lambda p: torch.zeros(len(p), 16, 32), concept_images=None, concept_image_prompts=None,
        retain_images=None, retain_image_prompts=None, alphas_cumprod=torch.linspace(0.99, 0.01, 1000),
        scheduler_config={}, sample_shape=(4, 8, 8), run_dir=None, device=torch.device("cpu"),
        encode_images=encode, image_shape=(3, IMAGE_SIZE, IMAGE_SIZE),
    )  # fmt: skip
    unlearner.prepare(ctx)
    assert seen["pixels"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)  # read at the pixel size, then encoded
    assert unlearner.state_dict()["anchor_images"].shape == (3, 4, 8, 8)  # what training uses: latents
