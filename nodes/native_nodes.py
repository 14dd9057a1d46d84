"""UniRef SELF Encode (native): SELF on ComfyUI's own model path.

Takes ComfyUI's CLIP and VAE (as core's loaders give them for Qwen-Image-Edit) and any number of references,
and returns what core ``TextEncodeQwenImageEditPlus`` returns (CONDITIONING with ``reference_latents``), for
the prompt and the negative prompt, plus an empty LATENT of the target size, so KSampler and every sampler,
LoRA, GGUF or fp8 loader of the ecosystem run with SELF. The sizes come from the engine's planner; the
resizing, tokenising and encoding are ComfyUI's own calls, made as the core node makes them.
"""

from __future__ import annotations

import math

import comfy.model_management as mm
import comfy.utils
import node_helpers
import torch
from comfy_api.latest import io

from ..uniref_core.budget import BUDGETS, plan_references
from ..uniref_core.errors import UniRefError
from ..uniref_core.prompt import PICTURE_LABEL, PROMPT_TEMPLATE, check_prompt_text
from .uniref_nodes import CATEGORY, CUSTOM, _image_slot_names, image_inputs

#: The core node's sizes: each reference's VL copy at ~384², its VAE copy at ~1024² in multiples of 8.
CORE_VL_AREA, CORE_VAE_AREA, CORE_MULTIPLE = 384 * 384, 1024 * 1024, 8
POLICIES = ("budget", "per_image")
LATENT_CHANNELS, VAE_SCALE = 16, 8
DEFAULT_BUDGET = next(iter(BUDGETS))  # 1024²


def core_sizes(width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(VL size, VAE size) exactly as TextEncodeQwenImageEditPlus computes them for one image."""
    s = math.sqrt(CORE_VL_AREA / (width * height))
    vl = (round(width * s), round(height * s))
    s = math.sqrt(CORE_VAE_AREA / (width * height))
    vae = (round(width * s / CORE_MULTIPLE) * CORE_MULTIPLE, round(height * s / CORE_MULTIPLE) * CORE_MULTIPLE)
    return vl, vae


class SelfEncodeNative(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniRefSelfEncodeNative",
            display_name="UniRef SELF Encode (native)",
            category=CATEGORY,
            description="SELF for ComfyUI's own Qwen-Image-Edit path: encodes the prompt with any number of "
            "references held to one pixel budget, for KSampler (with the core loaders, LoRAs, fp8 or GGUF models). "
            "per_image gives exactly what TextEncodeQwenImageEditPlus gives.",
            inputs=[
                io.Clip.Input("clip", tooltip="Qwen2.5-VL text encoder from Load CLIP (type qwen_image)."),
                io.Vae.Input("vae", tooltip="The Qwen-Image VAE from Load VAE."),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="",
                    tooltip="The instruction. Refer to references as 'Picture 1', 'Picture 2', …",
                ),
                io.String.Input(
                    "negative_prompt",
                    multiline=True,
                    default="",
                    tooltip="What to avoid (KSampler's negative; used when cfg is above 1).",
                ),
                *image_inputs(),
                io.Combo.Input(
                    "policy",
                    options=list(POLICIES),
                    default="budget",
                    tooltip="budget: SELF, all references within one pixel budget. per_image: each at "
                    "~1024², exactly as TextEncodeQwenImageEditPlus.",
                ),
                io.Combo.Input(
                    "budget",
                    options=[*BUDGETS, CUSTOM],
                    default=DEFAULT_BUDGET,
                    tooltip="Total pixels of ALL references together (policy budget).",
                ),
                io.Int.Input(
                    "custom_budget",
                    default=1024,
                    min=64,
                    max=8192,
                    step=32,
                    tooltip="Side of the square budget when budget is 'custom'.",
                ),
                io.Int.Input("width", default=1024, min=16, max=8192, step=16, tooltip="Output width."),
                io.Int.Input("height", default=1024, min=16, max=8192, step=16, tooltip="Output height."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images in the empty latent."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                io.Latent.Output(display_name="latent"),
            ],
        )

    @classmethod
    def execute(
        cls,
        clip,
        vae,
        prompt,
        negative_prompt="",
        policy="budget",
        budget=DEFAULT_BUDGET,
        custom_budget=1024,
        width=1024,
        height=1024,
        batch_size=1,
        **kwargs,
    ) -> io.NodeOutput:
        images = _image_slot_names(kwargs)
        if not images:
            raise UniRefError(
                "UniRef SELF Encode (native) has no image connected: connect at least one reference to image_1"
            )
        # ComfyUI's tokenizer would fail on text that is not UTF-8 with a bare UnicodeEncodeError, after the VAE ran.
        check_prompt_text(prompt, "prompt")
        check_prompt_text(negative_prompt, "negative prompt")
        frames = [im[i : i + 1] for im in images for i in range(im.shape[0])]  # a batch input is several references
        sizes = [(int(f.shape[2]), int(f.shape[1])) for f in frames]
        if policy == "per_image":
            plans = [core_sizes(w, h) for w, h in sizes]
        else:
            if budget != CUSTOM and budget not in BUDGETS:
                raise UniRefError(f"budget is {budget!r}: pick one of {', '.join(BUDGETS)} or {CUSTOM}")
            area = custom_budget * custom_budget if budget == CUSTOM else BUDGETS[budget]
            plan = plan_references(sizes, mode="budget", budget=area, width=width, height=height)
            plans = [(r.vl, r.vae) for r in plan.references]
        vl_images, ref_latents, image_prompt = [], [], ""
        for k, (frame, (vl, vae_size)) in enumerate(zip(frames, plans), start=1):
            samples = frame.movedim(-1, 1)
            vl_images.append(comfy.utils.common_upscale(samples, vl[0], vl[1], "area", "disabled").movedim(1, -1))
            s = comfy.utils.common_upscale(samples, vae_size[0], vae_size[1], "area", "disabled")
            ref_latents.append(vae.encode(s.movedim(1, -1)[:, :, :, :3]))
            image_prompt += PICTURE_LABEL.format(k)

        # The engine's template and picture labels are core TextEncodeQwenImageEditPlus's text (comfy_extras/
        # nodes_qwen.py): tests/test_native_self.py proves the conditioning equal.
        def encode(text):
            tokens = clip.tokenize(image_prompt + text, images=vl_images, llama_template=PROMPT_TEMPLATE)
            conditioning = clip.encode_from_tokens_scheduled(tokens)
            return node_helpers.conditioning_set_values(conditioning, {"reference_latents": ref_latents}, append=True)

        latent = torch.zeros(
            [batch_size, LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE], device=mm.intermediate_device()
        )
        return io.NodeOutput(encode(prompt), encode(negative_prompt), {"samples": latent})


NODES = [SelfEncodeNative]
