#!/usr/bin/env python
"""SFT throughput: samples/s of one training step with micro-batch 1 against the recipe's, fp32 and bf16.

    python bench/bench_batching.py [--k 3] [--batch 16] [--rounds 3] [--model DIR]

diffusers builds RoPE from the first sample's ``img_shapes``, so one forward pass holds samples of ONE
SELF layout. The default model's data (``training.build_default``: square references of one side) gives
one layout per K, so a micro-batch holds the whole global batch. This prints what that buys: the same
global batch (``--batch`` samples of K references) as ``--batch`` forward/backward passes of one sample
against one pass of all of them, each in fp32 and under bf16 autocast, as samples/s and ratios. The
step is the trainer's own (``collate`` → ``flow_matching_loss`` → backward), on the recipe's model
(a 6-layer transformer, the 4× VAE's 8 px tokens, budget 128², 128² targets) built with random weights
in a temporary folder unless ``--model`` names one. Absolute figures depend on the CPU; the ratios are
the point. The test suite never times anything.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def build_rows(folder: Path, k: int, n: int, cfg, ref_side: int):
    from training.common.data import load_rows
    from training.tasks.shapecompose import make_split, write_manifest

    samples = make_split("val", n, ks=(k,), kinds=("compose",), ref_side=ref_side)
    manifest = write_manifest(samples, folder / "data")
    rows, _ = load_rows([str(manifest)], cfg)
    return rows


def step_time(model, batches, bf16: bool) -> float:
    """Seconds of one global step made of ``batches`` (forward + backward of each, gradients summed)."""
    from training.sft.loss import flow_matching_loss

    t0 = time.perf_counter()
    for batch, noise, sigma in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = flow_matching_loss(model, batch, noise, sigma)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder (default: the recipe's architecture, random weights)")
    p.add_argument("--k", type=int, default=3, help="references per sample")
    p.add_argument("--batch", type=int, default=16, help="global batch (the recipe's micro-batch)")
    p.add_argument("--rounds", type=int, default=3, help="timed steps per setting (after one warm-up)")
    p.add_argument("--budget", type=int, default=128, help="reference budget side (budget²)")
    a = p.parse_args(argv)

    from training.build_default import RECIPE
    from training.common.config import Stage
    from training.sft.config import SFTConfig
    from training.sft.data import SampleEncoder, collate
    from training.sft.loss import draw_noise_and_sigma
    from uniref_core.model import load_components
    from uniref_core.tiny import make_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="uniref-bench-batching-"))
    model_dir = (
        Path(a.model)
        if a.model
        else make_tiny_model(tmp / "model", transformer=RECIPE["transformer"], vae=RECIPE["vae"])
    )
    c = load_components(model_dir)
    stage = Stage(budget=a.budget * a.budget, steps=1, lr=1e-3, batch_size=a.batch, output_size=RECIPE["size"] ** 2)
    cfg = SFTConfig(model=str(model_dir), train_manifest=[], stages=[stage], vl_budget=112 * 112)
    rows = build_rows(tmp, a.k, a.batch, cfg, RECIPE["ref_side"])
    enc = SampleEncoder(c, cfg)
    t0 = time.perf_counter()
    encoded = [enc.latents(r, stage) for r in rows]
    t_vae = (time.perf_counter() - t0) / len(rows)
    t0 = time.perf_counter()
    prompts = [enc.prompt(r, e.plan) for r, e in zip(rows, encoded)]
    t_text = (time.perf_counter() - t0) / len(rows)
    layouts = {tuple(e.img_shapes) for e in encoded}
    assert len(layouts) == 1, f"{len(layouts)} layouts: the recipe's data should give one per K"

    def batches(micro: int):
        out = []
        for j in range(0, a.batch, micro):
            b = collate(encoded[j : j + micro], prompts[j : j + micro], "cpu", torch.float32)
            noise, sigma = draw_noise_and_sigma(0, 0, list(range(j, j + micro)), b.x0.shape[1:], cfg.logit_normal)
            out.append((b, noise, sigma))
        return out

    transformer = c.transformer.train().requires_grad_(True)
    plan = encoded[0].plan
    print(
        f"# {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"K={a.k}, global batch {a.batch}, {plan.token_px} px tokens, sequence {plan.sequence_length} image "
        f"tokens + ~{prompts[0].embeds.shape[1]} text"
    )
    print(f"encoding (paid once per sample and stage, then cached): VAE {t_vae:.3f} s, text {t_text:.3f} s a sample")
    results = {}
    for bf16 in (False, True):
        for micro in (1, a.batch):
            bs = batches(micro)
            step_time(transformer, bs, bf16)  # warm-up
            t = statistics.median(step_time(transformer, bs, bf16) for _ in range(a.rounds))
            results[(bf16, micro)] = a.batch / t
            print(
                f"{'bf16' if bf16 else 'fp32'}  micro-batch {micro:3d}: "
                f"{a.batch / t:7.1f} samples/s ({t:.3f} s a step)"
            )
    base = results[(False, 1)]
    print("ratios to fp32 micro-batch 1:")
    for (bf16, micro), v in results.items():
        print(f"  {'bf16' if bf16 else 'fp32'} micro-batch {micro:3d}: {v / base:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
