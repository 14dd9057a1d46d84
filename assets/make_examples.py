"""Draw the example references shipped with the pack (run once; the PNGs are committed).

This folder is not named examples/: ComfyUI serves the first of examples/, workflows/ … as the
pack's template folder, and our workflows live in workflows/."""

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def main() -> None:
    obj1 = Image.new("RGB", (320, 240), (235, 235, 225))
    ImageDraw.Draw(obj1).ellipse((100, 60, 220, 180), fill=(210, 40, 40))
    obj1.save(HERE / "ref_red_circle.png")

    obj2 = Image.new("RGB", (256, 256), (225, 235, 235))
    ImageDraw.Draw(obj2).rectangle((78, 78, 178, 178), fill=(40, 70, 200))
    obj2.save(HERE / "ref_blue_square.png")

    bg = Image.new("RGB", (480, 270), (120, 180, 230))
    d = ImageDraw.Draw(bg)
    d.rectangle((0, 180, 480, 270), fill=(90, 160, 80))
    d.ellipse((380, 20, 440, 80), fill=(250, 220, 90))
    bg.save(HERE / "ref_background.png")


if __name__ == "__main__":
    main()
