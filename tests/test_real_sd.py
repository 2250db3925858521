"""The real Stable Diffusion path on a tiny SD-format pipeline built offline (tests/sd_fixtures.py): loading,
latent data, epsilon and v-prediction, bf16 autocast and gradient checkpointing on CPU, evaluation, one-line errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from sd_fixtures import IMAGE_SIZE, build_tiny_clip, build_tiny_sd

from bilevel.cli import main

CAPTIONS = ["a photo of a dog", "a red house", "a tree in a field"]
CONCEPT = "van gogh style"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd")
    data = root / "data"
    data.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(6):  # not square, not the model's size: resize + centre crop must handle it
        arr = (torch.rand(IMAGE_SIZE + 4, IMAGE_SIZE + 8, 3, generator=gen) * 255).byte().numpy()
        Image.fromarray(arr).save(data / f"{i:03d}.png")
        (data / f"{i:03d}.txt").write_text(CAPTIONS[i % 3])
    jsonl = root / "jsonl"
    jsonl.mkdir()
    lines = []
    for i in range(4):
        arr = (torch.rand(IMAGE_SIZE, IMAGE_SIZE, 3, generator=gen) * 255).byte().numpy()
        Image.fromarray(arr).save(jsonl / f"img{i}.jpg")
        lines.append(json.dumps({"file_name": f"img{i}.jpg", "text": CAPTIONS[i % 3]}))
    (jsonl / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return {
        "root": root,
        "eps": build_tiny_sd(root / "sd-eps"),
        "v": build_tiny_sd(root / "sd-v", prediction_type="v_prediction"),
        "clip": build_tiny_clip(root / "clip"),
        "data": data,
        "jsonl": jsonl,
    }


def small_run(assets: dict[str, Path], model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "run", "--model", str(model), "--out", str(out), "--concept", CONCEPT, "--steps", "4",
        "--set", f"data.finetune_data={data}", "--set", f"evaluation.sd.clip_model={assets['clip']}",
        "--set", "evaluation.samples_per_prompt=2", "--set", "evaluation.steps=2", "--set", "evaluation.latency_repeats=1",
        "--set", "data.concept_size=4", "--set", "training.batch_size=2", "--set", "training.upper_batch_size=2",
        "--set", "training.log_every=1", *extra,
    ]  # fmt: skip


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def finite_history(metrics: dict, arm: str) -> list[dict]:
    history = metrics["histories"][arm]
    assert history, arm
    for entry in history:
        for key in ("lower_loss", "upper_loss"):
            if key in entry:
                assert math.isfinite(entry[key]), (arm, entry)
    return history


# ------------------------------------------------------------------------------------------------ v-prediction
def test_v_target_matches_closed_form_and_diffusers():
    from diffusers import DDIMScheduler

    from bilevel.toolkit import noised, task_target

    sched = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    )
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    t = torch.tensor([10, 500, 990])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = task_target(x0, eps, a, "v_prediction")
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    torch.testing.assert_close(v, sched.get_velocity(x0, eps, t))
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=1e-5)  # x0 back from v
    assert task_target(x0, eps, a, "epsilon") is eps
    with pytest.raises(ValueError, match="sample"):
        task_target(x0, eps, a, "sample")
    # the unlearners' noising returns the same target for a v-prediction schedule
    xt2, t2, target = noised(
        x0, sched.alphas_cumprod, torch.Generator().manual_seed(1), torch.device("cpu"), "v_prediction"
    )
    a2 = sched.alphas_cumprod[t2].view(-1, 1, 1, 1)
    eps2 = (xt2 - a2.sqrt() * x0) / (1 - a2).sqrt()
    torch.testing.assert_close(target, a2.sqrt() * eps2 - (1 - a2).sqrt() * x0, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ whole runs
def test_run_epsilon_bf16_checkpointing_caption_folder(assets, capsys):
    out = assets["root"] / "run-eps"
    code, err = run_cli(
        small_run(
            assets, assets["eps"], assets["data"], out, "--arms", "teacher,pruned,kd,bilevel",
            "--set", "model.mixed_precision=bf16", "--set", "model.gradient_checkpointing=true",
            "--set", f"evaluation.sd.reference_images={assets['data']}",
            "--set", "unlearner.options.pool_size=2", "--set", "unlearner.options.sample_steps=2",
        ),
        capsys,
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {r["model"]: r for r in metrics["rows"]}
    assert set(rows) == {"teacher", "pruned", "kd", "bilevel"}
    for row in rows.values():
        assert 0.0 <= row["concept_rate"] <= 1.0 and f"concept_rate/{CONCEPT}" in row
        assert math.isfinite(row["clip_score"]) and row["clip_score"] >= 0
        assert row["quality_metric"] == "fid" and math.isfinite(row["quality_distance"]) and row["quality_distance"] >= 0
        assert row["retained_accuracy"] is None and row["collateral"] is None  # no detector for the retain prompts
        assert "per_colour" not in row and set(row["per_group"]) == {CONCEPT}  # no tiny-world words on SD
    assert rows["pruned"]["params"] < rows["teacher"]["params"]
    finite_history(metrics, "kd")
    assert any("upper_loss" in e for e in finite_history(metrics, "bilevel"))
    for arm in ("teacher", "pruned", "kd", "bilevel", "concepts"):
        assert (out / "grids" / f"{arm}.png").is_file()
    for arm in ("pruned", "kd", "bilevel"):
        assert (out / "students" / arm / "model.safetensors").is_file()
    with Image.open(out / "grids" / "teacher.png") as grid:
        assert grid.height == 2 * (32 + 2)  # two groups (the concept, the retain prompts), 16 px upscaled to 32


def test_run_v_prediction_metadata_jsonl_concept_ablation(assets, capsys):
    out = assets["root"] / "run-v"
    code, err = run_cli(
        small_run(
            assets, assets["v"], assets["jsonl"], out, "--arms", "kd,bilevel", "--unlearner", "concept-ablation",
            "--set", "unlearner.options.anchor=drop", "--set", "unlearner.options.loss=noise",
            "--set", "unlearner.options.num_anchor_images=2", "--set", "unlearner.options.anchor_steps=2",
            "--set", "evaluation.curve_points=1", "--set", "evaluation.curve_samples=1",
        ),
        capsys,
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert {r["model"] for r in metrics["rows"]} == {"kd", "bilevel"}
    curve = [e for e in metrics["histories"]["bilevel"] if "eval_concept_rate" in e]  # mid-training evaluation
    assert len(curve) == 1 and 0.0 <= curve[0]["eval_concept_rate"] <= 1.0 and curve[0]["eval_clip_score"] >= 0
    finite_history(metrics, "kd")
    finite_history(metrics, "bilevel")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["trust_remote_code"] is False and saved["data"]["finetune_data"] == str(assets["jsonl"])


# ------------------------------------------------------------------------------------------------ the world
def sd_config(assets: dict[str, Path], model: Path, precision: str = "no", **data):
    from bilevel.core.config import build_config

    return build_config(
        {
            "model": {"source": str(model), "mixed_precision": precision, "gradient_checkpointing": True},
            "concepts": [CONCEPT],
            "data": {"finetune_data": str(assets["data"]), "concept_size": 2, **data},
            "evaluation": {"steps": 2, "sd": {"clip_model": str(assets["clip"])}},
            "training": {"batch_size": 2, "lower_lr": 3e-3, "warmup": 0},
        }
    )


def test_world_latents_prompts_and_overfit(assets):
    from sd_fixtures import LATENT_SIZE

    from bilevel.core.config import LossWeights
    from bilevel.optim.problem import build_problem
    from bilevel.worlds.resolve import build_world

    config = sd_config(assets, assets["v"], retain_prompts=["a red house"])
    world = build_world(config)
    assert world.sample_shape == (4, LATENT_SIZE, LATENT_SIZE) and world.prediction_type == "v_prediction"
    assert world.finetune.images.shape == (6, 4, LATENT_SIZE, LATENT_SIZE) and world.finetune.prompts[:3] == CAPTIONS
    assert all(CONCEPT in p for p in world.concept_prompts()) and world.retain_prompts() == ["a red house"]
    assert world.concept_data.images.shape == (2, 4, LATENT_SIZE, LATENT_SIZE)
    pixels = world.decode(world.finetune.images[:2])
    assert pixels.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and pixels.abs().max() <= 1

    student = world.teacher.__class__.from_config(world.teacher.config).train()
    student.load_state_dict(world.teacher.state_dict())
    problem = build_problem(student, world, config, LossWeights(task=1.0, output=0.0, feature=0.0), [], None)
    assert student.is_gradient_checkpointing
    batch = problem.lower.draw()  # one fixed batch: a trivial overfit case
    # the task target is v: x0 = sqrt(a) x_t - sqrt(1-a) v must give back fine-tuning latents
    a = world.alphas_cumprod[batch.t].view(-1, 1, 1, 1)
    x0 = a.sqrt() * batch.xt - (1 - a).sqrt() * batch.noise
    gap = (x0[:, None] - world.finetune.images[None]).flatten(2).abs().amax(-1).amin(-1)
    assert float(gap.max()) < 1e-4, gap
    losses = []
    for _ in range(15):
        loss = problem.lower.loss(batch)
        assert torch.isfinite(loss)
        problem.lower_optimizer.zero_grad()
        loss.backward()
        problem.lower_optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_bf16_autocast_reaches_the_teacher(assets):
    from bilevel.core.config import LossWeights
    from bilevel.optim.problem import build_problem
    from bilevel.worlds.resolve import build_world

    config = sd_config(assets, assets["eps"], precision="bf16")
    world = build_world(config)
    student = world.teacher.__class__.from_config(world.teacher.config)
    problem = build_problem(student, world, config, LossWeights(), [], None)
    batch = problem.lower.draw()
    assert batch.targets.eps.dtype == torch.bfloat16  # the teacher ran under bf16 autocast
    assert batch.noise.dtype == torch.float32 and problem.lower.loss(batch).dtype == torch.float32


# ------------------------------------------------------------------------------------------------ one-line errors
def broken_copy(assets, name: str, edit) -> Path:
    folder = assets["root"] / name
    if not folder.exists():
        shutil.copytree(assets["eps"], folder)
        edit(folder)
    return folder


def _set_index(folder: Path, **entries) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index.update(entries)
    (folder / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing-model", "not found"),
        ("empty-folder", "no model_index.json"),
        ("no-vae", "not a Stable Diffusion pipeline"),
        ("custom-code", "trust_remote_code"),
        ("corrupt-weights", "cannot load Stable Diffusion pipeline"),
        ("hub-not-cached", "not in the local Hugging Face cache"),
        ("missing-data", "fine-tuning folder not found"),
        ("empty-data", "no images in fine-tuning folder"),
        ("uncaptioned", "has no caption"),
        ("no-data-option", "needs fine-tuning data"),
        ("bad-resolution", "data.resolution 20"),
        ("tiny-with-sd-data", "applies to Stable Diffusion models"),
    ],
)
def test_bad_sd_input_is_one_line(case, fragment, assets, capsys):
    root = assets["root"]
    model, data, extra = assets["eps"], assets["data"], []
    if case == "missing-model":
        model = root / "nope"
    elif case == "empty-folder":
        model = root / "empty-model"
        model.mkdir(exist_ok=True)
    elif case == "no-vae":
        model = broken_copy(assets, "no-vae", lambda f: _set_index(f, vae=[None, None]))
    elif case == "custom-code":
        model = broken_copy(assets, "custom", lambda f: _set_index(f, unet=["my_unet", "MyUNet"]))
    elif case == "corrupt-weights":
        model = broken_copy(
            assets, "corrupt", lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
        )
    elif case == "hub-not-cached":
        model = "someone/not-a-cached-model"
    elif case == "missing-data":
        data = root / "no-data"
    elif case == "empty-data":
        data = root / "empty-data"
        data.mkdir(exist_ok=True)
    elif case == "uncaptioned":
        data = root / "uncaptioned"
        data.mkdir(exist_ok=True)
        shutil.copy(assets["data"] / "000.png", data / "000.png")
    elif case == "bad-resolution":
        extra = ["--set", "data.resolution=20"]
    out = root / f"err-{case}"
    args = small_run(assets, model, data, out, *extra)
    if case == "no-data-option":
        i = next(k for k, a in enumerate(args) if a.startswith("data.finetune_data="))
        del args[i - 1 : i + 1]  # the --set and its value
    if case == "tiny-with-sd-data":
        args = ["run", "--out", str(out), "--set", f"data.finetune_data={data}"]
    code, err = run_cli(args, capsys)
    assert code == 2, err
    assert fragment in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert not (out / "config.json").exists()


def test_saved_dataset_without_datasets_package_is_one_line(assets, capsys):
    pytest.importorskip("PIL")
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("datasets is installed; the missing-package message cannot be seen")
    folder = assets["root"] / "saved"
    folder.mkdir(exist_ok=True)
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text("{}")
    code, err = run_cli(small_run(assets, assets["eps"], folder, assets["root"] / "err-saved"), capsys)
    assert code == 2 and "datasets package is not installed" in err and err.count("\n") == 1, err


def test_precision_config_values():
    from bilevel.core.config import build_config
    from bilevel.core.errors import BilevelError

    assert build_config({"model": {"mixed_precision": False}}).model.mixed_precision == "no"  # YAML's bare `no`
    assert build_config({"model": {"mixed_precision": "bf16"}}).model.mixed_precision == "bf16"
    with pytest.raises(BilevelError, match="fp16 needs a CUDA device"):
        build_config({"model": {"mixed_precision": "fp16", "device": "cpu"}})
    with pytest.raises(BilevelError, match="model.mixed_precision"):
        build_config({"model": {"mixed_precision": "fp8"}})


def test_saved_dataset_records_through_the_real_datasets_package(assets, tmp_path):
    """The saved-dataset reader on folders written by the real `datasets` package (save_to_disk): a flat Dataset
    and a DatasetDict, named image/caption columns, a missing column as one line."""
    datasets = pytest.importorskip("datasets")
    from bilevel.core.errors import BilevelError
    from bilevel.worlds.stable_diffusion.data import iter_batches, list_records

    images = [Image.open(p).convert("RGB") for p in sorted(assets["data"].glob("*.png"))]
    features = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")})
    flat = datasets.Dataset.from_dict({"img": images, "caption": CAPTIONS * 2}, features=features)
    flat.save_to_disk(str(tmp_path / "flat"))
    only_images = datasets.Dataset.from_dict({"img": images}, features=datasets.Features({"img": datasets.Image()}))
    datasets.DatasetDict(train=only_images).save_to_disk(str(tmp_path / "dict"))
    records = list_records(tmp_path / "flat", what="fine-tuning", limit=4, captions_required=True,
                           image_column="img", caption_column="caption")  # fmt: skip
    assert [r.caption for r in records] == (CAPTIONS * 2)[:4]
    batch = next(iter_batches(records, IMAGE_SIZE))
    assert batch.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and -1 <= batch.min() and batch.max() <= 1
    concept = list_records(tmp_path / "dict", what="concept", limit=10, captions_required=False, image_column="img")
    assert len(concept) == 6 and all(r.caption is None for r in concept)
    with pytest.raises(BilevelError, match="no column 'caption'"):
        list_records(tmp_path / "dict", what="fine-tuning", limit=4, captions_required=True,
                     image_column="img", caption_column="caption")  # fmt: skip


# ------------------------------------------------------------------------------------------------ attacks on SD
def test_every_attack_runs_on_the_sd_pipeline_through_the_command(assets, capsys):
    """`bilevel attack` on a Stable Diffusion folder: the paraphrase attack reads a prompt file (none is shipped),
    inversion and few-shot relearning learn from the world's concept images, benign relearning fine-tunes on the
    captions; CLIP zero-shot detection scores every rate, each with its interval."""
    prompts = assets["root"] / "ring-a-bell.txt"
    prompts.write_text("a painting in the manner of vincent\nswirling starry brushwork\n")
    out = assets["root"] / "attacks"
    code, err = run_cli(
        [
            "attack", str(assets["eps"]), "--concept", CONCEPT, "--attack", "paraphrase,inversion,relearn-benign,relearn-fewshot",
            "--out", str(out),
            "--set", f"data.finetune_data={assets['data']}", "--set", f"evaluation.sd.clip_model={assets['clip']}",
            "--set", "data.concept_size=4", "--set", "samples=2", "--set", "sampler_steps=2",
            "--set", f"paraphrase.prompts={prompts}", "--set", "inversion.steps=2", "--set", "inversion.k=2",
            "--set", "relearn-benign.steps=2", "--set", "relearn-benign.curve_points=1", "--set", "relearn-benign.batch_size=2",
            "--set", "relearn-fewshot.steps=2", "--set", "relearn-fewshot.every=1", "--set", "relearn-fewshot.k=2",
            "--set", "relearn-fewshot.batch_size=2",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    results = {r["attack"]: r for r in json.loads((out / "attacks.json").read_text())["results"]}
    assert {"paraphrase", "inversion", "relearn-benign", "relearn-fewshot"} <= set(results)
    for r in results.values():
        low, high = r["interval"]
        assert 0.0 <= low <= r["concept_rate"] <= high <= 1.0 and r["samples"] > 0
    assert results["paraphrase"]["used"]  # the prompt file's prompts, recorded
    assert [p["step"] for p in results["relearn-benign"]["curve"]][-1] == 2
    assert (out / "relearning.png").is_file()
