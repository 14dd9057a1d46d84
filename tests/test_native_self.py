"""UniRef SELF Encode (native) on ComfyUI's own model path, run inside a real host with ComfyUI's own CLIP
(Qwen2.5-VL text encoder through ``comfy.sd.load_clip``, type qwen_image) and VAE (``comfy.sd.VAE``) built from
tiny files in ComfyUI's layout:

- with the per_image policy and 1 or 3 references its positive conditioning (text states and every reference
  latent) equals core ``TextEncodeQwenImageEditPlus``'s exactly;
- with 6 references under a 1024² budget the reference latents ComfyUI's model will see have the engine's
  SELF sizes, within the budget (a sixth of the pixels the core node's per-image sizes give);
- the empty latent has the target size and the negative carries the same references."""

from pathlib import Path

import pytest
from comfy_child import last_json, run_in_host

from uniref_core.budget import BUDGETS, allocate_per_image, plan_references, rounding_slack

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import importlib.util
import comfy.ops, comfy.sd
import host_shims.uniref_test_tiny_qwen  # ComfyUI's 7B Qwen2.5-VL classes at a tiny size (load_clip passes no config)
from comfy.ldm.wan.vae import WanVAE
from comfy.text_encoders import llama
from comfy_child import init_weights
from safetensors.torch import save_file

g = torch.Generator().manual_seed(0)
te = llama.Qwen25_7BVLI({}, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
save_file(init_weights(te, g), args["te"])
wan = WanVAE(
    dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True]
)
clip = comfy.sd.load_clip(ckpt_paths=[args["te"]], clip_type=comfy.sd.CLIPType.QWEN_IMAGE)
vae = comfy.sd.VAE(sd=init_weights(wan, g))

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
    args = {"te": str(tmp_path / "qwen_2.5_vl_tiny.safetensors"), "pack": str(ROOT)}
    report = last_json(run_in_host(version, SCRIPT, args, timeout=600))
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
