"""Peak training memory on a model in the real proportions, as a ratio to the transformer's bf16 bytes.

    PYTHONPATH=. .venv/bin/python bench/bench_train_memory.py                 # every mode, ~10 min on 2 cores
    PYTHONPATH=. .venv/bin/python bench/bench_train_memory.py --modes lora_bf16 msgrpo_g16
    PYTHONPATH=. .venv/bin/python bench/bench_train_memory.py --device cuda  # torch.cuda.max_memory_allocated

The model (`uniref_core.tiny.REAL_PROPORTIONS`): a 190 M-parameter `QwenImageTransformer2DModel` with the real
head width and text width 1024, a Qwen2.5-VL text stack 0.45 of its size, weights bf16 on disk. Each mode trains
in a fresh process on ShapeCompose compositions of 3 references and reports the growth of its peak resident memory
(``VmHWM``, reset after importing torch, diffusers, transformers, peft and accelerate; glibc told to return freed
memory: ``MALLOC_MMAP_THRESHOLD_=65536``) over its size then, less the shared-library code it faulted in meanwhile
(which kernels run, so how many code pages, depends on the CPU: 45 MiB on one machine type, ~150 on another), with
oneDNN's primitive cache off (``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``: its compiled kernels held ~60 MiB more on an AMD
EPYC than on the CPU type the planner was fitted on): what the run's own tensors hold at their worst moment. On a
GPU it reports ``torch.cuda.max_memory_allocated`` instead. The memory planner's prediction for the same config
(`training.memory`) is printed beside each figure.

Modes: LoRA SFT on a bf16 base and on an fp8 base (checkpointing on), full SFT (bf16 mixed precision, fp32
master weights), MSGRPO LoRA with G = 16, and FSDP full SFT over 2 processes (per rank). LoRA rank 21 is r64 in
proportion (see LORA).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# r64 at the real width (3072) scaled to this model's 1024: the adapters and their optimizer state then weigh the same
# share of the model as r64 does at real size (LoRA grows with the width, the weights with its square).
LORA = {"rank": 21, "alpha": 21}
SFT = {
    "stages": [{"budget": 256, "steps": 2, "lr": 1e-4, "batch_size": 1, "output_size": 256}],
    "vl_budget": 112,
    "eval_samples": 0,
    "tensorboard": False,
    "mixed_precision": "bf16",
    "gradient_checkpointing": True,
    "save_every": 0,
}
MSGRPO = {
    "steps": 1,
    "lr": 1e-5,
    "group_size": 16,
    "groups_per_step": 1,
    "rollout_steps": 4,
    "sde_window": [0, 2],
    "budget": 128,
    "output_size": 128,
    "vl_budget": 112,
    "lora": LORA,
    "mixed_precision": "bf16",
    "base_dtype": "bf16",
    "rewards": [{"source": "bench.bench_train_memory:brightness_source"}],
    "gradient_checkpointing": True,
    "tensorboard": False,
    "grid_every": 0,
}
MODES = {
    "lora_bf16": ("sft", {**SFT, "lora": LORA, "base_dtype": "bf16"}),
    "lora_fp8": ("sft", {**SFT, "lora": LORA, "base_dtype": "fp8"}),
    "full": ("sft", {**SFT, "base_dtype": "bf16"}),
    "msgrpo_g16": ("msgrpo", MSGRPO),  # the re-scoring pass 4 images at a time (policy_micro_batch's default)
    "msgrpo_g16_whole": ("msgrpo", {**MSGRPO, "policy_micro_batch": None}),  # the whole group in one pass
    # A global batch of 2: one micro-batch per process, as "full" has in its one process.
    "fsdp2": ("sft", {**SFT, "base_dtype": "bf16", "fsdp": True, "stages": [{**SFT["stages"][0], "batch_size": 2}]}),
}


def brightness_source():
    """MSGRPO's reward in the bench: each image's mean brightness. A random model scores 0 on every checker signal,
    its groups would carry no advantage, and the re-scoring pass (the step's peak) would never run."""
    import numpy as np

    from training.rewards import RewardBatch, Signal

    def source(images, row):
        return RewardBatch({"brightness": Signal(np.array([np.asarray(im).mean() / 255 for im in images]))})

    return source


#: The child's environment beside PYTHONPATH: glibc returns freed memory at once, and oneDNN's primitive cache (up to
#: 1,024 compiled kernels with their buffers) is off. That cache is runtime state like the code pages: for the same
#: run it held ~60 MiB on an AMD EPYC and nothing measurable on the CPU type the planner was fitted on.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}

#: Child-script source shared by the memory benches: ``status(key)`` reads /proc/self/status, ``code_kib()`` the
#: resident shared-library code.
PROC_MEMORY = r"""
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))

def code_kib():  # resident KiB of shared-library mappings: code, faulted in by the kernels this CPU takes
    total, lib = 0, False
    try:
        for line in open("/proc/self/smaps"):
            head = line.split(maxsplit=6)
            if "-" in head[0] and not head[0].endswith(":"):
                lib = len(head) > 5 and ".so" in head[-1].rsplit("/", 1)[-1]
            elif lib and head[0] == "Rss:":
                total += int(head[1])
    except OSError:
        return 0
    return total
"""

CHILD = (
    r"""
import json, resource, sys
import accelerate, diffusers, peft, torch, transformers  # the interpreter's own memory: the baseline
kind, config, device = sys.argv[1], sys.argv[2], sys.argv[3]

"""
    + PROC_MEMORY
    + r"""
try:  # Linux: reset the peak to the current size, so a spike while importing does not hide the run's own peak
    open("/proc/self/clear_refs", "w").write("5")
    base, peak_kib = status("VmRSS"), lambda: status("VmHWM")
except OSError:
    def peak_kib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base = peak_kib()
if kind == "sft":
    from training.sft.config import load_config
    from training.sft.trainer import run
else:
    from training.rl.config import load_config
    from training.rl.trainer import run as rl_run
    run = lambda cfg: rl_run(cfg, trusted_modules=("bench",))  # the reward source is this bench's own
code = code_kib()
run(load_config(config))
code = code_kib() - code  # code pages only grow: all of them are counted in the peak, at most
peak = peak_kib() - base - code
if kind == "msgrpo":  # a step whose groups all scored alike re-scores nothing: the figure would miss the peak
    import json, pathlib
    log = pathlib.Path(json.loads(pathlib.Path(config).read_text())["output_dir"]) / "log.jsonl"
    assert all(json.loads(l).get("items", 1) > 0 for l in log.read_text().splitlines()), "no group had a signal"
if device == "cuda":
    peak = torch.cuda.max_memory_allocated() // 1024
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
print("PEAK_KIB", rank, peak, code, flush=True)
"""
)


def unknown_keys(kind: str, config: dict) -> list[str]:
    """Keys of the mode this checkout's trainer does not know (an older commit: measured without them)."""
    if kind == "sft":
        from training.sft.config import SFTConfig as cls
    else:
        from training.rl.config import RLConfig as cls
    return sorted(k for k in config if k not in cls.__dataclass_fields__)


def predict(kind: str, config_path: Path, processes: int) -> float | None:
    """The planner's predicted peak in bytes (per process), where this checkout has the planner."""
    try:
        from training.memory import predict_peak
    except ImportError:
        return None
    return predict_peak(config_path, kind=kind, processes=processes, device="cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workdir", default=None, help="keep the model and data here (default: a temporary folder)")
    args = ap.parse_args()

    from training.tasks.shapecompose import make_split, write_manifest
    from uniref_core.tiny import REAL_PROPORTIONS, make_tiny_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_train_memory_"))
    model = work / "model"
    if not (model / "model_index.json").is_file():
        make_tiny_model(model, **REAL_PROPORTIONS)
    manifest = work / "data" / "manifest.jsonl"
    if not manifest.is_file():
        write_manifest(make_split("train", 4, size=256, ks=(3,), kinds=("compose",)), work / "data")
    from safetensors import safe_open

    with safe_open(model / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    unit = 2 * params  # the transformer's bf16 bytes
    print(f"model: transformer {params / 1e6:.0f} M parameters ({unit / 2**20:.0f} MiB in bf16); device {args.device}")
    print(f"{'mode':<12} {'peak MiB':>9} {'ratio':>6} {'planner':>8}  note")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **CHILD_ENV}
    for mode in args.modes:
        kind, over = MODES[mode]
        config = {
            "model": str(model),
            "train_manifest": str(manifest),
            "output_dir": str(work / "runs" / mode),
            **over,
        }
        dropped = unknown_keys(kind, config)
        for key in dropped:
            del config[key]
        shutil.rmtree(work / "runs" / mode, ignore_errors=True)  # a fresh run: no cache, checkpoints or log kept
        path = work / f"{mode}.json"
        path.write_text(json.dumps(config))
        processes = 2 if over.get("fsdp") else 1
        child = work / "child.py"
        child.write_text(CHILD)
        if processes > 1:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
            env_mode = {**env, "OMP_NUM_THREADS": "1"}
        else:
            launch, env_mode = [sys.executable], env
        proc = subprocess.run(
            [*launch, str(child), kind, str(path), args.device], cwd=ROOT, env=env_mode, capture_output=True, text=True
        )
        peaks = [int(line.split()[2]) * 1024 for line in proc.stdout.splitlines() if line.startswith("PEAK_KIB")]
        if proc.returncode or not peaks:
            print(
                f"{mode:<12} failed: "
                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
            )
            continue
        peak = max(peaks)
        planned = predict(kind, path, processes)
        note = f"per rank, {processes} processes" if processes > 1 else ""
        if dropped:
            note += f" without {', '.join(dropped)} (unknown to this checkout)"
        plan = "-" if planned is None else f"{planned / unit:.2f}"
        print(f"{mode:<12} {peak / 2**20:>9.0f} {peak / unit:>6.2f} {plan:>8}  {note}")


if __name__ == "__main__":
    main()
