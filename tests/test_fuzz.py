"""Fuzzing everything that reads user data: whatever the input, a reader gives a valid result or one of our own
errors (`UniRefError` and its subclasses) whose message names the input, never another exception and never a hang.

Each reader has a check (``check_*``: one input in, assertions out) and a strategy that builds its inputs: real small
files from ``tests/fuzz_corpus/`` mutated byte by byte, and structured inputs (safetensors headers with fields
changed, configs and manifests with wrong types, values and keys, LoRA key sets in every layout). The corpus is
replayed first, file by file; then each property runs a fixed, derandomised number of examples so that CI sees the
same inputs every time. ``UNIREF_FUZZ_EXAMPLES=N`` multiplies those numbers; ``scripts/fuzz.py`` runs the same
checks for minutes with fresh random inputs and reports what it ran and what crashed.

Every crash found here became a plain regression test at the end of this file.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import json
import math
import os
import shutil
import signal
import struct
import tempfile
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from uniref_core.errors import UniRefError

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "uniref-default"
#: Multiplies every property's number of examples (long local runs).
SCALE = float(os.environ.get("UNIREF_FUZZ_EXAMPLES", "1") or 1)
#: Executions of each check in this process (scripts/fuzz.py reports them).
EXECUTIONS: dict[str, int] = {}


def fuzz_settings(examples: int, **overrides) -> settings:
    """CI's settings: a fixed number of examples, the same ones every run, no deadline (the machine is shared)."""
    options = {
        "max_examples": max(1, int(examples * SCALE)),
        "deadline": None,
        "derandomize": True,
        "database": None,
        "suppress_health_check": list(HealthCheck),
        "print_blob": True,
    }
    return settings(**{**options, **overrides})


#: Seconds one input may take before it counts as a hang (generous: CI shares two cores with other work).
HANG_SECONDS = 30


class Hang(AssertionError):
    pass


@contextlib.contextmanager
def time_limit(what: str, seconds: float = HANG_SECONDS):
    """Fail the block, rather than wait for ever, when it runs past ``seconds`` (a hang is a crash too)."""

    def hang(signum, frame):
        raise Hang(f"{what} ran past {seconds} s on one input")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@functools.cache
def warm_up() -> None:
    """Import the heavy libraries the readers use once, outside any input's time limit: a first import of diffusers
    takes seconds, more on a busy machine."""
    import diffusers.loaders.lora_pipeline  # noqa: F401

    import training.common.data  # noqa: F401
    import training.export  # noqa: F401
    import uniref_core.pipeline  # noqa: F401


def counted(check=None, *, warm=warm_up):
    """Count a check's executions under its name, and fail an input that runs past `HANG_SECONDS` (``warm`` runs
    first, untimed)."""
    if check is None:
        return functools.partial(counted, warm=warm)

    @functools.wraps(check)
    def run(*args, **kwargs):
        EXECUTIONS[check.__name__] = EXECUTIONS.get(check.__name__, 0) + 1
        warm()
        with time_limit(check.__name__):
            return check(*args, **kwargs)

    return run


@contextlib.contextmanager
def scratch():
    with tempfile.TemporaryDirectory(prefix="uniref-fuzz-") as d:
        yield Path(d)


@contextlib.contextmanager
def clear_error(*names: str):
    """The block may raise only our own errors, and their message must name one of ``names`` (the input)."""
    try:
        yield
    except UniRefError as e:
        message = str(e)
        assert message.strip(), f"{type(e).__name__} with an empty message"
        assert any(n in message for n in names), f"{type(e).__name__} names none of {names}: {message}"


#: Stands for a result a reader refused to give.
REFUSED = object()


def corpus(folder: str) -> list[Path]:
    return sorted(p for p in (CORPUS / folder).iterdir() if p.is_file())


# --------------------------------------------------------------------------------------------------
# Building blocks: byte mutations and JSON values
# --------------------------------------------------------------------------------------------------

INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF)


@st.composite
def mutated(draw, data: bytes, max_ops: int = 4) -> bytes:
    """``data`` with a few byte edits: bit flips, interesting bytes, truncation, deletion, duplication, insertion."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, max_ops))):
        op = draw(st.sampled_from(("flip", "set", "truncate", "delete", "duplicate", "insert")))
        if not out and op != "insert":
            continue
        i = draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "flip":
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            out[i] = draw(st.sampled_from(INTERESTING_BYTES) | st.integers(0, 255))
        elif op == "truncate":
            del out[i:]
        elif op == "delete":
            del out[i : i + draw(st.integers(1, 16))]
        elif op == "duplicate":
            out[i:i] = out[i : i + draw(st.integers(1, 32))]
        else:
            out[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(out)


def mutated_corpus(folder: str, max_ops: int = 4):
    return st.sampled_from([p.read_bytes() for p in corpus(folder)]).flatmap(lambda b: mutated(b, max_ops))


ODD_NUMBERS = (
    0,
    -1,
    1,
    2**31,
    2**63,
    2**64,
    10**400,
    -(10**30),
    0.5,
    1e-300,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    True,
    False,
)
ODD_TEXT = ("", " ", "x", "1024", "-1024", "1e3", "nan", "inf", "\x00", "\ud800", "a\x00b", "x" * 300, "é", "[]")
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ODD_NUMBERS),
    st.text(max_size=10),
    st.sampled_from(ODD_TEXT),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
#: Deeply nested JSON: past the parser's recursion limit.
DEEP_JSON = st.integers(1, 30).map(lambda k: "[" * (k * 1000) + "]" * (k * 1000))


def dumps(value) -> str:
    return json.dumps(value, allow_nan=True)


def _spots(data, path=()):
    """Every (path, value) inside nested dicts and lists, the root included."""
    yield path, data
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _spots(value, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _spots(value, (*path, i))


@st.composite
def mutated_json(draw, base, keys=(), max_ops: int = 3):
    """``base`` (plain JSON data) with a few edits: a value set to something odd, an entry deleted, a key added
    (from ``keys``, which a reader knows, or any text)."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_ops))):
        spots = list(_spots(data))
        path, value = draw(st.sampled_from(spots))
        op = draw(st.sampled_from(("set", "set", "delete", "add")))
        if not path:
            if op == "set" and draw(st.integers(0, 9)) == 0:
                data = draw(JSON_VALUES)
            continue
        parent = data
        for step in path[:-1]:
            parent = parent[step]
        if op == "set":
            parent[path[-1]] = draw(JSON_VALUES)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(value, dict):
            value[draw(st.sampled_from(keys) | st.text(max_size=8) if keys else st.text(max_size=8))] = draw(
                JSON_VALUES
            )
    return data


# --------------------------------------------------------------------------------------------------
# Images: files of every format and mode, mutated; PIL images, arrays and tensors
# --------------------------------------------------------------------------------------------------

#: Modes each format saves, as PIL writes them.
SAVE_MODES = {
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
    "JPEG": ("L", "RGB", "CMYK"),
    "WEBP": ("RGB", "RGBA"),
    "TIFF": ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "LAB"),
    "GIF": ("L", "P"),
    "BMP": ("1", "L", "P", "RGB"),
}
# Decoding a mutated header may ask for a huge canvas: keep PIL's bomb limit small so a fuzz run stays in memory.
FUZZ_MAX_PIXELS = 1 << 20


def _random_image(draw, mode: str) -> Image.Image:
    w, h = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    size = len(Image.new(mode, (w, h)).tobytes())
    return Image.frombytes(mode, (w, h), draw(st.binary(min_size=size, max_size=size)))


@st.composite
def saved_images(draw) -> bytes:
    """A small random image in a random format and mode, maybe with transparency and an EXIF orientation."""
    fmt = draw(st.sampled_from(sorted(SAVE_MODES)))
    mode = draw(st.sampled_from(SAVE_MODES[fmt]))
    image = _random_image(draw, mode)
    params = {}
    if fmt in ("PNG", "GIF") and mode in ("L", "P") and draw(st.booleans()):
        params["transparency"] = draw(st.integers(0, 255))
    if fmt in ("JPEG", "WEBP", "PNG", "TIFF") and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(0, 10))  # orientation; 1-8 are defined
        params["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


IMAGE_FILES = st.one_of(mutated_corpus("images"), saved_images().flatmap(lambda b: mutated(b, 3)))


@counted
def check_image_file(data: bytes):
    from uniref_core.images import load_image

    with scratch() as d:
        path = d / "fuzzed.png"  # PIL reads the format from the bytes, not the name
        path.write_bytes(data)
        before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = FUZZ_MAX_PIXELS
        try:
            with clear_error("fuzzed reference"):
                image = load_image(path, name="fuzzed reference")
                assert image.mode == "RGB" and image.width > 0 and image.height > 0
        finally:
            Image.MAX_IMAGE_PIXELS = before
        assert path.read_bytes() == data  # never written to


ALL_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "La", "PA")
ALL_MODES += ("I;16", "I;16B", "I;16L", "I;16N")


@st.composite
def pil_images(draw) -> Image.Image:
    mode = draw(st.sampled_from(ALL_MODES))
    image = _random_image(draw, mode)
    if draw(st.booleans()):
        bands = len(image.getbands())
        value = draw(st.integers(0, 255))
        image.info["transparency"] = value if bands == 1 else tuple([value] * min(bands, 3))
    return image


FLOAT_DTYPES = (np.float16, np.float32, np.float64)
ARRAY_DTYPES = (np.uint8, np.uint16, ">u2", np.bool_, np.int8, np.int32, np.int64, *FLOAT_DTYPES, np.complex64)


@st.composite
def arrays(draw) -> np.ndarray:
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
    dtype = np.dtype(draw(st.sampled_from(ARRAY_DTYPES)))
    count = int(np.prod(shape)) if shape else 1
    raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


@st.composite
def tensors(draw) -> torch.Tensor:
    array = draw(arrays())
    tensor = torch.from_numpy(array.astype(np.float32) if array.dtype.kind in "cb" or array.dtype == ">u2" else array)
    dtype = draw(st.sampled_from((None, torch.bfloat16, torch.float16, torch.int16)))
    return tensor if dtype is None else tensor.to(dtype)


IMAGE_OBJECTS = st.one_of(pil_images(), arrays(), tensors())


@counted
def check_image_object(source):
    from uniref_core.images import load_image, pil_to_comfy, split_image_batch

    with clear_error("fuzzed image"):
        image = load_image(source, name="fuzzed image")
        assert image.mode == "RGB"
        batch = pil_to_comfy([image, image.copy()], name="fuzzed image")
        assert batch.shape == (2, image.height, image.width, 3)
    if isinstance(source, torch.Tensor):
        with clear_error("fuzzed image"):
            assert all(im.mode == "RGB" for im in split_image_batch(source, name="fuzzed image"))


# --------------------------------------------------------------------------------------------------
# safetensors files: our own header readers and the library's, on valid headers with fields changed
# --------------------------------------------------------------------------------------------------

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
ITEMSIZE |= {"F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "C64": 8}


@st.composite
def safetensors_files(draw) -> bytes:
    """A valid-looking safetensors file (a few small tensors) with header fields, the length or the data changed."""
    header, offset = {}, 0
    for i in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[f"t{i}.weight"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    header = (
        draw(mutated_json(header, keys=("dtype", "shape", "data_offsets", "__metadata__")))
        if draw(st.booleans())
        else header
    )
    text = draw(st.just(json.dumps(header).encode()) | DEEP_JSON.map(str.encode) | st.binary(max_size=40))
    length = draw(
        st.just(len(text))
        | st.integers(-8, 8).map(lambda k: max(len(text) + k, 0))
        | st.sampled_from((0, 2**33, 2**40, 2**63, 2**64 - 1))
    )
    data = bytes(draw(st.integers(0, offset + 8)))
    raw = struct.pack("<Q", length) + text + data
    return draw(mutated(raw, 2)) if draw(st.integers(0, 3)) == 0 else raw


SAFETENSORS = st.one_of(safetensors_files(), mutated_corpus("safetensors"))


@counted
def check_safetensors(data: bytes):
    from safetensors import SafetensorError

    from training.common.checkpoint import model_fingerprint
    from training.export import _base_dtype
    from uniref_core.comfy_files import _keys
    from uniref_core.lora import _read_safetensors
    from uniref_core.model import read_safetensors

    with scratch() as d:
        folder = d / "model" / "transformer"
        folder.mkdir(parents=True)
        path = folder / "fuzzed.safetensors"
        path.write_bytes(data)
        with clear_error("fuzzed.safetensors"):
            for name, tensor in read_safetensors(path):
                assert isinstance(name, str) and isinstance(tensor, torch.Tensor)
        with clear_error("fuzzed.safetensors"):
            assert isinstance(_base_dtype(folder), torch.dtype)
        assert len(model_fingerprint(d / "model")) == 16  # a hash of whatever is there: never an error
        with clear_error("fuzzed.safetensors"):
            assert all(isinstance(k, str) for k in _keys(path))
        with clear_error("fuzzed.safetensors"):
            try:
                _read_safetensors(path)
            except SafetensorError as e:  # the library's own error escaping our wrapper is a crash
                raise AssertionError(f"SafetensorError escaped: {e}") from e


# --------------------------------------------------------------------------------------------------
# LoRA files: key sets of every layout (peft/diffusers, kohya, ComfyUI), with keys, shapes and alphas changed
# --------------------------------------------------------------------------------------------------

LORA_MODULES = ("attn.to_q", "attn.to_k", "attn.add_q_proj", "attn.to_out.0", "img_mlp.net.0.proj", "txt_mod.1")
LORA_IN, LORA_OUT = 8, 12
LORA_LAYOUTS = {
    "peft": ("transformer.{m}.lora_A.weight", "transformer.{m}.lora_B.weight", None),
    "diffusers": ("{m}.lora_A.weight", "{m}.lora_B.weight", None),
    "comfy": ("diffusion_model.{m}.lora_A.weight", "diffusion_model.{m}.lora_B.weight", "diffusion_model.{m}.alpha"),
    "kohya": ("lora_unet_{u}.lora_down.weight", "lora_unet_{u}.lora_up.weight", "lora_unet_{u}.alpha"),
    "peft-default": ("{m}.lora_A.default.weight", "{m}.lora_B.default.weight", None),
}


def lora_model() -> torch.nn.Module:
    """A transformer-shaped stand-in: LORA_MODULES as Linear(8 → 12) in two blocks, plus a top-level img_in."""

    def nest(names):
        root = torch.nn.ModuleDict()
        for name in names:
            node = root
            *parents, leaf = name.split(".")
            for part in parents:
                if part not in node:
                    node[part] = torch.nn.ModuleDict()
                node = node[part]
            node[leaf] = torch.nn.Linear(LORA_IN, LORA_OUT)
        return root

    torch.manual_seed(0)
    return nest([f"transformer_blocks.{b}.{m}" for b in range(2) for m in LORA_MODULES] + ["img_in"])


SHAPES = st.lists(st.integers(0, 13), max_size=3).map(tuple)
LORA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.bool, torch.float64)


@st.composite
def lora_files(draw) -> tuple[dict, dict | None]:
    """(tensors, metadata) of a LoRA file: layers of one layout, then keys, shapes, dtypes and alphas changed."""
    layout = draw(st.sampled_from(sorted(LORA_LAYOUTS)))
    a_key, b_key, alpha_key = LORA_LAYOUTS[layout]
    tensors = {}
    layers = draw(
        st.lists(
            st.sampled_from([f"transformer_blocks.{b}.{m}" for b in range(3) for m in LORA_MODULES] + ["img_in"]),
            min_size=1,
            max_size=4,
            unique=True,
        )
    )
    for module in layers:
        names = {"m": module, "u": module.replace(".", "_")}
        rank = draw(st.integers(1, 3))
        tensors[a_key.format(**names)] = torch.randn(rank, LORA_IN)
        tensors[b_key.format(**names)] = torch.randn(LORA_OUT, rank)
        if alpha_key and draw(st.booleans()):
            tensors[alpha_key.format(**names)] = torch.tensor(draw(st.sampled_from((1.0, 4.0, 0.0, -2.0))))
    keys = sorted(tensors)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(keys))
        op = draw(st.sampled_from(("drop", "rename", "shape", "dtype", "value", "junk")))
        if key not in tensors and op != "junk":
            continue
        if op == "drop":
            del tensors[key]
        elif op == "rename":
            new = draw(st.sampled_from(keys) | st.text(min_size=1, max_size=30))
            tensors[new] = tensors.pop(key)
        elif op == "shape":
            tensors[key] = torch.randn(draw(SHAPES))
        elif op == "dtype":
            tensors[key] = tensors[key].to(draw(st.sampled_from(LORA_DTYPES)))
        elif op == "value":
            tensors[key] = torch.full(tensors[key].shape, draw(st.sampled_from((float("nan"), float("inf"), 1e30))))
        else:
            tensors[draw(st.text(min_size=1, max_size=20))] = torch.zeros(draw(SHAPES))
    metadata = None
    if draw(st.booleans()):
        meta = draw(
            st.fixed_dictionaries(
                {}, optional={"r": JSON_VALUES, "lora_alpha": JSON_VALUES, "alpha_pattern": JSON_VALUES}
            )
            | JSON_VALUES
        )
        text = draw(st.just(dumps(meta)) | st.text(max_size=10))
        metadata = {"lora_adapter_metadata": text}
    return tensors, metadata


@counted
def check_lora(file: tuple[dict, dict | None]):
    from safetensors.torch import save_file

    from uniref_core.lora import LoraPatcher, read_lora

    tensors, metadata = file
    with scratch() as d:
        path = d / "fuzzed_lora.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        with clear_error("fuzzed_lora"):
            lora = read_lora(path)
            model = lora_model()
            before = {k: v.clone() for k, v in model.state_dict().items()}
            patcher = LoraPatcher(model)
            patched = patcher.apply([(lora, 0.5)])
            assert patched >= 1
            patcher.restore()
            after = model.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before), "restore() left a LoRA's trace"


# --------------------------------------------------------------------------------------------------
# fp8 quantisation metadata of ComfyUI files (uniref_core.fp8.quantized_layers)
# --------------------------------------------------------------------------------------------------


@st.composite
def quantised_states(draw) -> tuple[dict, dict | None]:
    state = {
        "blocks.0.weight": torch.zeros(2, 2).to(torch.float8_e4m3fn),
        "blocks.1.weight": torch.zeros(2, 2, dtype=torch.bfloat16),
    }
    for layer in draw(st.lists(st.sampled_from(("blocks.0", "blocks.1", "blocks.2")), max_size=2)):
        suffix = draw(st.sampled_from((".scale_weight", ".weight_scale", ".input_scale", ".comfy_quant")))
        if suffix == ".comfy_quant":
            conf = draw(st.just(dumps(draw(JSON_VALUES))).map(str.encode) | st.binary(max_size=12))
            state[layer + suffix] = torch.tensor(list(conf), dtype=torch.uint8)
        else:
            state[layer + suffix] = torch.ones(draw(SHAPES))
    metadata = None
    if draw(st.booleans()):
        layers = draw(st.dictionaries(st.sampled_from(("blocks.0", "blocks.1")), JSON_VALUES, max_size=2))
        header = draw(st.just({"layers": layers}) | JSON_VALUES)
        metadata = {"_quantization_metadata": draw(st.just(dumps(header)) | st.text(max_size=10))}
    return state, metadata


@counted
def check_quantised(item: tuple[dict, dict | None]):
    from uniref_core.fp8 import quantized_layers

    state, metadata = item
    with clear_error("fuzzed.safetensors"):
        layers = quantized_layers(dict(state), metadata, "fuzzed.safetensors")
        assert all(isinstance(k, str) and (s is None or s.numel() == 1) for k, s in layers.items())


# --------------------------------------------------------------------------------------------------
# Model folders: uniref.json's defaults
# --------------------------------------------------------------------------------------------------

DEFAULTS_BASE = {"name": "m", "defaults": {"budget": 16384, "vl_budget": 12544, "output_area": 16384, "steps": 20}}
DEFAULT_KEYS = ("budget", "vl_budget", "output_area", "steps", "cfg", "defaults")
DEFAULTS_FILES = st.one_of(
    mutated_json(DEFAULTS_BASE, DEFAULT_KEYS).map(dumps).map(str.encode),
    DEEP_JSON.map(str.encode),
    st.just(dumps(DEFAULTS_BASE).encode()).flatmap(lambda b: mutated(b, 3)),
)


@counted
def check_defaults(data: bytes):
    from uniref_core.model import DEFAULTS_FILE, read_defaults
    from uniref_core.pipeline import resolve_setting

    with scratch() as d:
        (d / DEFAULTS_FILE).write_bytes(data)
        with clear_error(DEFAULTS_FILE):
            defaults = read_defaults(d)
            for key in defaults:  # what the pipeline and the CLI do with them
                assert isinstance(resolve_setting(key, None, defaults), (int, float))


# --------------------------------------------------------------------------------------------------
# Prompt text
# --------------------------------------------------------------------------------------------------

SPECIAL = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>")
SPECIAL += ("<|endoftext|>", "Picture 1: ", "{}", "{0}", "%s", "\n", "\ud800", "\udcff")
PROMPTS = st.lists(st.text(max_size=12) | st.sampled_from(SPECIAL), max_size=4).map("".join)


@functools.cache
def processor():
    from transformers import Qwen2VLProcessor

    return Qwen2VLProcessor.from_pretrained(SHIPPED_MODEL / "processor", local_files_only=True)


@counted(warm=lambda: (warm_up(), processor()))
def check_prompt(item: tuple[str, int]):
    from uniref_core.prompt import build_prompt_text, check_prompt_text

    text, k = item
    with clear_error("fuzzed prompt"):
        check_prompt_text(text, "fuzzed prompt")
        images = [Image.new("RGB", (28, 28))] * k
        # What encode_prompt hands the encoder: it must take any text check_prompt_text lets through.
        out = processor()(text=[build_prompt_text(text, k)], images=images or None, padding=True, return_tensors="pt")
        assert out["input_ids"].shape[0] == 1


# --------------------------------------------------------------------------------------------------
# Sizes, areas and sampling settings: parse_area, the planner, the CLI's options, seeds
# --------------------------------------------------------------------------------------------------

AREA_TEXT = st.one_of(
    st.integers(-(10**6), 10**7).map(str),
    st.sampled_from(("1024", "1536x1024", "1024²", "1024×768", "1024*768", "-1024", "-5x-5", "0", "x", "5x", "x5")),
    st.sampled_from(("1e3", "nan", "١٠٢٤", "1_024", " 64 ", "9" * 30, "1" + "0" * 400, "3x" + "9" * 5000)),
    st.text(max_size=8),
)
AREAS = st.one_of(AREA_TEXT, st.integers(-(10**9), 10**12), st.sampled_from(ODD_NUMBERS))


@counted
def check_area(value):
    from uniref_core.budget import parse_area

    with clear_error(repr(value), str(value)):
        area = parse_area(value)
        assert isinstance(area, int) and not isinstance(area, bool) and area >= 0


SIZES = st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 5000)), max_size=4)
PLAN_INPUTS = st.fixed_dictionaries(
    {"sizes": SIZES, "mode": st.sampled_from(("budget", "per_image", "x"))},
    optional={
        "budget": st.integers(-10, 10**9) | st.sampled_from(ODD_NUMBERS),
        "vl_budget": st.integers(-10, 10**8) | st.sampled_from(ODD_NUMBERS),
        "width": st.integers(-10, 10**5),
        "height": st.integers(-10, 10**5),
        "match_ref": st.integers(-2, 6),
        "output_area": st.integers(-10, 10**9) | st.sampled_from(ODD_NUMBERS),
        "token_px": st.sampled_from((1, 2, 8, 16, 24, 32, 64)),
        "upscale": st.booleans(),
    },
)


@counted
def check_plan(kwargs: dict):
    from uniref_core.budget import check_sequence, plan_references

    kwargs = dict(kwargs)
    sizes, mode = kwargs.pop("sizes"), kwargs.pop("mode")
    with clear_error("reference", "budget", "mode", "output", "match_ref", "token", "vl_budget", "width", "height"):
        plan = plan_references(sizes, mode, **kwargs)
        check_sequence(plan)
        assert all(w > 0 and h > 0 for w, h in (r.vae for r in plan.references))


CLI_OPTIONS = st.lists(
    st.tuples(
        st.sampled_from(("--budget", "--vl-budget", "--output-area", "--per-image-area", "--width", "--height")),
        AREA_TEXT,
    )
    | st.tuples(
        st.sampled_from(("--match-ref", "--mode", "--model")), st.sampled_from(("1", "2", "-1", "budget", "x"))
    )
    | st.tuples(st.just("--model"), st.sampled_from(("uniref-default", "nowhere", ""))),
    max_size=4,
)


@counted
def check_cli_plan(options: list[tuple[str, str]]):
    from uniref_core.__main__ import main

    argv = ["plan", "--ref", str(CORPUS / "images" / "rgb.png"), *(f"{flag}={value}" for flag, value in options)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own refusal: a usage line, exit 2
            code = e.code
    assert code in (0, 2), (code, err.getvalue())
    assert "Traceback" not in err.getvalue()


SAMPLING = st.fixed_dictionaries(
    {
        "steps": st.integers(-5, 2000) | st.sampled_from(ODD_NUMBERS),
        "cfg": st.floats(allow_nan=True) | st.sampled_from(ODD_NUMBERS),
        "sampler": st.sampled_from(("ode", "sde", "x", "")),
        "eta": st.floats(allow_nan=True),
        "denoise": st.floats(allow_nan=True) | st.sampled_from(ODD_NUMBERS),
        "num_images": st.integers(-2, 100),
        "seed": st.integers(-(2**65), 2**65) | st.sampled_from(ODD_NUMBERS) | st.text(max_size=3),
    }
)


@counted
def check_sampling_options(options: dict):
    from uniref_core.pipeline import check_sampling, check_seed

    o = dict(options)
    names = ("steps", "cfg", "sampler", "eta", "denoise", "num_images", "seed")
    with clear_error(*names):
        check_sampling(o["steps"], o["cfg"], o["sampler"], o["eta"], o["denoise"], Image.new("RGB", (8, 8)), 1)
    with clear_error(*names):
        check_seed(o["seed"], o["num_images"] if o["num_images"] >= 1 else 1)


# --------------------------------------------------------------------------------------------------
# Training configs (SFT and MSGRPO), JSON or TOML, with a base file
# --------------------------------------------------------------------------------------------------

SFT_CONFIG = {
    "model": "uniref-default",
    "train_manifest": "train.jsonl",
    "output_dir": "fuzz-out",
    "stages": [{"budget": 128, "steps": 2, "lr": 1e-4, "batch_size": 2, "output_size": 64}],
    "micro_batch_size": 1,
    "lora": {"rank": 4, "alpha": 4.0},
    "logit_normal": {"mean": 0.0, "std": 1.0, "pure_noise": 0.1},
    "betas": [0.9, 0.999],
    "vl_budget": 112,
    "schedule": "cosine",
    "ema_decay": 0.99,
    "weight_decay": 0.0,
    "upscale": True,
}
RL_CONFIG = {
    "model": "uniref-default",
    "train_manifest": ["train.jsonl"],
    "output_dir": "fuzz-out",
    "rewards": [{"source": "checker", "weight": 1.0}],
    "aggregation": "min",
    "steps": 2,
    "group_size": 2,
    "sde_window": [0, 2],
    "budget": "128x128",
    "lora": {"rank": 2},
    "betas": [0.9, 0.999],
    "cfg": 1.0,
}
BASE_FILE = "base.json"
BASE_VALUES = st.sampled_from((BASE_FILE, "fuzzed_config.json", "missing.json", "", "a\x00b", "x" * 300, "..", "/"))


def _config_keys(kind: str) -> tuple[str, ...]:
    from training.rl.config import RLConfig
    from training.sft.config import SFTConfig

    cls = SFTConfig if kind == "sft" else RLConfig
    return (*(f.name for f in dataclasses.fields(cls)), "base", "budget", "steps", "lr", "batch_size", "rank")


@st.composite
def config_files(draw) -> tuple[str, str, bytes]:
    """(kind, suffix, file bytes): a working config with values changed, maybe naming a base, or a mutated file."""
    kind = draw(st.sampled_from(("sft", "rl")))
    base = SFT_CONFIG if kind == "sft" else RL_CONFIG
    how = draw(st.sampled_from(("structured", "structured", "bytes", "deep")))
    if how == "deep":
        return kind, ".json", draw(DEEP_JSON).encode()
    data = copy.deepcopy(base)
    if draw(st.booleans()):
        data["base"] = draw(BASE_VALUES | JSON_VALUES)
    data = draw(mutated_json(data, _config_keys(kind)))
    raw = dumps(data).encode("utf-8", "surrogatepass")
    if how == "bytes":
        seeds = [(p.suffix, p.read_bytes()) for p in corpus("configs") if p.name.startswith(kind)]
        suffix, raw = draw(st.sampled_from(seeds) | st.tuples(st.sampled_from((".json", ".toml")), st.just(raw)))
        return kind, suffix, draw(mutated(raw, 3))
    return kind, ".json", raw


def conforms(value, hint) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` (the types our config dataclasses declare)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return not isinstance(value, bool) and (
            isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
        )
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is tuple:
        return isinstance(value, tuple) and len(value) == len(args) and all(map(conforms, value, args))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint) and all_fields_conform(value)
    return True


def all_fields_conform(obj) -> bool:
    hints = typing.get_type_hints(type(obj))
    bad = [f.name for f in dataclasses.fields(obj) if not conforms(getattr(obj, f.name), hints[f.name])]
    assert not bad, f"{type(obj).__name__} accepted {[(n, getattr(obj, n)) for n in bad]}"
    return True


@counted
def check_config(item: tuple[str, str, bytes]):
    from training.common.config import read_config_data
    from training.rl.config import config_from_dict as rl_config
    from training.sft.config import config_from_dict as sft_config

    kind, suffix, raw = item
    build = sft_config if kind == "sft" else rl_config
    with scratch() as d:
        (d / BASE_FILE).write_text(dumps({"seed": 1, "log_every": 2}))
        path = d / f"fuzzed_config{suffix}"
        path.write_bytes(raw)
        data = REFUSED
        with clear_error("fuzzed_config"):
            data = read_config_data(path)
        if data is REFUSED:
            return
        with clear_error("config", *_config_keys(kind)):
            cfg = build(data)
            all_fields_conform(cfg)
            cfg.hash()  # what a resume compares


# --------------------------------------------------------------------------------------------------
# Manifests (training.common.data.load_rows)
# --------------------------------------------------------------------------------------------------

IMAGE_NAMES = ("ref.png", "target.png", "gray16.png", "truncated.png", "palette_trns.png", "missing.png")
PATHS = st.one_of(st.sampled_from(IMAGE_NAMES), st.sampled_from(("", ".", "..", "/", "a\x00b", "x" * 300, "\ud800")))
ROWS = st.fixed_dictionaries(
    {"references": st.lists(PATHS, max_size=3), "target": PATHS, "instruction": PROMPTS},
    optional={"task": JSON_VALUES, "spec": JSON_VALUES, "k": JSON_VALUES},
).flatmap(lambda row: mutated_json(row, ("references", "target", "instruction"), max_ops=1) | st.just(row))


@st.composite
def manifests(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("row", "row", "row", "bytes", "deep", "blank")))
        if kind == "row":
            line = json.dumps(draw(ROWS), ensure_ascii=draw(st.booleans()), allow_nan=True)
            lines.append(line.encode("utf-8", "surrogatepass"))
        elif kind == "bytes":
            lines.append(draw(mutated(json.dumps({"references": ["ref.png"], "target": "t.png"}).encode(), 3)))
        elif kind == "deep":
            lines.append(draw(DEEP_JSON).encode())
        else:
            lines.append(b"  ")
    return b"\n".join(lines)


@functools.cache
def manifest_config():
    from training.common.config import Stage

    stage = Stage(budget=64 * 64, steps=1, lr=1e-4, batch_size=1, output_size=32 * 32)
    return types.SimpleNamespace(
        model=str(SHIPPED_MODEL), stages=[stage], upscale=True, vl_budget=None, allow_target_upscale=True
    )


@counted
def check_manifest(data: bytes):
    from training.common.data import load_rows

    with scratch() as d:
        Image.new("RGB", (40, 24), (200, 10, 10)).save(d / "ref.png")
        Image.new("RGB", (32, 32), (10, 200, 10)).save(d / "target.png")
        for name in ("gray16.png", "truncated.png", "palette_trns.png"):
            shutil.copy(CORPUS / "images" / name, d / name)
        path = d / "fuzzed_manifest.jsonl"
        path.write_bytes(data)
        with clear_error("fuzzed_manifest"):
            rows, report = load_rows([str(path)], manifest_config(), workers=1)
            assert report.usable == len(rows) and report.total == report.usable + len(report.skipped)
            assert all(isinstance(r.instruction, str) and r.references for r in rows)


# --------------------------------------------------------------------------------------------------
# Reward sources named in an MSGRPO config (resolved, never called: a factory may open a connection)
# --------------------------------------------------------------------------------------------------

SOURCE_NAMES = st.one_of(
    st.sampled_from(("checker", "features", "judge", "os:system", "training", "training.rewards:RewardError")),
    st.text(max_size=12).map(lambda t: "training." + t),
    st.text(max_size=12).map(lambda t: "training.rewards:" + t),
    st.tuples(st.text(max_size=8), st.text(max_size=8)).map(":".join),
    st.text(max_size=12),
)


@counted
def check_reward_source(name: str):
    from training.rewards import resolve

    with clear_error(repr(name), name):
        assert callable(resolve(name))


# --------------------------------------------------------------------------------------------------
# The corpus replayed through the checks first, then the properties
# --------------------------------------------------------------------------------------------------

#: name → (strategy, check, CI examples); scripts/fuzz.py runs the same for longer.
PROPERTIES = {
    "image_files": (IMAGE_FILES, check_image_file, 120),
    "image_objects": (IMAGE_OBJECTS, check_image_object, 80),
    "safetensors": (SAFETENSORS, check_safetensors, 100),
    "lora": (lora_files(), check_lora, 60),
    "fp8_metadata": (quantised_states(), check_quantised, 60),
    "model_defaults": (DEFAULTS_FILES, check_defaults, 60),
    "prompt": (st.tuples(PROMPTS, st.integers(0, 2)), check_prompt, 40),
    "areas": (AREAS, check_area, 150),
    "plan": (PLAN_INPUTS, check_plan, 100),
    "cli_plan": (CLI_OPTIONS, check_cli_plan, 40),
    "sampling": (SAMPLING, check_sampling_options, 100),
    "configs": (config_files(), check_config, 120),
    "manifests": (manifests(), check_manifest, 50),
    "reward_sources": (SOURCE_NAMES, check_reward_source, 60),
}


def _name(path: Path) -> str:
    return path.name


@pytest.mark.parametrize("path", corpus("images"), ids=_name)
def test_corpus_images(path):
    check_image_file(path.read_bytes())


@pytest.mark.parametrize("path", corpus("safetensors"), ids=_name)
def test_corpus_safetensors(path):
    check_safetensors(path.read_bytes())


def lora_from_corpus(path: Path) -> tuple[dict, dict | None]:
    """A LoRA file from its key list: ``{"tensors": {key: shape}, "values": {key: number}, "metadata": {...}}``
    (random values where none is given)."""
    spec = json.loads(path.read_text())
    torch.manual_seed(0)
    tensors = {key: torch.randn(shape) for key, shape in spec["tensors"].items()}
    for key, value in spec.get("values", {}).items():
        tensors[key].fill_(value)
    return tensors, spec.get("metadata")


@pytest.mark.parametrize("path", corpus("lora"), ids=_name)
def test_corpus_lora(path):
    check_lora(lora_from_corpus(path))


@pytest.mark.parametrize("path", corpus("configs"), ids=_name)
def test_corpus_configs(path):
    check_config(("sft" if path.name.startswith("sft") else "rl", path.suffix, path.read_bytes()))


@pytest.mark.parametrize("path", corpus("manifests"), ids=_name)
def test_corpus_manifests(path):
    check_manifest(path.read_bytes())


@pytest.mark.parametrize("path", corpus("defaults"), ids=_name)
def test_corpus_model_defaults(path):
    check_defaults(path.read_bytes())


@pytest.mark.parametrize("text", json.loads((CORPUS / "prompts" / "prompts.json").read_text()), ids=ascii)
def test_corpus_prompts(text):
    for k in (0, 1):
        check_prompt((text, k))


def _property(name: str):
    strategy, check, examples = PROPERTIES[name]
    return fuzz_settings(examples)(given(strategy)(check))


test_image_files = _property("image_files")
test_image_objects = _property("image_objects")
test_safetensors_headers = _property("safetensors")
test_lora_key_layouts = _property("lora")
test_fp8_metadata = _property("fp8_metadata")
test_model_defaults = _property("model_defaults")
test_prompt_text = _property("prompt")
test_areas = _property("areas")
test_plan = _property("plan")
test_cli_plan_options = _property("cli_plan")
test_sampling_options = _property("sampling")
test_configs = _property("configs")
test_manifests = _property("manifests")
test_reward_sources = _property("reward_sources")


# --------------------------------------------------------------------------------------------------
# Regressions: each crash the fuzzing found, as a plain test of what the user now sees
# --------------------------------------------------------------------------------------------------


def refused(fn, *args) -> str:
    with pytest.raises(UniRefError) as info:
        fn(*args)
    return str(info.value)


def safetensors_bytes(header, data: bytes = b"", length: int | None = None) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text) if length is None else length) + text + data


@pytest.mark.parametrize(
    "raw, message",
    [
        # Was MemoryError (2**40) or OverflowError (2**64 - 1): read() asked for the header length as given.
        (safetensors_bytes({}, length=2**40), "ends inside its header"),
        (safetensors_bytes({}, length=2**64 - 1), "ends inside its header"),
        (b"\x05\x00\x00", "ends inside its header"),  # was struct.error
        (safetensors_bytes(b"[[[" * 2000), "not a JSON object"),  # was RecursionError
        (safetensors_bytes(b"\xff\xfe"), "not a JSON object"),  # was UnicodeDecodeError
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [2]}}), "tensor 'a' is damaged"),  # was KeyError
        (safetensors_bytes({"a": {"dtype": "F32", "shape": None, "data_offsets": [0, 0]}}), "damaged"),  # TypeError
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, bytes(4)), "damaged"),
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}), "damaged"),  # past the end
        (safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [[], 4]}}, bytes(4)), "damaged"),
    ],
    ids=["len-2**40", "len-2**64", "short", "deep", "not-utf8", "no-offsets", "shape-null", "size", "past", "list"],
)
def test_damaged_safetensors_headers_are_refused_naming_the_file(tmp_path, raw, message):
    from training.common.checkpoint import model_fingerprint
    from training.export import _base_dtype
    from uniref_core.model import read_safetensors

    folder = tmp_path / "model" / "transformer"
    folder.mkdir(parents=True)
    path = folder / "diffusion_pytorch_model.safetensors"
    path.write_bytes(raw)
    for reader in (lambda: list(read_safetensors(path)), lambda: _base_dtype(folder)):
        text = refused(reader)
        assert str(path) in text and message in text and "re-download or re-export" in text
    assert len(model_fingerprint(tmp_path / "model")) == 16  # hashed as it is; loading reports the damage


def test_fp8_quantisation_metadata_that_is_not_an_object_is_refused_naming_the_file():
    from uniref_core.fp8 import quantized_layers

    fp8 = torch.zeros(2, 2).to(torch.float8_e4m3fn)
    for metadata in ("null", "[1]", "{", '{"layers": {"blocks.0": 3}}', '{"layers": []}'):  # AttributeError, …
        text = refused(
            quantized_layers, {"blocks.0.weight": fp8}, {"_quantization_metadata": metadata}, "q.safetensors"
        )
        assert "q.safetensors" in text and "_quantization_metadata" in text
    state = {"blocks.0.weight": fp8, "blocks.0.comfy_quant": torch.tensor(list(b"\xff{"), dtype=torch.uint8)}
    assert "'blocks.0.comfy_quant' is not a JSON object" in refused(quantized_layers, state, None, "q.safetensors")
    formats = '{"layers": {"blocks.0": {"format": ["float8_e4m3fn"]}}}'  # was TypeError: unhashable list
    text = refused(quantized_layers, {"blocks.0.weight": fp8}, {"_quantization_metadata": formats}, "q.safetensors")
    assert "quantised as ['float8_e4m3fn'], which is not supported" in text
    state = {"blocks.0.weight": fp8, "blocks.0.weight_scale": torch.ones(2)}  # was a RuntimeError when loading
    assert "fp8 scale of shape (2,)" in refused(quantized_layers, state, None, "q.safetensors")


@pytest.mark.parametrize(
    "text",
    ["[" * 5000 + "]" * 5000, '{"defaults": {"steps": Infinity}}', '{"defaults": {"cfg": NaN}}']
    + ['{"defaults": {"cfg": 1' + "0" * 400 + "}}"],
    ids=["deep", "infinity", "nan", "400-digits"],
)
def test_model_defaults_that_are_no_setting_are_refused(tmp_path, text):
    """Was RecursionError, or accepted and then OverflowError / ValueError in int() / float() of the setting."""
    from uniref_core.model import read_defaults

    (tmp_path / "uniref.json").write_text(text)
    assert str(tmp_path / "uniref.json") in refused(read_defaults, tmp_path)


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|video_pad|>", "<|im_end|>", "<|vision_start|>"])
def test_prompt_with_a_template_control_token_is_refused(token):
    """Was a ValueError from the processor ("Found 1 <|image_pad|> tokens in the text but no images were passed"),
    or a silently broken template."""
    from uniref_core.prompt import check_prompt_text

    text = refused(check_prompt_text, f"copy {token} here", "--prompt")
    assert text.startswith(f"--prompt contains {token}") and "Picture k" in text


@pytest.mark.parametrize("area", [float("nan"), 10**400, -1], ids=["nan", "400-digits", "negative"])
def test_planner_refuses_areas_that_are_no_area(area):
    """NaN was a ValueError in int(), 10**400 an OverflowError in float division; both are refused like -1."""
    from uniref_core.budget import plan_references

    assert refused(plan_references, [(512, 512)], "budget", area).startswith(f"budget is {area} px")
    assert "output area is" in refused(lambda: plan_references([(512, 512)], output_area=area))
    assert "vl_budget is" in refused(lambda: plan_references([(512, 512)], vl_budget=area))
    assert "per-image area is" in refused(lambda: plan_references([(512, 512)], "per_image", per_image_area=area))


def test_planner_names_a_fractional_budget_too_small():
    """Was a TypeError in math.isqrt while writing the message."""
    from uniref_core.budget import plan_references

    text = refused(plan_references, [(512, 512)], "budget", 0.5)
    assert text.startswith("reference 1 is 512×512 px: with 1 references in a budget of 0.5 px")


@pytest.mark.parametrize("text", ["-1024", "-5x-5", "5x-5", -1024, True])
def test_parse_area_refuses_negative_sides_and_booleans(text):
    """'-1024' was squared into 1024², -5x-5 multiplied into 25 px, and JSON's true read as 1."""
    from uniref_core.budget import parse_area

    assert (
        refused(parse_area, text)
        == f"budget {text!r} is not a size: write 1024 (for 1024²), 1536x1024 or a pixel count"
    )


def test_cli_plan_refuses_a_budget_of_400_digits(capsys):
    """Was OverflowError out of `python -m uniref_core plan`: a traceback instead of one line."""
    from uniref_core.__main__ import main

    assert main(["plan", "--ref", str(CORPUS / "images" / "rgb.png"), "--budget", "1" + "0" * 400]) == 2
    assert capsys.readouterr().err.startswith("error: budget is 1000")


@pytest.mark.parametrize(
    "name, message",
    [
        ("sft_not_utf8.json", "is not UTF-8 text"),  # UnicodeDecodeError
        ("sft_nested_deep.json", "is not valid JSON"),  # RecursionError
        ("sft_nested_deep.toml", "is not valid TOML"),  # RecursionError
        ("sft_base_nul.json", "its base 'a\\x00b' is not a usable path"),  # ValueError: embedded null byte
        ("sft_base_too_long.json", "is not a usable path ([Errno 36] File name too long"),  # OSError
    ],
)
def test_config_files_that_cannot_be_read_are_refused_naming_the_file(tmp_path, name, message):
    from training.common.config import read_config_data

    path = tmp_path / name
    shutil.copy(CORPUS / "configs" / name, path)
    text = refused(read_config_data, path)
    assert text.startswith(f"config file {path}") and message in text


@pytest.mark.parametrize(
    "name, message",
    [
        ("sft_seed_infinity.json", "seed is inf: it must be a whole number"),  # OverflowError in int()
        ("sft_steps_nan.json", "steps is nan: it must be a whole number"),  # ValueError in int()
        ("sft_betas_number.json", "betas is 5: it must be a list of 2 numbers"),  # TypeError in tuple()
        ("sft_ema_decay_text.json", "ema_decay is 'x': it must be a finite number or null"),  # TypeError in <
        ("sft_model_number.json", "model is 5: give a model folder"),  # TypeError in Path()
        ("sft_output_dir_too_long.json", "is not a usable path (File name too long)"),  # OSError in exists()
        ("sft_weight_decay_text.json", "weight_decay is 'none': it must be a finite number"),  # taken, then torch
        ("rl_sde_window_number.json", "sde_window is 5: it must be a list of whole numbers or null"),  # TypeError
        ("rl_budget_negative.json", "budget is -64"),  # was squared into 64²
        ("rl_upscale_text.json", "upscale is 'no': it must be true or false"),  # taken as true
    ],
)
def test_config_values_of_the_wrong_type_are_refused_naming_the_key(name, message):
    from training.common.config import read_config_data
    from training.rl.config import config_from_dict as rl_config
    from training.sft.config import config_from_dict as sft_config

    build = sft_config if name.startswith("sft") else rl_config
    assert message in refused(build, read_config_data(CORPUS / "configs" / name))


def test_config_whole_numbers_written_as_floats_become_ints():
    from training.sft.config import config_from_dict

    data = {**SFT_CONFIG, "seed": 3.0, "stages": [{**SFT_CONFIG["stages"][0], "steps": 2.0, "warmup": 1.0}]}
    cfg = config_from_dict(data)
    assert (cfg.seed, cfg.stages[0].steps, cfg.stages[0].warmup) == (3, 2, 1)
    assert all(type(v) is int for v in (cfg.seed, cfg.stages[0].steps, cfg.stages[0].warmup))


def test_manifest_that_is_not_utf8_is_refused_naming_it(tmp_path):
    """Was UnicodeDecodeError out of load_rows."""
    from training.common.data import load_rows

    path = tmp_path / "train.jsonl"
    shutil.copy(CORPUS / "manifests" / "not_utf8.jsonl", path)
    text = refused(load_rows, [str(path)], manifest_config())
    assert text.startswith(f"train manifest {path} could not be read as UTF-8 text")


@pytest.mark.parametrize(
    "name, reason",
    [
        ("nested_deep.jsonl", "not valid JSON (maximum recursion depth exceeded"),  # RecursionError
        ("path_too_long.jsonl", "cannot be opened (File name too long)"),  # OSError out of a worker thread
        ("instruction_image_pad.jsonl", "the instruction contains <|image_pad|>"),  # stopped the encoding pass
        ("instruction_surrogate.jsonl", "the instruction is not valid UTF-8 text"),  # stopped the encoding pass
    ],
)
def test_manifest_rows_that_crashed_are_skipped_with_the_reason(tmp_path, name, reason):
    from training.common.data import load_rows

    Image.new("RGB", (40, 24)).save(tmp_path / "ref.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "target.png")
    shutil.copy(CORPUS / "manifests" / name, tmp_path / name)
    rows, report = load_rows([str(tmp_path / name)], manifest_config())
    assert not rows and report.total == 1 and len(report.skipped) == 1
    where, why = report.skipped[0]
    assert where == f"{name}:1" and reason in why


def test_image_path_too_long_for_the_file_system_is_refused():
    """Was OSError (File name too long) out of load_image."""
    from uniref_core.images import load_image

    text = refused(load_image, "x" * 300, "reference 1")
    assert text.startswith("reference 1: ") and "cannot be opened (File name too long)" in text


def test_lora_with_a_negative_alpha_is_refused_instead_of_hanging(tmp_path):
    """A negative alpha sent diffusers' alpha rescaling (``while scale_down * 2 < scale_up``) into an endless loop."""
    from safetensors.torch import save_file

    from uniref_core.lora import read_lora

    tensors, _ = lora_from_corpus(CORPUS / "lora" / "kohya.json")
    tensors["lora_unet_transformer_blocks_1_attn_add_q_proj.alpha"] = torch.tensor(-2.0)
    save_file(tensors, str(tmp_path / "neg.safetensors"))
    with time_limit("read_lora"):
        text = refused(read_lora, tmp_path / "neg.safetensors")
    assert "lora_unet_transformer_blocks_1_attn_add_q_proj.alpha is -2.0; a layer's alpha is one number" in text


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t.update({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2)}),
            "shape (2,)",
        ),
        (
            lambda t: t.update({"transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(12, 0)}),
            "(12, 0)",
        ),
    ],
    ids=["1-d", "rank-0"],
)
def test_lora_factors_that_are_no_matrix_are_refused(tmp_path, change, message):
    """A 1-D factor was an IndexError in lora_deltas, and rank 0 was refused as made "for a model of another size"
    (12×8 in the LoRA but 12×8 in the model)."""
    from safetensors.torch import save_file

    from uniref_core.lora import read_lora

    tensors, _ = lora_from_corpus(CORPUS / "lora" / "peft.json")
    change(tensors)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    text = refused(read_lora, tmp_path / "bad.safetensors")
    assert (
        text.startswith(f"LoRA file {tmp_path / 'bad.safetensors'}: transformer.transformer_blocks.0")
        and message in text
    )


@pytest.mark.parametrize(
    "metadata, message",
    [
        (
            {"lora_alpha": None, "alpha_pattern": True},
            "alpha_pattern of its lora_adapter_metadata is True",
        ),  # .items()
        ({"lora_alpha": [None]}, "the alpha [None]"),  # TypeError in float()
        ({"lora_alpha": ":"}, "the alpha ':'"),  # ValueError in float()
        ({"lora_alpha": 10**400}, "the alpha 1000"),  # OverflowError in float()
        ({"lora_alpha": float("nan")}, "the alpha nan"),  # NaN weights, found only after sampling
    ],
    ids=["pattern-true", "list", "text", "400-digits", "nan"],
)
def test_lora_metadata_alpha_that_is_no_number_is_refused(tmp_path, metadata, message):
    from safetensors.torch import save_file

    from uniref_core.lora import read_lora

    tensors, _ = lora_from_corpus(CORPUS / "lora" / "peft_metadata.json")
    save_file(tensors, str(tmp_path / "meta.safetensors"), metadata={"lora_adapter_metadata": dumps(metadata)})
    text = refused(read_lora, tmp_path / "meta.safetensors")
    assert text.startswith(f"LoRA file {tmp_path / 'meta.safetensors'}: ") and message in text
