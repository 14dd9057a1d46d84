"""The run-memory estimate (`uniref_core.memory`) against a measured run, and what it says at the real size.

    PYTHONPATH=. .venv/bin/python bench/bench_run_memory.py            # ~4 min on 2 cores
    PYTHONPATH=. .venv/bin/python bench/bench_run_memory.py --real     # the real-size figure only, instant

Each size runs in a fresh process on the tiny model (`uniref_core.tiny`, fp32 on the CPU): after a warm-up edit at
32² (its kernels' code pages), SELF encode, sampling (2 steps, cfg 4) and decode each run with the peak reset first
(``VmHWM`` after ``clear_refs``; glibc told to return freed memory: ``MALLOC_MMAP_THRESHOLD_=65536``), and the
growth of the resident size over its start, less the shared-library code faulted in meanwhile, is that phase's
measured peak. The estimate of each phase is printed beside it, and the run's (the largest phase) last: the check
wants estimate / measured ≥ 1 and ≤ 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench_train_memory import PROC_MEMORY

ROOT = Path(__file__).resolve().parents[1]
# (output side, reference budget side, vae_tiling): 3 references, as in the default workflow.
SIZES = [(512, 512, "auto"), (768, 512, "auto"), (1024, 768, "auto"), (512, 512, "on")]
REFERENCES = 3

CHILD = (
    r"""
import json, sys
import torch, diffusers, transformers  # the interpreter's own memory: the baseline
from PIL import Image
from uniref_core.pipeline import UniRefPipeline

"""
    + PROC_MEMORY
    + r"""
model, side, budget, k, tiling = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
pipe = UniRefPipeline.from_pretrained(model)
pipe.vae_tiling = tiling
refs = [Image.new("RGB", (300 + 40 * i, 300), (60 * i, 120, 80)) for i in range(k)]
prompt = "put the object of Picture 1 on the table of Picture 2"
warm = pipe.encode(refs[:1], prompt, cfg=4.0, budget=64 * 64, width=32, height=32)
pipe.decode(pipe.sample(warm, steps=1, cfg=4.0), 32, 32)
measured = {}

def phase(name, run):
    open("/proc/self/clear_refs", "w").write("5")
    code, base = code_kib(), status("VmRSS")
    result = run()
    measured[name] = (status("VmHWM") - base - (code_kib() - code)) * 1024
    return result

cond = phase("encoding", lambda: pipe.encode(refs, prompt, cfg=4.0, budget=budget * budget, width=side, height=side))
latents = phase("sampling", lambda: pipe.sample(cond, steps=2, cfg=4.0))
phase("decoding", lambda: pipe.decode(latents, side, side))
text = cond.positive.embeds.shape[1]
est = pipe.memory_estimate(cond.plan, text_tokens=text, cfg=4.0)
estimate = {
    "encoding": max(est.phase_total("prompt"), est.phase_total("references")),
    "sampling": est.phase_total("sampling"),
    "decoding": est.phase_total("decoding"),
}
print("RESULT", json.dumps({"measured": measured, "estimate": estimate, "tokens": cond.plan.sequence_length + text}))
"""
)


def real_size_figure() -> str:
    """The estimate for Qwen-Image-Edit-2509 (60 blocks, 24 heads × 128, Qwen2.5-VL-7B, Qwen-Image's VAE) in bf16 on
    CUDA: a 1024² output with 3 references in a 1024² budget, cfg 4, on an 80 GB GPU holding all three networks."""
    from uniref_core import memory
    from uniref_core.budget import plan_references
    from uniref_core.pipeline import use_vae_tiling

    shape = memory.RunShape(
        width=24 * 128,
        heads=24,
        vae_base=96,
        dtype_bytes=2,
        device="cuda",
        text_hidden=3584,
        text_layers=28,
        text_intermediate=18944,
        vocab=152064,
        vision_hidden=1280,
    )
    plan = plan_references([(1024, 1024)] * 3, "budget", 1024 * 1024, width=1024, height=1024)
    est = memory.estimate_run(plan, shape, prompt_bytes=60, cfg=4.0, tiled=lambda w, h: use_vae_tiling("auto", w, h))
    weights = int((38 + 15.4 + 0.24) * memory.GiB)  # DESIGN.md §5, bf16
    free = 80 * 10**9 - weights
    return (
        f"Qwen-Image-Edit-2509, bf16 on CUDA, 1024² output + 3 references in a 1024² budget, cfg 4 "
        f"({plan.sequence_length} image tokens):\n{est.describe()}\n"
        f"an 80 GB GPU holding the three networks ({memory.gib(weights)}) has {memory.gib(free)} left: "
        f"{'fits' if est.peak <= free else 'refused'}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", action="store_true", help="print only the real-size figure")
    args = ap.parse_args()
    if not args.real:
        from uniref_core.tiny import make_tiny_model

        work = Path(tempfile.mkdtemp(prefix="bench_run_memory_"))
        model = make_tiny_model(work / "model")
        child = work / "child.py"
        child.write_text(CHILD)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
        print(
            f"{'output':>7} {'budget':>7} {'tiling':>6} {'tokens':>6}  "
            + "  ".join(f"{p + ' MiB est/meas':>24}" for p in ("encoding", "sampling", "decoding"))
            + "   run ratio"
        )
        for side, budget, tiling in SIZES:
            argv = [sys.executable, str(child), str(model), str(side), str(budget), str(REFERENCES), tiling]
            out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
            r = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[7:])
            m, e = r["measured"], r["estimate"]
            cells = "  ".join(f"{e[p] / 2**20:>7.0f}/{m[p] / 2**20:>5.0f} ({e[p] / m[p]:.2f})".rjust(24) for p in m)
            ratio = max(e.values()) / max(m.values())
            print(f"{side:>6}² {budget:>6}² {tiling:>6} {r['tokens']:>6}  {cells}   {ratio:.2f}", flush=True)
    print(real_size_figure())


if __name__ == "__main__":
    main()
