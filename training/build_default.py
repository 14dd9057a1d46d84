"""Reproduce the built-in default model from scratch: data, VAE, SFT in two phases, MSGRPO, export, evaluation.

    python -m training.build_default                      # resumes where it stopped
    python -m training.build_default --out /tmp/my-default --sft-out /tmp/my-default-sft --nproc 2

There is one recipe, the one that ships; earlier recipes and their results are in training/README.md
("Earlier recipes"). Every step writes its result atomically and is skipped when that result exists, so running
the command again after a crash (or Ctrl-C) continues where it stopped; SFT and MSGRPO resume from their newest
checkpoint. Both run as ``--nproc`` processes under ``torch.distributed.run`` (default: one per GPU, else 2 on a
CPU). Times on 2 cores are in training/README.md. After the VAE, the checker's scores of its reconstructions of
held-out targets are logged (`vae ceiling`): no transformer on that VAE can score higher.

1. ``data``: ShapeCompose train / val manifests of each set of `SFT_DATA` (128² targets; compositions'
   references squares of ``RECIPE["ref_side"]`` px, one SELF layout per K, so a forward pass holds a whole
   micro-batch).
2. ``init``: the tiny Qwen-Image-Edit model (``uniref_core.tiny``, a 6-layer transformer) with a 4× VAE
   (8 px tokens) trained for reconstruction on ShapeCompose images (``training.vae``) and a ``uniref.json``
   with the settings it is trained for (VL copies 112² in all, 128² output, 20 steps, no CFG; the budget
   is the last stage's and "shapecompose" the data's, both set at export).
3. ``sft``: ``training.sft`` with each config of `SFT_PHASES` in turn (``training/configs/sft_default_*.json``
   over ``sft_base.json``): the first from ``init``, each later one from the EMA export of the one before.
   A build starts at the last phase whose start model exists, so a phase's export copied to the next
   config's "model" folder is continued from (training/README.md).
4. ``export``: the last phase's EMA weights after its last stage to ``--sft-out`` (``--out`` with
   ``--no-msgrpo``), and those after its first stage to ``<work>/after_stage1`` when it has several.
5. ``msgrpo`` (``--no-msgrpo`` skips it): MSGRPO (`MSGRPO`) trains the SFT model further on prompts of its own
   and its last checkpoint is exported to ``--out`` (``models/uniref-default``, the default model).
6. ``eval``: ``training.evaluate`` on the held-out test split, K = 1…6 and each edit kind, at two sampling
   seeds, for each model, drawn as the model was trained, and the VAE's ceiling on the same targets; JSON + PNG
   grids in ``<work>/eval``.

Why a 4× VAE and 128² output: one token is then 8×8 px, so a 128² target is 256 tokens and a 52 px
object ~6 tokens across (~3 with the 8× VAE of real checkpoints, where run after run gave blobs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from uniref_core.atomic import atomic_dir
from uniref_core.errors import UniRefError

from .common.cli import exit_on_error

CONFIGS = Path(__file__).parent / "configs"
#: Where the shipped configs' paths lie (the default of ``--work``).
WORK = "runs/uniref-default"

#: The recipe's fixed choices (the SFT ones are in `SFT_PHASES`' configs).
RECIPE = {
    "size": 128,
    # Compositions' references are squares of one side: under SELF every composition of one K then has one
    # layout, so a forward pass holds a whole batch (diffusers builds RoPE from the first sample's layout).
    "ref_side": 96,
    "transformer": {"num_layers": 6},  # 4 heads × 32 = 128 wide, ~3.7 M parameters
    # The VAE is 4x (`uniref_core.tiny.VAE_4X`): one transformer token is 8×8 px, so a 52 px object is
    # ~6 tokens across instead of ~3 with the 8x VAE of real checkpoints. Trained in fp32: on AVX2 CPUs
    # without AVX512-BF16, bf16 autocast made a step ~30x SLOWER (0.6 s vs 18.5 s, batch 8, 64² crops).
    # Phase 1: the busiest of 4 random 64² crops (objects and edges); phase 2: whole 128² images, so the
    # mid-block attention sees the 32×32 latents of a whole target (trained only on crops, an earlier
    # VAE painted bands onto whole images).
    "vae": {"dim_mult": [1, 2, 4], "temperal_downsample": [False, True]},
    "vae_phases": [
        {
            "steps": 1500,
            "lr": 1.5e-3,
            "kl_weight": 1e-6,
            "focus": 4,
            "seed": 0,
            "crop": 64,
            "l2_weight": 1.0,
            "bf16": False,
        },
        {
            "steps": 700,
            "lr": 1e-3,
            "kl_weight": 1e-6,
            "focus": 1,
            "seed": 1,
            "crop": 128,
            "batch_size": 4,
            "l2_weight": 1.0,
            "bf16": False,
        },
    ],
    "eval_n": 24,  # test samples per K and per edit kind
    "eval_refs": "1-6",
    "eval_seeds": (0, 1),  # sampling seeds: a gain counts when it holds at both
}
#: The settings the model is trained for, written to its uniref.json (areas in pixels).
MODEL_DEFAULTS = {"budget": 192 * 192, "vl_budget": 112 * 112, "output_area": 128 * 128, "steps": 20, "cfg": 1.0}


#: The ShapeCompose data the SFT phases train on, each set in ``<work>/<folder>`` (where the phases' configs name
#: their manifests). `ANCHORED`: K = 1…3 compositions (`training.tasks.shapecompose.COMPOSE_ORDERS` "anchored":
#: objects centred in square references at about the size their slot asks for, a background reference last at
#: K ≥ 2), K = 3 drawn twice as often as K = 1 or 2.
ANCHORED = {
    "folder": "data-anchored",
    "ks": (1, 2, 3, 3),
    "order": "anchored",
    "train_samples": 3000,
    "val_samples": 32,
    "compose_fraction": 1.0,
}
SFT_DATA = (ANCHORED,)

#: The SFT phases in order. The first starts from ``<work>/init``; each later one from its config's "model", where
#: the phase before it is exported. Phase 1: 4,400 steps of 8 at lr 2e-3 cosine; phase 2: 6,000 more at 1.5e-3.
SFT_PHASES = (CONFIGS / "sft_default_1.json", CONFIGS / "sft_default_2.json")

#: The last step: MSGRPO from the SFT export, the `sum` arm of training/README.md's aggregation ablation (checker
#: reward, 4 groups of 6 a step), on prompts of its own: 400 anchored compositions with K = 2, 3, 3.
MSGRPO = {
    "config": CONFIGS / "msgrpo_default.json",
    "data": {
        "folder": "rl-data",
        "ks": (2, 3, 3),
        "order": "anchored",
        "train_samples": 400,
        "val_samples": 8,
        "compose_fraction": 1.0,
    },
}


def _done(path: Path) -> bool:
    return (path / ".done").is_file()


def _mark(path: Path, info: dict) -> None:
    (path / ".done").write_text(json.dumps(info))


def shapecompose_info(data: dict) -> dict:
    """What a model's ``uniref.json`` "shapecompose" records of its data (read back by `training.evaluate`)."""
    return {"ref_side": RECIPE["ref_side"], "order": data["order"]}


def step_data(work: Path, log, data: dict) -> None:
    """The train and val manifests ``data`` (`SFT_DATA`, ``MSGRPO["data"]``) says, in ``<work>/<folder>``."""
    from .tasks.shapecompose import make_mixture, write_manifest

    for split, n in (("train", data["train_samples"]), ("val", data["val_samples"])):
        final = work / data["folder"] / split
        if _done(final):
            continue
        with atomic_dir(final) as tmp:
            t0 = time.perf_counter()
            samples = make_mixture(
                split,
                n,
                data["compose_fraction"],
                data["ks"],
                RECIPE["size"],
                order=data["order"],
                ref_side=RECIPE["ref_side"],
            )
            write_manifest(samples, tmp)
            _mark(tmp, {"samples": n, "seconds": time.perf_counter() - t0})
        log(f"data: {split} {n} samples in {time.perf_counter() - t0:.0f} s")


def step_init(work: Path, log) -> Path:
    from uniref_core.tiny import make_tiny_model

    from .vae import train_vae

    init = work / "init"
    if _done(init):
        return init
    base = work / "base"
    if not (base / "model_index.json").is_file():
        with atomic_dir(base) as tmp:
            make_tiny_model(tmp, seed=0, transformer=RECIPE["transformer"], vae=RECIPE["vae"])
    source = base
    for i, phase in enumerate(RECIPE["vae_phases"], start=1):
        vae = work / ("vae" if i == 1 else f"vae{i}")
        if not (vae / "config.json").is_file():
            train_vae(source, vae, size=RECIPE["size"], log=log, **phase)
        source = vae
    ceiling = vae_ceiling(source, log)
    with atomic_dir(init) as tmp:
        shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("vae"))
        shutil.copytree(source, tmp / "vae", ignore=shutil.ignore_patterns("train_log.json"))
        info = {"name": "uniref-default", "defaults": MODEL_DEFAULTS, "shapecompose": {"ref_side": RECIPE["ref_side"]}}
        (tmp / "uniref.json").write_text(json.dumps(info, indent=1))
        _mark(tmp, {"vae_ceiling": ceiling})
    return init


def vae_ceiling(vae_dir: Path, log) -> dict:
    """Log the checker scores of the trained VAE's reconstructions of held-out targets (`reconstruction_ceiling`):
    what SFT can reach at best. Run 4's VAE gave back 0.80 per reference at K = 1 and 0.36 at K = 3."""
    from .vae import load_vae, reconstruction_ceiling

    ceiling = reconstruction_ceiling(load_vae(vae_dir).eval(), RECIPE["size"])
    log("vae ceiling (checker on reconstructions, per K): " + json.dumps(ceiling))
    return ceiling


def default_nproc() -> int:
    """SFT processes: one per GPU, else 2 on a CPU with ≥ 2 cores (2 processes × 1 thread trained 1.11× faster
    than 1 process × 2 threads on 2 cores, training/README.md)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def build_config(shipped: Path, work: Path, name: str | None = None, **overrides) -> Path:
    """A shipped config as this build runs it, written to ``<work>/<name>`` (default: the shipped file's name): its
    base merged in, its paths moved from `WORK` into ``work`` (with ``--work`` at its default, the same config) and
    ``overrides`` set."""
    from .common.config import read_config_data

    def moved(value):
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, str) and Path(value).is_relative_to(WORK):
            return str(work / Path(value).relative_to(WORK))
        return value

    data = {key: moved(value) for key, value in read_config_data(shipped).items()}
    data.update(overrides)
    dest = work / (name or shipped.name)
    work.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, dest)
    return dest


def step_sft(config_path: Path, log, nproc: int = 1):
    from .sft import run
    from .sft.config import load_config

    cfg = load_config(config_path)
    if _trained(cfg.output_dir, cfg.total_steps):
        return cfg
    t0 = time.perf_counter()
    if nproc <= 1:
        run(cfg, resume="auto")
    else:
        _launch("sft", config_path, nproc, cfg.output_dir, log)
    log(f"sft: {time.perf_counter() - t0:.0f} s this run")
    return cfg


def _trained(output_dir, steps: int) -> bool:
    """The run in ``output_dir`` has a complete checkpoint at ``steps`` or later."""
    from .common import checkpoint as ckpt_mod

    ckpts = ckpt_mod.complete_checkpoints(output_dir)
    return bool(ckpts) and ckpt_mod.read_state(ckpts[-1])["global_step"] >= steps


def _launch(trainer: str, config_path: Path, nproc: int, output_dir, log) -> None:
    """``training.<trainer>`` as ``nproc`` processes through the standard launcher, resuming from the newest
    checkpoint; on a CPU each process gets an equal share of the cores."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        f"training.{trainer}",
        "--config",
        str(config_path),
        "--resume",
        "auto",
    ]
    log(f"{trainer}: " + " ".join(cmd[1:]))
    if subprocess.run(cmd, env=env).returncode != 0:
        raise UniRefError(
            f"training.{trainer} stopped (see the output above); run the command again to resume "
            f"from the newest checkpoint in {output_dir}"
        )


def stage_end_checkpoints(cfg) -> list[Path]:
    from .common import checkpoint as ckpt_mod

    return [p for p in ckpt_mod.complete_checkpoints(cfg.output_dir) if ckpt_mod.read_state(p).get("stage_end")]


def step_build_sft(out: Path, work: Path, log, nproc: int = 1) -> dict[str, Path]:
    """The SFT model: data, then each of `SFT_PHASES` trained and exported to where the next one starts (its
    config's "model"), the last to ``out``. Training starts at the last phase whose start model exists (``init``,
    built first, when none does), so a build continues from a phase's export, committed or copied there."""
    from .sft.config import load_config

    for data in SFT_DATA:
        step_data(work, log, data)
    configs = [build_config(p, work) for p in SFT_PHASES]
    starts = [Path(load_config(p).model) for p in configs[1:]]
    first = max([0] + [i + 1 for i, s in enumerate(starts) if (s / "model_index.json").is_file()])
    if first == 0:
        step_init(work, log)
    for config_path, dest in list(zip(configs, starts + [out]))[first:]:
        cfg = step_sft(config_path, log, nproc)
        models = step_export(cfg, dest, work, log, shapecompose_info(ANCHORED))
    return models


def step_export(cfg, out: Path, work: Path, log, shapecompose: dict | None = None) -> dict[str, Path]:
    from .export import export

    ends = stage_end_checkpoints(cfg)
    if len(ends) != len(cfg.stages):
        raise UniRefError(
            f"{cfg.output_dir} has {len(ends)} stage-end checkpoints, expected {len(cfg.stages)}: "
            "run the command again to finish SFT"
        )
    models = {"after_stage1": work / "after_stage1", "final": out}
    pairs = [("after_stage1", ends[0]), ("final", ends[-1])] if len(ends) > 1 else [("final", ends[-1])]
    for (name, ckpt), stage in zip(pairs, [cfg.stages[0], cfg.stages[-1]][-len(pairs) :]):
        export(ckpt, models[name], weights="auto")
        # The model's default budget is the one it was last trained at.
        info_path = models[name] / "uniref.json"
        info = json.loads(info_path.read_text())
        info["defaults"]["budget"] = stage.budget
        if shapecompose:
            info["shapecompose"] = shapecompose
        info_path.write_text(json.dumps(info, indent=1))
        log(f"export: {ckpt.name} → {models[name]} (default budget {stage.label})")
    return {name: models[name] for name, _ in pairs}


def _name_model(folder: Path) -> None:
    """A model folder's uniref.json "name" is the folder's (the SFT and the MSGRPO model are told apart)."""
    info_path = folder / "uniref.json"
    info = json.loads(info_path.read_text())
    info["name"] = folder.name
    info_path.write_text(json.dumps(info, indent=1))


def step_msgrpo(sft_model: Path, out: Path, work: Path, log, nproc: int = 1) -> Path:
    """MSGRPO (`MSGRPO`) from ``sft_model``, its last checkpoint exported to ``out``; resumes like SFT."""
    from .common import checkpoint as ckpt_mod
    from .export import export
    from .rl.config import load_config

    step_data(work, log, MSGRPO["data"])
    config_path = build_config(
        MSGRPO["config"],
        work,
        "msgrpo.json",
        model=str(sft_model),
        output_dir=str(work / "msgrpo"),
        train_manifest=str(work / MSGRPO["data"]["folder"] / "train" / "manifest.jsonl"),
    )
    cfg = load_config(config_path)
    if not _trained(cfg.output_dir, cfg.steps):
        t0 = time.perf_counter()
        _launch("msgrpo", config_path, nproc, cfg.output_dir, log)
        log(f"msgrpo: {time.perf_counter() - t0:.0f} s this run")
    ckpts = ckpt_mod.complete_checkpoints(cfg.output_dir)
    export(ckpts[-1], out, weights="auto")
    _name_model(out)
    log(f"export: {ckpts[-1].name} → {out}")
    return out


def step_eval(models: dict[str, Path], work: Path, log, order: str = "reading", folder_name: str = "eval") -> dict:
    """Each model on the held-out test split at every sampling seed of ``RECIPE["eval_seeds"]``
    (``<name>_seed<s>.json`` and a grid), and the VAE's ceiling on the same targets (``vae_ceiling.json``)."""
    from .evaluate import evaluate_model, parse_refs

    results = {}
    folder = work / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    ks = parse_refs(RECIPE["eval_refs"])
    for name, path in models.items():
        for seed in RECIPE["eval_seeds"]:
            res = evaluate_model(
                path,
                "test",
                ks,
                RECIPE["eval_n"],
                seed=seed,
                edits=RECIPE["eval_n"],
                grid_path=folder / f"{name}_seed{seed}.png",
            )
            (folder / f"{name}_seed{seed}.json").write_text(json.dumps(res, indent=1))
            results[f"{name}_seed{seed}"] = res
            log(f"eval {name} seed {seed}: " + json.dumps({**res["per_k"], **res.get("edit_kinds", {})}))
    ceiling_file = folder / "vae_ceiling.json"
    if not ceiling_file.is_file():  # the same targets, decoded from the VAE's own latents: the ceiling beside them
        from .vae import load_vae, reconstruction_ceiling

        vae = load_vae(next(iter(models.values()))).eval()
        ceiling = reconstruction_ceiling(
            vae, RECIPE["size"], ks=ks, n=RECIPE["eval_n"], order=order, edits=RECIPE["eval_n"]
        )
        ceiling_file.write_text(json.dumps(ceiling, indent=1))
        log(f"vae ceiling on the evaluation's targets ({order}): " + json.dumps(ceiling))
    return results


@exit_on_error
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.build_default",
        description=__doc__.split("\n")[0],
        epilog="There is one recipe, what ships: 4,400 + 6,000 SFT steps of 8 on anchored K = 1…3 compositions, "
        "then 100 MSGRPO steps. The --recipe flag is gone with the earlier recipes (training/README.md, "
        '"Earlier recipes", names the commit of each one\'s config).',
    )
    p.add_argument("--out", default="models/uniref-default", help="where the trained model folder goes")
    p.add_argument(
        "--sft-out", default="models/uniref-default-sft", help="where the SFT model that MSGRPO starts from goes"
    )
    p.add_argument("--no-msgrpo", action="store_true", help="stop after SFT: the SFT model goes to --out")
    p.add_argument(
        "--work",
        default=WORK,
        help="data, runs, checkpoints and evaluations (the shipped configs' paths in runs/uniref-default "
        "are moved here)",
    )
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="SFT and MSGRPO processes (torch.distributed.run; default: one per GPU, else 2 on a CPU with ≥ 2 cores)",
    )
    a = p.parse_args(argv)
    if a.nproc is None:
        a.nproc = default_nproc()
    elif a.nproc < 1:
        p.error(f"--nproc {a.nproc}: give 1 or more processes")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log_file = work / "build.log"

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with log_file.open("a") as f:
            f.write(line + "\n")

    t0 = time.perf_counter()
    if a.no_msgrpo:
        models = step_build_sft(Path(a.out), work, log, a.nproc)
    else:
        models = step_build_sft(Path(a.sft_out), work, log, a.nproc)
        _name_model(models["final"])
        models = {"sft": models["final"], "final": step_msgrpo(models["final"], Path(a.out), work, log, a.nproc)}
    if not a.skip_eval:
        step_eval(models, work, log, ANCHORED["order"])
    log(f"build_default: done in {time.perf_counter() - t0:.0f} s (this invocation); model in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
