#!/usr/bin/env python
"""Peak GPU memory and edit time of the two offload modes (``--offload model`` / ``blocks``, the Load node's
options) against no offload, as ratios.

    PYTHONPATH=. .venv/bin/python bench/bench_offload.py                    # on a CUDA machine, ~3 min
    PYTHONPATH=. .venv/bin/python bench/bench_offload.py --layers 2 --size 512 --device cpu   # smoke run

The transformer has the real Qwen-Image block width (24 heads of 128, 3072 wide) and ``--layers`` blocks of
random bf16 weights (the real model has 60; 8 blocks are ~2.7 B parameters, ~5.4 GB); the text encoder and the
VAE are the tiny ones of ``uniref_core.tiny`` (the real text encoder would add ~16 GB to "none" and a second
network to move for "model"). Each mode runs in a fresh process: the weights are built on the CPU (seeded, the
same in every process), moved or offloaded as the CLI does, then one warm-up edit and ``--rounds`` timed edits
of two references at ``--size``² under the same budget. Printed per mode: peak GPU memory
(``torch.cuda.max_memory_allocated``, over the timed edits) and the median edit time, each as a ratio to no
offload. Expected: "model" peaks at about "none" here (one big network); "blocks" at one block's weights plus
activations; "blocks" is the slowest (each block crosses PCIe once per denoising step and per CFG branch).
On a CPU (``--device cpu``) both devices are the CPU: only the times are printed and they say nothing about a
GPU; it checks the script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUN = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
from PIL import Image
from diffusers import QwenImageTransformer2DModel
from uniref_core.model import load_components
from uniref_core.pipeline import UniRefPipeline
model_dir, mode, device, layers, size, steps, rounds = sys.argv[2:9]
layers, size, steps, rounds = int(layers), int(size), int(steps), int(rounds)
dev = torch.device(device)
c = load_components(model_dir, device="cpu", dtype=torch.bfloat16)
torch.manual_seed(0)
c.transformer = QwenImageTransformer2DModel(
    num_layers=layers, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=c.transformer.config.joint_attention_dim).to(torch.bfloat16).eval().requires_grad_(False)
weights = sum(p.numel() * p.element_size() for p in c.transformer.parameters())
pipe = UniRefPipeline(c)
if mode == "none":
    for m in (c.transformer, c.vae, c.text_encoder):
        m.to(dev)
elif mode == "model":
    pipe.enable_model_offload(dev)
else:
    pipe.enable_block_offload(dev)
rng = np.random.default_rng(0)
refs = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(2)]
def edit():
    pipe.edit(refs, "Put Picture 1 next to Picture 2", seed=0, steps=steps, cfg=2.0, budget=size * size,
              width=size, height=size)
    if dev.type == "cuda":
        torch.cuda.synchronize()
edit()
cuda = dev.type == "cuda"
if cuda:
    torch.cuda.reset_peak_memory_stats()
times = []
for _ in range(rounds):
    t0 = time.perf_counter(); edit(); times.append(time.perf_counter() - t0)
print(json.dumps({"mode": mode, "weights": weights, "seconds": statistics.median(times),
                  "peak": torch.cuda.max_memory_allocated() if cuda else None}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8, help="transformer blocks of real width (real model: 60)")
    p.add_argument("--size", type=int, default=1024, help="reference and output side in px")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per edit")
    p.add_argument("--rounds", type=int, default=2, help="timed edits per mode (after one warm-up)")
    p.add_argument("--device", default="cuda", help="execution device (cpu: a smoke run, times only)")
    a = p.parse_args(argv)
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench_offload: no CUDA device here; run it on a GPU machine, or pass --device cpu for a smoke run "
            "(times only, no memory figure)",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(ROOT))
    from uniref_core.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="uniref-bench-offload-") as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model")
        rows = {}
        for mode in ("none", "model", "blocks"):
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    RUN,
                    str(ROOT),
                    str(model_dir),
                    mode,
                    a.device,
                    str(a.layers),
                    str(a.size),
                    str(a.steps),
                    str(a.rounds),
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                print(f"bench_offload: mode {mode} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                return 1
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows["none"]
    gb = base["weights"] / 1e9
    print(
        f"transformer: {a.layers} blocks of real width, {gb:.2f} GB bf16; 2 references and output at {a.size}², "
        f"{a.steps} steps, cfg 2, {a.rounds} timed edits per mode, device {a.device}"
    )
    print("| offload | peak GPU memory | vs none | edit time | vs none |")
    print("| --- | --- | --- | --- | --- |")
    for mode, r in rows.items():
        peak = "n/a (CPU)" if r["peak"] is None else f"{r['peak'] / 1e9:.2f} GB"
        peak_ratio = "" if r["peak"] is None else f"{r['peak'] / base['peak']:.2f}×"
        print(f"| {mode} | {peak} | {peak_ratio} | {r['seconds']:.2f} s | {r['seconds'] / base['seconds']:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
