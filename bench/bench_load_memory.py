"""Peak memory and time while loading a Qwen-Image diffusion model in each format the loader reads, the memory
as a ratio to the file's size.

    PYTHONPATH=. .venv/bin/python bench/bench_load_memory.py            # ~1 GB bf16 files, ~2 min
    PYTHONPATH=. .venv/bin/python bench/bench_load_memory.py --gb 0.25  # smaller

A synthetic Qwen-Image transformer (real block width 3072, 24 heads of 128; as many blocks as make the file
about --gb GB) is written four times, each by a separate process: a diffusers folder (``transformer/``, bf16,
what ``UniRefPipeline.from_pretrained`` reads), ComfyUI's single file in bf16, in fp8 with the newer
``weight_scale`` + ``comfy_quant`` layout, and in fp8 with the older ``scaled_fp8`` marker + ``scale_weight``. Each
load then runs in a fresh process that reports the growth of its peak resident
memory over its baseline after imports (``ru_maxrss``, after every weight page was touched, as a first forward
pass would) and the load time. Target (issue 18): peak ≤ 1.3× the
file size; a full fp32 copy of a bf16 file would be ≥ 3×.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WRITE = r"""
import json, sys, torch
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import save_file
layers, path, kind = int(sys.argv[1]), sys.argv[2], sys.argv[3]
fp8, old = kind.startswith("fp8"), kind == "fp8-old"
with torch.device("meta"):
    m = QwenImageTransformer2DModel(num_layers=layers)
sd = {}
g = torch.Generator().manual_seed(0)
for k, v in m.state_dict().items():
    t = (torch.randn(v.shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
    if fp8 and k.startswith("transformer_blocks.") and k.endswith(".weight") and t.ndim == 2:
        scale = t.float().abs().max() / 448
        sd[k] = (t.float() / scale).to(torch.float8_e4m3fn)
        if old:
            sd[k[:-7] + ".scale_weight"] = scale.reshape(1)
        else:
            sd[k[:-7] + ".weight_scale"] = scale.reshape(())
            sd[k[:-7] + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    else:
        sd[k] = t
if old:
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
if kind == "diffusers":  # the folder layout: config.json + diffusion_pytorch_model.safetensors
    import pathlib
    folder = pathlib.Path(path)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "QwenImageTransformer2DModel", **dict(m.config)}))
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
else:
    save_file(sd, path)
"""

LOAD = r"""
import json, resource, sys, time, torch
from uniref_core.comfy_files import load_comfy_transformer
from uniref_core.fp8 import FP8Linear
from diffusers import QwenImageTransformer2DModel  # the library's own import cost is not the load's
from safetensors import safe_open
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
if sys.argv[2] == "diffusers":  # as uniref_core.model.load_components loads a folder's transformer
    m = QwenImageTransformer2DModel.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16, use_safetensors=True,
                                                    local_files_only=True)
else:
    m = load_comfy_transformer(sys.argv[1])
dt = time.perf_counter() - t0
# Weights read lazily from the file's memory map are only resident once used: touch every byte, as a first
# forward pass would, so the peak counts them.
t1 = time.perf_counter()
with torch.no_grad():
    for t in [*m.parameters(), *m.buffers()]:
        t.view(-1)[:: max(1, 4096 // t.element_size())].sum()
touch = time.perf_counter() - t1
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
held = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
print(json.dumps({"peak_growth": peak - base, "held": held, "seconds": dt, "touch": touch,
                  "fp8_layers": sum(isinstance(x, FP8Linear) for x in m.modules())}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="approximate bf16 file size in GB (default 1)")
    a = p.parse_args(argv)
    per_block_bf16 = 340_000_000 * 2 / 1e9  # ~340 M parameters a block at width 3072 → GB in bf16
    layers = max(1, round(a.gb / per_block_bf16))
    root = Path(__file__).resolve().parent.parent
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("diffusers", "bf16", "fp8", "fp8-old"):
            path = Path(tmp) / (kind if kind == "diffusers" else f"qwen_image_synthetic_{kind}.safetensors")
            subprocess.run([sys.executable, "-c", WRITE, str(layers), str(path), kind], check=True, env=env, cwd=root)
            weights = path / "diffusion_pytorch_model.safetensors" if kind == "diffusers" else path
            size = weights.stat().st_size
            out = subprocess.run(
                [sys.executable, "-c", LOAD, str(path), kind],
                check=True,
                env=env,
                cwd=root,
                capture_output=True,
                text=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows.append((kind, size, r))
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"synthetic Qwen-Image transformer, {layers} blocks of width 3072")
    print(
        f"{'format':>9} {'size GB':>8} {'peak growth GB':>15} {'peak / file':>12} {'held / file':>12} "
        f"{'load ms':>8} {'read-in ms':>10} {'fp8 layers':>10}"
    )
    for kind, size, r in rows:
        print(
            f"{kind:>9} {size / 1e9:8.2f} {r['peak_growth'] / 1e9:15.2f} {r['peak_growth'] / size:12.2f} "
            f"{r['held'] / size:12.2f} {r['seconds'] * 1e3:8.0f} {r['touch'] * 1e3:10.0f} {r['fp8_layers']:10d}"
        )
    total = {k: r["seconds"] + r["touch"] for k, _, r in rows}  # load + read-in: what a first edit waits for
    print(
        "load + read-in / the bf16 single file's: "
        + ", ".join(f"{k} {t / total['bf16']:.1f}x" for k, t in total.items())
    )
    worst = max(r["peak_growth"] / size for _, size, r in rows)
    print(f"worst peak / file: {worst:.2f} (target <= 1.3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
