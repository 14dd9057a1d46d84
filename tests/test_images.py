"""What a user sees from uniref_core.images: the pixels that come back, and the error messages."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uniref_core.errors import UniRefError
from uniref_core.images import load_image, pil_to_comfy, split_image_batch

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def px(image: Image.Image, xy) -> tuple:
    return tuple(image.getpixel(xy))


def assert_rgb(image: Image.Image, size=None):
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    if size is not None:
        assert image.size == size


def error_message(source, name="reference 2", fn=load_image) -> str:
    with pytest.raises(UniRefError) as info:
        fn(source, name=name)
    return str(info.value)


# ---------------------------------------------------------------- files


def test_rgba_png_transparent_half_is_white_opaque_half_keeps_colour(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :, :3] = (10, 120, 200)
    rgba[:, :4, 3] = 255  # left half opaque
    rgba[:, 4:, 3] = 0  # right half fully transparent (colour underneath must not show)
    path = tmp_path / "cut_out.png"
    Image.fromarray(rgba, "RGBA").save(path)
    before = sha(path)

    image = load_image(path)

    assert_rgb(image, (8, 8))
    assert px(image, (1, 3)) == (10, 120, 200)
    assert px(image, (6, 3)) == WHITE
    assert sha(path) == before  # the user's file is never touched


def test_half_transparent_red_blends_with_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[...] = (255, 0, 0, 128)
    image = load_image(Image.fromarray(rgba, "RGBA"))
    r, g, b = px(image, (0, 0))
    assert r == 255 and 126 <= g <= 128 and g == b


def test_16bit_grayscale_png_scales_to_8bit(tmp_path):
    values = np.array([[65535, 32768, 0, 257]], np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I")  # really a 16-bit file

    image = load_image(str(path))

    assert_rgb(image, (4, 1))
    assert px(image, (0, 0)) == WHITE
    assert px(image, (1, 0))[0] in (127, 128)
    assert px(image, (2, 0)) == (0, 0, 0)
    assert px(image, (3, 0)) == (1, 1, 1)


def test_palette_png_transparent_index_is_white(tmp_path):
    pal = Image.new("P", (4, 2))
    pal.putpalette([0, 0, 0] + [255, 0, 0] + [0, 0, 255] + [0, 0, 0] * 253)
    pal.putdata([1, 1, 2, 2, 0, 0, 2, 2])  # index 0 is the transparent one
    path = tmp_path / "palette.png"
    pal.save(path, transparency=0)

    image = load_image(path)

    assert_rgb(image, (4, 2))
    assert px(image, (0, 0)) == RED
    assert px(image, (2, 0)) == BLUE
    assert px(image, (0, 1)) == WHITE  # transparent index, not the black stored colour


def test_exif_rotated_jpeg_is_upright(tmp_path):
    # Stored landscape 64x32 with a red block top-left; orientation 6 = display rotated 90° clockwise.
    stored = Image.new("RGB", (64, 32), BLUE)
    stored.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    before = sha(path)

    image = load_image(path)

    assert_rgb(image, (32, 64))  # width and height swapped
    r, g, b = px(image, (31 - 4, 4))  # top-left of the stored image is now top-right
    assert r > 200 and g < 60 and b < 60
    r, g, b = px(image, (4, 4))
    assert b > 200 and r < 60
    assert sha(path) == before


def test_plain_rgb_file_loads_from_str_and_path(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (5, 3), GREEN).save(path)
    for source in (path, str(path)):
        image = load_image(source)
        assert_rgb(image, (5, 3))
        assert px(image, (4, 2)) == GREEN


# ---------------------------------------------------------------- PIL modes


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("L", (3, 3), 200), (200, 200, 200)),
        (lambda: Image.new("1", (3, 3), 1), WHITE),
        (lambda: Image.new("CMYK", (3, 3), (0, 255, 255, 0)), RED),
        (lambda: Image.new("RGB", (3, 3), GREEN).convert("YCbCr"), GREEN),
        (lambda: Image.new("LA", (3, 3), (0, 0)), WHITE),
        (lambda: Image.new("LA", (3, 3), (40, 255)), (40, 40, 40)),
        (lambda: Image.new("La", (3, 3), (0, 0)), WHITE),
        (lambda: Image.new("RGBa", (3, 3), (0, 0, 0, 0)), WHITE),
        (lambda: Image.new("I;16B", (3, 3), 65535), WHITE),
        (lambda: Image.new("I", (3, 3), 65535), WHITE),
        (lambda: Image.new("I", (3, 3), 32768), (128, 128, 128)),
        (lambda: Image.new("F", (3, 3), 1.0), WHITE),
        (lambda: Image.new("F", (3, 3), 0.5), (128, 128, 128)),
        (lambda: Image.new("F", (3, 3), 200.0), (200, 200, 200)),
    ],
    ids=[
        "L",
        "1",
        "CMYK",
        "YCbCr",
        "LA-clear",
        "LA-opaque",
        "La",
        "RGBa",
        "I16B",
        "I-max",
        "I-mid",
        "F-one",
        "F-half",
        "F-255",
    ],
)
def test_pil_modes_become_8bit_rgb(make, expected):
    image = load_image(make())
    assert_rgb(image, (3, 3))
    got = px(image, (1, 1))
    assert all(abs(a - b) <= 1 for a, b in zip(got, expected)), got


def test_pil_input_is_not_modified_and_result_is_a_copy():
    original = Image.new("RGB", (2, 2), RED)
    image = load_image(original)
    image.putpixel((0, 0), GREEN)
    assert px(original, (0, 0)) == RED


# ---------------------------------------------------------------- numpy


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((2, 3), 77, np.uint8), (77, 77, 77)),
        (np.full((2, 3, 1), 77, np.uint8), (77, 77, 77)),
        (np.tile(np.array([1, 2, 3], np.uint8), (2, 3, 1)), (1, 2, 3)),
        (np.tile(np.array([9, 8, 7, 0], np.uint8), (2, 3, 1)), WHITE),
        (np.tile(np.array([9, 8, 7, 255], np.uint8), (2, 3, 1)), (9, 8, 7)),
        (np.full((2, 3, 3), 65535, np.uint16), WHITE),
        (np.full((2, 3), 65535, ">u2"), WHITE),
        (np.ones((2, 3), bool), WHITE),
        (np.zeros((2, 3, 3), bool), (0, 0, 0)),
        (np.tile(np.array([1.5, 0.5, -0.2], np.float32), (2, 3, 1)), (255, 128, 0)),
        (np.full((2, 3, 3), 0.25, np.float64), (64, 64, 64)),
    ],
    ids=[
        "u8-HW",
        "u8-HW1",
        "u8-HW3",
        "u8-HW4-clear",
        "u8-HW4-opaque",
        "u16",
        "u16-bigendian",
        "bool-true",
        "bool-false",
        "float-clipped",
        "float64",
    ],
)
def test_numpy_arrays(array, expected):
    image = load_image(array)
    assert_rgb(image, (3, 2))
    assert px(image, (2, 1)) == expected


# ---------------------------------------------------------------- torch / ComfyUI


def test_comfy_tensor_round_trips_within_one_level():
    torch.manual_seed(0)
    tensor = torch.rand(1, 6, 5, 3)
    image = load_image(tensor)
    assert_rgb(image, (5, 6))
    back = pil_to_comfy(image)
    assert back.shape == (1, 6, 5, 3) and back.dtype == torch.float32
    assert (back - tensor).abs().max() <= 1 / 255


def test_hwc_rgba_tensor_round_trips_and_alpha_goes_white():
    torch.manual_seed(1)
    tensor = torch.rand(4, 7, 4)
    tensor[..., 3] = 1.0
    tensor[0, 0, 3] = 0.0  # one transparent pixel
    image = load_image(tensor)
    back = pil_to_comfy([image])
    assert back.shape == (1, 4, 7, 3)
    assert torch.equal(back[0, 0, 0], torch.ones(3))
    assert (back[0, 1:] - tensor[1:, :, :3]).abs().max() <= 1 / 255


def test_bf16_tensor_loads():
    tensor = torch.full((1, 3, 3, 3), 0.5, dtype=torch.bfloat16)
    tensor[0, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    image = load_image(tensor)
    assert px(image, (0, 0)) == RED
    assert px(image, (2, 2)) == (128, 128, 128)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_tensor_loads():
    image = load_image(torch.ones(1, 2, 2, 3, device="cuda", dtype=torch.float16))
    assert px(image, (1, 1)) == WHITE


def test_single_channel_tensor_is_gray():
    assert px(load_image(torch.full((2, 2, 1), 0.2)), (0, 0)) == (51, 51, 51)


def test_split_image_batch_gives_each_image():
    batch = torch.zeros(3, 4, 5, 3)
    for i in range(3):
        batch[i, ..., i] = 1.0
    images = split_image_batch(batch, name="references")
    assert len(images) == 3
    assert [px(im, (0, 0)) for im in images] == [RED, GREEN, BLUE]
    assert all(im.mode == "RGB" and im.size == (5, 4) for im in images)
    assert len(split_image_batch(batch[0])) == 1


def test_pil_to_comfy_stacks_same_size_images():
    batch = pil_to_comfy([Image.new("RGB", (4, 2), RED), Image.new("L", (4, 2), 255)])
    assert batch.shape == (2, 2, 4, 3) and batch.dtype == torch.float32
    assert batch[0, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert batch[1].min() == 1.0


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    msg = error_message(tmp_path / "nope.png")
    assert "reference 2" in msg and "not found" in msg and "nope.png" in msg and "check the path" in msg


def test_directory(tmp_path):
    msg = error_message(tmp_path)
    assert "reference 2" in msg and "folder" in msg and "path" in msg


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    msg = error_message(path)
    assert "reference 2" in msg and "empty" in msg and "0 bytes" in msg


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels")
    before = sha(path)
    msg = error_message(path)
    assert "reference 2" in msg and "could not be read as an image" in msg and "PNG or JPEG" in msg
    assert sha(path) == before


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_fails_at_load_and_is_left_alone(tmp_path, fmt):
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path = tmp_path / f"cut.{fmt.lower()}"
    noisy.save(path, fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = sha(path)
    msg = error_message(path)
    assert "reference 2" in msg and "truncated" in msg and "re-export" in msg
    assert sha(path) == before


def test_empty_path_string():
    msg = error_message("")
    assert "reference 2" in msg and "no file path" in msg


@pytest.mark.parametrize(
    "source",
    [Image.new("RGB", (0, 4)), np.zeros((0, 4, 3), np.uint8), torch.zeros(1, 4, 0, 3)],
    ids=["pil", "numpy", "tensor"],
)
def test_zero_pixel_images(source):
    msg = error_message(source)
    assert "reference 2" in msg and "no pixels" in msg


def test_bad_array_shape_names_shape_and_accepted_shapes():
    msg = error_message(np.zeros((4, 4, 2), np.uint8))
    assert "reference 2" in msg and "(4, 4, 2)" in msg and "HxWx3" in msg


def test_bad_array_dtype():
    msg = error_message(np.zeros((4, 4, 3), np.int64))
    assert "reference 2" in msg and "int64" in msg and "uint8" in msg


def test_channels_first_tensor_is_rejected_with_accepted_shapes():
    msg = error_message(torch.zeros(1, 3, 16, 16))
    assert "reference 2" in msg and "(3, 16, 16)" in msg and "[H,W,C]" in msg


def test_integer_tensor_is_rejected():
    msg = error_message(torch.zeros(1, 4, 4, 3, dtype=torch.uint8))
    assert "reference 2" in msg and "torch.uint8" in msg and "float" in msg


@pytest.mark.parametrize(
    "source",
    [
        np.full((2, 2, 3), np.nan, np.float32),
        torch.full((1, 2, 2, 3), float("inf")),
        Image.fromarray(np.full((2, 2), np.nan, np.float32), "F"),
    ],
    ids=["numpy-nan", "tensor-inf", "pil-F-nan"],
)
def test_nan_and_inf_are_rejected(source):
    msg = error_message(source)
    assert "reference 2" in msg and "NaN" in msg


def test_batch_given_to_load_image_points_to_split_image_batch():
    msg = error_message(torch.zeros(2, 4, 4, 3))
    assert "reference 2" in msg and "split_image_batch" in msg and "2 images" in msg


def test_empty_batch():
    assert "empty" in error_message(torch.zeros(0, 4, 4, 3))
    assert "empty" in error_message(torch.zeros(0, 4, 4, 3), fn=split_image_batch)


@pytest.mark.parametrize("source", [42, b"/x/y.png", None, [1, 2, 3]], ids=["int", "bytes", "none", "list"])
def test_unsupported_type(source):
    msg = error_message(source)
    assert "reference 2" in msg and "file path" in msg and "tensor" in msg


def test_split_image_batch_names_the_bad_image():
    batch = torch.zeros(3, 2, 2, 3)
    batch[1, 0, 0, 0] = float("nan")
    msg = error_message(batch, name="style refs", fn=split_image_batch)
    assert "style refs" in msg and "image 2 of 3" in msg and "NaN" in msg


def test_split_image_batch_rejects_non_tensor():
    msg = error_message(np.zeros((1, 2, 2, 3), np.float32), fn=split_image_batch)
    assert "reference 2" in msg and "IMAGE tensor" in msg


def test_pil_to_comfy_different_sizes():
    with pytest.raises(UniRefError) as info:
        pil_to_comfy([Image.new("RGB", (4, 4)), Image.new("RGB", (8, 4))])
    msg = str(info.value)
    assert "4x4" in msg and "8x4" in msg and "resize" in msg


def test_pil_to_comfy_empty_list():
    with pytest.raises(UniRefError, match="at least one image"):
        pil_to_comfy([])
