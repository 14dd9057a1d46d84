"""Scripts that run inside a real ComfyUI host's tree and interpreter, where ComfyUI's own classes build tiny models,
save them in ComfyUI's file layouts and compute what the tests compare the engine with.

The test side calls ``run_in_host(version, script, args)``. Every script runs after ``PREAMBLE``: ComfyUI's own
argument parsing on the CPU, ``torch`` imported with gradients off, ``args`` (a JSON object) parsed, and this folder
importable, so a script imports the child-side helpers below (``from comfy_child import init_weights``) and the
tiny-size shim (``host_shims.uniref_test_tiny_qwen``). The helpers import ``comfy`` inside, so this module loads on
both sides.
"""

import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TESTS_DIR = Path(__file__).resolve().parent

PREAMBLE = f"""
import json, sys
args = json.loads(sys.argv[1])
sys.path.append({str(TESTS_DIR)!r})
import comfy.options
comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu"]
import torch
# As ComfyUI's executor runs every node (inference mode): no autograd graph. With one, the reference latents kept
# each encode's graph alive, the Wan VAE's 16k x 16k mid-block attention scores among them (2 GiB a 1 MP encode):
# test_native_self's 0.3.75 child grew to 19.5 GB and was killed by the OOM killer.
torch.set_grad_enabled(False)
"""


def run_in_host(version: str, script: str, args: dict | list, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` in the ComfyUI host of this version (set up on first use); fail with its stderr unless it exits
    0. A script reports with a last line of JSON (``last_json``) or with the files it writes."""
    from comfyhost import comfy_hosts

    host = comfy_hosts.ensure_host(version)
    proc = subprocess.run(
        [str(host.python), "-c", PREAMBLE + script, json.dumps(args)],
        cwd=host.comfy_dir,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=comfy_hosts.host_env(),
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}; stderr:\n{proc.stderr[-4000:]}"
    return proc


def last_json(proc: subprocess.CompletedProcess):
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- child side: weights ComfyUI's disable_weight_init leaves uninitialised ------------------------------------------


def init_weights(module, g) -> dict:
    """Random weights at the scale real ones have: norm scales near 1, biases small, matrices by their fan-in.
    Returns the module's state dict, ready to save."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "gamma" in name or (p.ndim == 1 and ("norm" in name or "ln_q" in name)):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return {k: v.contiguous() for k, v in module.state_dict().items()}


def init_transformer_weights(model, g) -> dict:
    """Random weights for a Qwen-Image transformer whose prediction the tests compare: norm scales near 1, the rest
    N(0, 0.05²). Returns its state dict, ready to save."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return {k: v.contiguous() for k, v in model.state_dict().items()}


# -- a transformer's prediction on both sides -----------------------------------------------------------------------

# Latents, two references of other shapes, and text states (joint_attention_dim 64) for a 16-channel transformer.
INPUT_SHAPES = (
    ("x", (1, 16, 1, 8, 8)),
    ("ref1", (1, 16, 1, 4, 8)),
    ("ref2", (1, 16, 1, 8, 4)),
    ("context", (1, 7, 64)),
)


def comfy_prediction(model, sigma: float, g, io_file: str) -> None:
    """Child side: ComfyUI's model on random inputs; the inputs and its output saved for ``our_prediction``."""
    inputs = {k: torch.randn(s, generator=g) for k, s in INPUT_SHAPES}
    with torch.no_grad():
        out = model(
            inputs["x"], torch.tensor([sigma]), inputs["context"], ref_latents=[inputs["ref1"], inputs["ref2"]]
        )
    save_file({**inputs, "out": out.contiguous()}, io_file)


def our_prediction(model, io: dict, sigma: float = 0.7):
    """Test side: the engine's prediction for the inputs ``comfy_prediction`` saved, and ComfyUI's, as tokens."""
    from uniref_core.latents import pack_latents
    from uniref_core.pipeline import predict_velocity

    x, refs = pack_latents(io["x"]), [pack_latents(io["ref1"]), pack_latents(io["ref2"])]
    # Where ComfyUI and diffusers (the two reference implementations) disagree with each other, the test stays
    # out: an odd token grid (3 rows: ComfyUI centres the rotary positions at -1, 0, 1, diffusers at -2, -1, 0)
    # and a reference wider or taller than the target (ComfyUI starts the text positions after the target's
    # half-size, diffusers after the largest image's).
    shapes = [[(1, 4, 4), (1, 2, 4), (1, 4, 2)]]
    with torch.no_grad():
        tokens = predict_velocity(model.float(), x, sigma * 1000, refs, io["context"], None, shapes)
    want = pack_latents(io["out"])
    return tokens, want


# -- fp8 files as ComfyUI lays them out -----------------------------------------------------------------------------

# A quantised layer's ``.comfy_quant`` (the newer layout): its format as JSON bytes. Each layer gets its own copy:
# safetensors refuses to save one tensor under several names.
QUANT = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)


def quantise_fp8(sd: dict, keys, layout: str, scale_input: bool = False) -> int:
    """Store the ``keys`` weights of ``sd`` in fp8, in place, as ComfyUI's files do: "old" (a ``scaled_fp8``
    marker, ``.scale_weight``, and ``.scale_input`` of 1 with ``scale_input``), "new" (``.weight_scale`` +
    ``.comfy_quant``) or "plain" (fp8 weights, no scale). Returns how many layers were quantised."""
    keys = list(keys)
    for k in keys:
        layer = k[: -len(".weight")]
        scale = torch.tensor(1.0) if layout == "plain" else sd[k].abs().max().float() / 448
        sd[k] = (sd[k] / scale).to(torch.float8_e4m3fn)
        if layout == "old":
            sd[layer + ".scale_weight"] = scale.reshape(())
            if scale_input:
                sd[layer + ".scale_input"] = torch.tensor(1.0)
        elif layout == "new":
            sd[layer + ".weight_scale"] = scale.reshape(())
            sd[layer + ".comfy_quant"] = QUANT.clone()
    if layout == "old":
        sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return len(keys)


def comfy_fp8_load(file: str):
    """Child side: ComfyUI's own load of an fp8 file (old quants converted) and the ops that run its quantised
    layers (``mixed_precision_ops``, emulated on the CPU): (state dict, operations)."""
    import comfy.ops
    import comfy.utils

    loaded, _ = comfy.utils.convert_old_quants(load_file(file), "", {})
    fp8 = {"float8_e4m3fn", "float8_e5m2"}
    return loaded, comfy.ops.mixed_precision_ops({}, torch.float32, full_precision_mm=True, disabled=fp8)


# -- ComfyUI's own VAE file -----------------------------------------------------------------------------------------

VAE_SCRIPT = """
from comfy import latent_formats
from comfy.ldm.wan.vae import WanVAE
from comfy_child import init_weights
from safetensors.torch import save_file

# What comfy/sd.py builds for a Wan 2.1 (Qwen-Image) VAE file, at a tiny width.
vae = WanVAE(dim=args["dim"], z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
             temperal_downsample=[False, True, True], dropout=0.0)
g = torch.Generator().manual_seed(args["seed"])
dtype = getattr(torch, args["dtype"])
save_file({args["prefix"] + k: v.to(dtype) for k, v in init_weights(vae, g).items()}, args["file"])
vae = vae.to(dtype).float()
image = torch.rand((1, 3, 1, 48, 32), generator=g) * 2 - 1
with torch.no_grad():
    mu = vae.encode(image)
    out = vae.decode(mu)
fmt = latent_formats.Wan21()
save_file({"image": image, "mu": mu.contiguous(), "out": out.contiguous(),
           "latents_mean": fmt.latents_mean.flatten().contiguous(),
           "latents_std": fmt.latents_std.flatten().contiguous()},
          args["io"])
"""


def comfy_vae_file(tmp_path, version, *, prefix="", dtype="float32", dim=8, seed=0):
    """A tiny Qwen-Image VAE built with ComfyUI's own class (``comfy/ldm/wan/vae.py``) in the host and saved in its
    file layout, and ComfyUI's encode and decode of one image with it: (file, {image, mu, out, latents_mean,
    latents_std})."""
    file, io_file = tmp_path / f"qwen_image_vae_{dtype}.safetensors", tmp_path / "io.safetensors"
    args = {"seed": seed, "prefix": prefix, "dtype": dtype, "dim": dim, "file": str(file), "io": str(io_file)}
    run_in_host(version, VAE_SCRIPT, args)
    return file, load_file(str(io_file))
