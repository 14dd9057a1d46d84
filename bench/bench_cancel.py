"""How long a cancel takes to act, as a fraction of one denoising step (and of one VAE decode).

    PYTHONPATH=. .venv/bin/python bench/bench_cancel.py [--side 768] [--layers 16] [--json out.json]

A tiny model with many transformer blocks at a size where one step takes seconds on a CPU. For each point f of the
step (0.1, 0.5, 0.9 of the way through step 2) a timer thread flips the run's ``is_cancelled`` flag; the figure is
the time from the flip to `UniRefCancelled` reaching the caller, over one step's time. Checked only between steps
(before this bench's commit) the ratio is about 1 − f; checked before every block it is about one block's share of a
step (1 / layers) whatever f is. The same for a tiled VAE decode of a large image, over the decode's own time.
The API used is the same before and after, so the bench runs against either tree (PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from uniref_core import UniRefCancelled, UniRefPipeline
from uniref_core.tiny import make_tiny_model

FRACTIONS = (0.1, 0.5, 0.9)


def cancel_after(seconds: float, flag: threading.Event, stamps: dict) -> threading.Timer:
    def fire():
        stamps["set"] = time.perf_counter()
        flag.set()

    timer = threading.Timer(seconds, fire)
    timer.start()
    return timer


def step_latency(pipe, cond, step_s: float, f: float) -> dict:
    """Cancel f of the way through step 2 of 3; seconds from the request to the exception."""
    flag, stamps = threading.Event(), {}
    timers = []

    def on_step(info) -> None:
        if info.step == 1:
            timers.append(cancel_after(f * step_s, flag, stamps))

    try:
        pipe.sample(cond, steps=3, cfg=1.0, on_step=on_step, is_cancelled=flag.is_set)
        raise SystemExit("the run was not cancelled: raise --side (a step must outlast the timer)")
    except UniRefCancelled as e:
        end, message = time.perf_counter(), str(e)
    for t in timers:
        t.join()
    return {"fraction": f, "latency_s": end - stamps["set"], "ratio": (end - stamps["set"]) / step_s, "msg": message}


def decode_latency(pipe, latents, side: int, decode_s: float, f: float) -> dict:
    flag, stamps = threading.Event(), {}
    timer = cancel_after(f * decode_s, flag, stamps)
    try:
        try:
            pipe.decode(latents, side, side, is_cancelled=flag.is_set)
        except TypeError:  # a tree whose decode cannot be cancelled: it runs to its end
            pipe.decode(latents, side, side)
        end, message = time.perf_counter(), "not cancelled"
    except UniRefCancelled as e:
        end, message = time.perf_counter(), str(e)
    timer.join()
    return {"fraction": f, "latency_s": end - stamps["set"], "ratio": (end - stamps["set"]) / decode_s, "msg": message}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=768, help="output side in px (16 px tokens)")
    p.add_argument("--layers", type=int, default=16, help="transformer blocks of the tiny model")
    p.add_argument("--decode-side", type=int, default=768, help="side of the tiled VAE decode timed")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", transformer={"num_layers": a.layers})
        pipe = UniRefPipeline.from_pretrained(model)
    ref = Image.new("RGB", (256, 256), (200, 40, 40))
    cond = pipe.encode([ref], "a red square", cfg=1.0, budget=256 * 256, width=a.side, height=a.side)
    t0 = time.perf_counter()
    pipe.sample(cond, steps=1, cfg=1.0)
    step_s = time.perf_counter() - t0
    tokens = cond.plan.sequence_length
    print(f"{a.layers} blocks, {a.side}² output, sequence {tokens} image tokens: one step {step_s:.2f} s")
    plain, checked = [], []
    for _ in range(2):  # what the checks cost: a step without and with them, interleaved
        for times, ask in ((plain, None), (checked, lambda: False)):
            t0 = time.perf_counter()
            pipe.sample(cond, steps=1, cfg=1.0, is_cancelled=ask)
            times.append(time.perf_counter() - t0)
    print(f"one step without checks {min(plain):.2f} s, with a check before every block {min(checked):.2f} s")
    print(f"{'cancel at':>10} {'latency s':>10} {'÷ step':>8}  message")
    rows = []
    for f in FRACTIONS:
        r = step_latency(pipe, cond, step_s, f)
        rows.append(r)
        print(f"{f:>10.1f} {r['latency_s']:>10.2f} {r['ratio']:>8.3f}  {r['msg']}")

    pipe.vae_tiling = "on"
    n = a.decode_side // 16
    latents = torch.randn(1, n * n, 64)
    t0 = time.perf_counter()
    pipe.decode(latents, a.decode_side, a.decode_side)
    decode_s = time.perf_counter() - t0
    print(f"tiled VAE decode of {a.decode_side}²: {decode_s:.2f} s")
    drows = []
    for f in FRACTIONS:
        r = decode_latency(pipe, latents, a.decode_side, decode_s, f)
        drows.append(r)
        print(f"{f:>10.1f} {r['latency_s']:>10.2f} {r['ratio']:>8.3f}  {r['msg']}")
    if a.json:
        figures = {"step_s": step_s, "plain_s": plain, "checked_s": checked, "steps": rows}
        a.json.write_text(json.dumps({**figures, "decode_s": decode_s, "decode": drows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
