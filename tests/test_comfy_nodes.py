"""The UniRef nodes inside real ComfyUI hosts: 0.30.0 (newest) and 0.3.75 (oldest supported).

What an artist sees: the pack loads, the four nodes are listed with their inputs, the shipped
workflows run to a saved image of the right size with progress messages, cancel works, and bad
input comes back as a node error carrying our message while the server keeps serving.
"""

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
from comfyhost import output_images, uniref_host
from PIL import Image
from workflow_api import split_workflows, ui_to_api

pytestmark = pytest.mark.comfy

ROOT = Path(__file__).resolve().parent.parent
# The pack-loader workflows; the native one (ComfyUI's own loaders) runs in tests/test_native_workflow.py.
WORKFLOWS, _ = split_workflows(ROOT / "workflows")
NODE_IDS = [
    "UniRefLoadModel",
    "UniRefLoadModelFiles",
    "UniRefReferenceBatch",
    "UniRefSelfEncode",
    "UniRefSampler",
    "UniRefLora",
]
# Small settings so a CPU host runs each prompt in seconds; the graph is the shipped one.
FAST = {"UniRefSampler": {"steps": 3, "cfg": 2.0}, "UniRefSelfEncode": {"budget": "custom", "custom_budget": 256}}
# The references the shipped composition workflow loads.
REFS = [ROOT / "assets" / n for n in ("ref_red_circle.png", "ref_blue_triangle.png", "ref_background.png")]


@pytest.fixture(scope="module", params=["0.30.0", "0.3.75"])
def host(request, tiny_model, tiny_lora, comfy_single_files):
    files = comfy_single_files[0]
    extra = {
        f"loras/{tiny_lora.name}": tiny_lora,
        **{
            f"{folder}/{files[part].name}": files[part]
            for part, folder in (
                ("diffusion_model", "diffusion_models"),
                ("text_encoder", "text_encoders"),
                ("vae", "vae"),
            )
        },
    }
    with uniref_host(request.param, tiny_model, extra_models=extra) as h:
        yield h


def workflow_prompt(host, path, overrides=FAST, width=None, height=None):
    ui = json.loads(Path(path).read_text())
    prompt = ui_to_api(ui, host.object_info())
    for node in prompt.values():
        node["inputs"].update(overrides.get(node["class_type"], {}))
        if node["class_type"] == "UniRefSelfEncode" and width:
            node["inputs"].update(width=width, height=height)
    return prompt


def node_of(prompt, class_type):
    return next(n for n in prompt.values() if n["class_type"] == class_type)


def node_image(host, prompt, timeout=240) -> np.ndarray:
    return np.asarray(host.output_image(host.run(prompt, timeout=timeout))).astype(int)


def cli_image(prompt, out, *options) -> np.ndarray:
    """The CLI's image from the graph's references, prompts and settings; ``options`` name the model (and more)."""
    from uniref_core.__main__ import main

    enc, smp = node_of(prompt, "UniRefSelfEncode")["inputs"], node_of(prompt, "UniRefSampler")["inputs"]
    code = main(
        [
            "edit",
            *options,
            *sum((["--ref", str(r)] for r in REFS), []),
            "--prompt",
            enc["prompt"],
            "--negative-prompt",
            enc["negative_prompt"],
            "--budget",
            "256",
            "--width",
            str(enc["width"]),
            "--height",
            str(enc["height"]),
            "--steps",
            str(smp["steps"]),
            "--cfg",
            str(smp["cfg"]),
            "--seed",
            str(smp["seed"]),
            "--quiet",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    return np.asarray(Image.open(out)).astype(int)


def test_pack_imports_and_lists_the_four_nodes(host):
    assert not host.import_failed(), host.log_tail()
    assert "Error while calling comfy_entrypoint" not in host.log_text()
    info = host.object_info()
    for node_id in NODE_IDS:
        assert node_id in info, f"{node_id} missing on ComfyUI {host.version}"
        assert info[node_id]["category"] == "UniRef"
        assert info[node_id]["description"]
    enc = info["UniRefSelfEncode"]["input"]
    assert {"model", "references", "prompt", "negative_prompt", "budget", "mode"} <= set(enc["required"])
    assert enc["required"]["budget"][1]["options"] if isinstance(enc["required"]["budget"][0], str) else True
    # Every input carries a tooltip.
    for node_id in NODE_IDS:
        for section in ("required", "optional"):
            for name, spec in info[node_id]["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    models = info["UniRefLoadModel"]["input"]["required"]["model"]
    options = models[1]["options"] if models[0] == "COMBO" else models[0]
    assert options[0] == "uniref-default (built-in)" and "tiny" in options
    if (ROOT / "models" / "uniref-default-sft" / "model_index.json").is_file():  # the SFT model, by name
        assert options[1] == "uniref-default-sft (built-in)"


def test_reference_batch_grows_on_new_hosts_and_has_fixed_slots_on_old(host):
    spec = host.object_info("UniRefReferenceBatch")["input"]
    flat = json.dumps(spec)
    if host.version == "0.30.0":
        assert "COMFY_AUTOGROW" in flat or "autogrow" in flat.lower()
    else:
        assert all(f"images.image_{i}" in spec["optional"] for i in range(1, 7))


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_runs_to_a_saved_image(host, workflow):
    prompt = workflow_prompt(host, workflow, width=96, height=64)
    with host.listen() as ws:
        prompt_id = host.queue(prompt, ws.client_id)
        assert isinstance(prompt_id, str), prompt_id
        entry = host.wait(prompt_id, timeout=240)
        ws.wait_for("execution_success", prompt_id=prompt_id, timeout=30)
        progress = [m for m in ws.of_type("progress") if m["data"].get("max") == 3]
    assert [m["data"]["value"] for m in progress][-1] == 3
    assert len(output_images(entry)) == 1
    assert host.output_image(entry).size == (96, 64)


def test_shipped_workflow_composes_the_references_with_the_trained_model(host):
    """The multi-reference workflow exactly as shipped (only the model is picked by its folder name, since
    the tests point the built-in name at a tiny random model): the ShapeCompose checker finds each
    reference's object in its place on Picture 3's background."""
    from training.tasks.shapecompose import score

    prompt = workflow_prompt(host, ROOT / "workflows" / "uniref_multi_compose.json", overrides={})
    node_of(prompt, "UniRefLoadModel")["inputs"]["model"] = "shipped"
    image = host.output_image(host.run(prompt, timeout=300)).convert("RGB")
    assert image.size == (128, 128)
    s = score(image, json.loads((ROOT / "assets" / "example_spec.json").read_text()))
    assert min(s.per_reference) >= 0.7 and s.instruction >= 0.7, s


@pytest.mark.parametrize("offload", ["none", "blocks"])
def test_nodes_give_the_same_image_as_the_cli(host, tiny_model, tmp_path, offload):
    """Also with the Load node's block offload (the CLI without it): on a CPU host both devices are the CPU, so
    this proves the offloaded model's plumbing through ComfyUI's memory management, not the GPU saving."""
    prompt = workflow_prompt(host, ROOT / "workflows" / "uniref_multi_compose.json", width=64, height=96)
    node_of(prompt, "UniRefLoadModel")["inputs"].update(model="tiny", offload=offload)
    node_img = node_image(host, prompt)
    cli_img = cli_image(prompt, tmp_path / "cli.png", "--model", str(tiny_model))
    assert np.abs(node_img - cli_img).max() <= 1


def test_cancel_stops_sampling_and_the_next_prompt_runs(host):
    prompt = workflow_prompt(
        host, WORKFLOWS[0], overrides={"UniRefSampler": {"steps": 200, "cfg": 1.0}}, width=64, height=64
    )
    node_of(prompt, "UniRefSampler")["inputs"]["seed"] = 123  # not cached from another test
    with host.listen() as ws:
        prompt_id = host.queue(prompt, ws.client_id)
        first = ws.wait_for("progress", prompt_id=prompt_id, timeout=120)
        host.interrupt()
        ws.wait_for("execution_interrupted", prompt_id=prompt_id, timeout=60)
        steps = [m["data"]["value"] for m in ws.of_type("progress") if m["data"].get("max") == 200]
    # Interrupted within a step or two of the request, far from the 200 planned.
    assert first["data"]["value"] >= 1 and max(steps) < 20
    entry = host.run(workflow_prompt(host, WORKFLOWS[0], width=64, height=64), timeout=240)
    assert output_images(entry)


def expect_node_error(host, prompt, text):
    with host.listen() as ws:
        result = host.queue(prompt, ws.client_id)
        if isinstance(result, dict):  # rejected at validation
            assert text in json.dumps(result), result
        else:
            err = ws.wait_for("execution_error", prompt_id=result, timeout=120)
            assert text in err["data"]["exception_message"], err["data"]["exception_message"]
    assert host.get_json("/system_stats")  # still serving


def test_no_reference_connected_is_a_node_error(host):
    prompt = workflow_prompt(host, WORKFLOWS[0])
    batch = node_of(prompt, "UniRefReferenceBatch")["inputs"]
    for key in [k for k in batch if k.startswith("image") or k.startswith("images")]:
        del batch[key]
    expect_node_error(host, prompt, "no image connected")


def test_budget_too_small_is_a_node_error(host):
    # A 3000×30 strip next to two other references cannot keep 16 px of height in 256².
    Image.new("RGB", (3000, 30), (200, 30, 30)).save(host.input_dir / "uniref_test_strip.png")
    prompt = workflow_prompt(
        host, WORKFLOWS[-1], overrides={"UniRefSelfEncode": {"budget": "custom", "custom_budget": 256}}
    )
    loaders = [n for n in prompt.values() if n["class_type"] == "LoadImage"]
    loaders[0]["inputs"]["image"] = "uniref_test_strip.png"
    expect_node_error(host, prompt, "reference 1 is 3000×30 px")


def test_inputs_out_of_range_are_refused_before_the_prompt_runs(host):
    # validate_inputs takes only width and height, so ComfyUI itself checks custom_budget's range and budget's options.
    for change, text in (
        ({"budget": "custom", "custom_budget": -64}, "custom_budget"),
        ({"budget": "999999²"}, "999999"),
        ({"width": 9000, "height": 64}, "width is 9000"),
    ):
        prompt = workflow_prompt(host, WORKFLOWS[0])
        node_of(prompt, "UniRefSelfEncode")["inputs"].update(change)
        expect_node_error(host, prompt, text)
    # The declared maximum size is a sequence no device runs in one step: refused before any encoding.
    expect_node_error(host, workflow_prompt(host, WORKFLOWS[0], width=8192, height=8192), "lower width and height")


def test_broken_model_folder_is_a_node_error(host, tmp_path):
    broken = host.base_dir / "models" / "uniref" / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPlusPipeline"}))
    prompt = workflow_prompt(host, WORKFLOWS[0])
    node_of(prompt, "UniRefLoadModel")["inputs"]["model"] = "broken"
    expect_node_error(host, prompt, "missing the 'transformer' component")
    node_of(prompt, "UniRefLoadModel")["inputs"]["model"] = "does-not-exist"
    expect_node_error(host, prompt, "does-not-exist")
    # And the server still runs a good prompt afterwards.
    assert output_images(host.run(workflow_prompt(host, WORKFLOWS[0], width=64, height=64), timeout=240))


def test_free_memory_reloads_the_model_on_next_use(host):
    prompt = workflow_prompt(host, WORKFLOWS[0], width=64, height=64)
    host.run(prompt, timeout=240)
    before = host.log_text().count("UniRef: loading model")
    host.run(prompt, timeout=240)  # cached: no reload
    assert host.log_text().count("UniRef: loading model") == before
    host._request("POST", "/free", {"unload_models": True, "free_memory": True})
    # ComfyUI's worker applies /free when it next wakes (at once when idle): let it before queueing.
    time.sleep(2)
    node_of(prompt, "UniRefSampler")["inputs"]["seed"] = 99
    assert output_images(host.run(prompt, timeout=240))
    assert host.log_text().count("UniRef: loading model") == before + 1


def test_lora_node_gives_the_clis_image_and_leaves_no_trace_when_removed(host, tiny_model, tiny_lora, tmp_path):
    """UniRef LoRA between the loader and the rest of the shipped graph: the image is the CLI's with
    --lora FILE:0.7; the same graph without the node then gives the plain CLI image again (the LoRA is
    taken out of the cached model, not left merged in)."""
    spec = host.object_info("UniRefLora")["input"]["required"]["lora_name"]
    assert tiny_lora.name in json.dumps(spec)
    plain_prompt = workflow_prompt(host, ROOT / "workflows" / "uniref_multi_compose.json", width=64, height=64)
    load_id = next(k for k, n in plain_prompt.items() if n["class_type"] == "UniRefLoadModel")
    plain_prompt[load_id]["inputs"]["model"] = "tiny"
    prompt = copy.deepcopy(plain_prompt)
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if value == [load_id, 0]:
                node["inputs"][name] = ["lora", 0]
    prompt["lora"] = {
        "class_type": "UniRefLora",
        "inputs": {"model": [load_id, 0], "lora_name": tiny_lora.name, "strength": 0.7},
    }

    model = ("--model", str(tiny_model))
    with_lora = node_image(host, prompt)
    lora_cli = cli_image(prompt, tmp_path / "cli.png", *model, "--lora", f"{tiny_lora}:0.7")
    assert np.abs(with_lora - lora_cli).max() <= 1
    without = node_image(host, plain_prompt)
    plain_cli = cli_image(plain_prompt, tmp_path / "cli.png", *model)
    assert np.abs(without - plain_cli).max() <= 1
    assert np.abs(with_lora - plain_cli).mean() > 1  # the LoRA changed the picture


def test_single_files_loader_node_gives_the_clis_image(host, comfy_single_files, tmp_path):
    """The shipped composition graph with Load UniRef Model (ComfyUI files) in place of the folder loader: the
    files are listed from ComfyUI's own folders, the tokenizer is ComfyUI's, and the image is the CLI's."""
    files, tokenizer, _, _ = comfy_single_files
    spec = host.object_info("UniRefLoadModelFiles")["input"]["required"]
    for name, part in (("diffusion_model", "diffusion_model"), ("text_encoder", "text_encoder"), ("vae", "vae")):
        assert files[part].name in json.dumps(spec[name])
    prompt = workflow_prompt(host, ROOT / "workflows" / "uniref_multi_compose.json", width=64, height=64)
    load_id = next(k for k, n in prompt.items() if n["class_type"] == "UniRefLoadModel")
    prompt[load_id] = {
        "class_type": "UniRefLoadModelFiles",
        "inputs": {
            "diffusion_model": files["diffusion_model"].name,
            "text_encoder": files["text_encoder"].name,
            "vae": files["vae"].name,
            "dtype": "fp32",
        },
    }
    node = node_image(host, prompt, timeout=300)
    model = ("--diffusion-model", str(files["diffusion_model"]), "--text-encoder", str(files["text_encoder"]))
    model += ("--vae", str(files["vae"]), "--tokenizer", str(tokenizer), "--dtype", "fp32")
    cli = cli_image(prompt, tmp_path / "cli.png", *model)
    assert node.shape == cli.shape and cli.std() > 5
    assert np.abs(node - cli).max() <= 1
