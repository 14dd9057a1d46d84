"""Per-reference image-feature similarity from a local image encoder (DINOv2, SigLIP, CLIP, …).

``{"source": "features", "options": {"path": "models/dinov2-small"}}``: the encoder is a transformers model
folder loaded with ``AutoModel`` from safetensors only (no remote code, no download). Each signal
``ref{k}`` is the cosine similarity between the image's embedding and reference k's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import RewardBatch, RewardError, Signal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def feature_source(path: str, device: str = "cpu", image_size: int | None = None):
    """Factory: the encoder at ``path``; ``image_size`` overrides its config's input size."""
    from transformers import AutoModel

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise RewardError(
            f"reward source 'features': {folder} is not a transformers model folder (no config.json); "
            "give options.path of a local image encoder such as DINOv2 or SigLIP"
        )
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(device).eval()  # nosec B615  # a local folder, local_files_only=True: nothing is fetched from the Hub
    except (OSError, ValueError) as e:
        raise RewardError(
            f"reward source 'features': {folder} could not be loaded ({e}); it needs safetensors weights"
        ) from e
    cfg = getattr(model.config, "vision_config", model.config)
    size = int(image_size or getattr(cfg, "image_size", 224))
    processor = _processor(folder)

    @torch.no_grad()
    def embed(images: list[Image.Image]) -> torch.Tensor:
        if processor is not None:
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        else:
            arr = np.stack(
                [np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for im in images]
            )
            pixels = (torch.from_numpy(arr).float() / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
            pixels = pixels.permute(0, 3, 1, 2)
        pixels = pixels.to(device)
        if hasattr(model, "get_image_features"):
            feats = model.get_image_features(pixel_values=pixels)
        else:
            out = model(pixel_values=pixels)
            pooled = getattr(out, "pooler_output", None)
            feats = pooled if pooled is not None else out.last_hidden_state.mean(dim=1)
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    def source(images, row) -> RewardBatch:
        from uniref_core.images import load_image

        refs = [load_image(p) for p in row.references]
        emb = embed(list(images) + refs)
        out, ref = emb[: len(images)], emb[len(images) :]
        sims = (out @ ref.T).numpy()  # [G, K]
        return RewardBatch({f"ref{k + 1}": Signal(sims[:, k], "reference", k + 1) for k in range(len(refs))})

    return source


def _processor(folder: Path):
    if not (folder / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder, local_files_only=True)  # nosec B615  # a local folder, local_files_only=True: nothing is fetched from the Hub
