"""The UniRef nodes' checks in-process, without a ComfyUI host: ComfyUI's API modules are stand-ins here, the node
module, its checks and the engine are the real ones. (The same inputs through a real host:
tests/test_comfy_nodes.py.)"""

import importlib
import importlib.util
import inspect
import sys
import types
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK = "uniref_pack_under_test"


class _StubModule(types.ModuleType):
    """A module whose every attribute is a MagicMock, except those set on it."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = mock.MagicMock(name=f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


def _interrupt_flag(mm) -> None:
    """ComfyUI's interrupt flag and its three functions (comfy.model_management), as the host has them."""
    mm.InterruptProcessingException = type("InterruptProcessingException", (Exception,), {})
    mm.flag = False

    def interrupt_current_processing(value=True):
        mm.flag = value

    def throw_exception_if_processing_interrupted():
        if mm.flag:
            mm.flag = False
            raise mm.InterruptProcessingException()

    mm.interrupt_current_processing = interrupt_current_processing
    mm.processing_interrupted = lambda: mm.flag
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted


@pytest.fixture
def nodes(monkeypatch):
    """nodes/uniref_nodes.py imported as ComfyUI imports the pack (a package), over stand-in host modules."""
    io = _StubModule("comfy_api.latest.io")
    io.ComfyNode = type("ComfyNode", (), {})
    io.NodeOutput = lambda *values, **kw: values
    latest = _StubModule("comfy_api.latest")
    latest.io = io
    comfy = _StubModule("comfy")
    stubs = {
        "comfy_api": _StubModule("comfy_api"),
        "comfy_api.latest": latest,
        "comfy_api.latest.io": io,
        "comfy": comfy,
        "folder_paths": _StubModule("folder_paths"),
    }
    for sub in ("model_management", "utils", "model_patcher", "cli_args"):
        stubs[f"comfy.{sub}"] = _StubModule(f"comfy.{sub}")
        setattr(comfy, sub, stubs[f"comfy.{sub}"])
    _interrupt_flag(stubs["comfy.model_management"])
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    monkeypatch.setitem(sys.modules, PACK, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(sys.modules[PACK])
    yield importlib.import_module(f"{PACK}.nodes.uniref_nodes")
    for name in [n for n in sys.modules if n.startswith(PACK + ".")]:
        del sys.modules[name]


def test_validate_inputs_names_only_what_it_checks_so_comfyui_checks_the_rest(nodes):
    # ComfyUI (execution.validate_inputs) skips its min/max/option checks for every input a node's validate_inputs
    # takes, and for all of them when it takes **kwargs.
    spec = inspect.getfullargspec(nodes.SelfEncode.validate_inputs)
    assert spec.varkw is None, "**kwargs switches off ComfyUI's checks of every input"
    assert spec.args == ["cls", "width", "height"]


@pytest.mark.parametrize(
    "width, height, message",
    [
        (9000, 64, "SELF Encode: width is 9000: give 0 (match a reference) or a size up to 8192"),
        (64, -16, "SELF Encode: height is -16"),
        (64, 0, "set both width and height, or both to 0"),
    ],
)
def test_width_and_height_are_checked_by_the_node_itself(nodes, width, height, message):
    assert message in nodes.SelfEncode.validate_inputs(width=width, height=height)


def test_good_and_linked_sizes_pass(nodes):
    assert nodes.SelfEncode.validate_inputs(width=0, height=0) is True
    assert nodes.SelfEncode.validate_inputs(width=512, height=256) is True
    assert nodes.SelfEncode.validate_inputs(height=0) is True  # width comes from a link: known only when it runs


@pytest.mark.parametrize(
    "budget, custom_budget, message",
    [
        ("custom", -64, "SELF Encode: custom_budget is -64: give the side of the square budget in pixels, 64 to 4096"),
        ("custom", 0, "custom_budget is 0"),
        ("custom", 100000, "custom_budget is 100000"),
        ("999999²", 1024, "budget is '999999²': pick one of model default, 1024², 1536², 2048², custom"),
    ],
)
def test_budgets_the_node_cannot_run_are_refused_before_the_model_loads(nodes, budget, custom_budget, message):
    model = mock.MagicMock()
    with pytest.raises(nodes.UniRefError) as err:
        nodes.SelfEncode.execute(model, [], "a prompt", budget=budget, custom_budget=custom_budget)
    assert message in str(err.value)
    model.load.assert_not_called()


def test_a_custom_budget_reaches_the_engine_as_its_area(nodes):
    model = mock.MagicMock()
    nodes.SelfEncode.execute(model, ["ref"], "a prompt", budget="custom", custom_budget=512)
    assert model.load.return_value.encode.call_args.kwargs["budget"] == 512 * 512


def test_a_sampler_whose_lora_makes_nan_is_a_node_error_naming_the_lora(nodes, tiny_model, tmp_path):
    import torch
    from conftest import make_refs, random_lora, write_lora

    pipe = importlib.import_module(f"{PACK}.uniref_core.pipeline").UniRefPipeline.from_pretrained(tiny_model)
    layers = random_lora(pipe.c.transformer, seed=3)
    down, up, alpha = layers["transformer_blocks.0.attn.to_q"]
    layers["transformer_blocks.0.attn.to_q"] = (torch.full_like(down, float("inf")), up, alpha)
    model = mock.MagicMock()
    model.load.return_value = pipe
    pipe.set_loras([(write_lora(layers, tmp_path / "broken.safetensors", "comfy"), 1.0)])
    cond = pipe.encode(make_refs([(64, 64)]), "x", cfg=1.0, budget=64 * 64, width=64, height=64)
    with pytest.raises(
        nodes.UniRefError, match="non-finite values .* LoRA broken.safetensors at strength 1 is loaded"
    ):
        nodes.UniRefSampler.execute(model, cond, seed=0, steps=2, cfg=1.0, sampler="ode", denoise=1.0)


def pack_pipe(model_dir):
    return importlib.import_module(f"{PACK}.uniref_core.pipeline").UniRefPipeline.from_pretrained(model_dir)


def test_an_interrupt_inside_a_step_ends_the_sampler_as_comfyuis_interrupt(nodes, tiny_model):
    from conftest import make_refs

    mm = sys.modules["comfy.model_management"]
    pipe = pack_pipe(tiny_model)
    model = mock.MagicMock()
    model.load.return_value = pipe
    cond = pipe.encode(make_refs([(64, 64)]), "x", cfg=1.0, budget=64 * 64, width=64, height=64)
    blocks = pipe.c.transformer.transformer_blocks
    ran = []

    def user_presses_cancel(module, args, out):
        ran.append(1)
        if len(ran) == 1:
            mm.interrupt_current_processing()  # during step 1, after its first block

    handle = blocks[0].register_forward_hook(user_presses_cancel)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            nodes.UniRefSampler.execute(model, cond, seed=0, steps=3, cfg=1.0, sampler="ode", denoise=1.0)
    finally:
        handle.remove()
    assert len(ran) == 1 and not mm.processing_interrupted()  # stopped inside step 1; the flag is cleared for the next
    assert all(not m._forward_pre_hooks for m in pipe.c.transformer.modules())


def test_an_interrupt_while_encoding_ends_self_encode_as_comfyuis_interrupt(nodes, tiny_model):
    from conftest import make_refs

    mm = sys.modules["comfy.model_management"]
    model = mock.MagicMock()
    model.load.return_value = pack_pipe(tiny_model)
    mm.interrupt_current_processing()
    with pytest.raises(mm.InterruptProcessingException):
        nodes.SelfEncode.execute(model, make_refs([(64, 64)]), "a prompt", width=64, height=64)
