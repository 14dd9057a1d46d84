"""Train a model folder's VAE (``AutoencoderKLQwenImage``) for reconstruction on ShapeCompose images.

    python -m training.vae --model tiny_models/uniref-tiny --steps 1500 --out runs/vae

The tiny default model's VAE starts random, and a random VAE's latents carry nothing a transformer can
learn to compose, so it is trained first, on the kind of images it will encode and decode: references
(objects on their own backgrounds, scenes) and composed targets, as random square crops. Loss: L1 on
pixels plus a small KL term (the posterior stays close to deterministic; inference takes its mode).

At the end the per-channel mean and standard deviation of the encoded latents (posterior modes of
held-out ShapeCompose images) are written to the config as ``latents_mean`` / ``latents_std``, the
fields Qwen-Image's VAE uses to normalise latents, so the transformer trains on unit-scale latents.
The result is saved, weights in safetensors, to ``<out>`` (a ``vae/`` folder of a diffusers model).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from uniref_core.atomic import atomic_dir
from uniref_core.errors import UniRefError
from uniref_core.latents import to_images, to_pixels

from .common.cli import exit_on_error
from .tasks.shapecompose import COMPOSE_ORDERS, K_TRAIN, make_sample


def _random_images(rng: np.random.Generator, size: int):
    """The images of one random ShapeCompose sample (references and target)."""
    seed = int(rng.integers(0, 2**31 - 1))
    k = int(rng.choice(K_TRAIN))
    kind = "compose" if rng.random() < 0.6 else "edit"
    s = make_sample(seed, k=k if kind == "compose" else 1, kind=kind, size=size)
    return list(s.references) + [s.target]


def _crop(rng, image, crop: int, focus: int = 1) -> torch.Tensor:
    """A random ``crop``² square; with ``focus`` > 1 the busiest (highest pixel spread) of ``focus`` tries,
    so batches hold objects and edges, not mostly flat background."""
    w, h = image.size
    if min(w, h) < crop:  # small references: enlarge so a crop fits (the planner may enlarge them too)
        f = crop / min(w, h)
        w, h = max(crop, math.ceil(w * f)), max(crop, math.ceil(h * f))
        image = image.resize((w, h))
    best, best_spread = None, -1.0
    for _ in range(max(1, focus)):
        x0, y0 = int(rng.integers(0, w - crop + 1)), int(rng.integers(0, h - crop + 1))
        x = to_pixels(image.crop((x0, y0, x0 + crop, y0 + crop)), crop, crop)
        spread = float(x.std())
        if spread > best_spread:
            best, best_spread = x, spread
    return best


def batches(seed: int, batch_size: int, crop: int, size: int, focus: int = 1):
    """Endless batches [B, 3, crop, crop] in −1..1, deterministic from ``seed``."""
    rng = np.random.default_rng([seed, 0xAE])
    pool: list = []
    while True:
        out = []
        while len(out) < batch_size:
            if not pool:
                pool = _random_images(rng, size)
            out.append(_crop(rng, pool.pop(int(rng.integers(0, len(pool)))), crop, focus))
        yield torch.cat(out)


def reconstruction_loss(vae, x: torch.Tensor, kl_weight: float, l2_weight: float = 0.0):
    """(loss, L1) of one batch: L1 (+ l2_weight · MSE, which punishes large colour errors harder) of the
    sampled reconstruction + kl_weight · mean KL per latent element."""
    post = vae.encode(x.unsqueeze(2)).latent_dist
    rec = vae.decode(post.sample()).sample[:, :, 0].float()
    l1 = (rec - x).abs().mean()
    kl = 0.5 * (post.mean.float().pow(2) + post.var.float() - 1.0 - post.logvar.float()).mean()
    return l1 + l2_weight * (rec - x).pow(2).mean() + kl_weight * kl, l1


@torch.no_grad()
def latent_stats(vae, seed: int, n_images: int, size: int) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) of posterior modes over ``n_images`` whole ShapeCompose images."""
    rng = np.random.default_rng([seed, 0x57A7])
    sums = None
    count = 0
    done = 0
    m = 2 ** len(vae.config.temperal_downsample)  # the VAE's scale: sides must be multiples of it
    while done < n_images:
        for image in _random_images(rng, size):
            w, h = (max(m, (d // m) * m) for d in image.size)
            z = vae.encode(to_pixels(image, w, h).unsqueeze(2)).latent_dist.mode().float()  # [1, C, 1, h, w]
            flat = z.flatten(2)
            s = torch.stack([flat.sum(dim=(0, 2)), flat.pow(2).sum(dim=(0, 2))])
            sums = s if sums is None else sums + s
            count += flat.shape[2]
            done += 1
    mean = sums[0] / count
    std = (sums[1] / count - mean.pow(2)).clamp_min(1e-8).sqrt()
    return mean.tolist(), std.tolist()


@torch.no_grad()
def reconstruction_ceiling(
    vae,
    size: int = 128,
    ks=(1, 2, 3, 4, 5, 6, 8),
    n: int = 16,
    split: str = "test",
    order: str = "reading",
    edits: int = 0,
) -> dict:
    """Checker scores of the VAE's reconstructions of the held-out targets `training.evaluate` scores a model
    on: ``n`` compositions per K (in ShapeCompose's ``order``: "anchored" targets have one object fewer at
    K ≥ 2) and ``edits`` single-image edits of each kind.

    No transformer can score above what its VAE gives back for the ground truth itself, so this is the
    ceiling of any model built on ``vae``: {K or "edit:<kind>": {"per_reference", "instruction"}} (means, in
    [0, 1]; an edit's per-reference score is its edit score).
    """
    from .evaluate import held_out_groups
    from .tasks.shapecompose import score

    out = {}
    for name, samples in held_out_groups(split, list(ks), n, edits, size, order=order):
        per_ref, instruction = [], []
        for s in samples:
            x = to_pixels(s.target, size, size).unsqueeze(2).to(vae.device, vae.dtype)
            rec = to_images(vae.decode(vae.encode(x).latent_dist.mode()).sample[:, :, 0])[0]
            sc = score(rec, s.spec)
            per_ref.append(sc.per_reference_mean)
            instruction.append(sc.instruction)
        out[name] = {
            "per_reference": round(float(np.mean(per_ref)), 3),
            "instruction": round(float(np.mean(instruction)), 3),
        }
    return out


def load_vae(model_dir):
    """The fp32 ``AutoencoderKLQwenImage`` of a diffusers model folder (its ``vae/``) or of a VAE folder."""
    from diffusers import AutoencoderKLQwenImage

    src = Path(model_dir) / "vae"
    if not (src / "config.json").is_file() and (Path(model_dir) / "config.json").is_file():
        src = Path(model_dir)
    if not (src / "config.json").is_file():
        raise UniRefError(f"{model_dir} has no vae/config.json: give a diffusers-format model folder or a VAE folder")
    return AutoencoderKLQwenImage.from_pretrained(src, use_safetensors=True).float()


def train_vae(
    model_dir,
    out_dir,
    steps: int = 1500,
    batch_size: int = 8,
    crop: int = 64,
    lr: float = 1e-3,
    kl_weight: float = 1e-4,
    seed: int = 0,
    size: int = 128,
    bf16: bool = True,
    focus: int = 1,
    l2_weight: float = 0.0,
    log=print,
) -> Path:
    """Train a VAE and save it with fitted latent statistics to ``out_dir``; return out_dir.

    ``model_dir``: a diffusers model folder (its ``vae/`` is trained) or a VAE folder (a second phase).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    vae = load_vae(model_dir).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(100, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / (warmup + 1)
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(steps - warmup, 1)))
        ),
    )
    data = batches(seed, batch_size, crop, size, focus)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="vae", dynamic_ncols=True)
    for step in bar:
        x = next(data)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, l1 = reconstruction_loss(vae, x, kl_weight, l2_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if not math.isfinite(float(loss.detach())):
            raise UniRefError(f"VAE loss is {float(loss.detach())} at step {step + 1}: lower --lr")
        bar.set_postfix(l1=f"{float(l1.detach()):.4f}")
        records.append(
            {
                "step": step + 1,
                "loss": float(loss.detach()),
                "l1": float(l1.detach()),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
    vae.eval()
    mean, std = latent_stats(vae, seed + 1, 256, size)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    with atomic_dir(out_dir) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "train_log.json").write_text(json.dumps(records))
    log(f"vae: {steps} steps in {time.perf_counter() - t0:.0f} s, final L1 {records[-1]['l1']:.4f} → {out_dir}")
    return out_dir


@exit_on_error
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.vae", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="diffusers-format model folder whose vae/ is trained")
    p.add_argument("--out", help="folder for the trained VAE (config + safetensors)")
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="do not train: print the checker scores of the VAE's "
        "reconstructions of held-out targets per K as JSON (the most any model on it can score)",
    )
    p.add_argument("--size", type=int, default=128, help="ShapeCompose image side (training and --ceiling)")
    p.add_argument("--n", type=int, default=16, help="--ceiling: targets per K and per edit kind")
    p.add_argument(
        "--order",
        choices=COMPOSE_ORDERS,
        default="reading",
        help="--ceiling: ShapeCompose compose order of the targets",
    )
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=64, help="square crop side in pixels (a multiple of 8)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--l2-weight", type=float, default=0.0, help="weight of an MSE term beside the L1")
    p.add_argument("--focus", type=int, default=1, help="take the busiest of N random crops (objects, edges)")
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 (bf16 autocast is ~2x faster on CPU)")
    a = p.parse_args(argv)
    if a.size % 16 or not 32 <= a.size <= 1024:
        p.error(f"--size {a.size}: give a multiple of 16 in 32..1024")
    if a.ceiling:
        if a.n < 1:
            p.error(f"--n {a.n}: give at least 1 target per K")
        ceiling = reconstruction_ceiling(load_vae(a.model).eval(), a.size, n=a.n, order=a.order, edits=a.n)
        print(json.dumps(ceiling, indent=1))
        return 0
    if not a.out:
        p.error("--out is required to train (or give --ceiling to only measure)")
    if a.crop % 8:
        p.error(f"--crop {a.crop} is not a multiple of 8")
    train_vae(
        a.model,
        a.out,
        a.steps,
        a.batch_size,
        a.crop,
        a.lr,
        a.kl_weight,
        a.seed,
        a.size,
        bf16=not a.no_bf16,
        focus=a.focus,
        l2_weight=a.l2_weight,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
