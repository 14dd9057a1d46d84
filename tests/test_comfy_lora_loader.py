"""The SFT trainer's LoRA export (``training.export --lora``: ComfyUI's key layout) in ComfyUI's OWN LoraLoader
path (``comfy.sd.load_lora_for_models``, what the core LoraLoader node calls) on a ComfyUI-native Qwen-Image
model: every layer of the file is matched by ComfyUI's key map, and the weights ComfyUI patches equal the
ones the engine merges for the same file and strength."""

import pytest
import torch
from comfy_child import last_json, run_in_host
from conftest import random_lora
from safetensors.torch import load_file, save_file

from uniref_core import UniRefPipeline
from uniref_core.tiny import TRANSFORMER_CONFIG

COMFY_LORA = """
import comfy.lora, comfy.model_patcher, comfy.sd, comfy.supported_models
from safetensors.torch import load_file, save_file

sd = load_file(args["model"])
# The tiny model's sizes; a real file's are ComfyUI's class defaults (model_detection reads only depth/channels).
unet_config = {"image_model": "qwen_image", **args["config"]}
model_config = comfy.supported_models.QwenImage(unet_config)
model_config.set_inference_dtype(torch.float32, None)
model = model_config.get_model(sd)
model.load_model_weights(sd, "")
patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
lora = load_file(args["lora"])
key_map = comfy.lora.model_lora_keys_unet(model, {})
matched = comfy.lora.load_lora(lora, key_map)
patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, args["strength"], 0)
patched.patch_model()
out = {k[len("diffusion_model."):]: v.contiguous() for k, v in patched.model.state_dict().items()
       if k.startswith("diffusion_model.transformer_blocks.")}
save_file(out, args["out"])
print(json.dumps({"matched": len(matched)}))
"""


@pytest.mark.comfy
@pytest.mark.parametrize("version", ["0.30.0", "0.3.75"])
def test_trainer_lora_export_loads_in_comfyuis_lora_loader(tmp_path, tiny_model, version):
    from training.common.trainable import comfy_lora_state_dict

    pipe = UniRefPipeline.from_pretrained(tiny_model)
    transformer = pipe.c.transformer
    layers = random_lora(transformer, rank=4, seed=3)
    peft_state = {}
    for name, (down, up, _) in layers.items():
        peft_state[f"{name}.lora_A.default.weight"] = down
        peft_state[f"{name}.lora_B.default.weight"] = up
    lora_file, model_file, out = (
        tmp_path / "export.safetensors",
        tmp_path / "model.safetensors",
        tmp_path / "out.safetensors",
    )
    save_file(comfy_lora_state_dict(peft_state, alpha=8.0), str(lora_file))
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, str(model_file))
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in TRANSFORMER_CONFIG.items()}
    args = {"model": str(model_file), "lora": str(lora_file), "out": str(out), "strength": 0.7, "config": config}
    proc = run_in_host(version, COMFY_LORA, args)
    assert "lora key not loaded" not in proc.stderr + proc.stdout
    assert last_json(proc)["matched"] == len(layers)
    theirs = load_file(str(out))
    pipe.set_loras([(lora_file, 0.7)])
    mine = transformer.state_dict()
    changed = 0
    for k, v in theirs.items():
        torch.testing.assert_close(mine[k], v, rtol=1e-5, atol=1e-6)
        changed += int(k[: -len(".weight")] in layers and k.endswith(".weight"))
    assert changed == len(layers)
    pipe.set_loras([])
