"""UniRef SELF Encode (native) on ComfyUI's own model path, run inside a real host with ComfyUI's own CLIP
(Qwen2.5-VL text encoder through ``comfy.sd.load_clip``, type qwen_image) and VAE (``comfy.sd.VAE``) built from
tiny files in ComfyUI's layout:

- with the per_image policy and 1 or 3 references its positive conditioning (text states and every reference
  latent) equals core ``TextEncodeQwenImageEditPlus``'s exactly;
- with 6 references under a 1024² budget the reference latents ComfyUI's model will see have the engine's
  SELF sizes, within the budget (a sixth of the pixels the core node's per-image sizes give);
- the empty latent has the target size and the negative carries the same references."""

import json
import subprocess
from pathlib import Path

import pytest

from uniref_core.budget import BUDGETS, allocate_per_image, plan_references, rounding_slack

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import dataclasses, importlib.util, json, sys
import comfy.options
comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu"]
import torch
import comfy.ops, comfy.sd
from comfy.text_encoders import llama, qwen_vl
from safetensors.torch import save_file

args = json.loads(ARGS)
# ComfyUI builds every Qwen2.5-VL text encoder at 7B size (load_clip passes no config); shrink its own classes.
Tiny = dataclasses.make_dataclass(
    "Qwen25_7BVLI_Config",
    [(name, int, dataclasses.field(default=value)) for name, value in dict(
        vocab_size=151936, hidden_size=256, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4).items()],  # 4 x 128 k_proj bias: what detect_te_model calls Qwen2.5-7B
    bases=(llama.Qwen25_7BVLI_Config,))
llama.Qwen25_7BVLI_Config = Tiny
Vision = qwen_vl.Qwen2VLVisionTransformer
class TinyVision(Vision):
    def __init__(self, hidden_size=1280, output_hidden_size=3584, **kw):
        super().__init__(
            hidden_size=64, output_hidden_size=output_hidden_size, intermediate_size=48, num_layers=2, **kw
        )
qwen_vl.Qwen2VLVisionTransformer = TinyVision

g = torch.Generator().manual_seed(0)
def init(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "gamma" in name or (p.ndim == 1 and ("norm" in name or "ln_q" in name)):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)

te = llama.Qwen25_7BVLI({}, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
init(te)
save_file({k: v.contiguous() for k, v in te.state_dict().items()}, args["te"])
from comfy.ldm.wan.vae import WanVAE
wan = WanVAE(
    dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True]
)
init(wan)
clip = comfy.sd.load_clip(ckpt_paths=[args["te"]], clip_type=comfy.sd.CLIPType.QWEN_IMAGE)
vae = comfy.sd.VAE(sd={k: v.contiguous() for k, v in wan.state_dict().items()})

spec = importlib.util.spec_from_file_location("uniref_pack", args["pack"] + "/__init__.py",
                                              submodule_search_locations=[args["pack"]])
pack = importlib.util.module_from_spec(spec); sys.modules["uniref_pack"] = pack; spec.loader.exec_module(pack)
from uniref_pack.nodes.native_nodes import SelfEncodeNative
from comfy_extras.nodes_qwen import TextEncodeQwenImageEditPlus

def image(w, h, seed):
    return torch.rand((1, h, w, 3), generator=torch.Generator().manual_seed(seed))

def cond_of(out, i=0):
    return out.result[i] if hasattr(out, "result") else out[i]

report = {}
prompt = "put the object from Picture 1 next to the one in Picture 2"
for k in (1, 3):
    refs = [image(96 + 40 * i, 64 + 24 * i, i) for i in range(k)]
    core = cond_of(TextEncodeQwenImageEditPlus.execute(clip, prompt, vae, *refs, *[None] * (3 - k)))
    ours = SelfEncodeNative.execute(clip, vae, prompt, "blurry", policy="per_image", width=256, height=128,
                                    **{f"images.image_{i + 1}": r for i, r in enumerate(refs)})
    pos, neg, latent = cond_of(ours, 0), cond_of(ours, 1), cond_of(ours, 2)
    core_refs, pos_refs = core[0][1]["reference_latents"], pos[0][1]["reference_latents"]
    same = torch.equal(core[0][0], pos[0][0]) and len(core_refs) == len(pos_refs) == k
    same = same and all(torch.equal(a, b) for a, b in zip(core_refs, pos_refs))
    neg_refs = all(torch.equal(a, b) for a, b in zip(core[0][1]["reference_latents"], neg[0][1]["reference_latents"]))
    report[f"per_image_{k}"] = {"equal": bool(same), "neg_refs": bool(neg_refs), "text_std": float(pos[0][0].std()),
                                "neg_differs": not torch.equal(neg[0][0], pos[0][0]),
                                "latent": list(latent["samples"].shape)}
refs = [image(200 + 30 * i, 150 + 10 * i, 10 + i) for i in range(6)]
ours = SelfEncodeNative.execute(clip, vae, prompt, "", policy="budget", budget="1024²", width=512, height=512,
                                **{f"images.image_{i + 1}": r for i, r in enumerate(refs)})
lat = cond_of(ours, 0)[0][1]["reference_latents"]
report["budget_6"] = {"sources": [[r.shape[2], r.shape[1]] for r in refs],
                      "latent_px": [[l.shape[-1] * 8, l.shape[-2] * 8] for l in lat]}
print(json.dumps(report))
"""


@pytest.mark.comfy
@pytest.mark.parametrize("version", ["0.30.0", "0.3.75"])
def test_native_self_encode_matches_core_node_and_holds_the_budget(tmp_path, version):
    from comfyhost import comfy_hosts

    host = comfy_hosts.ensure_host(version)
    args = {"te": str(tmp_path / "qwen_2.5_vl_tiny.safetensors"), "pack": str(ROOT)}
    proc = subprocess.run(
        [str(host.python), "-c", SCRIPT.replace("ARGS", repr(json.dumps(args)))],
        cwd=host.comfy_dir,
        capture_output=True,
        text=True,
        timeout=600,
        env=comfy_hosts.host_env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for k in (1, 3):
        r = report[f"per_image_{k}"]
        assert r["equal"], (k, r)  # text states and every reference latent equal the core node's
        assert r["text_std"] > 1e-3 and r["neg_differs"] and r["neg_refs"]
        assert r["latent"] == [1, 16, 128 // 8, 256 // 8]
    b = report["budget_6"]
    sources = [tuple(x) for x in b["sources"]]
    plan = plan_references(sources, mode="budget", budget=BUDGETS["1024²"], width=512, height=512)
    got = [tuple(x) for x in b["latent_px"]]
    assert got == [r.vae for r in plan.references]  # the engine's SELF sizes, one per reference
    assert sum(w * h for w, h in got) <= BUDGETS["1024²"] + rounding_slack(got)  # within the budget
    per_image = sum(w * h for w, h in allocate_per_image(sources))  # what the core node's sizes would give
    assert 5 * sum(w * h for w, h in got) < per_image
