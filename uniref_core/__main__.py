"""Command line: ``python -m uniref_core {edit,plan,make-tiny-model} ...``.

Every bad input ends with one line naming the input and the fix (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .budget import MODES, PER_IMAGE_AREA, TOKEN_PX, parse_area
from .errors import UniRefCancelled, UniRefError
from .tiny import FAMILIES

SAVE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def _area(text: str) -> int:
    try:
        return parse_area(text)
    except UniRefError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uniref_core", description="UniRef multi-reference image editing")
    sub = p.add_subparsers(dest="command", required=True)

    def size_options(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--ref", action="append", default=[], metavar="IMAGE", help="reference image (repeat; order = Picture k)"
        )
        q.add_argument(
            "--mode",
            choices=MODES,
            default="budget",
            help="budget: SELF, all references within --budget; per_image: each at ~1024² (diffusers behaviour)",
        )
        q.add_argument(
            "--budget",
            type=_area,
            default=None,
            help="total reference pixels: 1024, 1536, 2048 (squared) or WxH (default: the model's, else 1024)",
        )
        q.add_argument("--per-image-area", type=_area, default=PER_IMAGE_AREA, help=argparse.SUPPRESS)
        q.add_argument(
            "--vl-budget",
            type=_area,
            default=None,
            help="total area of the VL encoder's copies (default: the model's, else 384² each)",
        )
        q.add_argument(
            "--no-upscale", action="store_true", help="never enlarge references smaller than their share of the budget"
        )
        q.add_argument(
            "--width", type=int, help="output width (a multiple of the model's token size: 16 px for Qwen-Image-Edit)"
        )
        q.add_argument("--height", type=int, help="output height (a multiple of the model's token size)")
        q.add_argument(
            "--match-ref", type=int, default=1, metavar="K", help="output takes reference K's aspect ratio (default 1)"
        )
        q.add_argument(
            "--output-area",
            type=_area,
            default=None,
            help="output area when matching a reference (default: the model's, else 1024)",
        )

    e = sub.add_parser("edit", help="edit / compose references with an instruction")
    e.add_argument(
        "--model",
        help="diffusers-format model folder, or a built-in model: uniref-default (the default), "
        "uniref-default-sft (the same before MSGRPO)",
    )
    e.add_argument(
        "--diffusion-model",
        metavar="FILE",
        help="instead of --model: a ComfyUI single-file diffusion model "
        "(bf16/fp16/fp32 or fp8; with --text-encoder, --vae and --tokenizer)",
    )
    e.add_argument("--text-encoder", metavar="FILE", help="ComfyUI single-file Qwen2.5-VL text encoder")
    e.add_argument("--vae", metavar="FILE", help="ComfyUI single-file Qwen-Image VAE")
    e.add_argument(
        "--tokenizer", metavar="DIR", help="Qwen2.5 tokenizer folder (ComfyUI's: comfy/text_encoders/qwen25_tokenizer)"
    )
    size_options(e)
    e.add_argument(
        "--prompt", required=True, help="the instruction, e.g. 'put the cat from Picture 1 on the sofa of Picture 2'"
    )
    e.add_argument("--negative-prompt", default=None, help="what to avoid (used when --cfg > 1; default ' ')")
    e.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, else 30)")
    e.add_argument(
        "--cfg", type=float, default=None, help="true-CFG scale; 1 turns guidance off (default: the model's, else 4)"
    )
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--num-images", type=int, default=1, help="images with seeds S, S+1, …")
    e.add_argument("--sampler", choices=("ode", "sde"), default="ode")
    e.add_argument("--eta", type=float, default=0.7, help="SDE noise level")
    e.add_argument("--denoise", type=float, default=1.0, help="< 1 starts from --init")
    e.add_argument("--init", default=None, help="init image for --denoise < 1")
    e.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:STRENGTH]",
        help="a LoRA .safetensors file (peft/diffusers, kohya or ComfyUI keys) at a strength (default 1); "
        "repeat for several",
    )
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if present)")
    e.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    e.add_argument(
        "--offload",
        default="none",
        choices=("none", "model", "blocks"),
        help="model: only one of the text encoder and the transformer on the device at a time (for GPUs "
        "that hold the transformer alone); blocks: keep both in CPU memory and move each block to the "
        "device only while it runs (for GPUs smaller than the transformer; slower)",
    )
    e.add_argument(
        "--vae-tiling",
        default="auto",
        choices=("auto", "on", "off"),
        help="encode and decode images in 256 px tiles (diffusers' tiled VAE: far less memory for large "
        "images, slightly different pixels); auto: only images above 2 MP (default)",
    )
    e.add_argument("-o", "--output", required=True, help="output image path (.png/.jpg/.webp)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")

    pl = sub.add_parser("plan", help="print the SELF allocation without loading a model")
    pl.add_argument(
        "--model",
        help="plan with this model folder's token size and defaults (its configs are read, "
        "no weights); without it: 16 px tokens, as every Qwen-Image-Edit checkpoint",
    )
    size_options(pl)
    pl.add_argument("--json", action="store_true", help="print JSON")

    t = sub.add_parser("make-tiny-model", help="build a tiny random model of the architecture (tests, examples)")
    t.add_argument("dir")
    t.add_argument(
        "--family",
        choices=FAMILIES,
        default="edit",
        help="edit: Qwen-Image-Edit-2509/2511 (default); qwen21: Qwen-Image 2.1",
    )
    t.add_argument("--zero-cond-t", action="store_true", help="like Qwen-Image-Edit-2511 (edit only)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--vae-scale",
        type=int,
        choices=(4, 8),
        help="edit only: 8 (default) like real checkpoints (16 px tokens); 4 gives 8 px tokens",
    )
    return p


def output_paths(output: str, n: int) -> list[Path]:
    """``out.png`` for one image; ``out-1.png … out-N.png`` for several. Checked before any model runs."""
    path = Path(output).expanduser()
    if path.suffix.lower() not in SAVE_SUFFIXES:
        raise UniRefError(f"output {path} has no image extension: end it in {', '.join(sorted(SAVE_SUFFIXES))}")
    if path.is_dir():
        raise UniRefError(f"output {path} is a folder: give a file name such as {path / 'out.png'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UniRefError(f"output folder {parent} does not exist: create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise UniRefError(f"output folder {parent} is not writable: choose another path")
    for p in [path] if n == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, n + 1)]:
        if p.exists() and not os.access(p, os.W_OK):
            raise UniRefError(f"output {p} exists and is not writable: choose another path")
    return [path] if n == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, n + 1)]


def check_outputs_are_not_inputs(paths: list[Path], inputs: list[tuple[str, str]]) -> None:
    """Refuse an output that is one of the input files (``(what, path)`` pairs): saving would overwrite it."""
    for out in paths:
        for what, source in inputs:
            if _same_file(out, Path(source).expanduser()):
                raise UniRefError(
                    f"-o/--output {out} is {what} ({source}): saving would overwrite it; choose another output path"
                )


def _same_file(path: Path, other: Path) -> bool:
    """The same path, or two names (links) of one file."""
    if path.exists() and other.exists():
        return os.path.samefile(path, other)
    return path.resolve() == other.resolve()


def _fill_defaults(a, model_defaults: dict, references: int) -> None:
    """Options left unset take the model folder's defaults for ``references`` references (uniref.json), else the
    built-in ones."""
    from .pipeline import BUILTIN_DEFAULTS, resolve_setting

    for name in BUILTIN_DEFAULTS:
        if hasattr(a, name):
            setattr(a, name, resolve_setting(name, getattr(a, name), model_defaults, references))


def _size_kwargs(a) -> dict:
    return {
        "mode": a.mode,
        "budget": a.budget,
        "upscale": not a.no_upscale,
        "per_image_area": a.per_image_area,
        "vl_budget": a.vl_budget,
        "width": a.width,
        "height": a.height,
        "match_ref": a.match_ref,
        "output_area": a.output_area,
    }


def cmd_plan(a) -> int:
    from .budget import plan_references
    from .images import load_image

    if not a.ref:
        raise UniRefError("no reference images: pass at least one --ref IMAGE")
    sizes = [load_image(r, name=f"reference {k} ({r})").size for k, r in enumerate(a.ref, start=1)]
    token_px = TOKEN_PX
    defaults = {}
    if a.model:
        from .defaults import resolve_model_arg
        from .model import check_model_folder, read_defaults, token_px_of

        a.model = resolve_model_arg(a.model)
        check_model_folder(a.model)
        token_px, defaults = token_px_of(a.model), read_defaults(a.model)
    _fill_defaults(a, defaults, len(sizes))
    plan = plan_references(sizes, token_px=token_px, **_size_kwargs(a))
    if a.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    head = f"mode {plan.mode}" + (f", budget {plan.budget} px" if plan.budget else "") + f", {plan.token_px} px tokens"
    print(head)
    for r in plan.references:
        print(
            f"  Picture {r.index}: {r.source[0]}×{r.source[1]} → {r.vae[0]}×{r.vae[1]} px, {r.tokens} tokens; "
            f"VL copy {r.vl[0]}×{r.vl[1]}, ~{r.vl_tokens} tokens"
        )
    print(f"  output {plan.output[0]}×{plan.output[1]} px, {plan.output_tokens} tokens")
    print(
        f"  reference tokens {plan.reference_tokens}, VL tokens {plan.vl_tokens}, "
        f"image sequence {plan.sequence_length} tokens"
    )
    return 0


def cmd_edit(a) -> int:
    import torch

    from .cancel import check_cancel
    from .defaults import resolve_model_arg
    from .images import load_image, save_image
    from .model import resolve_dtype
    from .pipeline import SamplingOptions, UniRefPipeline

    if not a.ref:
        raise UniRefError("no reference images: pass at least one --ref IMAGE")
    from .pipeline import MAX_IMAGES

    if not 1 <= a.num_images <= MAX_IMAGES:  # before output_paths lists a file name per image
        raise UniRefError(
            f"--num-images is {a.num_images}: it must be between 1 and {MAX_IMAGES}; make fewer images per run"
        )
    paths = output_paths(a.output, a.num_images)
    from .prompt import check_prompt_text

    check_prompt_text(a.prompt, "--prompt")
    if a.negative_prompt is not None:
        check_prompt_text(a.negative_prompt, "--negative-prompt")
    inputs = [(f"reference {k} (--ref)", r) for k, r in enumerate(a.ref, start=1)]
    check_outputs_are_not_inputs(paths, inputs + ([("the init image (--init)", a.init)] if a.init else []))
    # Read every input before the (slow) model load so a typo fails in a second.
    refs = [load_image(r, name=f"reference {k} ({r})") for k, r in enumerate(a.ref, start=1)]
    init = load_image(a.init, name=f"init image ({a.init})") if a.init else None
    from .lora import parse_lora_arg, read_lora

    loras = [(read_lora(p), s) for p, s in map(parse_lora_arg, a.lora)]
    from .budget import plan_references
    from .model import check_model_folder, read_defaults, token_px_of

    files = {
        "--diffusion-model": a.diffusion_model,
        "--text-encoder": a.text_encoder,
        "--vae": a.vae,
        "--tokenizer": a.tokenizer,
    }
    single = any(files.values())
    if single:
        missing = [k for k, v in files.items() if not v]
        if missing or a.model:
            raise UniRefError(
                "single files need all of --diffusion-model, --text-encoder, --vae and --tokenizer, and "
                + (f"no --model (got {a.model})" if a.model else f"{', '.join(missing)} is missing")
            )
        model = a.diffusion_model
        token_px = 16  # Qwen-Image's 8x VAE and 2x2 patches: the only layout its single files come in
        _fill_defaults(a, {}, len(refs))
    else:
        model = resolve_model_arg(a.model)
        check_model_folder(model)
        token_px = token_px_of(model)
        _fill_defaults(a, read_defaults(model), len(refs))
    plan_references([r.size for r in refs], token_px=token_px, **_size_kwargs(a))
    options = SamplingOptions(
        seed=a.seed, steps=a.steps, cfg=a.cfg, sampler=a.sampler, eta=a.eta, denoise=a.denoise, num_images=a.num_images
    )
    options.check(init)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(a.dtype, torch.device(device))  # the compute device's, also when loading to the CPU
    load_to = "cpu" if a.offload != "none" else device  # offloaded weights never visit the device all together
    if single:
        from .comfy_files import load_single_files

        pipe = UniRefPipeline(
            load_single_files(a.diffusion_model, a.text_encoder, a.vae, a.tokenizer, device=load_to, dtype=dtype)
        )
    else:
        pipe = UniRefPipeline.from_pretrained(model, device=load_to, dtype=dtype)
    if a.offload == "blocks":
        pipe.enable_block_offload(device)
    elif a.offload == "model":
        pipe.enable_model_offload(device)
    pipe.set_loras(loras)
    pipe.vae_tiling = a.vae_tiling

    bar = None
    if not a.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=a.steps, desc="denoising", unit="step", file=sys.stderr)

    def on_step(info) -> None:
        if bar is not None:
            bar.total = info.total
            bar.update(1)

    with ctrl_c_cancels() as is_cancelled:
        try:
            result = pipe.edit(
                refs,
                a.prompt,
                a.negative_prompt,
                options,
                init_image=init,
                on_step=on_step,
                is_cancelled=is_cancelled,
                **_size_kwargs(a),
            )
        finally:
            if bar is not None:
                bar.close()
        check_cancel(is_cancelled, "before saving")
    for img, p in zip(result.images, paths):
        save_image(img, p)
    with_loras = "".join(f" + LoRA {lw.name} at {s:g}" for lw, s in loras)
    print(f"{', '.join(str(p) for p in paths)}: {result.summary()}; model {model}{with_loras}")
    return 0


@contextmanager
def ctrl_c_cancels() -> Iterator[Callable[[], bool]]:
    """Inside, the first Ctrl-C asks the engine to stop before its next network block (`uniref_core.cancel`: within a
    fraction of a step, the run then ends as cancelled) and a second one stops at once; yields ``is_cancelled``."""
    asked = threading.Event()

    def on_ctrl_c(signum, frame) -> None:
        if asked.is_set():
            raise KeyboardInterrupt
        asked.set()
        print("\ncancelling (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    try:
        previous = signal.signal(signal.SIGINT, on_ctrl_c)
    except ValueError:  # not the main thread: Ctrl-C stays Python's KeyboardInterrupt
        yield asked.is_set
        return
    try:
        yield asked.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_make_tiny(a) -> int:
    from .tiny import VAE_4X, make_tiny_model

    if a.family == "qwen21":
        edit_only = [opt for opt, given in (("--zero-cond-t", a.zero_cond_t), ("--vae-scale", a.vae_scale)) if given]
        if edit_only:
            raise UniRefError(
                f"{' and '.join(edit_only)} {'is' if len(edit_only) == 1 else 'are'} for --family edit only: a "
                "Qwen-Image 2.1 model has a fixed 16x VAE and no zero_cond_t; leave them out"
            )
    vae = VAE_4X if a.vae_scale == 4 else None
    path = make_tiny_model(a.dir, zero_cond_t=a.zero_cond_t, seed=a.seed, vae=vae, family=a.family)
    print(f"tiny model written to {path}")
    return 0


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        return {"edit": cmd_edit, "plan": cmd_plan, "make-tiny-model": cmd_make_tiny}[a.command](a)
    except UniRefError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UniRefCancelled as e:
        print(f"cancelled: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
