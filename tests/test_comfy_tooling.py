"""The test tooling itself: real ComfyUI hosts (0.30.0 and 0.3.75) load a throwaway V3 pack and run a
UI-format workflow converted by ui_to_api; plus ui_to_api's frontend rules on their own.

Host tests are marked `comfy` (deselect with -m "not comfy") and are skipped only when
UNIREF_SKIP_COMFY=1; otherwise the hosts are set up on first use (scripts/comfy_hosts.py).
"""

import io
import json
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from tests.comfyhost import VERSIONS, ComfyHost, output_images, running
from tests.workflow_api import ui_to_api

PACK = "ToolingInvertPack"
BROKEN_PACK = "ToolingBrokenPack"
PACK_INIT = textwrap.dedent(
    '''
    """A V3-only pack (no NODE_CLASS_MAPPINGS): Invert Image everywhere, Stack Images where the host
    has io.Autogrow (0.30.0)."""
    import torch
    from comfy_api.latest import ComfyExtension, io


    class InvertImage(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="ToolingInvertImage",
                display_name="Invert Image (tooling)",
                category="testing",
                inputs=[
                    io.Image.Input("image"),
                    io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05),
                    io.Int.Input("seed", default=0, min=0, max=2**31, control_after_generate=True),
                    io.Combo.Input("mode", options=["rgb", "luma"], default="rgb", optional=True),
                ],
                outputs=[io.Image.Output()],
            )

        @classmethod
        def execute(cls, image, strength, seed, mode="rgb"):
            return io.NodeOutput(image * (1 - strength) + (1 - image) * strength)


    NODES = [InvertImage]

    if hasattr(io, "Autogrow"):

        class StackImages(io.ComfyNode):
            @classmethod
            def define_schema(cls):
                template = io.Autogrow.TemplatePrefix(io.Image.Input("image"), prefix="image", min=1, max=4)
                return io.Schema(
                    node_id="ToolingStackImages",
                    category="testing",
                    inputs=[io.Autogrow.Input("images", template=template)],
                    outputs=[io.Image.Output()],
                )

            @classmethod
            def execute(cls, images):
                return io.NodeOutput(torch.cat([images[k] for k in sorted(images)], dim=2))

        NODES.append(StackImages)


    class Extension(ComfyExtension):
        async def get_node_list(self):
            return NODES


    async def comfy_entrypoint():
        return Extension()
    '''
)


def put_image(host, name, w, h, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(host.input_dir / name)
    return rgb


def node(id, type, inputs=(), outputs=(), widgets=None, mode=0, **extra):
    """A UI-format node; inputs/outputs as (name, type, link) / (name, type, [links])."""
    return {
        "id": id,
        "type": type,
        "pos": [0, 0],
        "size": [200, 100],
        "flags": {},
        "order": id,
        "mode": mode,
        "properties": {},
        "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
        "outputs": [{"name": n, "type": t, "links": ls} for n, t, ls in outputs],
        "widgets_values": widgets if widgets is not None else [],
        **extra,
    }


def workflow(nodes, links):
    """A UI-format (0.4) workflow; links as (id, origin, slot, target, slot, type)."""
    return {
        "id": "00000000-0000-0000-0000-000000000000",
        "revision": 0,
        "version": 0.4,
        "last_node_id": max(n["id"] for n in nodes),
        "last_link_id": max((link[0] for link in links), default=0),
        "nodes": nodes,
        "links": [list(link) for link in links],
        "groups": [],
        "config": {},
        "extra": {},
    }


def invert_workflow(image_name):
    """LoadImage -> Invert Image -> SaveImage, with a Note, as the frontend would save it."""
    return workflow(
        [
            node(
                1,
                "LoadImage",
                outputs=[("IMAGE", "IMAGE", [1]), ("MASK", "MASK", None)],
                widgets=[image_name, "image"],
            ),
            node(
                2,
                "ToolingInvertImage",
                inputs=[("image", "IMAGE", 1)],
                outputs=[("IMAGE", "IMAGE", [2])],
                widgets=[1.0, 7, "randomize", "rgb"],
            ),
            node(3, "SaveImage", inputs=[("images", "IMAGE", 2)], widgets=["tooling"]),
            node(4, "Note", widgets=["Invert the image, then save it."]),
        ],
        [(1, 1, 0, 2, 0, "IMAGE"), (2, 2, 0, 3, 0, "IMAGE")],
    )


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Both hosts, booted together, each with the throwaway pack (and its example workflow) and a
    pack that fails to import."""
    pack = tmp_path_factory.mktemp("pack") / PACK
    (pack / "example_workflows").mkdir(parents=True)
    (pack / "__init__.py").write_text(PACK_INIT)
    (pack / "example_workflows" / "invert.json").write_text(json.dumps(invert_workflow("tooling.png")))
    started = []
    for version in VERSIONS:
        base = tmp_path_factory.mktemp(f"comfy-{version}")
        broken = base / "custom_nodes" / BROKEN_PACK
        broken.mkdir(parents=True)
        (broken / "__init__.py").write_text("import no_such_module_for_tooling_test\n")
        started.append(ComfyHost(version, pack, base_dir=base))
    with running(*started):
        for host in started:
            print(f"ComfyUI {host.version} ready in {host.startup_s:.1f} s")
        yield {host.version: host for host in started}


@pytest.fixture(params=VERSIONS)
def host(request, hosts):
    return hosts[request.param]


# ------------------------------------------------------------------ real hosts


@pytest.mark.comfy
def test_host_loads_the_pack(host):
    assert not host.import_failed(PACK), host.log_tail()
    assert host.import_failed(BROKEN_PACK), "a pack that cannot import must be reported"
    assert "ToolingInvertImage" in host.object_info()
    info = host.object_info("ToolingInvertImage")
    assert info["input_order"] == {"required": ["image", "strength", "seed"], "optional": ["mode"]}
    assert info["input"]["required"]["seed"][1]["control_after_generate"] is True
    # A V3 Combo is ["COMBO", {"options": [...]}], not the V1 [[...options...], {...}].
    assert info["input"]["optional"]["mode"][0] == "COMBO"
    has_autogrow = host.version != "0.3.75"
    assert ("ToolingStackImages" in host.object_info()) == has_autogrow


@pytest.mark.comfy
def test_ui_workflow_runs_and_reports_over_websocket(host):
    rgb = put_image(host, "tooling.png", 48, 32)
    assert host.templates() == {PACK: ["invert"]}
    prompt = ui_to_api(host.template(PACK, "invert"), host.object_info())
    assert set(prompt) == {"1", "2", "3"}  # the Note is frontend-only
    assert prompt["2"]["inputs"] == {"image": ["1", 0], "strength": 1.0, "seed": 7, "mode": "rgb"}

    with host.listen() as ws:
        t0 = time.perf_counter()
        prompt_id = host.queue(prompt, ws.client_id)
        assert isinstance(prompt_id, str), prompt_id
        entry = host.wait(prompt_id, timeout=60)
        print(f"ComfyUI {host.version}: prompt ran in {time.perf_counter() - t0:.2f} s")
        ws.wait_for("execution_success", prompt_id=prompt_id)
        assert entry["status"]["status_str"] == "success"
        assert {"execution_start", "executing", "executed"} <= set(ws.types())

    (saved,) = output_images(entry)
    out = np.asarray(Image.open(io.BytesIO(host.view(**saved))).convert("RGB")).astype(int)
    assert out.shape == (32, 48, 3)
    assert np.abs(out - (255 - rgb.astype(int))).max() <= 1


@pytest.mark.comfy
def test_rejected_prompt_returns_node_errors(host):
    put_image(host, "tooling.png", 48, 32)
    prompt = ui_to_api(invert_workflow("tooling.png"), host.object_info())
    prompt["2"]["inputs"]["strength"] = 5.0  # beyond max=1.0
    answer = host.queue(prompt)
    assert isinstance(answer, dict)
    assert answer["node_errors"]["2"]["errors"][0]["type"] == "value_bigger_than_max"


@pytest.mark.comfy
def test_autogrow_inputs_keep_their_dotted_names(hosts):
    host = hosts["0.30.0"]
    put_image(host, "a.png", 16, 24, seed=1)
    put_image(host, "b.png", 40, 24, seed=2)
    spec = host.object_info("ToolingStackImages")["input"]["required"]["images"]
    assert spec[0] == "COMFY_AUTOGROW_V3"
    assert spec[1]["template"] == {
        "input": {"required": {"image": ["IMAGE", {}]}},
        "prefix": "image",
        "min": 1,
        "max": 4,
    }
    wf = workflow(
        [
            node(1, "LoadImage", outputs=[("IMAGE", "IMAGE", [1])], widgets=["a.png", "image"]),
            node(2, "LoadImage", outputs=[("IMAGE", "IMAGE", [2])], widgets=["b.png", "image"]),
            node(
                3,
                "ToolingStackImages",
                outputs=[("IMAGE", "IMAGE", [3])],
                inputs=[
                    ("images.image0", "IMAGE", 1),
                    ("images.image1", "IMAGE", 2),
                    ("images.image2", "IMAGE", None),
                ],
            ),
            node(4, "SaveImage", inputs=[("images", "IMAGE", 3)], widgets=["stacked"]),
        ],
        [(1, 1, 0, 3, 0, "IMAGE"), (2, 2, 0, 3, 1, "IMAGE"), (3, 3, 0, 4, 0, "IMAGE")],
    )
    prompt = ui_to_api(wf, host.object_info())
    assert prompt["3"]["inputs"] == {"images.image0": ["1", 0], "images.image1": ["2", 0]}
    (saved,) = output_images(host.run(prompt))
    assert Image.open(io.BytesIO(host.view(**saved))).size == (56, 24)


# ------------------------------------------------------------------ ui_to_api on its own

INFO = {
    "Src": {"input": {"required": {}}, "output": ["IMAGE"]},
    "Sampler": {
        "input": {
            "required": {
                "image": ["IMAGE", {}],
                "noise_seed": ["INT", {"default": 0}],  # seed-like by name: older frontends
                "steps": ["INT", {"default": 4, "control_after_generate": False}],
                "sampler": [["euler", "heun"], {}],
                "cfg": ["FLOAT", {"default": 1.0, "forceInput": True}],
            },
            "optional": {"note": ["STRING", {"default": "hi"}]},
        },
        "input_order": {"required": ["image", "noise_seed", "steps", "sampler", "cfg"], "optional": ["note"]},
    },
    "Pick": {
        "input": {
            "required": {
                "model": [
                    "COMFY_DYNAMICCOMBO_V3",
                    {
                        "options": [
                            {"key": "small", "inputs": {"required": {"size": ["INT", {"default": 1}]}}},
                            {
                                "key": "big",
                                "inputs": {
                                    "required": {
                                        "size": ["INT", {"default": 9}],
                                        "mode": ["COMBO", {"options": ["a", "b"]}],
                                    }
                                },
                            },
                        ]
                    },
                ],
                "seed": ["INT", {"control_after_generate": True}],
            }
        },
    },
    "Upload": {
        "input": {
            "required": {"image": [["x.png"], {"image_upload": True}], "channel": [["red", "alpha"], {}]},
            "optional": {"scale": ["FLOAT", {"default": 1.0}]},
        },
    },
}


def test_ui_to_api_widgets_follow_the_frontend():
    wf = workflow(
        [
            node(1, "Src", outputs=[("IMAGE", "IMAGE", [1])]),
            node(
                2,
                "Sampler",
                inputs=[("image", "IMAGE", 1), ("cfg", "FLOAT", 2)],
                widgets=[5, "fixed", 8, "heun", "text"],
            ),
            node(3, "PrimitiveNode", outputs=[("FLOAT", "FLOAT", [2])], widgets=[2.5, "fixed"]),
            node(4, "Pick", widgets=["big", 3, "b", 11, "randomize"]),
            node(5, "Upload", widgets=["x.png", "alpha", "image", 0.5]),
            node(6, "Upload", widgets={"image": "x.png", "channel": "red", "scale": 2.0, "upload": "image"}),
            node(7, "MarkdownNote", widgets=["# hello"]),
        ],
        [(1, 1, 0, 2, 0, "IMAGE"), (2, 3, 0, 2, 1, "FLOAT")],
    )
    prompt = ui_to_api(wf, INFO)
    assert set(prompt) == {"1", "2", "4", "5", "6"}
    assert prompt["2"]["inputs"] == {
        "image": ["1", 0],
        "noise_seed": 5,
        "steps": 8,
        "sampler": "heun",
        "note": "text",
        "cfg": 2.5,
    }
    assert prompt["4"]["inputs"] == {"model": "big", "model.size": 3, "model.mode": "b", "seed": 11}
    assert prompt["5"]["inputs"] == {"image": "x.png", "channel": "alpha", "scale": 0.5}
    assert prompt["6"]["inputs"] == {"image": "x.png", "channel": "red", "scale": 2.0}
    assert prompt["2"]["_meta"] == {"title": "Sampler"}


def test_ui_to_api_old_workflows_get_defaults_and_short_upload_lists():
    wf = workflow(
        [
            node(1, "Upload", widgets=["x.png", "red"]),
            node(2, "Src", outputs=[("IMAGE", "IMAGE", [1])]),
            node(3, "Sampler", inputs=[("image", "IMAGE", 1)], widgets=[5, "fixed"]),
        ],
        [(1, 2, 0, 3, 0, "IMAGE")],
    )
    prompt = ui_to_api(wf, INFO)
    assert prompt["1"]["inputs"] == {"image": "x.png", "channel": "red", "scale": 1.0}
    assert prompt["3"]["inputs"] == {"image": ["2", 0], "noise_seed": 5, "steps": 4, "sampler": "euler", "note": "hi"}


def test_ui_to_api_bypass_mute_and_reroute():
    wf = workflow(
        [
            node(1, "Src", outputs=[("IMAGE", "IMAGE", [1])]),
            node(2, "Reroute", inputs=[("", "*", 1)], outputs=[("", "IMAGE", [2])]),
            node(
                3,
                "Sampler",
                mode=4,
                inputs=[("image", "IMAGE", 2)],
                outputs=[("IMAGE", "IMAGE", [3])],
                widgets=[1, "fixed", 2, "euler", ""],
            ),
            node(4, "Sampler", inputs=[("image", "IMAGE", 3)], widgets=[1, "fixed", 2, "euler", ""]),
            node(5, "Src", mode=2, outputs=[("IMAGE", "IMAGE", [4])]),
            node(6, "Sampler", inputs=[("image", "IMAGE", 4)], widgets=[1, "fixed", 2, "euler", ""]),
        ],
        [(1, 1, 0, 2, 0, "*"), (2, 2, 0, 3, 0, "IMAGE"), (3, 3, 0, 4, 0, "IMAGE"), (4, 5, 0, 6, 0, "IMAGE")],
    )
    prompt = ui_to_api(wf, INFO)
    assert set(prompt) == {"1", "4", "6"}
    assert prompt["4"]["inputs"]["image"] == ["1", 0]  # through the bypassed node and the reroute
    assert "image" not in prompt["6"]["inputs"]  # its source is muted: the host reports it missing


def test_ui_to_api_refuses_what_it_cannot_convert():
    with pytest.raises(KeyError, match="NoSuchNode"):
        ui_to_api(workflow([node(1, "NoSuchNode")], []), INFO)
    sub = workflow([node(1, "6f0c-subgraph")], [])
    sub["definitions"] = {"subgraphs": [{"id": "6f0c-subgraph"}]}
    with pytest.raises(NotImplementedError):
        ui_to_api(sub, INFO)
