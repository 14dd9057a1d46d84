"""TEST-ONLY custom node folder: lets ComfyUI's own loaders build TINY Qwen-Image-Edit models.

ComfyUI reads only the layer count and input channels of a Qwen-Image diffusion model from its file and builds
every Qwen2.5-VL text encoder at 7B size; released checkpoints need nothing more, but a test cannot hold 7B
weights. Imported by the host like any pack, this module changes exactly those two facts: the diffusion
model's widths are read from the file's shapes, and the 7B text-encoder configs shrink to ``TEXT``/``VISION``.
Everything else (UNETLoader, CLIPLoader, VAELoader, KSampler, VAEDecode, the model code) is ComfyUI's own.
The test that writes the tiny files imports this module in the host too, so both sides agree on the sizes.
"""

import dataclasses

import comfy.model_detection
from comfy.text_encoders import llama, qwen_vl

TEXT = dict(
    vocab_size=151936,
    hidden_size=256,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)  # 4 x 128 k_proj bias: what ComfyUI's detect_te_model calls Qwen2.5-7B
VISION = dict(hidden_size=64, intermediate_size=48, num_layers=2)

if not getattr(llama.Qwen25_7BVLI_Config, "_uniref_tiny", False):
    llama.Qwen25_7BVLI_Config = dataclasses.make_dataclass(
        "Qwen25_7BVLI_Config",
        [(k, int, dataclasses.field(default=v)) for k, v in TEXT.items()],
        bases=(llama.Qwen25_7BVLI_Config,),
        namespace={"_uniref_tiny": True},
    )

    _Vision = qwen_vl.Qwen2VLVisionTransformer

    class TinyVision(_Vision):
        def __init__(self, hidden_size=1280, output_hidden_size=3584, intermediate_size=3420, num_layers=32, **kw):
            super().__init__(
                hidden_size=VISION["hidden_size"],
                output_hidden_size=output_hidden_size,
                intermediate_size=VISION["intermediate_size"],
                num_layers=VISION["num_layers"],
                **kw,
            )

    qwen_vl.Qwen2VLVisionTransformer = TinyVision

    _detect = comfy.model_detection.detect_unet_config

    def detect_unet_config(state_dict, key_prefix, *args, **kwargs):
        config = _detect(state_dict, key_prefix, *args, **kwargs)
        if isinstance(config, dict) and config.get("image_model") == "qwen_image":
            head = state_dict[f"{key_prefix}transformer_blocks.0.attn.norm_q.weight"].shape[0]
            width = state_dict[f"{key_prefix}img_in.weight"].shape[0]
            config.update(
                attention_head_dim=head,
                num_attention_heads=width // head,
                joint_attention_dim=state_dict[f"{key_prefix}txt_in.weight"].shape[1],
            )
        return config

    comfy.model_detection.detect_unet_config = detect_unet_config

NODE_CLASS_MAPPINGS = {}
