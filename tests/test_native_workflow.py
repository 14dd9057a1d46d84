"""The shipped native workflow (``workflows/uniref_native_compose.json``: ComfyUI's own Load Diffusion Model,
Load CLIP and Load VAE -> UniRef SELF Encode (native) -> KSampler -> VAE Decode) inside real hosts, on tiny
models built with ComfyUI's own classes and saved in ComfyUI's file layout.

ComfyUI's loaders assume the released model sizes; ``tests/host_shims/uniref_test_tiny_qwen`` (a test-only
custom node folder) lets them build the tiny ones, and nothing else of ComfyUI's path is touched.

- the workflow as shipped (only file names, size and step count changed) runs to a saved image of its size;
- with policy per_image the image is exactly the one of the same graph with core TextEncodeQwenImageEditPlus
  (prompt and negative) and EmptySD3LatentImage in place of our node;
- with policy budget (the shipped setting) the image differs from per_image: the budget reached the model."""

import json
from pathlib import Path

import numpy as np
import pytest
from comfy_child import comfy_vae_file, run_in_host
from comfyhost import uniref_host
from workflow_api import ui_to_api

pytestmark = pytest.mark.comfy

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "tests" / "host_shims" / "uniref_test_tiny_qwen"
WORKFLOW = ROOT / "workflows" / "uniref_native_compose.json"
SIZE, STEPS, CFG = 64, 2, 2.0

BUILD = r"""
import comfy.ops
from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
from comfy.text_encoders import llama
from comfy_child import init_weights
from host_shims.uniref_test_tiny_qwen import TEXT  # the sizes the host will use
from safetensors.torch import save_file

g = torch.Generator().manual_seed(0)
te = llama.Qwen25_7BVLI({}, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
save_file(init_weights(te, g), args["te"])
dit = QwenImageTransformer2DModel(num_layers=2, attention_head_dim=128, num_attention_heads=2,
                                  joint_attention_dim=TEXT["hidden_size"], in_channels=64, out_channels=16,
                                  dtype=torch.float32, operations=comfy.ops.disable_weight_init)
save_file(init_weights(dit, g), args["dit"])
"""


@pytest.fixture(scope="module", params=["0.30.0", "0.3.75"])
def host(request, tiny_model, tmp_path_factory):
    version = request.param
    tmp = tmp_path_factory.mktemp(f"native-{version}")
    files = {"dit": tmp / "qwen_image_edit_tiny.safetensors", "te": tmp / "qwen_2.5_vl_tiny.safetensors"}
    run_in_host(version, BUILD, {k: str(v) for k, v in files.items()})
    files["vae"], _ = comfy_vae_file(tmp, version)  # ComfyUI's own Wan VAE class, in its file layout
    models = {
        f"diffusion_models/{files['dit'].name}": files["dit"],
        f"text_encoders/{files['te'].name}": files["te"],
        f"vae/{files['vae'].name}": files["vae"],
    }
    with uniref_host(version, tiny_model, extra_models=models, extra_packs={SHIM.name: SHIM}) as h:
        h.files = files
        yield h


def shipped_prompt(host, **encode):
    """The shipped workflow in API form, on the tiny files, small and fast."""
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), host.object_info())
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            inputs["unet_name"] = host.files["dit"].name
        elif kind == "CLIPLoader":
            inputs["clip_name"] = host.files["te"].name
        elif kind == "VAELoader":
            inputs["vae_name"] = host.files["vae"].name
        elif kind == "UniRefSelfEncodeNative":
            inputs.update({"width": SIZE, "height": SIZE, "negative_prompt": "blurry", **encode})
        elif kind == "KSampler":
            inputs.update(steps=STEPS, cfg=CFG)
    return prompt


def node_id(prompt, class_type):
    return next(k for k, n in prompt.items() if n["class_type"] == class_type)


def run_image(host, prompt) -> np.ndarray:
    return np.asarray(host.output_image(host.run(prompt, timeout=600))).astype(int)


def test_native_workflow_runs_on_comfyuis_own_loaders_and_sampler(host):
    assert not host.import_failed(), host.log_tail()
    prompt = shipped_prompt(host)
    enc = prompt[node_id(prompt, "UniRefSelfEncodeNative")]["inputs"]
    assert enc["policy"] == "budget" and enc["budget"] == "1024²"  # the shipped settings
    assert sum(k.startswith("images.") for k in enc) == 3  # three references, each its own LoadImage
    image = run_image(host, prompt)
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 1  # a picture of the asked size, not a blank


def test_per_image_equals_the_core_qwen_edit_node_and_budget_changes_the_image(host):
    ours = shipped_prompt(host, policy="per_image")
    enc_id = node_id(ours, "UniRefSelfEncodeNative")
    enc = ours[enc_id]["inputs"]
    images = [enc[f"images.image_{i}"] for i in (1, 2, 3)]
    # The same graph with ComfyUI's own encode node (one for the prompt, one for the negative) and empty latent.
    core = json.loads(json.dumps(ours))
    del core[enc_id]
    for name, text in (("pos", enc["prompt"]), ("neg", enc["negative_prompt"])):
        core[name] = {
            "class_type": "TextEncodeQwenImageEditPlus",
            "inputs": {
                "clip": enc["clip"],
                "vae": enc["vae"],
                "prompt": text,
                **{f"image{i}": im for i, im in enumerate(images, start=1)},
            },
        }
    core["latent"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
    sampler = core[node_id(core, "KSampler")]["inputs"]
    sampler.update(positive=["pos", 0], negative=["neg", 0], latent_image=["latent", 0])
    per_image = run_image(host, ours)
    assert np.array_equal(per_image, run_image(host, core))  # exactly TextEncodeQwenImageEditPlus's image
    budget = run_image(host, shipped_prompt(host, policy="budget", budget="custom", custom_budget=128))
    assert np.abs(budget - per_image).mean() > 1  # the references' sizes reached ComfyUI's model


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_text_that_is_not_utf8_is_a_node_error_naming_it(host, field):
    """A lone surrogate, as a workflow JSON can hold ("\\udce9"), is refused by name before any encoding; ComfyUI's
    tokenizer would otherwise fail on it with a bare UnicodeEncodeError."""
    prompt = shipped_prompt(host, **{field: "caf\udce9"})
    with host.listen() as ws:
        err = ws.wait_for("execution_error", prompt_id=host.queue(prompt, ws.client_id), timeout=120)
    message = err["data"]["exception_message"]
    assert f"{field.replace('_', ' ')} is not valid UTF-8 text: character 4 is the byte 0xe9" in message, message
    assert run_image(host, shipped_prompt(host)).shape == (SIZE, SIZE, 3)  # the host still serves
