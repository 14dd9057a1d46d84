"""The UniRef nodes: Load UniRef Model → Reference Batch → SELF Encode → UniRef Sampler.

Each node is a schema plus a short ``execute`` that calls ``uniref_core``; no model maths here.
"""

from __future__ import annotations

from contextlib import contextmanager

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from ..uniref_core.budget import BUDGETS, MODES
from ..uniref_core.errors import UniRefCancelled, UniRefError
from ..uniref_core.images import pil_to_comfy, split_image_batch
from ..uniref_core.memory import trim_host_heap
from ..uniref_core.pipeline import (
    DEFAULT_CFG,
    DEFAULT_ETA,
    DEFAULT_STEPS,
    MAX_CFG,
    MAX_SEED,
    MAX_STEPS,
    SAMPLERS,
    SamplingOptions,
)
from . import comfy_model

ModelType = io.Custom("UNIREF_MODEL")
RefsType = io.Custom("UNIREF_REFS")
CondType = io.Custom("UNIREF_COND")

CATEGORY = "UniRef"
# Hosts without io.Autogrow (ComfyUI < 0.4) get this many fixed optional image inputs.
FIXED_IMAGE_INPUTS = 6
MAX_AUTOGROW_IMAGES = 16
AUTOGROW_PREFIX = "images."
CUSTOM = "custom"
MODEL_DEFAULT = "model default"
MAX_SIDE = 8192  # output width / height; the engine refuses areas beyond its longest sequence with a clear error
MIN_CUSTOM_BUDGET = 64
MAX_CUSTOM_BUDGET = 4096  # a 4096² budget is the most the engine runs (uniref_core.budget.MAX_SEQUENCE_TOKENS)


def _precision_inputs(what: str) -> list:
    """The dtype and offload inputs both loaders share; ``what`` is how the dtype's tooltip names it."""
    return [
        io.Combo.Input(
            "dtype",
            options=["auto", "bf16", "fp16", "fp32"],
            default="auto",
            tooltip=f"{what}. auto: bf16 on a GPU that supports it, fp32 on CPU.",
        ),
        io.Combo.Input(
            "offload",
            options=list(comfy_model.OFFLOAD_MODES),
            default="none",
            optional=True,
            tooltip="blocks: for GPUs smaller than the model. The transformer and text encoder stay in "
            "CPU memory and each block visits the GPU only while it runs (slower; the VAE stays "
            "on the GPU). none: ComfyUI moves whole networks in and out as usual.",
        ),
    ]


def _image_slot_names(kwargs: dict) -> list:
    """Connected IMAGE tensors in slot order (image_1, image_2, …) from Autogrow's dict or fixed inputs."""
    images = kwargs.get("images")
    if isinstance(images, dict):
        slots = images
    else:
        slots = {k.split(".", 1)[1]: v for k, v in kwargs.items() if k.startswith(AUTOGROW_PREFIX)}
    ordered = sorted(slots, key=lambda n: int(n.rsplit("_", 1)[-1]))
    return [slots[n] for n in ordered if slots[n] is not None]


class LoadUniRefModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniRefLoadModel",
            display_name="Load UniRef Model",
            category=CATEGORY,
            description="Loads a Qwen-Image-Edit-family model (UniRef, Qwen-Image-Edit-2509/2511, UniPic 3.0) "
            "from a diffusers-format folder in models/uniref/. Kept in memory between runs.",
            inputs=[
                io.Combo.Input(
                    "model",
                    options=comfy_model.list_models(),
                    tooltip="A diffusers-format model folder inside models/uniref/ (the folder holding "
                    "model_index.json), or a built-in model: uniref-default (tuned with MSGRPO) or "
                    "uniref-default-sft (the same before it).",
                ),
                *_precision_inputs("Weight precision"),
            ],
            outputs=[ModelType.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, dtype="auto", offload="none") -> io.NodeOutput:
        return io.NodeOutput(comfy_model.load_model(model, dtype, offload))


class LoadUniRefModelFiles(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="UniRefLoadModelFiles",
            display_name="Load UniRef Model (ComfyUI files)",
            category=CATEGORY,
            description="Loads a Qwen-Image-Edit-family model from ComfyUI's single files: a diffusion model "
            "(bf16 or fp8, e.g. qwen_image_edit_2511_bf16.safetensors), its Qwen2.5-VL text encoder and the "
            "Qwen-Image VAE. The tokenizer comes with ComfyUI.",
            inputs=[
                io.Combo.Input(
                    "diffusion_model",
                    options=folder_paths.get_filename_list("diffusion_models"),
                    tooltip="From models/diffusion_models/. fp8 files stay 8-bit in memory.",
                ),
                io.Combo.Input(
                    "text_encoder",
                    options=folder_paths.get_filename_list("text_encoders"),
                    tooltip="From models/text_encoders/, e.g. qwen_2.5_vl_7b.safetensors.",
                ),
                io.Combo.Input(
                    "vae",
                    options=folder_paths.get_filename_list("vae"),
                    tooltip="From models/vae/, e.g. qwen_image_vae.safetensors.",
                ),
                *_precision_inputs("Compute precision"),
            ],
            outputs=[ModelType.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, diffusion_model, text_encoder, vae, dtype="auto", offload="none") -> io.NodeOutput:
        return io.NodeOutput(comfy_model.load_model_files(diffusion_model, text_encoder, vae, dtype, offload))


def image_inputs() -> list:
    """Any number of reference images: one Autogrow input (a new slot appears as one is connected) where the host
    has it, else FIXED_IMAGE_INPUTS optional ones named like Autogrow's slots ("images.image_1"), so one workflow
    file links on both kinds of host. Read back in order with `_image_slot_names`."""
    tip = "A reference image; its order is its 'Picture k' number in the prompt. Any size."
    if hasattr(io, "Autogrow"):
        return [
            io.Autogrow.Input(
                "images",
                template=io.Autogrow.TemplateNames(
                    io.Image.Input("image", tooltip=tip),
                    names=[f"image_{i}" for i in range(1, MAX_AUTOGROW_IMAGES + 1)],
                    # 0: no slot is "required", so an empty batch reaches our own error message.
                    min=0,
                ),
                optional=True,
                tooltip="Reference images; a new input appears as you connect one.",
            )
        ]
    return [
        io.Image.Input(f"{AUTOGROW_PREFIX}image_{i}", display_name=f"image_{i}", optional=True, tooltip=tip)
        for i in range(1, FIXED_IMAGE_INPUTS + 1)
    ]


def _reference_inputs() -> list:
    previous = RefsType.Input(
        "previous",
        optional=True,
        tooltip="References from another Reference Batch; they come first, so chain batches for any number.",
    )
    return [previous, *image_inputs()]


class ReferenceBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniRefReferenceBatch",
            display_name="Reference Batch",
            category=CATEGORY,
            description="Collects reference images in order (Picture 1, 2, …), each kept at its own size. "
            "Chain several to add more.",
            inputs=_reference_inputs(),
            outputs=[RefsType.Output(display_name="references")],
        )

    @classmethod
    def execute(cls, previous=None, **kwargs) -> io.NodeOutput:
        refs = list(previous or [])
        for tensor in _image_slot_names(kwargs):
            # An IMAGE batch of several frames adds each frame as its own reference.
            refs.extend(pil_to_comfy(im) for im in split_image_batch(tensor, name=f"reference {len(refs) + 1}"))
        if not refs:
            raise UniRefError("Reference Batch has no image connected: connect at least one image to image_1")
        return io.NodeOutput(refs)


class SelfEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniRefSelfEncode",
            display_name="SELF Encode",
            category=CATEGORY,
            description="Encodes the prompt and the references for the sampler: all references share one pixel "
            "budget (SELF), so many references cost about what one costs.",
            inputs=[
                ModelType.Input("model", tooltip="From Load UniRef Model."),
                RefsType.Input("references", tooltip="From Reference Batch."),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="",
                    tooltip="The instruction. Refer to references as 'Picture 1', 'Picture 2', … in batch order.",
                ),
                io.String.Input(
                    "negative_prompt",
                    multiline=True,
                    default=" ",
                    tooltip="What to avoid; used when the sampler's cfg is above 1.",
                ),
                io.Combo.Input(
                    "budget",
                    options=[MODEL_DEFAULT, *BUDGETS, CUSTOM],
                    default=MODEL_DEFAULT,
                    tooltip="Total pixels of ALL references together. model default: what the checkpoint was "
                    "trained at (1024² for Qwen-Image-Edit, 256² for the built-in model); larger keeps more detail "
                    "and costs more.",
                ),
                io.Int.Input(
                    "custom_budget",
                    default=1024,
                    min=MIN_CUSTOM_BUDGET,
                    max=MAX_CUSTOM_BUDGET,
                    step=32,
                    tooltip="Side of the square budget (pixels) when budget is 'custom'.",
                ),
                io.Combo.Input(
                    "mode",
                    options=list(MODES),
                    default="budget",
                    tooltip="budget: SELF, all references within the budget. per_image: each reference at ~1024² "
                    "like Qwen-Image-Edit's own pipeline (how 2509/2511 were trained).",
                ),
                io.Int.Input(
                    "width",
                    default=0,
                    min=0,
                    max=MAX_SIDE,
                    step=16,
                    tooltip="Output width; 0 takes reference 'match_reference's aspect ratio at the model's output "
                    "area (1024², 128² for the built-in model).",
                ),
                io.Int.Input(
                    "height",
                    default=0,
                    min=0,
                    max=MAX_SIDE,
                    step=16,
                    tooltip="Output height; 0 takes reference 'match_reference's aspect ratio at the model's output "
                    "area (1024², 128² for the built-in model).",
                ),
                io.Int.Input(
                    "match_reference",
                    default=1,
                    min=1,
                    max=64,
                    tooltip="Which reference's aspect ratio the output takes when width and height are 0.",
                ),
                io.Boolean.Input(
                    "upscale_small",
                    default=True,
                    tooltip="Enlarge references smaller than their share of the budget (off: keep their size).",
                ),
            ],
            outputs=[CondType.Output(display_name="conditioning")],
        )

    # Only the inputs checked here are named: ComfyUI skips its own min/max/option checks for the inputs a
    # validate_inputs takes (all of them with **kwargs), so it still checks every other input. None: linked.
    @classmethod
    def validate_inputs(cls, width=None, height=None):
        for name, value in (("width", width), ("height", height)):
            if value is not None and not 0 <= value <= MAX_SIDE:
                return f"SELF Encode: {name} is {value}: give 0 (match a reference) or a size up to {MAX_SIDE}"
        if width is not None and height is not None and (width == 0) != (height == 0):
            return "SELF Encode: set both width and height, or both to 0 to match a reference"
        return True

    @classmethod
    def execute(
        cls,
        model,
        references,
        prompt,
        negative_prompt=" ",
        budget=MODEL_DEFAULT,
        custom_budget=1024,
        mode="budget",
        width=0,
        height=0,
        match_reference=1,
        upscale_small=True,
    ) -> io.NodeOutput:
        area = _budget_area(budget, custom_budget)  # None: the model's
        pipe = model.load("text_encoder", "vae")
        with comfy_interrupt():
            cond = pipe.encode(
                references,
                prompt,
                negative_prompt,
                cfg=2.0,  # always encode the negative: the sampler's cfg is not known here
                mode=mode,
                budget=area,
                upscale=upscale_small,
                width=width or None,
                height=height or None,
                match_ref=match_reference,
                is_cancelled=mm.processing_interrupted,
            )
        return io.NodeOutput(cond)


def _budget_area(budget: str, custom_budget: int) -> int | None:
    """The reference budget in pixels (None: the model's default), refused here when the host let a value through
    that the schema does not offer (an API prompt, a host that skips validation)."""
    if budget == MODEL_DEFAULT:
        return None
    if budget in BUDGETS:
        return BUDGETS[budget]
    if budget != CUSTOM:
        options = ", ".join([MODEL_DEFAULT, *BUDGETS, CUSTOM])
        raise UniRefError(f"SELF Encode: budget is {budget!r}: pick one of {options}")
    if not MIN_CUSTOM_BUDGET <= custom_budget <= MAX_CUSTOM_BUDGET:
        raise UniRefError(
            f"SELF Encode: custom_budget is {custom_budget}: give the side of the square budget in "
            f"pixels, {MIN_CUSTOM_BUDGET} to {MAX_CUSTOM_BUDGET} (1024 is typical)"
        )
    return custom_budget * custom_budget


class UniRefSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniRefSampler",
            display_name="UniRef Sampler",
            category=CATEGORY,
            description="Generates the edited image from a SELF conditioning, with a preview each step.",
            inputs=[
                ModelType.Input("model", tooltip="From Load UniRef Model."),
                CondType.Input("conditioning", tooltip="From SELF Encode."),
                io.Int.Input(
                    "seed", default=0, min=0, max=MAX_SEED, control_after_generate=True, tooltip="Noise seed."
                ),
                io.Int.Input(
                    "steps",
                    default=DEFAULT_STEPS,
                    min=1,
                    max=MAX_STEPS,
                    tooltip="Denoising steps; 30–50 is typical, 8 for distilled checkpoints, 20 for the built-in "
                    "model.",
                ),
                io.Float.Input(
                    "cfg",
                    default=DEFAULT_CFG,
                    min=1.0,
                    max=MAX_CFG,
                    step=0.1,
                    tooltip="True CFG scale with the negative prompt; 1 turns it off and runs twice as fast (use 1 "
                    "with the built-in model, which is trained without it).",
                ),
                io.Combo.Input(
                    "sampler",
                    options=list(SAMPLERS),
                    default="ode",
                    tooltip="ode: deterministic Euler. sde: stochastic (Flow-GRPO's sampler).",
                ),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.01,
                    max=1.0,
                    step=0.01,
                    tooltip="1 starts from noise; lower keeps more of init_image (which is then required).",
                ),
                io.Float.Input(
                    "eta", default=DEFAULT_ETA, min=0.01, max=2.0, step=0.01, tooltip="Noise level of the sde sampler."
                ),
                io.Image.Input("init_image", optional=True, tooltip="Start image for denoise < 1."),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(
        cls, model, conditioning, seed, steps, cfg, sampler, denoise, eta=DEFAULT_ETA, init_image=None
    ) -> io.NodeOutput:
        init = split_image_batch(init_image, name="init_image")[0] if init_image is not None else None
        options = SamplingOptions(seed=seed, steps=steps, cfg=cfg, sampler=sampler, eta=eta, denoise=denoise)
        options.check(init)
        # ComfyUI evicts other models to leave what the run needs; the engine refuses it if still too little.
        needed = model.pipe.sample_memory_required(conditioning, options, mm.get_torch_device())
        pipe = model.load("transformer", "vae", memory_required=needed)
        cond = conditioning
        bar = comfy.utils.ProgressBar(steps)
        show_preview = _previews_enabled()

        def on_step(info) -> None:
            preview = None
            if show_preview:
                preview = ("JPEG", pipe.preview(info.x0, info.width, info.height), _preview_size())
            bar.update_absolute(info.step, info.total, preview)

        with comfy_interrupt():
            latents = pipe.sample(
                cond, options, init_image=init, on_step=on_step, is_cancelled=mm.processing_interrupted
            )
            images = pipe.decode(latents, cond.width, cond.height, is_cancelled=mm.processing_interrupted)
        return io.NodeOutput(pil_to_comfy(images), {"samples": pipe.raw_latents(latents, cond.width, cond.height)})


@contextmanager
def comfy_interrupt():
    """The engine's cancel (it asks ComfyUI's interrupt flag before every network block) as ComfyUI's own
    InterruptProcessingException, so the prompt ends as "interrupted", not as an error. However the work ends, the
    host memory its activations took goes back to the system (a server runs for days: `trim_host_heap`)."""
    try:
        yield
    except UniRefCancelled as e:
        mm.throw_exception_if_processing_interrupted()  # clears the flag as ComfyUI's own checks do, and raises
        raise mm.InterruptProcessingException() from e
    finally:
        trim_host_heap()


def _previews_enabled() -> bool:
    from comfy.cli_args import LatentPreviewMethod, args

    return args.preview_method != LatentPreviewMethod.NoPreviews


def _preview_size() -> int:
    from comfy.cli_args import args

    return int(getattr(args, "preview_size", 512))


class UniRefLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="UniRefLora",
            display_name="UniRef LoRA",
            category=CATEGORY,
            description="Applies a LoRA from models/loras/ (peft/diffusers, kohya/musubi or ComfyUI/ai-toolkit keys) "
            "to a UniRef model's transformer at a strength. Chain several; remove the node and the model is as it "
            "was.",
            inputs=[
                ModelType.Input("model", tooltip="From Load UniRef Model or another UniRef LoRA."),
                io.Combo.Input(
                    "lora_name",
                    options=folder_paths.get_filename_list("loras"),
                    tooltip="A Qwen-Image / Qwen-Image-Edit LoRA (.safetensors) in models/loras/.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="How strongly the LoRA changes the model; 0 leaves it out, negative inverts it.",
                ),
            ],
            outputs=[ModelType.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength=1.0) -> io.NodeOutput:
        if strength == 0:
            return io.NodeOutput(model)
        return io.NodeOutput(model.with_lora(lora_name, strength))


NODES = [LoadUniRefModel, LoadUniRefModelFiles, ReferenceBatch, SelfEncode, UniRefSampler, UniRefLora]
