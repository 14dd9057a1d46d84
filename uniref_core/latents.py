"""VAE latents and the SELF token sequence.

A latent image [B, 16, 1, h, w] (h, w = pixels / VAE scale: 8 for real checkpoints, the model's own
otherwise) is cut into 2×2 patches: [B, h/2·w/2, 64].
The SELF sequence is [target ; ref 1 ; … ; ref K] along the token axis; ``img_shapes`` tells the
transformer each image's (frames, rows, cols) so RoPE gives image i frame index i and centred
row/column positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, h, w] or [B, C, h, w] → [B, (h/2)·(w/2), 4C] in the order the transformer expects."""
    if latents.ndim == 5:
        latents = latents[:, :, 0]
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, width: int, height: int, vae_scale: int) -> torch.Tensor:
    """[B, L, 4C] → [B, C, 1, h, w] for an image of ``width``×``height`` pixels and a ``vae_scale``× VAE."""
    b, _, c4 = tokens.shape
    h, w = height // vae_scale, width // vae_scale
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, 1, h, w)


def latent_stats(vae, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel mean and std as [1, C, 1, 1, 1] (Qwen latents are normalised with them)."""
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(device, dtype)
    std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(device, dtype)
    return mean, std


def vae_encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, H, W] in −1..1 → normalised latents [B, C, 1, H/s, W/s] (the distribution's mode)."""
    x = pixels.unsqueeze(2).to(vae.device, vae.dtype)
    latents = vae.encode(x).latent_dist.mode()
    mean, std = latent_stats(vae, latents.device, latents.dtype)
    return (latents - mean) / std


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, C, 1, h, w] → pixels [B, 3, H, W] in about −1..1."""
    latents = latents.to(vae.dtype)
    mean, std = latent_stats(vae, latents.device, latents.dtype)
    latents = latents / (1.0 / std) + mean
    return vae.decode(latents, return_dict=False)[0][:, :, 0]


@contextmanager
def vae_tiling(vae, on: bool) -> Iterator[None]:
    """diffusers' own spatial tiling on ``vae`` (AutoencoderKLQwenImage: 256 px tiles 192 px apart, blended over
    the 64 px overlap; sizes in pixels, so a 4x VAE gets the same tiles) for the encodes and decodes inside."""
    was = vae.use_tiling
    if on:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    try:
        yield
    finally:
        vae.use_tiling = was


def to_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """One RGB image resized (Lanczos, like diffusers' VaeImageProcessor) → [1, 3, H, W] in −1..1."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return (x.permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0).contiguous()


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Pixels [B, 3, H, W] in −1..1 → 8-bit RGB images (round half up, like diffusers' postprocess)."""
    x = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((img * 255).round().astype("uint8")) for img in x]


def build_sequence(target: torch.Tensor, references: list[torch.Tensor]) -> torch.Tensor:
    """The SELF sequence [target ; ref 1 ; … ; ref K] of packed latents (references broadcast to B)."""
    if not references:
        return target
    b = target.shape[0]
    refs = [r.expand(b, -1, -1) if r.shape[0] != b else r for r in references]
    return torch.cat([target, *refs], dim=1)
