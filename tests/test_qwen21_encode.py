"""Qwen-Image 2.1 encoding (uniref_core.qwen21) gives exactly what diffusers' QwenImage21Pipeline gives for the
same references: the prompt's embeddings and image slots, the references' latents, the token grids, and the decoded
image; a prompt that is too long or holds a control token is refused in a sentence."""

import copy
import re

import numpy as np
import pytest
import torch
from conftest import make_refs
from PIL import Image

from uniref_core import UniRefError
from uniref_core.budget import calculate_dimensions
from uniref_core.qwen21 import (
    SYSTEM_PROMPT,
    decode_qwen21,
    encode_image_qwen21,
    encode_prompt_qwen21,
    encoder_room_qwen21,
    img_mask_qwen21,
    img_shapes_qwen21,
    resize_reference,
)
from uniref_core.tiny import make_tiny_model

PROMPT = "Put the red circle on the left"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers import QwenImage21Pipeline

    folder = make_tiny_model(tmp_path_factory.mktemp("qwen21") / "model", family="qwen21")
    pipe = QwenImage21Pipeline.from_pretrained(folder, local_files_only=True)
    # The tiny VAE's mean 0 / std 1 would hide a normalisation mistake; both sides read these from the config.
    z = pipe.vae.config.z_dim
    pipe.vae.register_to_config(
        latents_mean=torch.linspace(-0.3, 0.3, z).tolist(), latents_std=torch.linspace(0.5, 1.7, z).tolist()
    )
    return pipe


def _refs(sizes, rgba):
    """Reference images at ``sizes``; those at indices ``rgba`` get an alpha ramp (transparent on the left)."""
    refs = make_refs(sizes)
    for k in rgba:
        w, h = refs[k].size
        refs[k].putalpha(Image.fromarray(np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))))
    return refs


CASES = {
    # (source sizes, which are RGBA, output_resolution, whether the decode is compared too); each reference goes to
    # output_resolution² at its own aspect (sides multiples of 32), the output follows the last one's aspect.
    "1 ref": ([(300, 200)], [], 192, True),
    "3 refs": ([(300, 200), (128, 256), (200, 200)], [2], 192, True),
    "10 refs": ([(160 + 24 * k, 128 - 8 * (k % 3)) for k in range(10)], [4], 128, False),  # the decode adds nothing
}


@pytest.mark.parametrize("case", CASES)
def test_encoding_equals_what_diffusers_hands_the_transformer(pipe, case):
    sources, rgba, resolution, decode = CASES[case]
    refs = _refs(sources, rgba)
    sizes = [calculate_dimensions(resolution**2, w / h) for w, h in (im.size for im in refs)]
    width, height = calculate_dimensions(resolution**2, sizes[-1][0] / sizes[-1][1])
    assert len(sizes) == 1 or len(set(sizes)) > 1  # references of different sizes

    calls, last = [], []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    try:
        image = pipe(
            image=refs,
            prompt=PROMPT,
            num_inference_steps=2,
            output_resolution=resolution,
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=lambda p, i, t, kw: last.append(kw["latents"]) or {},
            output_type="pil" if decode else "latent",
        ).images[0]
    finally:
        hook.remove()
    seen = calls[0]

    copies = [resize_reference(im, *s) for im, s in zip(refs, sizes)]
    prompt = encode_prompt_qwen21(pipe.text_encoder, pipe.processor, PROMPT, copies)
    latents = torch.cat([encode_image_qwen21(pipe.vae, im, *s) for im, s in zip(refs, sizes)], dim=1)
    target = (width // 16) * (height // 16)

    # What the transformer receives inside the real call (the outputs of the pipeline's own encode_prompt and
    # prepare_latents on its resized RGBA copies): bitwise ours, all fp32.
    assert torch.equal(seen["encoder_hidden_states"], prompt.embeds)
    assert seen["encoder_hidden_states_mask"] is None and prompt.mask is None
    assert torch.equal(seen["img_mask"], img_mask_qwen21(prompt.img_mask, target))
    assert int(prompt.img_mask.sum()) == sum((w // 32) * (h // 32) for w, h in sizes)
    assert [list(s) for s in seen["img_shapes"]] == [img_shapes_qwen21(sizes, (width, height))]
    assert img_shapes_qwen21(sizes, (width, height))[-1] == (1, height // 16, width // 16)  # target last
    assert torch.equal(seen["hidden_states"][:, :-target], latents)  # references first, in order

    # The last step's latents decode to the pipeline's output, RGBA.
    if not decode:
        return
    ours = decode_qwen21(pipe.vae, last[-1], width, height)[0]
    assert ours.mode == image.mode == "RGBA" and ours.size == image.size == (width, height)
    assert np.array_equal(np.asarray(ours), np.asarray(image))


def test_empty_prompt_and_no_references_equal_diffusers(pipe):
    ref = resize_reference(_refs([(200, 130)], [0])[0], 192, 128)
    for images in ([], [ref]):
        ours = encode_prompt_qwen21(pipe.text_encoder, pipe.processor, "", images)
        embeds, mask, img_mask = pipe.encode_prompt("", image=images or None)
        assert torch.equal(ours.embeds, embeds) and torch.equal(ours.img_mask, img_mask) and mask is None
    assert int(img_mask.sum()) == (192 // 32) * (128 // 32)


def test_too_long_prompt_is_refused_with_its_count(pipe):
    refs = [resize_reference(im, 128, 96) for im in make_refs([(128, 96)])]
    tokens = encode_prompt_qwen21(pipe.text_encoder, pipe.processor, PROMPT, refs).embeds.shape[1]
    room = (tokens, "the test's room leaves it")
    encode_prompt_qwen21(pipe.text_encoder, pipe.processor, PROMPT, refs, max_tokens=room)  # exactly fits
    drop = len(pipe.processor.tokenizer.encode(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"))
    assert encoder_room_qwen21(pipe.text_encoder, pipe.processor) == (
        4096 - drop,
        f"the text encoder's 4096 positions (its {drop}-token system turn among them) leave it",
    )
    for extra, prompt in ((1, PROMPT), (4, PROMPT + " red red red")):  # one token over the room, and four
        with pytest.raises(
            UniRefError,
            match=rf"^the instruction is too long: .* makes {tokens + extra - 1} tokens, and the test's "
            rf"room leaves it at most {tokens - 1}; shorten it by at least {extra} tokens",
        ):
            short = (tokens - 1, room[1])
            encode_prompt_qwen21(
                pipe.text_encoder, pipe.processor, prompt, refs, max_tokens=short, name="the instruction"
            )


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|im_end|>"])
def test_a_control_token_in_the_prompt_is_refused(pipe, token):
    expected = f"prompt contains {re.escape(token)}, a control token of the Qwen3-VL template .* remove it, and "
    with pytest.raises(UniRefError, match="^" + expected + "refer to a reference as image k"):
        encode_prompt_qwen21(pipe.text_encoder, pipe.processor, f"put {token} here", [])


def test_a_reference_the_vision_processor_would_resize_is_refused(pipe):
    """The transformer fills each reference's VL slots with its latents; a processor that resizes the image would
    otherwise stop the transformer with a bare shape error."""
    odd = make_refs([(200, 96)])
    with pytest.raises(UniRefError, match=r"^reference 1 is 200×96 px: .* sides that are multiples of 32 px"):
        encode_prompt_qwen21(pipe.text_encoder, pipe.processor, PROMPT, odd)
    processor = copy.deepcopy(pipe.processor)
    processor.image_processor.size = dict(processor.image_processor.size, shortest_edge=128 * 128)  # up-scales 64²
    small = [resize_reference(make_refs([(90, 70)])[0], 64, 64)]
    with pytest.raises(
        UniRefError,
        match=r"^reference 1 is 64×64 px: the vision encoder's processor makes 16 slots "
        r"of it, its latents need 4; .* min_pixels",
    ):
        encode_prompt_qwen21(pipe.text_encoder, processor, PROMPT, small)
    encode_prompt_qwen21(pipe.text_encoder, pipe.processor, PROMPT, small)  # the model's own processor keeps 64²


def test_bf16_decode_equals_diffusers_postprocess(pipe):
    vae = copy.deepcopy(pipe.vae).to(torch.bfloat16)
    tokens = torch.randn(1, 4 * 6, 64, generator=torch.Generator().manual_seed(1))
    ours = decode_qwen21(vae, tokens, 96, 64)[0]
    mean, std = (
        torch.tensor(v).view(1, -1, 1, 1, 1).to(torch.bfloat16)
        for v in (vae.config.latents_mean, vae.config.latents_std)
    )
    latents = tokens.transpose(1, 2).reshape(1, 64, 1, 4, 6).to(torch.bfloat16)
    with torch.no_grad():
        pixels = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
    assert np.array_equal(np.asarray(ours), np.asarray(pipe.image_processor.postprocess(pixels)[0]))
