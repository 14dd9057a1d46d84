"""The reference side of the parity contract (tests/test_parity.py, tests/test_token_size.py): diffusers'
QwenImageEditPlusPipeline on the same model folder, with the references' sizes, the prompt and the per-image VAE
area those tests give both sides."""

import numpy as np
import torch
from diffusers import QwenImageEditPlusPipeline

SIZES = [(96, 64), (80, 120), (200, 100)]
PROMPT = "put the red object from Picture 1 on the left of the background of Picture 2"
AREA = 128 * 128


def diffusers_edit(folder, refs, cfg, seed, steps, width, height, negative=" "):
    pipe = QwenImageEditPlusPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"negative_prompt": negative} if cfg > 1 else {}
    out = pipe(
        image=refs,
        prompt=PROMPT,
        true_cfg_scale=cfg,
        height=height,
        width=width,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        **kwargs,
    )
    return np.asarray(out.images[0]).astype(int)
