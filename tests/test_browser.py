"""A real browser drives the real ComfyUI frontend: what an artist does with the shipped workflows.

For each host (0.30.0 with frontend 1.47.12, 0.3.75 with frontend 1.32.9) and each workflow in
workflows/, headless Chromium (Debian's, driven by Playwright):

1. opens the frontend and waits until the app is ready;
2. opens the Templates dialog from the sidebar, picks the "ComfyUI-UniRef" extension entry and
   clicks the workflow's card (the frontend fetches it from /api/workflow_templates/<pack>/<name>.json);
3. checks that the frontend resolved every node (no "missing nodes" dialog or card, no placeholder);
4. with the trained built-in model in the repository, runs the workflow with its shipped settings on it
   (20 steps, 128×128, the model's budget); without it, a tiny random model stands in and the widgets
   are set to the cheap 3 steps, 128×96, budget 256;
5. clicks the Run button and waits until the SaveImage node shows the UniRef image;
6. checks the saved image through the host's history (and, for the multi-reference workflow on the
   trained model, that the ShapeCompose checker finds each object of the example in its place) and
   writes a screenshot to docs/screenshots/<host>_<workflow>.png with UNIREF_UPDATE_SCREENSHOTS=1
   (else .cache/screenshots/).

Needs /usr/bin/chromium (scripts/ensure_chromium.sh installs it; scripts/test.sh calls it) and the
playwright package from requirements-dev.txt (its bundled browsers are never downloaded). Set
UNIREF_SKIP_BROWSER=1 to skip these tests, UNIREF_CHROMIUM to use another Chromium binary.
"""

import io
import json
import os
import time
from pathlib import Path

import pytest
from comfyhost import PACK_NAME, output_images, uniref_host
from PIL import Image
from workflow_api import NATIVE_LOADERS, split_workflows

pytestmark = [pytest.mark.comfy, pytest.mark.browser]

ROOT = Path(__file__).resolve().parent.parent
# The workflows on the pack's own loader run here; the native one names the artist's model files, so here it is
# loaded only (tests/test_native_workflow.py runs it on tiny files).
PACK_WORKFLOWS, NATIVE_WORKFLOWS = split_workflows(ROOT / "workflows")
# The README's screenshots are refreshed only on request; ordinary runs write beside the cache.
SCREENSHOTS = ROOT / (
    "docs/screenshots" if os.environ.get("UNIREF_UPDATE_SCREENSHOTS") == "1" else ".cache/screenshots"
)
CHROMIUM = os.environ.get("UNIREF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1600, "height": 1000}
SHIPPED = ROOT / "models" / "uniref-default"
TRAINED = (SHIPPED / "model_index.json").is_file()
# The settings, set through the widgets as a user would: {node type: {widget: value}}. With the trained
# model: the workflows' own (what an artist gets); with a random stand-in: the cheapest.
if TRAINED:
    OUT_W, OUT_H = 128, 128
    FAST = {
        "UniRefSampler": {"steps": 20, "cfg": 1.0},
        "UniRefSelfEncode": {"width": OUT_W, "height": OUT_H, "budget": "model default"},
    }
else:
    OUT_W, OUT_H = 128, 96
    FAST = {
        "UniRefSampler": {"steps": 3, "cfg": 1.0},
        "UniRefSelfEncode": {"width": OUT_W, "height": OUT_H, "budget": "custom", "custom_budget": 256},
    }
# Settings a user would pick for a clean screenshot: no minimap over the graph.
# MinFontSizeForLOD 1: draw widget text even at the small zoom that fits a whole graph in a screenshot.
UI_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 1,
}


def log(msg: str) -> None:
    print(f"[browser] {msg}", flush=True)


MISSING_CHROMIUM = (
    f"{CHROMIUM} is missing: run scripts/ensure_chromium.sh (installs Debian's chromium), "
    "or set UNIREF_SKIP_BROWSER=1 to skip the browser tests"
)


def need(page):
    """The tests FAIL (not error, not skip) when the browser is not there."""
    if page is None:
        pytest.fail(MISSING_CHROMIUM, pytrace=False)
    return page


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium via Playwright, or None when CHROMIUM is missing (the tests then fail)."""
    if not Path(CHROMIUM).is_file():
        yield None
        return
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: run scripts/setup_env.sh", pytrace=False)
    t0 = time.perf_counter()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        log(f"chromium {b.version} launched in {time.perf_counter() - t0:.1f} s")
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module", params=["0.30.0", "0.3.75"])
def host(request, tiny_model):
    with uniref_host(request.param, tiny_model, default_model=SHIPPED if TRAINED else None) as h:
        log(f"ComfyUI {h.version} ready in {h.startup_s:.1f} s")
        settings = h.base_dir / "user" / "default" / "comfy.settings.json"
        current = json.loads(settings.read_text()) if settings.exists() else {}
        settings.write_text(json.dumps({**current, **UI_SETTINGS}))  # read on each page load
        yield h


@pytest.fixture
def page(browser, host):
    """A fresh browser context (own storage) on the host's frontend, ready to use."""
    if browser is None:
        yield None
        return
    context = browser.new_context(viewport=VIEWPORT)
    # 1.32.9 shows a "Nodes 2.0" banner above the tabs until dismissed (kept in localStorage).
    context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.page_errors = []
    pg.on("pageerror", lambda e: pg.page_errors.append(str(e)))
    t0 = time.perf_counter()
    pg.goto(host.url)
    pg.wait_for_function(
        "() => window.app && app.graph && app.canvas && document.querySelector('canvas')"
        " && Object.keys(LiteGraph.registered_node_types).includes('UniRefSampler')"
        " && [...document.querySelectorAll('button')].some(b => b.innerText.trim() === 'Run')",
        timeout=60_000,
    )
    pg.frontend_version = pg.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || '?'")
    pg.ready_s = time.perf_counter() - t0
    log(f"ComfyUI {host.version}: frontend {pg.frontend_version} ready in {pg.ready_s:.1f} s")
    try:
        yield pg
    finally:
        context.close()


# ---------------------------------------------------------------- in-page helpers

NODES_JS = """() => app.graph._nodes.map(n => ({
    id: n.id, type: n.type, title: n.title, has_errors: !!n.has_errors,
    registered: !!LiteGraph.registered_node_types[n.type],
    comfyClass: n.constructor.comfyClass || null, ctor: n.constructor.name,
    inputs: (n.inputs || []).map(i => ({name: i.name, label: i.label || null, link: i.link})),
    widgets: (n.widgets || []).map(w => w.name),
}))"""

SET_WIDGETS_JS = """(fast) => {
    const done = [];
    for (const [type, values] of Object.entries(fast)) {
        for (const node of app.graph._nodes.filter(n => n.type === type)) {
            for (const [name, value] of Object.entries(values)) {
                const w = node.widgets.find(w => w.name === name);
                if (!w) throw new Error(`${type} has no widget ${name}`);
                w.value = value;
                w.callback?.(w.value, app.canvas, node);
                done.push([type, name, w.value]);
            }
        }
    }
    app.graph.setDirtyCanvas(true, true);
    return done;
}"""

# Frame the whole graph (title bars included) in the canvas area that the menus leave free.
FIT_JS = """([left, top, right, bottom]) => {
    const c = app.canvas, th = LiteGraph.NODE_TITLE_HEIGHT || 30;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of app.graph._nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - th);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const r = c.canvas.getBoundingClientRect();
    const w = r.width - left - right, h = r.height - top - bottom;
    const s = Math.min(w / (x1 - x0), h / (y1 - y0), 1.25);
    c.ds.scale = s;
    c.ds.offset[0] = (left - r.left + (w - (x1 - x0) * s) / 2) / s - x0;
    c.ds.offset[1] = (top - r.top + (h - (y1 - y0) * s) / 2) / s - y0;
    c.setDirty(true, true);
    return s;
}"""

SAVED_IMAGE_JS = """() => {
    const n = app.graph._nodes.find(n => n.type === 'SaveImage');
    const img = n && n.imgs && n.imgs.find(i => i.src.includes('filename=UniRef'));
    return img && img.complete && img.naturalWidth ? [img.src, img.naturalWidth, img.naturalHeight] : null;
}"""


def missing_node_problems(page) -> list[str]:
    """Everything the frontend says or shows about unresolved nodes (empty when all resolved)."""
    problems = []
    for n in page.evaluate(NODES_JS):
        if not n["registered"] or n["has_errors"] or n["ctor"] == "LGraphNode":
            problems.append(f"node {n['id']} {n['type']!r} is unresolved ({n['ctor']}, errors={n['has_errors']})")
    text = page.evaluate("() => document.body.innerText")
    for line in text.splitlines():
        if "missing node" in line.lower():  # 1.32.9: a dialog; 1.47.12: an error card
            problems.append(f"frontend says: {line.strip()}")
    return problems


def open_template(page, pack: str, name: str) -> dict:
    """Load a pack workflow the way a user does: sidebar Templates → extension entry → card.
    Returns the template JSON the frontend fetched."""
    dialog = page.get_by_role("dialog").filter(has_text="Templates")
    if not dialog.count():
        page.get_by_role("button", name="Templates", exact=True).first.click()
    dialog.wait_for(state="visible")
    dialog.get_by_text(pack, exact=True).first.click()
    card = dialog.get_by_text(name, exact=True).first
    card.wait_for(state="visible")
    url_tail = f"/api/workflow_templates/{pack}/{name}.json"
    with page.expect_response(lambda r: r.url.endswith(url_tail), timeout=30_000) as resp:
        card.click()
    assert resp.value.ok, f"{url_tail}: HTTP {resp.value.status}"
    dialog.wait_for(state="hidden")
    return resp.value.json()


# ---------------------------------------------------------------- tests


def test_host_lists_the_workflows_as_templates(host):
    assert sorted(host.templates().get(PACK_NAME, [])) == sorted(p.stem for p in PACK_WORKFLOWS + NATIVE_WORKFLOWS)


@pytest.mark.parametrize("workflow", PACK_WORKFLOWS, ids=lambda p: p.stem)
def test_template_loads_resolved_and_runs_from_the_run_button(host, page, workflow):
    page = need(page)
    times = {"page ready": page.ready_s}
    ui = json.loads(workflow.read_text())
    want_types = sorted(n["type"] for n in ui["nodes"])

    # Load it from the Templates dialog.
    t0 = time.perf_counter()
    served = open_template(page, PACK_NAME, workflow.stem)
    assert sorted(n["type"] for n in served["nodes"]) == want_types
    page.wait_for_function(
        "(want) => JSON.stringify(app.graph._nodes.map(n => n.type).sort()) === JSON.stringify(want)",
        arg=want_types,
    )
    page.wait_for_timeout(500)  # let the frontend finish its post-load checks (missing nodes/models)
    times["template load"] = time.perf_counter() - t0

    # Every node resolved: registered type, a real node class, nothing flagged, no warning shown.
    assert missing_node_problems(page) == []
    nodes = page.evaluate(NODES_JS)
    for n in nodes:
        if n["type"].startswith("UniRef") or n["type"] in ("LoadImage", "SaveImage"):
            assert n["comfyClass"] == n["type"], n
    batch = next(n for n in nodes if n["type"] == "UniRefReferenceBatch")
    linked = [i["name"] for i in batch["inputs"] if i["link"] is not None]
    assert len(linked) == sum(n["type"] == "LoadImage" for n in ui["nodes"]), batch["inputs"]

    # Cheap settings through the widgets.
    done = page.evaluate(SET_WIDGETS_JS, FAST)
    assert len(done) == sum(map(len, FAST.values())), done
    page.evaluate(FIT_JS, [70, 130, 30, 50])

    # Queue with the Run button; the frontend posts the prompt it built from the graph.
    t0 = time.perf_counter()
    with page.expect_request(lambda r: r.url.endswith("/prompt") and r.method == "POST") as req:
        page.get_by_role("button", name="Run", exact=True).first.click()
    body = req.value.post_data_json
    resp = req.value.response()
    answer = resp.json()
    assert resp.ok and "prompt_id" in answer, answer
    prompt = body["prompt"]
    by_type = {}
    for node in prompt.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    for type_, values in FAST.items():
        for inputs in by_type[type_]:
            assert {k: inputs[k] for k in values} == values, inputs
    batch_inputs = sorted(by_type["UniRefReferenceBatch"][0])
    log(f"ComfyUI {host.version} {workflow.stem}: the frontend sent ReferenceBatch inputs {batch_inputs}")

    # The image appears in the UI (the SaveImage node shows it), and the host saved it at 128×96.
    entry = host.wait(answer["prompt_id"], timeout=150)
    assert entry.get("status", {}).get("status_str") == "success", entry.get("status")
    src, w, h = page.wait_for_function(SAVED_IMAGE_JS, timeout=60_000).json_value()
    times["run to image"] = time.perf_counter() - t0
    assert (w, h) == (OUT_W, OUT_H), src
    images = output_images(entry)
    assert len(images) == 1 and images[0]["filename"].startswith("UniRef"), images
    assert images[0]["filename"] in src
    saved = Image.open(io.BytesIO(host.view(images[0]["filename"], images[0]["subfolder"], images[0]["type"])))
    assert saved.size == (OUT_W, OUT_H)
    if TRAINED and workflow.stem == "uniref_multi_compose":
        from training.tasks.shapecompose import score

        s = score(saved.convert("RGB"), json.loads((ROOT / "assets" / "example_spec.json").read_text()))
        assert min(s.per_reference) >= 0.7 and s.instruction >= 0.7, s

    assert missing_node_problems(page) == []
    assert not [e for e in page.page_errors if "UniRef" in e], page.page_errors

    # Screenshot of the whole graph with its output.
    page.evaluate("() => app.canvas.setDirty(true, true)")
    page.wait_for_timeout(400)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"{host.version}_{workflow.stem}.png"
    page.screenshot(path=str(shot), full_page=True)
    log(
        f"ComfyUI {host.version} (frontend {page.frontend_version}) {workflow.stem}: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
        + f" → {shot.relative_to(ROOT)}"
    )


@pytest.mark.parametrize("workflow", NATIVE_WORKFLOWS, ids=lambda p: p.stem)
def test_native_template_loads_with_the_pack_node_resolved(host, page, workflow):
    """The native workflow from the Templates dialog: every node is a registered, real node and UniRef SELF
    Encode (native) has each LoadImage linked; only ComfyUI's own loaders flag their model files, which this
    host does not have (what an artist sees until they pick their Qwen-Image-Edit files)."""
    page = need(page)
    ui = json.loads(workflow.read_text())
    want_types = sorted(n["type"] for n in ui["nodes"])
    served = open_template(page, PACK_NAME, workflow.stem)
    assert sorted(n["type"] for n in served["nodes"]) == want_types
    page.wait_for_function(
        "(want) => JSON.stringify(app.graph._nodes.map(n => n.type).sort()) === JSON.stringify(want)",
        arg=want_types,
    )
    page.wait_for_timeout(500)
    problems = [p for p in missing_node_problems(page) if not any(f"'{t}'" in p for t in NATIVE_LOADERS)]
    assert problems == []
    nodes = page.evaluate(NODES_JS)
    assert all(n["registered"] and n["ctor"] != "LGraphNode" for n in nodes), nodes
    native = next(n for n in nodes if n["type"] == "UniRefSelfEncodeNative")
    assert native["comfyClass"] == "UniRefSelfEncodeNative" and not native["has_errors"], native
    linked = [i["name"] for i in native["inputs"] if i["link"] is not None]
    assert len([x for x in linked if x.startswith("image")]) == sum(n["type"] == "LoadImage" for n in ui["nodes"]), (
        linked
    )
    assert not [e for e in page.page_errors if "UniRef" in e], page.page_errors


def test_a_missing_node_would_be_caught(host, page):
    """The check above is not vacuous: a workflow with an unknown node type trips it."""
    page = need(page)
    ui = json.loads(PACK_WORKFLOWS[0].read_text())
    ui["nodes"][-1]["type"] = "UniRefNoSuchNode"
    page.evaluate("(wf) => app.loadGraphData(wf, true, true, 'broken')", ui)
    page.wait_for_timeout(1000)
    problems = missing_node_problems(page)
    assert any("UniRefNoSuchNode" in p for p in problems), problems
