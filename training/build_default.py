"""Reproduce the built-in default model from scratch: data, VAE, SFT with progressive budgets, export, evaluation.

    python -m training.build_default                      # resumes where it stopped
    python -m training.build_default --out /tmp/my-default --work runs/my-default

On 2 CPU cores (run 4, 2026-12-02): VAE ~18 min (+5.4 min for phase 4, added after run 4), SFT stage 1
~64 min, stage 2 ~45 min, which is over the 2 h it must fit (see training/README.md). After the VAE, the
checker's scores of its reconstructions of held-out targets are logged (`vae_ceiling`): no transformer
on that VAE can score higher. Every step writes its result atomically and is skipped
when that result exists, so running the command again after a crash (or Ctrl-C) continues where it
stopped; SFT itself resumes from its newest checkpoint.

1. ``data``: ShapeCompose train / val manifests (K = 1…6 compositions and single-image edits), 128² targets.
2. ``init``: the tiny Qwen-Image-Edit model (``uniref_core.tiny``, a 6-layer transformer) with its VAE
   trained for reconstruction on ShapeCompose images (``training.vae``) and a ``uniref.json`` with the
   settings it is trained for (budget 256², VL copies 112² in all, 128² output, 20 steps, no CFG).
3. ``sft``: ``training.sft`` with ``training/configs/default_model.json`` (budgets 128² → 256²).
4. ``export``: the EMA weights after the last stage to ``--out`` (the model the CLI, main.sh and the
   ComfyUI loader use), and those after the first stage to ``<work>/after_stage1`` for comparison.
5. ``eval``: ``training.evaluate`` on the held-out test split, K = 1…8, for both; JSON + PNG grids in ``<work>/eval``.

Why 128² output: the VAE makes 8×8-pixel latents and the transformer 2×2 patches, so a 128² image is
64 tokens and a step of the 6-layer transformer on a whole K = 6 sample costs milliseconds on a CPU;
shapes of ~25–45 px per object are still easy to read. 256² would be 4× the tokens and ~3–5× the time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from uniref_core.errors import UniRefError

from .cli import exit_on_error

CONFIG = Path(__file__).parent / "configs" / "default_model.json"

#: The recipe's fixed choices (the SFT ones are in CONFIG).
RECIPE = {
    "train_samples": 8000,  # encoding is ~0.1 s a sample a stage on 2 cores: more would not fit 2 h
    "val_samples": 48,
    "compose_fraction": 0.75,  # the rest are single-image edits (K = 1)
    "size": 128,
    "transformer": {"num_layers": 6},  # 4 heads × 32 = 128 wide, ~3.7 M parameters
    # VAE, four phases: random crops with a small KL term, then the busiest of 4 crops (objects and edges,
    # where colour and shape live) with almost none, then smaller busy crops with an MSE term; after
    # phase 1 purple and green objects came back grey, after phase 2 still dull. Phase 4 (fp32, 32 px busy
    # crops, batch 32) raised the checker's score of reconstructed targets (`vae_ceiling`) from 0.80 to
    # 0.97 per reference at K = 1 and from 0.36 to 0.46 at K = 3 (which of its changes did it: not separated).
    "vae_phases": [
        {"steps": 1800, "lr": 1e-3, "kl_weight": 1e-4, "focus": 1, "seed": 0},
        {"steps": 1000, "lr": 5e-4, "kl_weight": 1e-6, "focus": 4, "seed": 1},
        {"steps": 2000, "lr": 1e-3, "kl_weight": 1e-6, "focus": 4, "seed": 2, "crop": 48, "l2_weight": 1.0},
        {"steps": 1000, "lr": 5e-4, "kl_weight": 1e-6, "focus": 4, "seed": 3, "crop": 32, "batch_size": 32,
         "l2_weight": 1.0, "bf16": False},
    ],
    "eval_n": 24,  # test samples per K
    "eval_refs": "1-8",
}
#: The settings the model is trained for, written to its uniref.json (areas in pixels).
MODEL_DEFAULTS = {"budget": 256 * 256, "vl_budget": 112 * 112, "output_area": 128 * 128, "steps": 20, "cfg": 1.0}


def _done(path: Path) -> bool:
    return (path / ".done").is_file()


def _mark(path: Path, info: dict) -> None:
    (path / ".done").write_text(json.dumps(info))


def step_data(work: Path, log) -> None:
    from .make_shapecompose import make_mixture
    from .shapecompose import K_TRAIN, write_manifest

    for split, n in (("train", RECIPE["train_samples"]), ("val", RECIPE["val_samples"])):
        final = work / "data" / split
        if _done(final):
            continue
        tmp = final.with_name(split + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        samples = make_mixture(split, n, RECIPE["compose_fraction"], K_TRAIN, RECIPE["size"])
        write_manifest(samples, tmp)
        _mark(tmp, {"samples": n, "seconds": time.perf_counter() - t0})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        log(f"data: {split} {n} samples in {time.perf_counter() - t0:.0f} s")


def step_init(work: Path, log) -> Path:
    from uniref_core.tiny import make_tiny_model

    from .vae import train_vae

    init = work / "init"
    if _done(init):
        return init
    base = work / "base"
    if not (base / "model_index.json").is_file():
        make_tiny_model(base.with_name("base.tmp"), seed=0, transformer=RECIPE["transformer"])
        shutil.rmtree(base, ignore_errors=True)
        base.with_name("base.tmp").rename(base)
    source = base
    for i, phase in enumerate(RECIPE["vae_phases"], start=1):
        vae = work / ("vae" if i == 1 else f"vae{i}")
        if not (vae / "config.json").is_file():
            train_vae(source, vae, size=RECIPE["size"], log=log, **phase)
        source = vae
    ceiling = vae_ceiling(source, log)
    tmp = work / "init.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("vae"))
    shutil.copytree(source, tmp / "vae", ignore=shutil.ignore_patterns("train_log.json"))
    (tmp / "uniref.json").write_text(json.dumps({"name": "uniref-default", "defaults": MODEL_DEFAULTS}, indent=1))
    _mark(tmp, {"vae_ceiling": ceiling})
    shutil.rmtree(init, ignore_errors=True)
    tmp.rename(init)
    return init


def vae_ceiling(vae_dir: Path, log) -> dict:
    """Log the checker scores of the trained VAE's reconstructions of held-out targets (`reconstruction_ceiling`):
    what SFT can reach at best. Run 4's VAE gave back 0.80 per reference at K = 1 and 0.36 at K = 3."""
    from .vae import load_vae, reconstruction_ceiling

    ceiling = reconstruction_ceiling(load_vae(vae_dir).eval(), RECIPE["size"])
    log("vae ceiling (checker on reconstructions, per K): " + json.dumps(ceiling))
    return ceiling


def step_sft(config_path: Path, log):
    from . import checkpoint as ckpt_mod
    from .config import load_config
    from .sft import run

    cfg = load_config(config_path)
    out = Path(cfg.output_dir)
    ckpts = ckpt_mod.complete_checkpoints(out)
    if ckpts and ckpt_mod.read_state(ckpts[-1])["global_step"] >= cfg.total_steps:
        return cfg
    t0 = time.perf_counter()
    run(cfg, resume="auto")
    log(f"sft: {time.perf_counter() - t0:.0f} s this run")
    return cfg


def stage_end_checkpoints(cfg) -> list[Path]:
    from . import checkpoint as ckpt_mod

    return [p for p in ckpt_mod.complete_checkpoints(cfg.output_dir) if ckpt_mod.read_state(p).get("stage_end")]


def step_export(cfg, out: Path, work: Path, log) -> dict[str, Path]:
    from .export import export

    ends = stage_end_checkpoints(cfg)
    if len(ends) != len(cfg.stages):
        raise UniRefError(f"{cfg.output_dir} has {len(ends)} stage-end checkpoints, expected {len(cfg.stages)}: "
                          "run the command again to finish SFT")  # fmt: skip
    models = {"after_stage1": work / "after_stage1", "final": out}
    for name, ckpt in (("after_stage1", ends[0]), ("final", ends[-1])):
        export(ckpt, models[name], weights="auto")
        log(f"export: {ckpt.name} → {models[name]}")
    return models


def step_eval(models: dict[str, Path], work: Path, log) -> dict:
    from .evaluate import evaluate_model, parse_refs

    results = {}
    folder = work / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in models.items():
        res = evaluate_model(path, "test", parse_refs(RECIPE["eval_refs"]), RECIPE["eval_n"], seed=0,
                             grid_path=folder / f"{name}.png")  # fmt: skip
        (folder / f"{name}.json").write_text(json.dumps(res, indent=1))
        results[name] = res
        log(f"eval {name}: " + json.dumps(res["per_k"]))
    return results


@exit_on_error
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.build_default", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="models/uniref-default", help="where the trained model folder goes")
    p.add_argument("--work", default="runs/uniref-default", help="data, runs, checkpoints and evaluations")
    p.add_argument("--config", default=str(CONFIG), help="SFT config (its paths must lie in --work)")
    p.add_argument("--skip-eval", action="store_true")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log_file = work / "build.log"

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with log_file.open("a") as f:
            f.write(line + "\n")

    t0 = time.perf_counter()
    step_data(work, log)
    step_init(work, log)
    cfg = step_sft(Path(a.config), log)
    models = step_export(cfg, Path(a.out), work, log)
    if not a.skip_eval:
        step_eval(models, work, log)
    log(f"build_default: done in {time.perf_counter() - t0:.0f} s (this invocation); model in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
