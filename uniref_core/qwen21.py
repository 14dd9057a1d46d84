"""Qwen-Image 2.1's encoding, step for step as diffusers' QwenImage21Pipeline does it (0.42.1).

What differs from the Edit family (prompt.py, latents.py), each reproduced here:

- Prompt: a short system turn, then ``<image1><|vision_start|><|image_pad|><|vision_end|>`` per reference (blocks
  joined by one space) before the prompt; only the system turn is dropped (its length read off the processor's chat
  template); the conditioning is the last decoder layer BEFORE the encoder's final norm; ``img_mask`` marks the
  ``<|image_pad|>`` slots the transformer fills with each reference's latents.
- References: RGBA at one size for both sides: the VL copy is composited over white, the 4-channel VAE reads all four.
- Latents: a 16x VAE and patch size 1, so one token is one latent (16×16 px) and packing is a plain flatten.
- Sequence: references first, the target LAST (``img_shapes``, ``img_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import UniRefError
from .latents import latent_stats, vae_encode
from .prompt import check_prompt_length, check_prompt_text, encoder_positions

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
PROMPT_TEMPLATE = (
    f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n<|im_start|>assistant\n"
)
IMAGE_BLOCK = "<image{}><|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
# The VAE compresses 16x and the transformer takes latents unpatched: one token = one 16×16 px latent.
VAE_SCALE = 16
# Sides are multiples of 32: one VL slot (16 px patches merged 2×2) = one img_mask slot = 2×2 latents.
SIDE_MULTIPLE = 32
LATENTS_PER_SLOT = 4
REFER_AS = "image k (the template tags them <image1>, <image2>, ...)"


def build_prompt_text(prompt: str, num_images: int) -> str:
    """The encoder text for ``prompt`` after ``num_images`` references; an empty prompt becomes one space (Qwen has
    no BOS token, and diffusers does the same)."""
    blocks = " ".join(IMAGE_BLOCK.format(k) for k in range(1, num_images + 1))
    return PROMPT_TEMPLATE.format(blocks + (prompt or " "))


def system_turn_tokens(processor) -> int:
    """How many leading tokens (the system turn) the conditioning drops, counted through the processor's own chat
    template as diffusers counts them."""
    if not getattr(processor, "chat_template", None):
        raise UniRefError(
            "the Qwen-Image 2.1 processor has no chat template (processor/chat_template.jinja or the "
            "chat_template entry of its config); it is needed to count the system turn: re-download the model folder"
        )
    message = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}]
    return len(processor.apply_chat_template(message, tokenize=True, return_dict=False)[0])


def vl_image(image: Image.Image) -> Image.Image:
    """What the vision encoder sees of a reference: RGB, any transparency composited over white (the checkpoint was
    trained so; the VAE still reads the alpha)."""
    image = image if image.mode == "RGBA" else image.convert("RGBA")
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return white


def encoder_room_qwen21(text_encoder, processor) -> tuple[int, str] | None:
    """(the most conditioning tokens the text encoder's positions hold, why), or None when its config does not say:
    its ``max_position_embeddings`` less the dropped system turn (`encode_prompt_qwen21`'s ``max_tokens``)."""
    positions = encoder_positions(text_encoder)
    if positions is None:
        return None
    drop = system_turn_tokens(processor)
    return (
        positions - drop,
        f"the text encoder's {positions} positions (its {drop}-token system turn among them) leave it",
    )


@dataclass
class Qwen21Prompt:
    """Encoder output for one prompt: [1, T, D] embeddings; a [1, T] mask, or None when all are valid (always, for
    one prompt); ``img_mask`` [1, T] bool, True at each reference's ``<|image_pad|>`` slots."""

    embeds: torch.Tensor
    mask: torch.Tensor | None
    img_mask: torch.Tensor


def _check_sides(images: list[Image.Image]) -> None:
    """A reference's sides must be multiples of 32 px: each vision slot stands for 2×2 latents of it."""
    for k, im in enumerate(images, start=1):
        w, h = im.size
        if w % SIDE_MULTIPLE or h % SIDE_MULTIPLE:
            raise UniRefError(
                f"reference {k} is {w}×{h} px: a Qwen-Image 2.1 reference needs sides that are multiples of "
                f"{SIDE_MULTIPLE} px (each vision slot stands for 2×2 latents); resize it to its planned size first"
            )


def _check_slots(grid: torch.Tensor | None, images: list[Image.Image]) -> None:
    """Each reference's VL slots must be its latents / 4, or the transformer's splice fails with a bare shape error:
    the Qwen-VL processor resizes an image itself when its area is outside its min/max pixels."""
    slots = [int(g.prod()) // LATENTS_PER_SLOT for g in grid] if grid is not None else []
    for k, (im, got) in enumerate(zip(images, slots), start=1):
        w, h = im.size
        want = (w // SIDE_MULTIPLE) * (h // SIDE_MULTIPLE)
        if got != want:
            raise UniRefError(
                f"reference {k} is {w}×{h} px: the vision encoder's processor makes {got} slots of it, its latents "
                f"need {want}; give each reference an area within the processor's min_pixels..max_pixels "
                "(size.shortest_edge..size.longest_edge in processor/preprocessor_config.json)"
            )


@torch.no_grad()
def encode_prompt_qwen21(
    text_encoder,
    processor,
    prompt: str,
    images: list[Image.Image],
    device=None,
    max_tokens: tuple[int, str] | None = None,
    name: str = "prompt",
) -> Qwen21Prompt:
    """Encode ``prompt`` with the references ``images``, each already at its planned size (`resize_reference`: the
    copy the VAE reads too).

    ``max_tokens``: (the most conditioning tokens the model takes, why), checked on the tokenized text before the
    encoder runs; a longer prompt is refused with its count, not cut. ``name`` is how the errors call the text."""
    check_prompt_text(prompt, name, encoder="Qwen3-VL", refer_as=REFER_AS)
    _check_sides(images)
    device = device or text_encoder.device
    text = build_prompt_text(prompt, len(images))
    kwargs = dict(text=[text], padding=True, padding_side="left", return_tensors="pt")
    if images:
        kwargs["images"] = [vl_image(im) for im in images]
    inputs = processor(**kwargs)
    drop = system_turn_tokens(processor)
    length = inputs["input_ids"].shape[1] - drop
    check_prompt_length(length, max_tokens, name, "make the references smaller")
    _check_slots(inputs.get("image_grid_thw"), images)
    inputs = inputs.to(device)
    forward = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
    if images and "pixel_values" in inputs:
        forward.update(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    if "mm_token_type_ids" in inputs:
        forward["mm_token_type_ids"] = inputs["mm_token_type_ids"]
    # The transformer was trained on the last decoder layer before the final RMSNorm; transformers 5.x returns the
    # normed state as hidden_states[-1], so a hook hands the norm's input through instead.
    model = text_encoder.model
    norm = getattr(model, "language_model", model).norm
    handle = norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        hidden = text_encoder(**forward).hidden_states[-1]
    finally:
        handle.remove()
    valid = inputs["attention_mask"][0].bool()
    pad_id = processor.tokenizer.encode(IMAGE_PAD)[0]
    embeds = hidden[0][valid][drop:].unsqueeze(0)
    img_mask = (inputs["input_ids"][0][valid] == pad_id)[drop:].unsqueeze(0)
    # One prompt is never padded: the mask is all ones, and diffusers passes None then.
    return Qwen21Prompt(embeds=embeds, mask=None, img_mask=img_mask)


def pack_qwen21(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, h, w] or [B, C, h, w] → [B, h·w, C], raster order (patch size 1)."""
    if latents.ndim == 5:
        latents = latents[:, :, 0]
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).transpose(1, 2)


def unpack_qwen21(tokens: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, h·w, C] → [B, C, 1, h, w] for an image of ``width`` × ``height`` pixels."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, 1, height // VAE_SCALE, width // VAE_SCALE)


def resize_reference(image: Image.Image, width: int, height: int) -> Image.Image:
    """A reference at its planned size, RGBA (Lanczos, on the alpha-premultiplied pixels as PIL resizes RGBA): the
    one copy both the vision encoder (`vl_image`) and the VAE read."""
    image = image if image.mode == "RGBA" else image.convert("RGBA")
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def reference_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """``image`` as RGBA at ``width`` × ``height`` → [1, 4, H, W] in −1..1, left channels-last as diffusers'
    VaeImageProcessor leaves it: the VAE's convolutions round differently (~1e-6) on a contiguous copy."""
    x = np.asarray(resize_reference(image, width, height), dtype=np.float32) / 255.0
    return 2.0 * torch.from_numpy(x[None].transpose(0, 3, 1, 2)) - 1.0


@torch.no_grad()
def encode_image_qwen21(vae, image: Image.Image, width: int, height: int) -> torch.Tensor:
    """``image`` as RGBA resized to ``width`` × ``height`` → normalised latent tokens [1, h·w, C] (the VAE's mode)."""
    return pack_qwen21(vae_encode(vae, reference_pixels(image, width, height)))


@torch.no_grad()
def decode_qwen21(vae, tokens: torch.Tensor, width: int, height: int) -> list[Image.Image]:
    """Latent tokens [B, h·w, C] → ``width`` × ``height`` RGBA images."""
    latents = unpack_qwen21(tokens, width, height).to(vae.dtype)
    mean, std = latent_stats(vae, latents.device, latents.dtype)
    # x·std + mean, as diffusers' 2.1 pipeline writes it (the Edit pipeline divides by 1/std: not bitwise the same).
    pixels = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
    # Denormalised in the VAE's dtype before the float cast, as diffusers' postprocess does (latents.to_images casts
    # first: in bf16 about a third of the 8-bit values would come out one off).
    x = (pixels * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray((im * 255).round().astype("uint8")) for im in x]


def img_shapes_qwen21(ref_sizes: list[tuple[int, int]], output_size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(frames, rows, columns) of each image's tokens, from (width, height) in pixels: the references in order,
    then the target LAST."""
    return [(1, h // VAE_SCALE, w // VAE_SCALE) for w, h in [*ref_sizes, output_size]]


def img_mask_qwen21(prompt_img_mask: torch.Tensor, target_tokens: int) -> torch.Tensor:
    """The transformer's ``img_mask`` over the joint sequence: the prompt's ``<|image_pad|>`` slots, then one True
    slot per 2×2 group of the target's ``target_tokens`` latents."""
    target = prompt_img_mask.new_ones(prompt_img_mask.shape[0], target_tokens // LATENTS_PER_SLOT)
    return torch.cat([prompt_img_mask, target], dim=1)
