"""SELF's encoding steps, written once: the pipeline (``UniRefPipeline.encode``), the SFT encoding pass
(`training.sft.data.SampleEncoder`) and the MSGRPO prompts all call these, so training and inference cannot drift.

- ``vl_copies``: each reference resized to its planned VL size, for the text encoder.
- ``prompt_room``: how many conditioning tokens a prompt may make under a plan.
- ``encode_image`` / ``encode_references``: an image (a reference at its planned VAE size, a target, an init
  image) → packed latent tokens [1, L, C·4] on the VAE's device.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from PIL import Image

from . import budget as budget_mod
from .budget import Plan, ReferencePlan
from .latents import pack_latents, to_pixels, vae_encode
from .prompt import encoder_room


def vl_copies(images: list[Image.Image], plan: Plan) -> list[Image.Image]:
    """The references' small copies the text encoder sees, at the sizes ``plan`` gives them."""
    return [im.resize(r.vl, resample=Image.Resampling.LANCZOS) for im, r in zip(images, plan.references)]


def prompt_room(text_encoder, plan: Plan) -> tuple[int, str]:
    """The most conditioning tokens a prompt may make with ``plan`` (`encode_prompt`'s ``max_tokens``): the
    transformer's RoPE room after the largest image's half side, or the text encoder's positions less the dropped
    system turn if fewer."""
    encoder = encoder_room(text_encoder)
    if encoder is not None and encoder[0] < plan.text_room:
        return encoder
    return plan.text_room, (
        f"at this size (the longest image side is {2 * plan.text_position} tokens) the "
        f"transformer's {budget_mod.ROPE_POSITIONS} RoPE positions leave it"
    )


def encode_image(vae, image: Image.Image, width: int, height: int) -> torch.Tensor:
    """``image`` resized (and centre-cropped) to ``width`` × ``height`` → packed latent tokens."""
    return pack_latents(vae_encode(vae, to_pixels(image, width, height)))


def encode_references(
    vae,
    images: list[Image.Image],
    plan: Plan,
    around: Callable[[ReferencePlan], AbstractContextManager] | None = None,
) -> list[torch.Tensor]:
    """Each reference at its planned VAE size → packed latent tokens. ``around(reference)``: a context each
    reference's pass runs in (the pipeline's tiling choice and cancel points)."""
    tokens = []
    for im, r in zip(images, plan.references):
        with around(r) if around is not None else nullcontext():
            tokens.append(encode_image(vae, im, *r.vae))
    return tokens
