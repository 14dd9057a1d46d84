"""The SFT encoding pass on the CPU with and without `training.common.model.heap_kept`: CPU seconds and page faults.

    PYTHONPATH=. .venv/bin/python bench/bench_encoding_pass.py            # 8 images of 256², ~1 min on 2 cores
    PYTHONPATH=. .venv/bin/python bench/bench_encoding_pass.py --size 128 --images 32

Each arm runs in a fresh process (one thread) that VAE-encodes ``--images`` ShapeCompose scenes with the built-in
model's 4× VAE, as the encoding pass does, after one warm-up image (inside `heap_kept` in its arm, as in the
trainers' pass, so the figures are the steady state of a pass over many rows); it reports user and system CPU
seconds (not wall time: CPU time holds up while other jobs share the machine) and minor page faults. The ratio is
kept / plain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import contextlib, json, resource, sys
import torch
torch.set_num_threads(1)
from training.common.model import heap_kept
from training.tasks.shapecompose import make_split
from uniref_core.latents import to_pixels, vae_encode
from uniref_core.model import load_components
keep, size, n = sys.argv[1] == "kept", int(sys.argv[2]), int(sys.argv[3])
vae = load_components("models/uniref-default-sft", device="cpu", dtype="fp32", parts=("vae",)).vae
images = [s.target for s in make_split("train", n + 1, kinds=("recolour",), size=size)]
with heap_kept("cpu") if keep else contextlib.nullcontext():  # the trainers' pass: thousands of rows inside it
    vae_encode(vae, to_pixels(images[0], size, size))  # warm-up: the heap grows to one image's working set
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for im in images[1:]:
        vae_encode(vae, to_pixels(im, size, size))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                  "faults": r1.ru_minflt - r0.ru_minflt}))
"""


def measure(arm: str, size: int, images: int) -> dict:
    """One arm ("kept" or "plain") in a fresh one-thread process, with no MALLOC_* thresholds of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, arm, str(size), str(images)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image side in px")
    ap.add_argument("--images", type=int, default=8)
    a = ap.parse_args()
    plain, kept = measure("plain", a.size, a.images), measure("kept", a.size, a.images)
    print(f"{a.images} images of {a.size}²        user s   sys s   faults")
    for name, r in (("plain", plain), ("heap_kept", kept)):
        print(f"{name:<22} {r['user']:7.2f} {r['sys']:7.2f} {r['faults']:8d}")
    cpu = (kept["user"] + kept["sys"]) / (plain["user"] + plain["sys"])
    print(f"CPU time kept / plain: {cpu:.2f}×; faults {kept['faults']} vs {plain['faults']}")


if __name__ == "__main__":
    main()
