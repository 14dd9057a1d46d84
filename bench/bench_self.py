#!/usr/bin/env python
"""SELF speed benchmark: per-step transformer cost vs number of references, and overhead vs diffusers.

    python bench/bench_self.py [--quick] [--scale 1/16|1/4] [--json FILE]

Runs on the CPU with the tiny random model of ``uniref_core.tiny`` (built in a temporary folder),
so the absolute times mean nothing; the RATIOS are the point. Every area of the real setting
(SELF budget 1024², per-image area 1024², output 1024², VL copies 384²) is scaled by the same
factor (default 1/16: 256², 256², 256×256, 96²), which keeps the token ratios of the real setting.

Tables:
 1. per-step transformer time (``UniRefPipeline.velocity``, cfg 1) and sequence length for K = 1…6
    references in ``budget`` and ``per_image`` modes; ratios to K = 1 and per_image / budget;
 2. our per-step and whole-edit time vs diffusers' ``QwenImageEditPlusPipeline`` on the same inputs
    (per_image mode, K = 3); per-step time = (time(2N steps) − time(N steps)) / N, so the
    encode/decode costs cancel;
 3. the targets, PASS/MISS.
The test suite never times anything; speed figures live here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# Reference sizes, cycled: different sizes and aspect ratios, random content.
REF_SIZES = [(640, 480), (480, 640), (800, 800), (1024, 576), (576, 1024), (700, 500)]
PROMPT = "put the red circle from Picture 1 on the left of the blue square in Picture 2"
REAL_SIDE = 1024  # real budget = per-image area = output area = 1024²
REAL_VL_SIDE = 384  # real VL copy area 384² per reference (diffusers' CONDITION_IMAGE_SIZE)
SCALES = {"1/16": 16, "1/4": 4}
DIFFUSERS_K = 3
SEED = 1234

TARGETS = {
    "budget_k6_over_k1": ("budget: step time K=6 / K=1", "<=", 1.2),
    "per_image_over_budget_k3": ("per_image / budget step time at K=3", ">=", 2.0),
    "per_image_over_budget_k6": ("per_image / budget step time at K=6", ">=", 3.5),
    "ours_over_diffusers_step": ("ours / diffusers per-step time (per_image, K=3)", "<=", 1.05),
}


def make_references(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [REF_SIZES[i % len(REF_SIZES)] for i in range(n)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


class AttentionTimer:
    """Wraps torch's SDPA (diffusers looks it up at call time) to add up the time spent in attention."""

    def __init__(self):
        self.seconds = 0.0
        self._orig = None

    def __enter__(self):
        self._orig = orig = torch.nn.functional.scaled_dot_product_attention

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = orig(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            return out

        torch.nn.functional.scaled_dot_product_attention = timed
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self._orig


class CpuMonitor:
    """How much of the machine's CPU time other processes took while we ran (Linux /proc/stat).

    Other work on the same cores (a test run, say) makes torch's threads fight for them and can
    slow every call by orders of magnitude, which would make the figures meaningless.
    """

    def __init__(self):
        self.start = self._snap()

    @staticmethod
    def _snap():
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        t = os.times()
        return sum(vals), vals[3] + vals[4], t.user + t.system + t.children_user + t.children_system

    def others_share(self) -> float | None:
        end = self._snap()
        if self.start is None or end is None:
            return None
        clk = os.sysconf("SC_CLK_TCK")
        total = (end[0] - self.start[0]) / clk
        busy = total - (end[1] - self.start[1]) / clk
        own = end[2] - self.start[2]
        return max(0.0, busy - own) / total if total > 0 else None


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# --- 1. per-step time vs K ------------------------------------------------------------------


def bench_steps(pipe, refs, ks, side, rounds, log) -> list[dict]:
    area = side * side
    timestep = torch.tensor(500.0)
    configs = []
    for mode in ("budget", "per_image"):
        for k in ks:
            t0 = time.perf_counter()
            cond = pipe.encode(
                refs[:k], PROMPT, cfg=1.0, mode=mode, budget=area, per_image_area=area, width=side, height=side
            )
            enc_s = time.perf_counter() - t0
            gen = torch.Generator("cpu").manual_seed(SEED + k)
            x = torch.randn((1, cond.plan.output_tokens, pipe.c.transformer.config.in_channels), generator=gen)
            configs.append(
                dict(mode=mode, k=k, cond=cond, x=x.to(pipe.device, pipe.dtype), enc_s=enc_s, step=[], attn=[])
            )
    log(f"  encoded {len(configs)} configurations; timing {rounds} rounds ...")
    with torch.no_grad():
        for c in configs:  # warm-up
            for _ in range(2):
                pipe.velocity(c["x"], timestep, c["cond"], 1.0)
        order = list(range(len(configs)))
        shuffle = random.Random(SEED)
        with AttentionTimer() as at:
            for _ in range(rounds):
                # Interleaved and shuffled, so machine drift hits every configuration alike.
                shuffle.shuffle(order)
                for i in order:
                    c = configs[i]
                    at.seconds = 0.0
                    t0 = time.perf_counter()
                    pipe.velocity(c["x"], timestep, c["cond"], 1.0)
                    c["step"].append(time.perf_counter() - t0)
                    c["attn"].append(at.seconds)
    rows = []
    for c in configs:
        plan = c["cond"].plan
        rows.append(
            dict(
                mode=c["mode"],
                k=c["k"],
                image_tokens=plan.sequence_length,
                reference_tokens=plan.reference_tokens,
                text_tokens=int(c["cond"].positive.embeds.shape[1]),
                step_ms=1e3 * statistics.median(c["step"]),
                attention_ms=1e3 * statistics.median(c["attn"]),
                encode_s=c["enc_s"],
                samples=len(c["step"]),
            )
        )
    by = {(r["mode"], r["k"]): r for r in rows}
    for r in rows:
        base = by[(r["mode"], ks[0])]
        r["step_vs_k1"] = ratio(r["step_ms"], base["step_ms"])
        r["tokens_vs_k1"] = ratio(r["image_tokens"], base["image_tokens"])
        r["attention_share"] = ratio(r["attention_ms"], r["step_ms"])
        b = by[("budget", r["k"])]
        r["per_image_over_budget_step"] = ratio(by[("per_image", r["k"])]["step_ms"], b["step_ms"])
        r["per_image_over_budget_tokens"] = ratio(by[("per_image", r["k"])]["image_tokens"], b["image_tokens"])
    return rows


def print_steps(rows, ks, out):
    out("")
    out("Table 1. Per-step transformer time vs K (one velocity() call, cfg 1, median)")
    out("  image tok = target + reference tokens; text tok = prompt stream incl. VL tokens; attn = share of the")
    out("  step spent in scaled_dot_product_attention")
    for mode in ("budget", "per_image"):
        out("")
        out(f"  mode = {mode}")
        out("   K  image tok  text tok   step ms  attn   step/K1  tok/K1")
        for r in (r for r in rows if r["mode"] == mode):
            out(
                f"  {r['k']:>2}  {r['image_tokens']:>9}  {r['text_tokens']:>8}  {r['step_ms']:>8.2f}  "
                f"{100 * r['attention_share']:>3.0f}%  {r['step_vs_k1']:>7.2f}x  {r['tokens_vs_k1']:>5.2f}x"
            )
    out("")
    out("  per_image / budget at the same K")
    out("   K  step ratio  token ratio")
    for k in ks:
        r = next(r for r in rows if r["mode"] == "budget" and r["k"] == k)
        out(f"  {k:>2}  {r['per_image_over_budget_step']:>9.2f}x  {r['per_image_over_budget_tokens']:>10.2f}x")


# --- 2. overhead vs diffusers ----------------------------------------------------------------


def bench_vs_diffusers(ours, folder, refs, side, steps, repeats, log) -> dict:
    """Whole edits with N and 2N steps, ours and diffusers' alternating; (t(2N) - t(N)) / N per step.

    Both loops also stamp the time at the end of every step (our ``on_step``, diffusers'
    ``callback_on_step_end``); the median interval between stamps is a second, much less noisy
    per-step figure (it sees one loop iteration, not encode/decode jitter).
    """
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as dq
    from diffusers import QwenImageEditPlusPipeline

    theirs = QwenImageEditPlusPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    area = side * side
    stamps: list[float] = []

    def our_cb(info):
        stamps.append(time.perf_counter())

    def their_cb(pipe, i, t, kwargs):
        stamps.append(time.perf_counter())
        return {}

    def run_ours(n):
        res = ours.edit(refs, PROMPT, cfg=1.0, seed=SEED, steps=n, mode="per_image", per_image_area=area,
                        width=side, height=side, on_step=our_cb)
        return np.asarray(res.images[0]).astype(int)

    def run_theirs(n):
        img = theirs(
            image=refs,
            prompt=PROMPT,
            true_cfg_scale=1.0,
            height=side,
            width=side,
            num_inference_steps=n,
            generator=torch.Generator("cpu").manual_seed(SEED),
            callback_on_step_end=their_cb,
        ).images[0]
        return np.asarray(img).astype(int)

    runners = {"ours": run_ours, "diffusers": run_theirs}
    times = {name: {steps: [], 2 * steps: []} for name in runners}
    intervals = {name: [] for name in runners}
    images = {}
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        for fn in runners.values():  # warm-up (2 steps: with 1, diffusers' schedule is NaN)
            fn(2)
        for rep in range(repeats):
            # Alternate the order of pipelines and of N / 2N between repeats.
            names = list(runners) if rep % 2 == 0 else list(reversed(runners))
            for n in (steps, 2 * steps) if rep % 2 == 0 else (2 * steps, steps):
                for name in names:
                    stamps.clear()
                    t0 = time.perf_counter()
                    img = runners[name](n)
                    times[name][n].append(time.perf_counter() - t0)
                    intervals[name] += [b - a for a, b in zip(stamps, stamps[1:])]
                    if n == steps:
                        images[name] = img
            log(f"  repeat {rep + 1}/{repeats} done")
    finally:
        dlog.set_verbosity(level)
    result = {"k": len(refs), "steps": steps, "repeats": repeats}
    for name in runners:
        per_rep = [(b - a) / steps for a, b in zip(times[name][steps], times[name][2 * steps])]
        result[name] = dict(
            step_ms=1e3 * statistics.median(per_rep),
            step_ms_samples=[1e3 * s for s in per_rep],
            step_ms_callbacks=1e3 * statistics.median(intervals[name]),
            edit_n_s=statistics.median(times[name][steps]),
            edit_2n_s=statistics.median(times[name][2 * steps]),
        )
    result["step_ratio"] = ratio(result["ours"]["step_ms"], result["diffusers"]["step_ms"])
    result["step_ratio_callbacks"] = ratio(result["ours"]["step_ms_callbacks"], result["diffusers"]["step_ms_callbacks"])
    result["edit_n_ratio"] = ratio(result["ours"]["edit_n_s"], result["diffusers"]["edit_n_s"])
    result["edit_2n_ratio"] = ratio(result["ours"]["edit_2n_s"], result["diffusers"]["edit_2n_s"])
    result["max_pixel_diff"] = int(np.abs(images["ours"] - images["diffusers"]).max())
    result["vae_image_size"] = dq.VAE_IMAGE_SIZE
    result["condition_image_size"] = dq.CONDITION_IMAGE_SIZE
    return result


def print_vs_diffusers(r, out):
    n = r["steps"]
    out("")
    out(f"Table 2. Ours vs diffusers QwenImageEditPlusPipeline (per_image, K={r['k']}, cfg 1, same seed and inputs, "
        f"median of {r['repeats']})")
    out(f"  step ms = (time of a {2 * n}-step edit - time of a {n}-step edit) / {n}  (encode/decode cancel)")
    out("  cb ms   = median time between step-end callbacks (cross-check, less noisy); progress bar off")
    out("              step ms    cb ms   edit N s  edit 2N s")
    for name in ("ours", "diffusers"):
        x = r[name]
        out(f"  {name:<10} {x['step_ms']:>8.2f} {x['step_ms_callbacks']:>8.2f}  {x['edit_n_s']:>9.3f}  "
            f"{x['edit_2n_s']:>9.3f}")
    out(f"  ours / diffusers: per step {r['step_ratio']:.3f}x (callbacks {r['step_ratio_callbacks']:.3f}x), "
        f"whole edit {r['edit_n_ratio']:.3f}x ({n} steps), {r['edit_2n_ratio']:.3f}x ({2 * n} steps)")
    out(f"  per-step samples (ms): ours {', '.join(f'{s:.1f}' for s in r['ours']['step_ms_samples'])}; "
        f"diffusers {', '.join(f'{s:.1f}' for s in r['diffusers']['step_ms_samples'])}")
    out(f"  same output: max |pixel difference| ours vs diffusers = {r['max_pixel_diff']} (of 255)")


# --- 3. targets ------------------------------------------------------------------------------


def check_targets(rows, vs) -> dict:
    by = {(r["mode"], r["k"]): r for r in rows}
    values = {}
    if ("budget", 6) in by and ("budget", 1) in by:
        values["budget_k6_over_k1"] = by[("budget", 6)]["step_vs_k1"]
    if ("budget", 3) in by:
        values["per_image_over_budget_k3"] = by[("budget", 3)]["per_image_over_budget_step"]
    if ("budget", 6) in by:
        values["per_image_over_budget_k6"] = by[("budget", 6)]["per_image_over_budget_step"]
    if vs is not None:
        values["ours_over_diffusers_step"] = vs["step_ratio"]
    results = {}
    for key, value in values.items():
        label, op, target = TARGETS[key]
        ok = value <= target if op == "<=" else value >= target
        results[key] = dict(label=label, value=value, op=op, target=target, passed=bool(ok))
    return results


def print_targets(targets, out):
    out("")
    out("Targets")
    for t in targets.values():
        out(f"  {'PASS' if t['passed'] else 'MISS'}  {t['label']}: {t['value']:.3f}x (target {t['op']} {t['target']}x)")


# --- main ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (< 1 min): K = 1, 3, 6, few repeats")
    ap.add_argument("--scale", choices=sorted(SCALES), default="1/16",
                    help="area scale vs the real 1024² setting: 1/16 = 256² areas (default), 1/4 = 512² areas")
    ap.add_argument("--real-vl", action="store_true",
                    help="keep the VL copies at the real 384² each instead of scaling them with the other areas")
    ap.add_argument("--skip-diffusers", action="store_true", help="skip table 2")
    ap.add_argument("--json", metavar="FILE", help="also write all figures as JSON")
    args = ap.parse_args(argv)

    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as dq

    import uniref_core.budget as budget_mod
    from uniref_core import UniRefPipeline
    from uniref_core.tiny import make_tiny_model
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()

    div = SCALES[args.scale]
    side = REAL_SIDE // math.isqrt(div)
    vl_area = REAL_VL_SIDE**2 if args.real_vl else REAL_VL_SIDE**2 // div
    quick = args.quick
    ks = [1, 3, 6] if quick else [1, 2, 3, 4, 5, 6]
    rounds = 5 if quick else 25
    steps, repeats = (4, 1) if quick else (40, 5)
    if div == 4:
        rounds, steps, repeats = (3, 2, 1) if quick else (9, 16, 3)

    def out(line=""):
        print(line, flush=True)

    def log(line):
        print(line, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    monitor = CpuMonitor()
    out(f"SELF benchmark ({'quick' if quick else 'full'}) -- CPU, tiny random model (uniref_core.tiny); "
        "absolute times are meaningless, read the ratios")
    out(f"  torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()} (default), "
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    out(f"  scale {args.scale} of the real setting: budget {side}² total, per_image {side}² each, output "
        f"{side}x{side} ({(side // 16) ** 2} target tokens), VL copies {math.isqrt(vl_area)}² each"
        + (" (real, unscaled)" if args.real_vl else ""))
    out(f"  {os.cpu_count()} CPUs; load average before start {os.getloadavg()[0]:.2f}")
    out(f"  references cycle through {', '.join(f'{w}x{h}' for w, h in REF_SIZES)} (random pixels)")

    # Every planned area is scaled by the same factor: the VL copies too (ours and diffusers').
    budget_mod.VL_IMAGE_AREA = vl_area
    dq.CONDITION_IMAGE_SIZE = vl_area
    dq.VAE_IMAGE_SIZE = side * side

    report = dict(
        quick=quick,
        scale=args.scale,
        side=side,
        vl_area=vl_area,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        device="cpu",
        model="uniref_core.tiny (random weights)",
    )
    with tempfile.TemporaryDirectory(prefix="uniref-bench-") as tmp:
        log("building the tiny model ...")
        folder = make_tiny_model(Path(tmp) / "model")
        pipe = UniRefPipeline.from_pretrained(folder)
        refs = make_references(max(ks), seed=0)

        log("table 1: per-step time vs K ...")
        rows = bench_steps(pipe, refs, ks, side, rounds, log)
        print_steps(rows, ks, out)
        report["steps"] = rows
        report["rounds"] = rounds

        vs = None
        if not args.skip_diffusers:
            log("table 2: ours vs diffusers ...")
            vs = bench_vs_diffusers(pipe, folder, refs[:DIFFUSERS_K], side, steps, repeats, log)
            print_vs_diffusers(vs, out)
            report["vs_diffusers"] = vs

    targets = check_targets(rows, vs)
    print_targets(targets, out)
    report["targets"] = targets
    report["seconds"] = time.perf_counter() - t_start
    others = monitor.others_share()
    report["other_processes_cpu_share"] = others
    out("")
    if others is not None:
        out(f"Other processes used {100 * others:.0f}% of the machine's CPU time during the run"
            + (": WARNING, the machine was not idle; the timings are unreliable, rerun on an idle machine"
               if others > 0.10 else " (idle enough)."))
    out(f"Total {report['seconds']:.0f} s. CPU timings of a 2-layer, 128-wide model: fixed per-call overheads weigh "
        "more, and attention less, than in the 60-layer 3072-wide real model on a GPU.")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        out(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
