"""Qwen-Image 2.1 folders: the tiny one that `make-tiny-model --family qwen21` builds runs in diffusers'
QwenImage21Pipeline, UniRef tells the family from model_index.json, refuses a folder whose parts do not fit each
other naming the part, and says plainly that this version does not run 2.1 models."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_refs

from uniref_core import UniRefError, UniRefPipeline
from uniref_core.__main__ import main
from uniref_core.model import check_qwen21_folder, load_components, model_family
from uniref_core.tiny import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def qwen21_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("qwen21") / "model", family="qwen21")


@pytest.fixture
def broken(qwen21_model, tmp_path):
    """A fresh copy of the tiny 2.1 folder to damage."""
    return Path(shutil.copytree(qwen21_model, tmp_path / "model"))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "sizes, expected, grids",
    [
        # Each reference and the output (which follows the LAST reference's aspect) at output_resolution² = 256²,
        # sides rounded to 32 px; grids: (frames, rows, columns) of 16 px tokens per image, the target last.
        ([(300, 200)], (320, 224), [(1, 14, 20), (1, 14, 20)]),
        ([(300, 200), (128, 256), (200, 200)], (256, 256), [(1, 14, 20), (1, 22, 12), (1, 16, 16), (1, 16, 16)]),
    ],
)
def test_diffusers_runs_it_with_references_of_different_sizes(qwen21_model, sizes, expected, grids):
    from diffusers import QwenImage21Pipeline

    pipe = QwenImage21Pipeline.from_pretrained(qwen21_model, local_files_only=True)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["img_shapes"]), with_kwargs=True)
    refs = make_refs(sizes)
    refs[-1] = refs[-1].convert("RGBA")  # 2.1 takes RGBA references
    out = pipe(
        image=refs,
        prompt="Put the red circle on the left",
        num_inference_steps=2,
        output_resolution=256,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert out.size == expected and out.mode == "RGBA"  # the 2.1 VAE decodes four channels
    assert [list(map(tuple, shapes[0])) for shapes in seen] == [grids, grids]  # every reference, both steps


def test_cli_builds_the_same_folder_from_the_same_seed(qwen21_model, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "uniref_core", "make-tiny-model", str(tmp_path / "cli"), "--family", "qwen21"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert f"tiny model written to {tmp_path / 'cli'}" in r.stdout
    built = _files(tmp_path / "cli")
    assert built == _files(qwen21_model)  # seed 0 both times: bitwise the same weights, configs and tokenizer
    assert not any(name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for name in built)
    assert json.loads(built["model_index.json"])["_class_name"] == "QwenImage21Pipeline"


@pytest.mark.parametrize("edit_only", [["--zero-cond-t"], ["--vae-scale", "4"]])
def test_cli_refuses_edit_options_with_qwen21(tmp_path, capsys, edit_only):
    assert main(["make-tiny-model", str(tmp_path / "m"), "--family", "qwen21", *edit_only]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{edit_only[0]} is for --family edit only" in err
    assert not (tmp_path / "m").exists()


def test_model_family_is_read_from_model_index(qwen21_model, tiny_model, broken):
    assert model_family(qwen21_model) == "qwen21"
    assert model_family(tiny_model) == "edit"
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps(dict(index, _class_name="FluxKontextPipeline")))
    with pytest.raises(UniRefError, match="holds a FluxKontextPipeline model"):
        model_family(broken)


def test_a_good_folder_passes_the_check(qwen21_model):
    assert check_qwen21_folder(qwen21_model)["_class_name"] == "QwenImage21Pipeline"


def _edit_config(folder: Path, part: str, change) -> None:
    path = folder / part / "config.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def _pickle_only(folder: Path) -> None:
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "transformer" / "diffusion_pytorch_model.bin")


BAD_FOLDERS = {
    "missing part": (lambda f: shutil.rmtree(f / "vae"), r"missing the 'vae' component.*re-download"),
    "missing config": (
        lambda f: (f / "text_encoder" / "config.json").unlink(),
        r"'text_encoder' has no config.json in .*text_encoder.*re-download",
    ),
    "channels": (
        lambda f: _edit_config(f, "transformer", lambda c: c.update(in_channels=32)),
        r"transformer's in/out channels 32/64 \(transformer/config.json\) are not the VAE's z_dim 64",
    ),
    "text width": (
        lambda f: _edit_config(f, "text_encoder", lambda c: c["text_config"].update(hidden_size=48)),
        r"text encoder's hidden size 48 .* not the transformer's context_in_dim 64",
    ),
    "8x vae": (
        lambda f: _edit_config(f, "vae", lambda c: c.update(dim_mult=[1, 2, 4, 4], temperal_downsample=[False] * 3)),
        r"the VAE \(vae/config.json\) is 8x .* for a 16x VAE",
    ),
    "vision slot": (
        lambda f: _edit_config(f, "text_encoder", lambda c: c["vision_config"].update(patch_size=14)),
        r"text encoder's vision slot is 28 px .*patch_size 14 x spatial_merge_size 2",
    ),
    "pickle weights": (_pickle_only, r"'transformer' has only pickle weights .*convert them to .safetensors"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_folder_whose_parts_do_not_fit_is_refused_naming_the_part(broken, case):
    damage, message = BAD_FOLDERS[case]
    damage(broken)
    with pytest.raises(UniRefError, match=message) as e:
        check_qwen21_folder(broken)
    assert str(broken) in str(e.value)


def test_loading_a_qwen21_folder_says_this_version_runs_edit_models(qwen21_model):
    expected = (
        rf"{qwen21_model} holds a Qwen-Image 2.1 model \(QwenImage21Pipeline\); this version of UniRef runs "
        r"Qwen-Image-Edit-2509/2511 folders"
    )
    with pytest.raises(UniRefError, match=expected):
        load_components(qwen21_model)
    with pytest.raises(UniRefError, match=expected):
        UniRefPipeline.from_pretrained(qwen21_model)
