"""Write the example workflows in workflows/ (ComfyUI UI format, LiteGraph version 0.4).

Run after changing a node's inputs: `python scripts/build_workflows.py`. The JSON files are what
ships; this script only keeps them consistent (ids, links, widget order).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "uniref-default (built-in)"


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, type_, pos, size, inputs=(), outputs=(), widgets=None, title=None, color=None):
        nid = len(self.nodes) + 1
        node = {
            "id": nid,
            "type": type_,
            "pos": list(pos),
            "size": list(size),
            "flags": {},
            "order": nid - 1,
            "mode": 0,
            # Dynamic slots are named "group.slot" ("images.image_1"); the label is what the artist reads.
            "inputs": [
                dict(
                    name=n,
                    type=t,
                    link=None,
                    **({"label": n.split(".", 1)[1]} if "." in n else {}),
                    **({"widget": {"name": n}} if w else {}),
                )
                for n, t, w in inputs
            ],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": type_},
            "widgets_values": widgets if widgets is not None else [],
        }
        if title:
            node["title"] = title
        if color:
            node["color"], node["bgcolor"] = color
        self.nodes.append(node)
        return node

    def link(self, src, src_slot, dst, dst_input):
        lid = len(self.links) + 1
        slot = next(i for i, inp in enumerate(dst["inputs"]) if inp["name"] == dst_input)
        type_ = src["outputs"][src_slot]["type"]
        src["outputs"][src_slot]["links"].append(lid)
        dst["inputs"][slot]["link"] = lid
        self.links.append([lid, src["id"], src_slot, dst["id"], slot, type_])

    def to_json(self, name):
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-uniref/{name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [60, 380]}},
            "version": 0.4,
        }


NOTE_COLOR = ("#432", "#653")


def build(
    name,
    images,
    prompt,
    note,
    budget="model default",
    custom_budget=1024,
    match_reference=1,
    steps=20,
    cfg=1.0,
    width=128,
    height=128,
):
    g = Graph()
    g.node("Note", (0, -330), (340, 300), widgets=[note], title="Read me", color=NOTE_COLOR)
    loaders = [
        g.node(
            "LoadImage",
            (0, 20 + 430 * i),
            (300, 380),
            outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
            widgets=[img, "image"],
            title=f"Picture {i + 1}",
        )
        for i, img in enumerate(images)
    ]
    model = g.node(
        "UniRefLoadModel", (380, -330), (320, 82), outputs=[("model", "UNIREF_MODEL")], widgets=[MODEL, "auto"]
    )
    slots = [("previous", "UNIREF_REFS", False)] + [
        (f"images.image_{i + 1}", "IMAGE", False) for i in range(len(images))
    ]
    batch = g.node(
        "UniRefReferenceBatch",
        (380, 20),
        (260, 46 + 22 * len(slots)),
        inputs=slots,
        outputs=[("references", "UNIREF_REFS")],
    )
    enc_inputs = [("model", "UNIREF_MODEL", False), ("references", "UNIREF_REFS", False)]
    encode = g.node(
        "UniRefSelfEncode",
        (740, -330),
        (400, 460),
        inputs=enc_inputs,
        outputs=[("conditioning", "UNIREF_COND")],
        widgets=[prompt, " ", budget, custom_budget, "budget", width, height, match_reference, True],
    )
    sampler = g.node(
        "UniRefSampler",
        (1180, -330),
        (320, 300),
        inputs=[
            ("model", "UNIREF_MODEL", False),
            ("conditioning", "UNIREF_COND", False),
            ("init_image", "IMAGE", False),
        ],
        outputs=[("image", "IMAGE"), ("latent", "LATENT")],
        widgets=[0, "fixed", steps, cfg, "ode", 1.0, 0.7],
    )
    save = g.node("SaveImage", (1540, -330), (420, 460), inputs=[("images", "IMAGE", False)], widgets=["UniRef"])
    for i, loader in enumerate(loaders):
        g.link(loader, 0, batch, f"images.image_{i + 1}")
    g.link(model, 0, encode, "model")
    g.link(batch, 0, encode, "references")
    g.link(model, 0, sampler, "model")
    g.link(encode, 0, sampler, "conditioning")
    g.link(sampler, 0, save, "images")
    path = ROOT / "workflows" / f"{name}.json"
    path.write_text(json.dumps(g.to_json(name), indent=2) + "\n")
    return path


#: ComfyUI's own file names for Qwen-Image-Edit-2509 (its template's downloads), what an artist has on disk.
NATIVE_FILES = {
    "unet": "qwen_image_edit_2509_fp8_e4m3fn.safetensors",
    "clip": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
    "vae": "qwen_image_vae.safetensors",
}


def build_native(name, images, prompt, note, steps=20, cfg=2.5, shift=3.0, size=1024):
    """SELF on ComfyUI's own path: core loaders -> UniRef SELF Encode (native) -> KSampler -> VAE Decode."""
    g = Graph()
    g.node("Note", (0, -330), (340, 300), widgets=[note], title="Read me", color=NOTE_COLOR)
    loaders = [
        g.node(
            "LoadImage",
            (0, 20 + 430 * i),
            (300, 380),
            outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
            widgets=[img, "image"],
            title=f"Picture {i + 1}",
        )
        for i, img in enumerate(images)
    ]
    unet = g.node(
        "UNETLoader", (380, -330), (320, 82), outputs=[("MODEL", "MODEL")], widgets=[NATIVE_FILES["unet"], "default"]
    )
    shifted = g.node(
        "ModelSamplingAuraFlow",
        (380, -210),
        (320, 58),
        inputs=[("model", "MODEL", False)],
        outputs=[("MODEL", "MODEL")],
        widgets=[shift],
    )
    clip = g.node(
        "CLIPLoader",
        (380, -120),
        (320, 106),
        outputs=[("CLIP", "CLIP")],
        widgets=[NATIVE_FILES["clip"], "qwen_image", "default"],
    )
    vae = g.node("VAELoader", (380, 20), (320, 58), outputs=[("VAE", "VAE")], widgets=[NATIVE_FILES["vae"]])
    slots = [("clip", "CLIP", False), ("vae", "VAE", False)] + [
        (f"images.image_{i + 1}", "IMAGE", False) for i in range(len(images))
    ]
    encode = g.node(
        "UniRefSelfEncodeNative",
        (740, -330),
        (400, 520),
        inputs=slots,
        outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")],
        widgets=[prompt, "", "budget", "1024²", 1024, size, size, 1],
    )
    sampler = g.node(
        "KSampler",
        (1180, -330),
        (320, 262),
        inputs=[
            ("model", "MODEL", False),
            ("positive", "CONDITIONING", False),
            ("negative", "CONDITIONING", False),
            ("latent_image", "LATENT", False),
        ],
        outputs=[("LATENT", "LATENT")],
        widgets=[0, "fixed", steps, cfg, "euler", "simple", 1.0],
    )
    decode = g.node(
        "VAEDecode",
        (1180, -30),
        (210, 46),
        inputs=[("samples", "LATENT", False), ("vae", "VAE", False)],
        outputs=[("IMAGE", "IMAGE")],
    )
    save = g.node("SaveImage", (1540, -330), (420, 460), inputs=[("images", "IMAGE", False)], widgets=["UniRef"])
    g.link(unet, 0, shifted, "model")
    for i, loader in enumerate(loaders):
        g.link(loader, 0, encode, f"images.image_{i + 1}")
    g.link(clip, 0, encode, "clip")
    g.link(vae, 0, encode, "vae")
    g.link(shifted, 0, sampler, "model")
    for slot, target in enumerate(("positive", "negative", "latent_image")):
        g.link(encode, slot, sampler, target)
    g.link(sampler, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    g.link(decode, 0, save, "images")
    path = ROOT / "workflows" / f"{name}.json"
    path.write_text(json.dumps(g.to_json(name), indent=2) + "\n")
    return path


def main() -> None:
    (ROOT / "workflows").mkdir(exist_ok=True)
    build(
        "uniref_single_edit",
        ["uniref_edit_scene.png"],
        "Recolour the red circle in Picture 1 to blue.",
        "UniRef single-image edit\n\n1. Picture 1: load the image to edit.\n2. SELF Encode: write the instruction "
        "(call the image 'Picture 1').\n3. Load UniRef Model: pick your model (models/uniref/).\n4. Queue.\n\n"
        "Sizes: 128×128, what the built-in model makes; with Qwen-Image-Edit checkpoints set width and height to 0 "
        "(Picture 1's aspect ratio at 1024²) or to the size you want.\n\nSampler: 20 steps and cfg 1 suit the "
        "built-in model; use 30–50 steps and cfg 4 with Qwen-Image-Edit checkpoints.",
    )
    build(
        "uniref_multi_compose",
        ["uniref_red_circle.png", "uniref_blue_triangle.png", "uniref_background.png"],
        "Put the object from Picture 1 on the left and the object from Picture 2 on the right, on the background "
        "of Picture 3.",
        "UniRef multi-reference composition\n\nEach LoadImage is one reference; its slot number is its 'Picture k' "
        "in the prompt. Connect more images to Reference Batch (a new slot appears), or chain a second Reference "
        "Batch into 'previous' for even more.\n\nAll references share ONE pixel budget (SELF Encode > budget), so "
        "adding references barely slows sampling. 'model default' is the budget the checkpoint was trained at. "
        "Output 128×128, what the built-in model makes; with Qwen-Image-Edit checkpoints set width and height to 0 "
        "(Picture 3's aspect ratio at 1024², match_reference) or to the size you want.\n\nSampler: 20 steps and cfg 1 "
        "suit the built-in model; use "
        "30–50 steps and cfg 4 with Qwen-Image-Edit checkpoints.",
        match_reference=3,
    )
    build_native(
        "uniref_native_compose",
        ["uniref_red_circle.png", "uniref_blue_triangle.png", "uniref_background.png"],
        "Put the object from Picture 1 on the left and the object from Picture 2 on the right, on the background "
        "of Picture 3.",
        "SELF on ComfyUI's own sampler\n\nFor Qwen-Image-Edit-2509/2511 as ComfyUI's files: Load Diffusion Model "
        "(diffusion_models/), Load CLIP (text_encoders/, type qwen_image), Load VAE (vae/). fp8 files, LoRA loaders "
        "and any sampler work as usual.\n\nUniRef SELF Encode (native) holds ALL references to one pixel budget "
        "(policy budget, 1024² here), so six references cost about what one costs; policy per_image gives exactly "
        "what TextEncodeQwenImageEditPlus gives. It returns the positive and negative conditioning and an empty "
        "latent of the output size.\n\nKSampler: 20 steps, cfg 2.5 for the full model; 4 steps, cfg 1 with a "
        "4-step lightning LoRA.",
    )


if __name__ == "__main__":
    main()
