"""Image inputs for the engine: anything a user or ComfyUI hands us -> 8-bit RGB PIL images.

Accepted sources for `load_image`:
  * a file path (str / pathlib.Path), opened read-only, EXIF orientation applied;
  * a PIL image of any mode (transparency is composited on white, 16-bit and float
    grayscale are scaled to 8 bits rather than clipped);
  * a numpy array HxW / HxWx1 / HxWx3 / HxWx4 of uint8, uint16, bool or float (0..1);
  * a torch tensor in ComfyUI's IMAGE convention: float 0..1, [H,W,C] or [1,H,W,C].

`split_image_batch` turns a ComfyUI IMAGE batch into a list of images and `pil_to_comfy`
goes back to a float32 [B,H,W,3] tensor; `save_image` writes an output whole or not at all. Every
bad input raises `UniRefError` with a message that names the input (the `name` argument) and says
how to fix it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UniRefError

# Channel counts we understand in channels-last arrays/tensors: gray, RGB, RGBA.
ACCEPTED_CHANNELS = (1, 3, 4)
# uint16 full scale; 65535 / 257 == 255 exactly, so 16-bit white stays white.
UINT16_MAX = 65535
UINT8_MAX = 255
# PIL modes holding 16/32-bit integer grayscale (PNG 16-bit gray opens as "I;16" or "I").
INT_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# PIL modes that carry an alpha band (premultiplied "La"/"RGBa" included).
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")

READ_HINT = "re-export it as PNG or JPEG"
ACCEPTED_TYPES = "a file path, a PIL image, a numpy array or a ComfyUI IMAGE tensor"
ARRAY_SHAPES = "HxW, HxWx1, HxWx3 or HxWx4"
TENSOR_SHAPES = "[H,W,C] or [1,H,W,C] with C = 1, 3 or 4 (ComfyUI IMAGE, channels last)"


# ---------------------------------------------------------------- public API


def load_image(source, name: str = "image") -> Image.Image:
    """Return `source` as a new 8-bit RGB PIL image; raise UniRefError naming `name` if it can't be."""
    if isinstance(source, (str, os.PathLike)):
        return _pil_to_rgb(_open_file(source, name), name)
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source, name)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, name, "array", ARRAY_SHAPES)
    if isinstance(source, torch.Tensor):
        tensor = _tensor_to_cpu_float(source, name)
        if tensor.ndim == 4 and tensor.shape[0] == 0:
            raise UniRefError(f"{name}: the image batch is empty (shape {tuple(tensor.shape)}) — connect an image")
        if tensor.ndim == 4 and tensor.shape[0] > 1:
            raise UniRefError(
                f"{name}: got a batch of {tensor.shape[0]} images (tensor shape {tuple(tensor.shape)}) "
                "where one image is expected — use split_image_batch to take the batch apart, "
                "or pick one image from it"
            )
        if tensor.ndim == 4:
            tensor = tensor[0]
        return _tensor_image_to_rgb(tensor, name)
    raise UniRefError(f"{name}: unsupported input type {type(source).__name__} — give {ACCEPTED_TYPES}")


def save_image(image: Image.Image, path, name: str = "output") -> None:
    """Write ``image`` to ``path`` (its format from the suffix) whole or not at all: into a temporary file in the same
    folder, then renamed over ``path``, so a full disk or a crash never leaves a truncated image there."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise UniRefError(f"{name} {path} has no image extension: end it in .png, .jpg or .webp")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        # O_EXCL: never write through a file or link already there; 0o666: the umask applies, as for a plain save.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            image.save(f, format=image_format)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UniRefError(
            f"{name} {path} could not be written ({e.strerror or e}): free some space or choose "
            "another path; nothing was left there"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def split_image_batch(tensor, name: str = "image") -> list[Image.Image]:
    """ComfyUI IMAGE tensor [B,H,W,C] (or one [H,W,C] image) -> B RGB PIL images."""
    if not isinstance(tensor, torch.Tensor):
        raise UniRefError(
            f"{name}: expected a ComfyUI IMAGE tensor [B,H,W,C], got {type(tensor).__name__} — "
            "connect an IMAGE output, or use load_image for a single file/PIL image/array"
        )
    tensor = _tensor_to_cpu_float(tensor, name)
    if tensor.ndim == 3:
        return [_tensor_image_to_rgb(tensor, name)]
    if tensor.ndim != 4:
        raise UniRefError(
            f"{name}: image batch tensor has shape {tuple(tensor.shape)}; accepted shapes are "
            "[B,H,W,C] or [H,W,C] with C = 1, 3 or 4 (ComfyUI IMAGE, channels last)"
        )
    count = tensor.shape[0]
    if count == 0:
        raise UniRefError(
            f"{name}: the image batch is empty (shape {tuple(tensor.shape)}) — connect at least one image"
        )
    # Name each image so an error points at the one at fault.
    return [
        _tensor_image_to_rgb(tensor[i], f"{name} (image {i + 1} of {count})" if count > 1 else name)
        for i in range(count)
    ]


def pil_to_comfy(images: list[Image.Image] | Image.Image, name: str = "images") -> torch.Tensor:
    """Same-size PIL images -> float32 tensor [B,H,W,3] in 0..1 (ComfyUI IMAGE convention)."""
    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if not images:
        raise UniRefError(f"{name}: no images to convert — pass at least one image")
    for i, image in enumerate(images, start=1):
        if not isinstance(image, Image.Image):
            raise UniRefError(
                f"{name} (image {i} of {len(images)}): expected a PIL image, got {type(image).__name__} "
                "— call load_image on it first"
            )
        if image.size != images[0].size:
            raise UniRefError(
                f"{name}: images have different sizes ({_size(images[0].size)} for image 1, "
                f"{_size(image.size)} for image {i}) — resize them to one size before batching"
            )
    arrays = [
        np.asarray(_pil_to_rgb(image, f"{name} (image {i} of {len(images)})"))
        for i, image in enumerate(images, start=1)
    ]
    batch = np.stack(arrays).astype(np.float32) / UINT8_MAX
    return torch.from_numpy(batch)


# ---------------------------------------------------------------- files


def _open_file(source, name: str) -> Image.Image:
    """Open, orient and fully decode an image file; never writes to it."""
    if isinstance(source, str) and not source.strip():
        raise UniRefError(f"{name}: no file path given — pick an image file")
    path = Path(source).expanduser()
    try:
        found = path.exists()
        folder = found and path.is_dir()
        size = path.stat().st_size if found and not folder else None
    except OSError as e:  # a name longer than the file system allows, a loop of links, …
        raise UniRefError(f"{name}: {path} cannot be opened ({e.strerror or e}) — check the path") from None
    if not found:
        raise UniRefError(f"{name}: file not found: {path} — check the path")
    if folder:
        raise UniRefError(f"{name}: {path} is a folder, not an image file — check the path and pick a file inside it")
    if size == 0:
        raise UniRefError(f"{name}: {path} is an empty file (0 bytes) — {READ_HINT} or copy it again")
    try:
        # Image.open reads in "rb" mode; exif_transpose returns a decoded copy, so the file
        # can be closed here and truncated data fails now rather than mid-generation.
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except PermissionError:
        raise UniRefError(
            f"{name}: {path} cannot be opened (permission denied) — check the file's permissions"
        ) from None
    except Image.DecompressionBombError as exc:
        raise UniRefError(f"{name}: {path} is too large to load safely ({exc}) — downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UniRefError(
            f"{name}: {path} could not be read as an image (truncated or not an image file): {READ_HINT}"
        ) from exc
    return image


# ---------------------------------------------------------------- PIL images


def _pil_to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Any PIL mode -> new RGB image; transparency over white, high bit depths scaled down."""
    try:
        image.load()  # lazily opened images decode here, so corrupt data is reported as such
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UniRefError(f"{name}: the image could not be decoded (truncated or corrupt): {READ_HINT}") from exc
    _check_has_pixels(image.width, image.height, name)
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image.copy()  # a copy, so later edits never reach the caller's image
    if mode in INT_GRAY_MODES:
        # Full 16-bit range: "I" (32-bit) from 16-bit PNGs also holds 0..65535.
        values = np.clip(np.asarray(image), 0, UINT16_MAX).astype(np.uint16)
        return _array_to_rgb(values, name, "image", ARRAY_SHAPES)
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        _check_finite(values, name, "image")
        # Float images are either 0..1 or 0..255; scale the latter to 0..1.
        if values.size and values.max() > 1.0:
            values = values / UINT8_MAX
        return _array_to_rgb(values, name, "image", ARRAY_SHAPES)
    if mode == "La":
        # Premultiplied gray+alpha: over white that is simply L + (1 - alpha).
        lum, alpha = np.moveaxis(np.asarray(image, dtype=np.float32) / UINT8_MAX, -1, 0)
        return _unit_to_rgb(np.clip(lum + (1.0 - alpha), 0.0, 1.0)[..., None])
    if mode in ALPHA_MODES or "transparency" in image.info:
        # Covers RGBA/LA/PA plus palette/L/RGB images with a tRNS transparent colour.
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / UINT8_MAX
        return _unit_to_rgb(rgba)
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise UniRefError(f"{name}: image mode {mode!r} cannot be converted to RGB — {READ_HINT}") from exc


# ---------------------------------------------------------------- arrays and tensors


def _tensor_to_cpu_float(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Any-device float tensor -> detached CPU float32 (bf16/fp16 included)."""
    if not tensor.is_floating_point():
        raise UniRefError(
            f"{name}: image tensor has dtype {tensor.dtype}; expected a float tensor in 0..1 "
            "(ComfyUI IMAGE) — convert it with .float() / 255"
        )
    return tensor.detach().to(device="cpu", dtype=torch.float32)


def _tensor_image_to_rgb(tensor: torch.Tensor, name: str) -> Image.Image:
    """One [H,W,C] CPU float tensor -> RGB image."""
    if tensor.ndim != 3 or tensor.shape[-1] not in ACCEPTED_CHANNELS:
        raise UniRefError(f"{name}: image tensor has shape {tuple(tensor.shape)}; accepted shapes are {TENSOR_SHAPES}")
    return _array_to_rgb(tensor.numpy(), name, "tensor", TENSOR_SHAPES)


def _array_to_rgb(array: np.ndarray, name: str, what: str, accepted: str) -> Image.Image:
    """HxW or HxWxC (C in 1,3,4) uint8/uint16/bool/float array -> RGB image."""
    shape = tuple(array.shape)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in ACCEPTED_CHANNELS:
        raise UniRefError(f"{name}: image {what} has shape {shape}; accepted shapes are {accepted}")
    _check_has_pixels(array.shape[1], array.shape[0], name)
    dtype = array.dtype
    if dtype == np.uint8:
        if array.shape[-1] == 3:
            return Image.fromarray(np.ascontiguousarray(array), "RGB")  # fast path, no float round trip
        unit = array.astype(np.float32) / UINT8_MAX
    elif dtype.kind == "u" and dtype.itemsize == 2:  # uint16 in either byte order
        unit = array.astype(np.float32) / UINT16_MAX
    elif dtype == np.bool_:
        unit = array.astype(np.float32)
    elif np.issubdtype(dtype, np.floating):
        _check_finite(array, name, what)
        unit = np.clip(array.astype(np.float32), 0.0, 1.0)
    else:
        raise UniRefError(
            f"{name}: image {what} has dtype {dtype}; accepted dtypes are uint8 (0..255), "
            "uint16 (0..65535), bool, or float (0..1) — convert it, e.g. with .astype(np.uint8)"
        )
    return _unit_to_rgb(unit)


def _unit_to_rgb(unit: np.ndarray) -> Image.Image:
    """HxWxC float array in 0..1 (C in 1,3,4) -> RGB image; alpha is composited on white."""
    channels = unit.shape[-1]
    if channels == 4:
        colour, alpha = unit[..., :3], unit[..., 3:]
        unit = colour * alpha + (1.0 - alpha)  # white background shows through transparency
    elif channels == 1:
        unit = np.repeat(unit, 3, axis=-1)
    pixels = np.rint(unit * UINT8_MAX).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


# ---------------------------------------------------------------- checks


def _check_has_pixels(width: int, height: int, name: str) -> None:
    if width == 0 or height == 0:
        raise UniRefError(f"{name}: the image has no pixels ({width}x{height}) — give an image at least 1x1 in size")


def _check_finite(values: np.ndarray, name: str, what: str) -> None:
    if not np.isfinite(values).all():
        raise UniRefError(
            f"{name}: image {what} contains NaN or infinite values — check the node that produced it "
            "(often a VAE decode in fp16; try fp32 or bf16)"
        )


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"
