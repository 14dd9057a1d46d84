"""LoRA files on the engine: the three key layouts found in the wild read alike, a LoRA's edit is the image
diffusers' own LoRA loader makes on the same model (one LoRA, two at once, at strengths), removing it restores
the model exactly, and bad files are clear errors."""

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as dq
import numpy as np
import pytest
import torch
from conftest import make_refs, random_lora, write_lora
from diffusers import QwenImageEditPlusPipeline
from safetensors.torch import save_file

from uniref_core import UniRefPipeline
from uniref_core.errors import UniRefError
from uniref_core.lora import parse_lora_arg, read_lora

PROMPT = "put the object from Picture 1 on the background of Picture 2"
AREA = 96 * 96


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    ours = UniRefPipeline.from_pretrained(tiny_model)
    folder = tmp_path_factory.mktemp("loras")
    a = random_lora(ours.c.transformer, seed=1)
    b = random_lora(ours.c.transformer, rank=2, alpha=2.0, seed=2)
    files = {
        layout: write_lora(a, folder / f"a_{layout}.safetensors", layout) for layout in ("kohya", "comfy", "diffusers")
    }
    files["b"] = write_lora(b, folder / "b.safetensors", "kohya")
    return tiny_model, ours, files


def edit(pipe_or_ours, refs, seed=5):
    if isinstance(pipe_or_ours, UniRefPipeline):
        out = pipe_or_ours.edit(
            refs, PROMPT, mode="per_image", per_image_area=AREA, cfg=1.0, seed=seed, steps=3, width=64, height=64
        )
        return np.asarray(out.images[0]).astype(int)
    out = pipe_or_ours(
        image=refs,
        prompt=PROMPT,
        true_cfg_scale=1.0,
        height=64,
        width=64,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    return np.asarray(out.images[0]).astype(int)


def test_the_three_layouts_read_to_the_same_layers(setup):
    _, _, files = setup
    read = {layout: read_lora(files[layout]) for layout in ("kohya", "comfy", "diffusers")}
    names = set(read["kohya"].layers)
    assert names == set(read["comfy"].layers) == set(read["diffusers"].layers)
    assert "transformer_blocks.1.attn.to_out.0" in names and "transformer_blocks.0.img_mlp.net.0.proj" in names
    for name in names:  # alpha / rank = 2 folded in by each reader the same way
        deltas = [lw.layers[name][1] @ lw.layers[name][0] for lw in read.values()]
        assert torch.allclose(deltas[0], deltas[1], atol=1e-6) and torch.allclose(deltas[0], deltas[2], atol=1e-6)


@pytest.mark.parametrize("layout", ["kohya", "comfy", "diffusers"])
def test_a_lora_edits_as_diffusers_lora_loader_does(setup, monkeypatch, layout):
    folder, ours, files = setup
    monkeypatch.setattr(dq, "VAE_IMAGE_SIZE", AREA)
    refs = make_refs([(96, 64), (64, 80)], seed=3)
    plain = edit(ours, refs)
    ref = QwenImageEditPlusPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(files[layout]), adapter_name="a")
    ref.set_adapters(["a"], [0.7])
    want = edit(ref, refs)
    ours.set_loras([(files[layout], 0.7)])
    try:
        got = edit(ours, refs)
    finally:
        ours.set_loras([])
    assert np.abs(got - want).max() <= 1
    assert np.abs(want - plain).mean() > 3  # the LoRA changed the picture: the match is not the plain model's


def test_two_loras_at_once_at_their_strengths(setup, monkeypatch):
    folder, ours, files = setup
    monkeypatch.setattr(dq, "VAE_IMAGE_SIZE", AREA)
    refs = make_refs([(80, 80)], seed=4)
    ref = QwenImageEditPlusPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(files["comfy"]), adapter_name="a")
    ref.load_lora_weights(str(files["b"]), adapter_name="b")
    ref.set_adapters(["a", "b"], [0.5, 1.2])
    want = edit(ref, refs)
    ours.set_loras([(files["comfy"], 0.5), (files["b"], 1.2)])
    try:
        got = edit(ours, refs)
        assert len(ours.loras) == 2
    finally:
        ours.set_loras([])
    assert np.abs(got - want).max() <= 1


def test_removing_a_lora_restores_the_model_exactly(setup):
    _, ours, files = setup
    before = {k: v.clone() for k, v in ours.c.transformer.state_dict().items()}
    a, b = read_lora(files["kohya"]), read_lora(files["b"])
    assert ours.set_loras([(a, 1.0)]) == len(a.layers)
    q = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(ours.c.transformer.state_dict()[q], before[q])
    ours.set_loras([(a, 0.3), (b, 1.0)])  # another strength and a second LoRA: re-merged from the originals
    ours.set_loras([(a, 1.0)])
    once = ours.c.transformer.state_dict()[q].clone()
    ours.set_loras([(a, 0.3)])
    ours.set_loras([(a, 1.0)])
    assert torch.equal(ours.c.transformer.state_dict()[q], once)  # no drift from applying and removing
    ours.set_loras([])
    after = ours.c.transformer.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert ours.loras == ()


def test_cli_lora_flag_gives_the_pipelines_image(setup, tmp_path):
    from PIL import Image

    from uniref_core.__main__ import main

    folder, ours, files = setup
    refs = make_refs([(64, 64)], seed=6)
    ref_path = tmp_path / "r.png"
    refs[0].save(ref_path)
    out = tmp_path / "o.png"
    args = [
        "edit",
        "--model",
        str(folder),
        "--ref",
        str(ref_path),
        "--prompt",
        PROMPT,
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--cfg",
        "1",
        "--budget",
        "64",
        "--seed",
        "1",
        "--quiet",
        "-o",
        str(out),
    ]
    assert main([*args, "--lora", f"{files['comfy']}:0.4"]) == 0
    cli = np.asarray(Image.open(out)).astype(int)
    ours.set_loras([(files["comfy"], 0.4)])
    try:
        mine = ours.edit(refs, PROMPT, cfg=1.0, steps=2, seed=1, budget=64 * 64, width=64, height=64)
    finally:
        ours.set_loras([])
    assert np.abs(cli - np.asarray(mine.images[0]).astype(int)).max() <= 1
    assert main([*args]) == 0
    assert np.abs(cli - np.asarray(Image.open(out)).astype(int)).mean() > 1  # without --lora: another picture


def test_lora_argument_parsing():
    assert parse_lora_arg("a/b.safetensors") == (parse_lora_arg("a/b.safetensors:1")[0], 1.0)
    assert parse_lora_arg("a/b.safetensors:0.6")[1] == 0.6
    assert str(parse_lora_arg("C:/loras/x.safetensors")[0]) == "C:/loras/x.safetensors"  # a drive letter stays
    with pytest.raises(UniRefError, match="finite"):
        parse_lora_arg("x.safetensors:nan")


def test_bad_lora_files_are_clear_errors(setup, tmp_path):
    _, ours, files = setup
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(UniRefError, match=r"old.ckpt is a pickle.*convert it to safetensors"):
        read_lora(pickle)
    with pytest.raises(UniRefError, match="does not exist"):
        read_lora(tmp_path / "nope.safetensors")
    full = tmp_path / "full.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, str(full))
    with pytest.raises(UniRefError, match="holds no LoRA weights.*Load UniRef Model"):
        read_lora(full)
    other = tmp_path / "flux.safetensors"
    save_file(
        {
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 8),
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(24, 2),
        },
        str(other),
    )
    before = ours.c.transformer.state_dict()["transformer_blocks.0.attn.to_q.weight"].clone()
    with pytest.raises(
        UniRefError, match=r"matches no layer of this model \(first keys: double_blocks.0.img_attn.qkv"
    ):
        ours.set_loras([(other, 1.0)])
    wrong = tmp_path / "wide.safetensors"
    save_file(
        {
            "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 999),
            "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(999, 2),
        },
        str(wrong),
    )
    with pytest.raises(UniRefError, match="transformer_blocks.0.attn.to_q is 999×999 in the LoRA"):
        ours.set_loras([(files["kohya"], 1.0), (wrong, 1.0)])
    # Nothing was half-applied.
    assert torch.equal(ours.c.transformer.state_dict()["transformer_blocks.0.attn.to_q.weight"], before)


def test_the_sft_trainers_lora_export_loads(setup, tmp_path):
    """training.export --lora writes ComfyUI's layout (comfy_lora_state_dict); the engine reads it and merges it
    exactly as the trainer's own merge does."""
    from training.common.trainable import comfy_lora_state_dict, merge_comfy_lora

    _, ours, _ = setup
    layers = random_lora(ours.c.transformer, rank=4, seed=9)
    peft_state = {}
    for name, (down, up, _) in layers.items():
        peft_state[f"{name}.lora_A.default.weight"] = down
        peft_state[f"{name}.lora_B.default.weight"] = up
    sd = comfy_lora_state_dict(peft_state, alpha=8.0)
    path = tmp_path / "export.safetensors"
    save_file(sd, str(path))
    ours.set_loras([(path, 1.0)])
    try:
        mine = {k: v.clone() for k, v in ours.c.transformer.state_dict().items()}
    finally:
        ours.set_loras([])
    import copy

    theirs = copy.deepcopy(ours.c.transformer)
    merge_comfy_lora(theirs, sd, 1.0)
    for k, v in theirs.state_dict().items():
        assert torch.allclose(mine[k], v, atol=1e-6), k


def test_a_lora_with_nan_weights_is_an_error_naming_it_not_a_black_image(setup, tmp_path, capsys):
    from uniref_core.__main__ import main

    folder, ours, _ = setup
    layers = random_lora(ours.c.transformer, seed=3)
    down, up, alpha = layers["transformer_blocks.0.attn.to_q"]
    layers["transformer_blocks.0.attn.to_q"] = (torch.full_like(down, float("nan")), up, alpha)
    broken = write_lora(layers, tmp_path / "broken.safetensors", "comfy")
    ref = tmp_path / "r.png"
    make_refs([(64, 64)])[0].save(ref)
    out = tmp_path / "o.png"
    code = main(
        [
            "edit",
            "--model",
            str(folder),
            "--ref",
            str(ref),
            "--prompt",
            PROMPT,
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--budget",
            "64",
            "--quiet",
            "--lora",
            f"{broken}:0.5",
            "-o",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert (
        "error: the model produced non-finite values (NaN or inf) while sampling, so there is no image; LoRA "
        "broken.safetensors at strength 0.5 is loaded: lower its strength, or check the file" in err
    )
    assert not out.exists()
