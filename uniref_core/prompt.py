"""Prompt encoding through the Qwen2.5-VL encoder, which also sees each reference.

The text is the Qwen-Image-Edit template: a system prompt, then ``Picture k: <image>`` per reference,
then the instruction. The encoder's last hidden state is the conditioning, with the first
``DROP_IDX`` template tokens dropped (the system prompt and the user-turn header).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .errors import UniRefError

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PICTURE_LABEL = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
# Tokens of the template before the user's content: the system turn and "<|im_start|>user\n".
DROP_IDX = 64
# Qwen2.5-VL merges 2×2 vision patches into one token.
VL_MERGE = 4


def build_prompt_text(prompt: str, num_images: int) -> str:
    """The full encoder text for ``prompt`` with ``num_images`` pictures labelled 1…K in order."""
    labels = "".join(PICTURE_LABEL.format(k) for k in range(1, num_images + 1))
    return PROMPT_TEMPLATE.format(labels + prompt)


# Qwen2.5-VL's control tokens that the template places: typed in a prompt, the processor counts an image or
# video placeholder that has no picture (and fails), and the others end the user's turn or open a picture early.
TEMPLATE_TOKENS = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|im_start|>",
    "<|im_end|>",
)


def check_prompt_text(
    text: str, name: str = "prompt", *, encoder: str = "Qwen2.5-VL", refer_as: str = "'Picture k'"
) -> None:
    """Refuse text the tokenizer cannot take: a lone surrogate, such as a byte that is not UTF-8 read from a command
    line or file (Python keeps it as U+DC80…U+DCFF) or a ``\\ud800`` escape in a JSON workflow; or one of the
    template's control tokens (`TEMPLATE_TOKENS`, the same in Qwen2.5-VL and Qwen3-VL). ``encoder`` and
    ``refer_as`` name the family's encoder and how its prompts refer to a reference."""
    token = next((t for t in TEMPLATE_TOKENS if t in text), None)
    if token:
        raise UniRefError(
            f"{name} contains {token}, a control token of the {encoder} template that UniRef places itself (one "
            f"<|image_pad|> per reference); remove it, and refer to a reference as {refer_as}"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        raise UniRefError(
            f"{name} is not valid UTF-8 text: character {e.start + 1} is {what} (text saved in another "
            "encoding, such as Latin-1?); give the prompt as UTF-8 text"
        ) from None


def encoder_positions(text_encoder) -> int | None:
    """The text encoder's ``max_position_embeddings`` (its text config's for a VL model), or None when not said."""
    config = getattr(text_encoder, "config", None)
    positions = getattr(getattr(config, "text_config", None), "max_position_embeddings", None)
    positions = positions or getattr(config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) else None


def encoder_room(text_encoder) -> tuple[int, str] | None:
    """(the most conditioning tokens the text encoder's positions hold, why), or None when its config does not say:
    its ``max_position_embeddings`` less the dropped system turn (`encode_prompt`'s ``max_tokens``)."""
    positions = encoder_positions(text_encoder)
    if positions is None:
        return None
    return (
        positions - DROP_IDX,
        f"the text encoder's {positions} positions (its {DROP_IDX}-token system turn among them) leave it",
    )


@dataclass
class PromptEmbeds:
    """Encoder output for one prompt: [1, L, D] embeddings, a mask or None when all valid."""

    embeds: torch.Tensor
    mask: torch.Tensor | None
    vl_tokens: list[int]  # vision tokens per reference inside the text stream

    def repeat(self, n: int) -> PromptEmbeds:
        mask = None if self.mask is None else self.mask.repeat(n, 1)
        return PromptEmbeds(self.embeds.repeat(n, 1, 1), mask, self.vl_tokens)

    def to(self, device, dtype=None) -> PromptEmbeds:
        mask = None if self.mask is None else self.mask.to(device)
        return PromptEmbeds(self.embeds.to(device, dtype or self.embeds.dtype), mask, self.vl_tokens)


def check_prompt_length(length: int, max_tokens: tuple[int, str] | None, name: str, smaller: str) -> None:
    """Refuse a tokenized prompt of ``length`` conditioning tokens beyond ``max_tokens`` (the most, why) with the
    count to cut; ``smaller``: the other way to make room, for the message."""
    if max_tokens is not None and length > max_tokens[0]:
        limit, why = max_tokens
        raise UniRefError(
            f"{name} is too long: with the template and the references' vision tokens it makes "
            f"{length} tokens, and {why} at most {limit}; shorten it by at least {length - limit} "
            f"tokens (or {smaller})"
        )


@torch.no_grad()
def encode_prompt(
    text_encoder,
    processor,
    prompt: str,
    vl_images: list[Image.Image],
    device=None,
    dtype=None,
    *,
    max_tokens: tuple[int, str] | None = None,
    name: str = "prompt",
):
    """Encode ``prompt`` with the references' small copies ``vl_images`` (already at their VL size).

    ``max_tokens``: (the most conditioning tokens the model takes, why), checked on the tokenized text before the
    encoder runs; a longer prompt is refused with its count, not cut (the references' vision tokens are in the same
    stream, and cutting would drop the end of the instruction; diffusers' Qwen-Image-Edit-Plus pipeline does not cut
    either). ``name`` is how the errors call the text."""
    check_prompt_text(prompt, name)
    device = device or text_encoder.device
    text = build_prompt_text(prompt, len(vl_images))
    inputs = processor(text=[text], images=vl_images or None, padding=True, return_tensors="pt")
    length = inputs["input_ids"].shape[1] - DROP_IDX
    check_prompt_length(length, max_tokens, name, "lower the VL budget and the largest image side")
    inputs = inputs.to(device)
    out = text_encoder(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"),
        output_hidden_states=True,
    )
    hidden = out.hidden_states[-1]
    valid = inputs["attention_mask"].bool()[0]
    embeds = hidden[0][valid][DROP_IDX:].unsqueeze(0).to(dtype or hidden.dtype)
    grid = inputs.get("image_grid_thw")
    vl_tokens = [int(g.prod()) // VL_MERGE for g in grid] if grid is not None else []
    # One prompt is never padded, so the mask is all ones: None, as the reference pipeline passes it.
    return PromptEmbeds(embeds=embeds, mask=None, vl_tokens=vl_tokens)
