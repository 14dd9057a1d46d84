"""The built-in default model as a user meets it: shipped in the repository, used when no model is given,
composing the shipped example references into an image the ShapeCompose checker scores as correct;
the model-folder defaults (uniref.json) it relies on; the evaluation and checker CLIs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from training.tasks.shapecompose import EDIT_KINDS, render_target, score
from uniref_core.defaults import BUILTIN_MODELS, SHIPPED_MODEL_DIR
from uniref_core.model import DEFAULT_KEYS, read_defaults

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
SPEC = json.loads((ASSETS / "example_spec.json").read_text())
REFS = [ASSETS / n for n in ("ref_red_circle.png", "ref_blue_triangle.png", "ref_background.png")]
EDIT_SPEC = json.loads((ASSETS / "edit_spec.json").read_text())


def run(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "UNIREF_DEFAULT_MODEL"}
    env.update(PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


def test_shipped_model_is_small_safetensors_with_its_defaults():
    folder = ROOT / SHIPPED_MODEL_DIR
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 50 * 2**20
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    defaults = read_defaults(folder)
    assert set(defaults) | {"by_references"} == set(DEFAULT_KEYS)  # every setting; sizes per K optional
    assert defaults["output_area"] == 128 * 128 and defaults["cfg"] == 1.0


def test_example_spec_describes_the_main_command():
    """The spec main.sh's output is scored against: its rendered ground truth scores 1, and it is where
    main.sh takes its prompt from."""
    assert score(render_target(SPEC), SPEC).overall >= 0.95
    assert "assets/example_spec.json" in (ROOT / "scripts" / "main.sh").read_text()


def test_cli_without_a_model_composes_the_example_references(tmp_path):
    out = tmp_path / "out.png"
    r = run(
        "-m",
        "uniref_core",
        "edit",
        *sum((["--ref", p] for p in REFS), []),
        "--prompt",
        SPEC["instruction"],
        "--width",
        "128",
        "--height",
        "128",
        "--seed",
        "0",
        "--quiet",
        "-o",
        out,
    )
    assert r.returncode == 0, r.stderr
    assert "uniref-default" in r.stdout  # the summary names the model it used
    image = Image.open(out)
    assert image.size == (128, 128)
    s = score(image, SPEC)
    # Each object from its own reference, in its slot, on the background of Picture 3.
    assert min(s.per_reference) >= 0.7, s
    assert s.instruction >= 0.7, s


def test_edit_template_picture_and_instruction_have_a_spec():
    """The single-edit template (workflows/uniref_single_edit.json) loads the shipped scene as Picture 1 and asks for
    the edit assets/edit_spec.json describes (its ground truth scores 1, the unedited scene 0)."""
    workflow = json.loads((ROOT / "workflows" / "uniref_single_edit.json").read_text())
    widgets = [n["widgets_values"] for n in workflow["nodes"]]
    assert ["uniref_edit_scene.png", "image"] in widgets  # assets/edit_scene.png, copied into input/ with uniref_
    assert any(w and w[0] == EDIT_SPEC["instruction"] for w in widgets)
    assert score(render_target(EDIT_SPEC), EDIT_SPEC).overall >= 0.95
    assert score(Image.open(ASSETS / "edit_scene.png"), EDIT_SPEC).per_reference == [0.0]


@pytest.mark.xfail(
    strict=True,
    reason="the shipped model is not trained on edits (issue 35: at 128² even its VAE "
    "caps most edit kinds below 0.7); strict: this fails as soon as the shipped model edits",
)
def test_edit_template_inputs_are_edited_as_asked_at_seeds_0_to_3(tmp_path):
    """The single-edit template's Picture 1 and instruction through the CLI at the template's settings: the red
    circle comes out blue, the triangle and the background are kept."""
    for seed in range(4):
        out = tmp_path / f"edit{seed}.png"
        r = run(
            "-m",
            "uniref_core",
            "edit",
            "--ref",
            ASSETS / "edit_scene.png",
            "--prompt",
            EDIT_SPEC["instruction"],
            "--width",
            "128",
            "--height",
            "128",
            "--seed",
            seed,
            "--quiet",
            "-o",
            out,
        )
        assert r.returncode == 0, r.stderr
        s = score(Image.open(out), EDIT_SPEC)
        assert s.per_reference[0] >= 0.7 and s.instruction >= 0.7, (seed, s)


def test_the_sft_model_ships_beside_the_default_and_loads_by_name(tmp_path):
    """The default is the SFT model trained further with MSGRPO; the SFT model ships too, as a model of its
    own the CLI loads by name, and composes the example as well (a different image: other weights)."""
    import numpy as np

    from training.common.checkpoint import model_fingerprint

    sft = BUILTIN_MODELS["uniref-default-sft"]
    trained = json.loads((SHIPPED_MODEL_DIR / "uniref_training.json").read_text())
    assert trained["base_model_fingerprint"] == model_fingerprint(sft)  # exported from a run that started there
    assert model_fingerprint(sft) != model_fingerprint(SHIPPED_MODEL_DIR)
    for part in ("vae", "text_encoder", "tokenizer", "processor", "scheduler"):  # only the transformer was trained
        for f in (SHIPPED_MODEL_DIR / part).iterdir():
            assert f.read_bytes() == (sft / part / f.name).read_bytes(), f
    assert [json.loads((m / "uniref.json").read_text())["name"] for m in (SHIPPED_MODEL_DIR, sft)] == [
        "uniref-default",
        "uniref-default-sft",
    ]
    images = {}
    for name in ("uniref-default", "uniref-default-sft"):
        out = tmp_path / f"{name}.png"
        r = run(
            "-m",
            "uniref_core",
            "edit",
            *sum((["--ref", p] for p in REFS), []),
            "--prompt",
            SPEC["instruction"],
            "--model",
            name,
            "--width",
            "128",
            "--height",
            "128",
            "--seed",
            "0",
            "--quiet",
            "-o",
            out,
        )
        assert r.returncode == 0, r.stderr
        assert f"models/{name}" in r.stdout
        images[name] = np.asarray(Image.open(out).convert("RGB"))
        s = score(Image.fromarray(images[name]), SPEC)
        assert min(s.per_reference) >= 0.7, (name, s)
    assert np.abs(images["uniref-default"].astype(int) - images["uniref-default-sft"]).mean() > 0.5


def test_model_names_resolve_to_the_built_in_folders(tmp_path, monkeypatch):
    from uniref_core import defaults
    from uniref_core.errors import UniRefError

    monkeypatch.delenv("UNIREF_DEFAULT_MODEL", raising=False)
    assert BUILTIN_MODELS["uniref-default-sft"] == SHIPPED_MODEL_DIR.parent / "uniref-default-sft"
    sft = tmp_path / "shipped-sft"
    sft.mkdir()
    (sft / "model_index.json").write_text("{}")
    monkeypatch.setitem(defaults.BUILTIN_MODELS, "uniref-default-sft", sft)
    monkeypatch.chdir(tmp_path)
    assert defaults.resolve_model_arg("uniref-default-sft") == sft
    assert defaults.resolve_model_arg(None) == defaults.resolve_model_arg("uniref-default") == SHIPPED_MODEL_DIR
    assert defaults.resolve_model_arg("some/folder") == Path("some/folder")  # a path stays a path
    (tmp_path / "uniref-default-sft").mkdir()  # a folder of that name here wins over the built-in name
    assert defaults.resolve_model_arg("uniref-default-sft") == Path("uniref-default-sft")
    monkeypatch.setitem(defaults.BUILTIN_MODELS, "uniref-default-sft", tmp_path / "gone")
    monkeypatch.chdir(ROOT)
    with pytest.raises(UniRefError, match="built-in model 'uniref-default-sft' is missing from .*gone.*git checkout"):
        defaults.resolve_model_arg("uniref-default-sft")


def test_checker_cli_scores_an_image_against_a_spec(tmp_path):
    good, blank = tmp_path / "good.png", tmp_path / "blank.png"
    render_target(SPEC).save(good)
    Image.new("RGB", (128, 128), (128, 128, 128)).save(blank)
    r_good = run("-m", "training.checker", good, ASSETS / "example_spec.json")
    r_blank = run("-m", "training.checker", blank, ASSETS / "example_spec.json")
    assert r_good.returncode == 0 and r_blank.returncode == 0, r_good.stderr + r_blank.stderr
    assert json.loads(r_good.stdout)["overall"] >= 0.95
    assert json.loads(r_blank.stdout)["overall"] <= 0.2
    bad = run("-m", "training.checker", tmp_path / "missing.png", ASSETS / "example_spec.json")
    assert bad.returncode == 2 and "missing.png" in bad.stderr


def test_evaluate_cli_prints_per_k_scores_and_writes_a_grid(tiny_model, tmp_path):
    grid = tmp_path / "grid.png"
    r = run(
        "-m",
        "training.evaluate",
        "--model",
        tiny_model,
        "--split",
        "test",
        "--refs",
        "1-2",
        "--n",
        "2",
        "--edits",
        "1",
        "--seed",
        "0",
        "--steps",
        "2",
        "--cfg",
        "1",
        "--budget",
        "128",
        "--grid",
        grid,
        "--grid-rows",
        "1",
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert set(result["per_k"]) == {"1", "2"} and result["edit"]["n"] == len(EDIT_KINDS)  # --edits 1: one per kind
    assert list(result["edit_kinds"]) == list(EDIT_KINDS) and all(m["n"] == 1 for m in result["edit_kinds"].values())
    assert result["per_k"]["1"]["n"] == 2 and result["options"] == {"steps": 2, "cfg": 1.0, "budget": 128 * 128}
    assert result["size"] == 128  # a model folder without uniref.json: ShapeCompose's default side
    for means in [*result["per_k"].values(), *result["edit_kinds"].values(), result["edit"]]:
        assert all(
            0.0 <= means[k] <= 1.0 for k in ("per_reference", "per_reference_min", "instruction", "quality", "overall")
        )
        assert means["per_reference_min"] <= means["per_reference"]  # the weakest reference of each sample
    with Image.open(grid) as im:  # one row per K and one per edit kind
        assert im.height >= (2 + len(EDIT_KINDS)) * 128
    # The samples of a K are the split's own: the test split never shares a seed with train or val.
    assert result["split"] == "test"
    bad = run("-m", "training.evaluate", "--refs", "0-3")
    assert bad.returncode == 2 and "--refs" in bad.stderr and "Traceback" not in bad.stderr


def test_evaluation_samples_the_task_the_model_was_trained_on(tiny_model_4x, tmp_path, monkeypatch):
    """uniref.json "shapecompose" says how the model's data was made; the held-out evaluation draws its
    compositions the same way (here "anchored": the last picture is the background), and says so."""
    import shutil

    from training.evaluate import evaluate_model, trained_order
    from uniref_core.errors import UniRefError
    from uniref_core.model import DEFAULTS_FILE

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_4x, folder)
    (folder / DEFAULTS_FILE).write_text(json.dumps({"shapecompose": {"ref_side": 64, "order": "anchored"}}))
    import training.evaluate as ev

    drawn = []
    real = ev.make_split
    monkeypatch.setattr(ev, "make_split", lambda *a, **kw: drawn.extend(real(*a, **kw)) or drawn[-1:])
    result = evaluate_model(folder, "test", [2], 1, steps=1, cfg=1.0)
    assert [r["role"] for r in drawn[0].spec["references"]] == ["object", "background"]
    assert all(im.size == (64, 64) for im in drawn[0].references)
    assert result["order"] == "anchored" and result["ref_side"] == 64 and result["per_k"]["2"]["n"] == 1
    (folder / DEFAULTS_FILE).write_text(json.dumps({"shapecompose": {"order": "sideways"}}))
    with pytest.raises(
        UniRefError, match="shapecompose order 'sideways' is unknown; use one of reading, free, anchored"
    ):
        trained_order(folder)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"defaults": {"budjet": 65536}}, "unknown default(s) budjet"),
        ({"defaults": {"steps": -3}}, "'steps' (denoising steps) must be a positive number"),
        ({"defaults": [1, 2]}, "'defaults' must be an object"),
        ({"defaults": {"by_references": {"four": {"budget": 1}}}}, "maps a number of references (1, 2, …) to sizes"),
        ({"defaults": {"by_references": {"4": {"steps": 8}}}}, "'by_references' 4 sets steps; it may set budget"),
        (
            {"defaults": {"by_references": {"4": {"output_area": 0}}}},
            "by_references 4: default 'output_area' (output area when",
        ),
    ],
)
def test_bad_model_defaults_file_names_the_key(tiny_model, tmp_path, content, message):
    import shutil

    from uniref_core.errors import UniRefError
    from uniref_core.model import DEFAULTS_FILE

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    (folder / DEFAULTS_FILE).write_text(json.dumps(content))
    with pytest.raises(UniRefError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_defaults(folder)


def test_model_defaults_fill_what_the_caller_leaves_unset(tiny_model, tmp_path):
    import shutil

    from uniref_core import UniRefPipeline
    from uniref_core.model import DEFAULTS_FILE

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    (folder / DEFAULTS_FILE).write_text(
        json.dumps(
            {
                "defaults": {
                    "budget": 128 * 128,
                    "vl_budget": 56 * 56 * 3,
                    "output_area": 64 * 64,
                    "steps": 2,
                    "cfg": 1.0,
                }
            }
        )
    )
    pipe = UniRefPipeline.from_pretrained(folder)
    refs = [Image.open(p).convert("RGB") for p in REFS]
    cond = pipe.encode(refs, "x", match_ref=2)
    assert cond.plan.budget == 128 * 128
    assert sum(r.vae[0] * r.vae[1] for r in cond.plan.references) <= 128 * 128 + 3 * 32 * 160
    assert cond.plan.vl_tokens <= 30  # 3 small VL copies, not 3 × ~190 tokens at 384² each
    assert abs(cond.width * cond.height - 64 * 64) <= 16 * 80  # reference 2's aspect ratio at 64²
    assert cond.negative is None  # cfg 1 from the file: no negative prompt encoded
    explicit = pipe.encode(refs, "x", budget=256 * 256, width=96, height=96)
    assert explicit.plan.budget == 256 * 256 and (explicit.width, explicit.height) == (96, 96)
    # Steps: the model's 2 unless given.
    seen = []
    pipe.sample(cond, on_step=lambda info: seen.append(info.total))
    assert seen == [2, 2]


def test_model_defaults_by_number_of_references(tiny_model, tmp_path):
    """uniref.json "by_references": a model trained on a larger canvas from K references on gets that output size
    (and budget) by default from K on, in the engine and in the CLI's plan; below K and given sizes are unchanged."""
    import shutil

    from uniref_core import UniRefPipeline
    from uniref_core.model import DEFAULTS_FILE

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    by_refs = {"2": {"output_area": 96 * 96}, "3": {"output_area": 128 * 128, "budget": 192 * 192}}
    defaults = {"budget": 64 * 64, "output_area": 64 * 64, "steps": 1, "by_references": by_refs}
    (folder / DEFAULTS_FILE).write_text(json.dumps({"defaults": defaults}))
    pipe = UniRefPipeline.from_pretrained(folder)
    refs = [Image.new("RGB", (96, 96), c) for c in ("red", "green", "blue")]
    sizes = {k: pipe.encode(refs[:k], "x", cfg=1.0) for k in (1, 2, 3)}
    assert [(c.width, c.height) for c in sizes.values()] == [(64, 64), (96, 96), (128, 128)]
    assert [c.plan.budget for c in sizes.values()] == [64 * 64, 64 * 64, 192 * 192]
    given = pipe.encode(refs, "x", cfg=1.0, output_area=64 * 64, budget=64 * 64)
    assert (given.width, given.height, given.plan.budget) == (64, 64, 64 * 64)
    paths = []
    for i, im in enumerate(refs):
        paths += ["--ref", str(tmp_path / f"r{i}.png")]
        im.save(paths[-1])
    for k, side in ((1, 64), (3, 128)):
        r = run("-m", "uniref_core", "plan", "--model", folder, *paths[: 2 * k], "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)["output"]
        assert (out["width"], out["height"]) == (side, side)
