"""The command line as a user types it: plan, edit, make-tiny-model, and what bad input prints."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uniref_core import UniRefPipeline
from uniref_core.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets"
REFS = [EXAMPLES / "ref_red_circle.png", EXAMPLES / "ref_blue_triangle.png", EXAMPLES / "ref_background.png"]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "uniref_core", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )


def test_plan_prints_each_reference_without_a_model(capsys):
    argv = ["plan", *sum((["--ref", str(r)] for r in REFS), []), "--budget", "512"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mode budget, budget 262144 px" in out
    assert "Picture 1: 96×96 →" in out and "Picture 3: 96×96 →" in out and "16 px tokens" in out
    assert "image sequence" in out
    assert main(argv + ["--json"]) == 0
    import json

    plan = json.loads(capsys.readouterr().out)
    assert len(plan["references"]) == 3
    assert plan["reference_tokens"] * 256 <= 512 * 512 + 16 * sum(
        r["width"] + r["height"] + 16 for r in plan["references"]
    )


def test_edit_writes_the_image_and_a_summary(tiny_model, tmp_path):
    out = tmp_path / "out.png"
    r = run_cli(
        "edit",
        "--model",
        tiny_model,
        *sum((["--ref", p] for p in REFS), []),
        "--prompt",
        "put the circle from Picture 1 left of the square from Picture 2 on Picture 3",
        "--budget",
        "256",
        "--width",
        "128",
        "--height",
        "96",
        "--steps",
        "3",
        "--seed",
        "4",
        "-o",
        out,
    )
    assert r.returncode == 0, r.stderr
    img = Image.open(out)
    assert img.size == (128, 96)
    assert "tokens/ref: ref1=" in r.stdout and "sequence" in r.stdout
    assert "denoising" in r.stderr  # the progress bar
    # Same as the library with the same inputs.
    pipe = UniRefPipeline.from_pretrained(tiny_model)
    lib = pipe.edit(
        [str(p) for p in REFS],
        "put the circle from Picture 1 left of the square from Picture 2 on Picture 3",
        budget=256 * 256,
        width=128,
        height=96,
        steps=3,
        seed=4,
    ).images[0]
    assert np.array_equal(np.asarray(img), np.asarray(lib))


def test_several_images_get_numbered_files(tiny_model, tmp_path):
    out = tmp_path / "many.png"
    code = main(
        [
            "edit",
            "--model",
            str(tiny_model),
            "--ref",
            str(REFS[0]),
            "--prompt",
            "recolour it",
            "--quiet",
            "--budget",
            "128",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--num-images",
            "2",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    assert (tmp_path / "many-1.png").is_file() and (tmp_path / "many-2.png").is_file()


def test_make_tiny_model(tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "m"), "--zero-cond-t"]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert '"zero_cond_t": true' in (tmp_path / "m" / "transformer" / "config.json").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ref", "missing.png"], "reference 1 (missing.png): file not found"),
        (["--ref", "{ref}", "--steps", "0"], "steps is 0"),
        (["--ref", "{ref}", "--cfg", "0"], "cfg is 0.0"),
        (["--ref", "{ref}", "--width", "100", "--height", "64"], "output width is 100 px"),
        (["--ref", "{ref}", "--denoise", "0.5"], "denoise < 1 needs an init image"),
        (["--ref", "{ref}", "-o", "/nonexistent-dir/out.png"], "output folder /nonexistent-dir does not exist"),
        (["--ref", "{ref}", "-o", "{tmp}/out.txt"], "has no image extension"),
        (["--ref", "{ref}", "--model", "{tmp}/no-model"], "model folder not found"),
        (["--ref", "{ref}", "--budget", "huge"], "is not a size"),
        (["--ref", "{ref}", "--seed", str(2**64)], "seed is 18446744073709551616: it must be between 0 and"),
        (["--ref", "{ref}", "--seed", "-1"], "seed is -1: it must be between 0 and 18446744073709551615"),
        (["--ref", "{ref}", "--num-images", str(10**30)], "--num-images is 10000000000000000000000000000"),
        (["--ref", "{ref}", "--prompt", "caf\udce9"], "--prompt is not valid UTF-8 text: character 4 is the byte"),
        (
            ["--ref", "{ref}", "--budget", "64", "--width", "64", "--height", "64", "--prompt", "red " * 5000],
            "prompt is too long: with the template and the references' vision tokens it makes 5",
        ),
        (["--ref", "{ref}", "--width", "140000", "--height", "16"], "make the output less long and thin (at most"),
        (["--ref", "{ref}", "--vl-budget", "100000x100000"], "vision tokens alone leave it no room: lower the VL"),
    ],
)
def test_bad_input_prints_one_line_naming_it(tiny_model, tmp_path, capsys, args, message):
    argv = ["edit", "--prompt", "x", "--model", str(tiny_model), "-o", str(tmp_path / "o.png"), "--quiet"]
    argv += [a.format(ref=REFS[0], tmp=tmp_path) for a in args]
    before = hashlib.sha256(REFS[0].read_bytes()).hexdigest()
    with pytest.raises(SystemExit) if "not a size" in message else _nullcontext():
        code = main(argv)
        assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "o.png").exists()
    assert hashlib.sha256(REFS[0].read_bytes()).hexdigest() == before


def test_a_prompt_in_another_encoding_is_one_line(tmp_path):
    # The bytes a Latin-1 terminal or file passes: Python's argv holds them as surrogates (surrogateescape).
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "uniref_core",
            "edit",
            "--ref",
            str(REFS[0]),
            "--prompt",
            b"caf\xe9",
            "--model",
            str(tmp_path / "none"),
            "-o",
            str(tmp_path / "o.png"),
        ],
        capture_output=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "LC_ALL": "C.UTF-8"},
        timeout=120,
    )
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err, err
    assert (
        err.strip() == "error: --prompt is not valid UTF-8 text: character 4 is the byte 0xe9 (text saved in "
        "another encoding, such as Latin-1?); give the prompt as UTF-8 text"
    )


def test_output_path_is_checked_before_the_model_loads(tmp_path, capsys):
    # A bad model AND a bad output: the output error comes first, without loading anything.
    code = main(
        [
            "edit",
            "--prompt",
            "x",
            "--ref",
            str(REFS[0]),
            "--model",
            str(tmp_path / "nope"),
            "-o",
            str(tmp_path / "missing" / "o.png"),
        ]
    )
    assert code == 2
    assert "output folder" in capsys.readouterr().err


def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tiny_model, tmp_path, capsys):
    refs = []
    for k, src in enumerate(REFS[:2], start=1):
        refs.append(tmp_path / f"ref{k}.png")
        refs[-1].write_bytes(src.read_bytes())
    (tmp_path / "link.png").symlink_to(refs[1])
    before = [hashlib.sha256(r.read_bytes()).hexdigest() for r in refs]
    for output in (refs[1], tmp_path / "link.png"):  # the same path, or another name of the same file
        code = main(
            [
                "edit",
                "--prompt",
                "x",
                "--model",
                str(tiny_model),
                "--ref",
                str(refs[0]),
                "--ref",
                str(refs[1]),
                "-o",
                str(output),
                "--quiet",
            ]
        )
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert (
            f"-o/--output {output} is reference 2 (--ref) ({refs[1]}): saving would overwrite it; choose another "
            "output path" in err
        )
    assert [hashlib.sha256(r.read_bytes()).hexdigest() for r in refs] == before


def test_a_failed_save_leaves_the_earlier_output_whole(tiny_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.png"
    out.write_bytes(REFS[0].read_bytes())  # an earlier result
    real_save = Image.Image.save

    def disk_full(self, fp, format=None, **kw):
        real_save(self, fp, format=format, **kw)
        fp.truncate(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    code = main(
        [
            "edit",
            "--prompt",
            "x",
            "--model",
            str(tiny_model),
            "--ref",
            str(REFS[0]),
            "--width",
            "64",
            "--height",
            "64",
            "--budget",
            "64",
            "--steps",
            "1",
            "-o",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert (
        f"error: output {out} could not be written (No space left on device): free some space or choose another "
        "path" in err
    )
    assert out.read_bytes() == REFS[0].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary file left


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
