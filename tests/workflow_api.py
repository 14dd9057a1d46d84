"""Turn a UI-format (LiteGraph 0.4) workflow into the API-format prompt that POST /prompt takes.

This follows the frontend's graphToPrompt closely enough for our example workflows:

- Note/MarkdownNote/PrimitiveNode/Reroute (virtual, frontend-only) and muted nodes (mode 2) are left
  out; links from them are dropped, except that a PrimitiveNode gives its value and a Reroute passes
  its link through. A bypassed node (mode 4) passes each output through from its first linked input of
  the same type (the same slot index first), as the frontend does.
- ``widgets_values`` (a list) is laid onto the node's widget inputs in /object_info order (required,
  then the image/video/audio upload widget the frontend appends to required, then optional), skipping
  the frontend's extra ``control_after_generate`` value after seed-like INTs (and two after a combo
  with that option); widgets without a saved value get their default. A 0.30.0 DynamicCombo's chosen
  option's widgets follow its value as ``<combo>.<input>``. A dict ``widgets_values`` maps by name.
- A linked input becomes ``[str(origin_id), origin_slot]``, under the input's name as written in the
  workflow, so V3 dynamic inputs keep their dotted names (``images.image0``).

Subgraphs are not supported (NotImplementedError).
"""

from __future__ import annotations

import json
from pathlib import Path

VIRTUAL_NODES = frozenset({"Note", "MarkdownNote", "PrimitiveNode", "Reroute"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a control widget to these INTs by name
MODE_MUTED, MODE_BYPASSED = 2, 4
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # 0.30.0: a combo whose chosen option brings more inputs


def _spec(spec) -> tuple[object, dict]:
    typ = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    has_opts = isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict)
    return typ, spec[1] if has_opts else {}


def _is_widget(typ, opts: dict) -> bool:
    return (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput")


def _default(typ, opts: dict):
    if "default" in opts:
        return opts["default"]
    options = typ if isinstance(typ, list) else opts.get("options") or []
    if options:
        return options[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(typ)


def _control_values(name: str, typ, opts: dict) -> int:
    """How many extra values the frontend stores after this widget's own value."""
    if typ == "INT":
        control = opts.get("control_after_generate")
        return 1 if (control if control is not None else name in SEED_NAMES) else 0
    if (isinstance(typ, list) or typ == "COMBO") and opts.get("control_after_generate"):
        return 2  # the control combo and its filter-list text box
    return 0


def _lay_out(inputs: dict, order: dict, values: list, out: dict, prefix: str, upload: bool, pos: int = 0) -> int:
    """Assign values[pos:] to the widget inputs in frontend order; returns the next position.
    A DynamicCombo's chosen option's widgets follow its own value, named "<combo>.<input>"."""
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        has_upload = False
        for name in order.get(section) or list(specs):
            typ, opts = _spec(specs[name])
            if typ == DYNAMIC_COMBO:
                keys = [o.get("key") for o in opts.get("options", [])]
                key = values[pos] if pos < len(values) else opts.get("default", keys[0] if keys else None)
                out[prefix + name] = key
                chosen = [o["inputs"] for o in opts.get("options", []) if o.get("key") == key]
                sub = chosen[0] if chosen else {}
                pos = _lay_out(sub, {}, values, out, f"{prefix}{name}.", False, pos + 1)
                continue
            if not _is_widget(typ, opts):
                continue
            # Widgets the workflow has no value for keep their defaults, as in the frontend.
            out[prefix + name] = values[pos] if pos < len(values) else _default(typ, opts)
            pos += 1 + _control_values(name, typ, opts)
            has_upload |= section == "required" and any(opts.get(k) for k in UPLOAD_OPTIONS)
        if has_upload and upload:  # the frontend appends the upload button's widget to required
            pos += 1
    return pos


def widget_values(node_def: dict, values: list | dict) -> dict:
    """{input name: value} from a node's ``widgets_values``."""
    inputs, order = node_def.get("input", {}), node_def.get("input_order", {})
    if isinstance(values, dict):
        names = {n for sec in ("required", "optional") for n in inputs.get(sec) or {}}
        return {k: v for k, v in values.items() if k in names}
    out: dict = {}
    if _lay_out(inputs, order, values, out, "", upload=True) != len(values):
        # Some frontends do not save the upload widget's value; use the layout that fits.
        alt: dict = {}
        if _lay_out(inputs, order, values, alt, "", upload=False) == len(values):
            return alt
    return out


def _links(workflow: dict) -> dict[int, tuple[int, int, str]]:
    """link id -> (origin node id, origin slot, type); links are lists or (schema 1) dicts."""
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link.get("type"))
        else:
            out[link[0]] = (link[1], link[2], link[5] if len(link) > 5 else None)
    return out


def _types_match(a, b) -> bool:
    if a in (None, "*", "") or b in (None, "*", ""):
        return True
    return bool(set(str(a).split(",")) & set(str(b).split(",")))


def _wrap(value):
    # A list would read as a link; the frontend wraps array values the same way.
    return {"__value__": value} if isinstance(value, list) else value


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt for a UI-format workflow, given the host's /object_info."""
    subgraphs = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs") or []}
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = _links(workflow)

    def resolve(link_id, depth=0):
        """("link", [origin id, slot]), ("value", v) from a PrimitiveNode, or None (dropped)."""
        if link_id is None or link_id not in links or depth > 100:
            return None
        origin_id, slot, typ = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None:
            return None
        kind, mode = origin.get("type"), origin.get("mode", 0)
        if kind == "Reroute":
            ins = origin.get("inputs") or [{}]
            return resolve(ins[0].get("link"), depth + 1)
        if kind == "PrimitiveNode":
            values = origin.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if kind in VIRTUAL_NODES or mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASSED:
            outs = origin.get("outputs") or []
            out_type = outs[slot].get("type") if slot < len(outs) else typ
            ins = origin.get("inputs") or []
            same_slot = [ins[slot]] if slot < len(ins) else []
            for inp in same_slot + ins:
                if inp.get("link") is not None and _types_match(inp.get("type"), out_type):
                    return resolve(inp["link"], depth + 1)
            return None
        return ("link", [str(origin_id), slot])

    prompt = {}
    for node_id, node in nodes.items():
        kind, mode = node.get("type"), node.get("mode", 0)
        if kind in VIRTUAL_NODES or mode in (MODE_MUTED, MODE_BYPASSED):
            continue
        if kind in subgraphs:
            raise NotImplementedError(f"node {node_id} is a subgraph ({kind}); subgraphs are not supported")
        node_def = object_info.get(kind)
        if node_def is None:
            raise KeyError(f"node {node_id}: the host has no node type {kind!r} (missing custom node?)")

        # Like the frontend: every widget's value first, then links override (a link that resolves
        # to nothing, e.g. from a muted node, leaves the widget's value in place).
        values = node.get("widgets_values") or []
        inputs = {name: _wrap(v) for name, v in widget_values(node_def, values).items()}
        for inp in node.get("inputs") or []:
            source = resolve(inp.get("link"))
            if source is not None:
                kind_, value = source
                inputs[inp["name"]] = value if kind_ == "link" else _wrap(value)

        title = node.get("title") or node_def.get("display_name") or kind
        prompt[str(node_id)] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    return prompt


#: ComfyUI's own model loaders: a workflow with them (``uniref_native_compose``) names the artist's model files.
NATIVE_LOADERS = ("UNETLoader", "CLIPLoader", "VAELoader")


def split_workflows(folder) -> tuple[list, list]:
    """The shipped workflows (sorted paths): those on the pack's own loader, and the native ones (ComfyUI's
    loaders and KSampler, run by tests/test_native_workflow.py on tiny files saved in ComfyUI's layout)."""
    pack, native = [], []
    for path in sorted(Path(folder).glob("*.json")):
        types = {n["type"] for n in json.loads(path.read_text())["nodes"]}
        (native if types & set(NATIVE_LOADERS) else pack).append(path)
    return pack, native
