"""Training a model's VAE for reconstruction (the first step of the default model's recipe)."""

import json

import numpy as np
import torch

from training.vae import batches, latent_stats, train_vae
from uniref_core.latents import to_pixels, vae_decode, vae_encode


def test_vae_learns_to_reconstruct_and_its_latents_are_normalised(tiny_model, tmp_path):
    from diffusers import AutoencoderKLQwenImage

    out = train_vae(
        tiny_model, tmp_path / "vae", steps=150, batch_size=4, crop=32, lr=2e-3, seed=0, log=lambda m: None
    )
    l1 = [r["l1"] for r in json.loads((out / "train_log.json").read_text())]
    assert len(l1) == 150 and all(np.isfinite(l1))  # one record a step (crops differ a lot: no trend test here)
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))

    trained = AutoencoderKLQwenImage.from_pretrained(out, use_safetensors=True).eval()
    mean, std = trained.config.latents_mean, trained.config.latents_std
    assert len(mean) == len(std) == trained.config.z_dim
    with torch.no_grad():
        # The saved statistics are those of its latents: fresh images, normalised, have ~0 mean and ~1 std.
        fresh_mean, fresh_std = (np.array(v) for v in latent_stats(trained, seed=7, n_images=32, size=128))
        assert np.abs((fresh_mean - np.array(mean)) / np.array(std)).max() < 0.5
        assert 0.5 < (fresh_std / np.array(std)).min() and (fresh_std / np.array(std)).max() < 2.0
        from training.tasks.shapecompose import make_sample

        image = make_sample(3, k=1, kind="compose").target
        z = vae_encode(trained, to_pixels(image, 128, 128))
        assert abs(float(z.mean())) < 0.5 and 0.3 < float(z.std()) < 3.0
        # ...and decoding undoes the normalisation: on held-out crops of the kind it trained on, the
        # round trip is already better than the untrained VAE's after 150 small steps (a wrong
        # normalisation on either side would make it far worse). The recipe's 4,800 steps reach L1 0.035.
        untrained = AutoencoderKLQwenImage.from_pretrained(tiny_model / "vae", use_safetensors=True).eval()
        x = next(batches(seed=123, batch_size=32, crop=32, size=128))

        def round_trip_error(vae):
            return float((vae_decode(vae, vae_encode(vae, x)) - x).abs().mean())

        assert round_trip_error(trained) < round_trip_error(untrained)


def test_vae_ceiling_cli_reports_what_its_reconstructions_score(tiny_model):
    """`python -m training.vae --ceiling`: the checker's scores of a VAE's reconstructions of held-out targets,
    compositions of each K and edits of each kind, the most any model built on that VAE can reach. An untrained VAE
    gives back no objects: near 0 everywhere."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(
        [sys.executable, "-m", "training.vae", "--model", str(tiny_model), "--ceiling", "--n", "2"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    ceiling = json.loads(r.stdout)
    from training.tasks.shapecompose import EDIT_KINDS

    assert set(ceiling) == {"1", "2", "3", "4", "5", "6", "8"} | {f"edit:{kind}" for kind in EDIT_KINDS}
    for k, scores in ceiling.items():
        assert 0.0 <= scores["per_reference"] <= 0.2 and 0.0 <= scores["instruction"] <= 0.2, (k, scores)
    bad = subprocess.run(
        [sys.executable, "-m", "training.vae", "--model", str(tiny_model)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
    )
    assert bad.returncode == 2 and "--out" in bad.stderr and "Traceback" not in bad.stderr
