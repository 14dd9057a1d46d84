"""Cancel acts inside a step: before the next transformer block, text-encoder layer or VAE stage (per tile), and the
pipeline runs as before afterwards. The CLI's Ctrl-C takes the same path. (Through a real host:
tests/test_comfy_nodes.py; the latency figures: bench/bench_cancel.py.)"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import SLOW_LAYERS, make_refs

from uniref_core import UniRefCancelled, UniRefPipeline
from uniref_core.cancel import blocks_of

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "put the object from Picture 1 on the left"


@pytest.fixture(scope="module")
def slow_pipe(slow_model):
    return UniRefPipeline.from_pretrained(slow_model)


@pytest.fixture
def block_runs(slow_pipe):
    """Transformer blocks run so far (each appends once it has run)."""
    runs = []
    blocks = slow_pipe.c.transformer.transformer_blocks
    handles = [b.register_forward_hook(lambda m, args, out: runs.append(1)) for b in blocks]
    yield runs
    for h in handles:
        h.remove()


def no_pre_hooks(*modules) -> bool:
    return all(not m._forward_pre_hooks for net in modules for m in net.modules())


@pytest.mark.parametrize("step, block", [(1, 5), (2, 1), (3, SLOW_LAYERS - 1)])
def test_a_cancel_inside_a_step_stops_before_its_next_block(slow_pipe, block_runs, step, block):
    cond = slow_pipe.encode(make_refs([(96, 64)]), PROMPT, cfg=1.0, budget=64 * 64, width=64, height=64)
    stop_after = (step - 1) * SLOW_LAYERS + block
    with pytest.raises(UniRefCancelled, match=f"cancelled in step {step} of 4"):
        slow_pipe.sample(cond, steps=4, cfg=1.0, is_cancelled=lambda: len(block_runs) >= stop_after)
    assert len(block_runs) == stop_after  # not one block more: the step did not finish
    assert no_pre_hooks(slow_pipe.c.transformer)


def test_after_a_cancel_the_pipeline_gives_what_a_fresh_one_gives(slow_pipe, slow_model, block_runs):
    refs = make_refs([(96, 64)])
    with pytest.raises(UniRefCancelled):
        slow_pipe.edit(refs, PROMPT, steps=3, cfg=2.0, budget=64 * 64, width=64, height=64, is_cancelled=lambda: True)
    with pytest.raises(UniRefCancelled):
        cond = slow_pipe.encode(refs, PROMPT, cfg=2.0, budget=64 * 64, width=64, height=64)
        slow_pipe.sample(cond, steps=3, cfg=2.0, is_cancelled=lambda: len(block_runs) >= SLOW_LAYERS + 3)
    assert no_pre_hooks(slow_pipe.c.transformer, slow_pipe.c.vae, slow_pipe.c.text_encoder)
    again = slow_pipe.edit(refs, PROMPT, steps=3, cfg=2.0, seed=7, budget=64 * 64, width=64, height=64)
    fresh = UniRefPipeline.from_pretrained(slow_model).edit(
        refs, PROMPT, steps=3, cfg=2.0, seed=7, budget=64 * 64, width=64, height=64
    )
    assert torch.equal(again.latents, fresh.latents)
    assert again.images[0].tobytes() == fresh.images[0].tobytes()


def test_checks_are_installed_only_while_a_cancellable_run_goes(slow_pipe):
    cond = slow_pipe.encode(make_refs([(96, 64)]), PROMPT, cfg=1.0, budget=64 * 64, width=64, height=64)
    block = slow_pipe.c.transformer.transformer_blocks[0]
    seen = []
    handle = block.register_forward_hook(lambda m, args, out: seen.append(len(m._forward_pre_hooks)))
    try:
        slow_pipe.sample(cond, steps=2, cfg=1.0)
        slow_pipe.sample(cond, steps=2, cfg=1.0, is_cancelled=lambda: False)
    finally:
        handle.remove()
    assert seen == [0, 0, 1, 1]
    assert no_pre_hooks(slow_pipe.c.transformer)


def test_a_cancel_while_encoding_stops_inside_the_text_encoder(slow_pipe, block_runs):
    layers = [m for m in blocks_of(slow_pipe.c.text_encoder) if type(m).__name__.endswith("DecoderLayer")]
    assert len(layers) >= 2
    ran = []
    handles = [m.register_forward_hook(lambda m, args, out: ran.append(1)) for m in layers]
    try:
        with pytest.raises(UniRefCancelled, match="while encoding the prompt"):
            refs = make_refs([(96, 64)])
            slow_pipe.encode(refs, PROMPT, budget=64 * 64, width=64, height=64, is_cancelled=lambda: len(ran) >= 1)
    finally:
        for h in handles:
            h.remove()
    assert len(ran) == 1  # the prompt's pass ended after its first layer
    assert not block_runs
    assert no_pre_hooks(slow_pipe.c.text_encoder)


def test_a_cancel_while_decoding_stops_between_tiles(slow_pipe):
    vae = slow_pipe.c.vae
    sizes = vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_sample_stride_height
    vae.tile_sample_min_height = vae.tile_sample_min_width = 64  # 9 small tiles over 128² instead of 1
    vae.tile_sample_stride_height = vae.tile_sample_stride_width = 48
    tiles = []
    handle = vae.decoder.register_forward_hook(lambda m, args, out: tiles.append(1))
    slow_pipe.vae_tiling = "on"
    try:
        latents = torch.randn(1, 64, 64)
        slow_pipe.decode(latents, 128, 128)
        assert len(tiles) == 9
        tiles.clear()
        with pytest.raises(UniRefCancelled, match="while decoding the image"):
            slow_pipe.decode(latents, 128, 128, is_cancelled=lambda: len(tiles) >= 2)
        assert len(tiles) == 2
        assert not vae.use_tiling and no_pre_hooks(vae)
    finally:
        handle.remove()
        slow_pipe.vae_tiling = "auto"
        vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_sample_stride_height = sizes
        vae.tile_sample_stride_width = sizes[2]


class StderrTimes:
    """A child's stderr read as it comes, each chunk with the time it arrived."""

    def __init__(self, stream):
        self.chunks, self._stream = [], stream
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while chunk := os.read(self._stream.fileno(), 4096):
            self.chunks.append((time.monotonic(), chunk.decode(errors="replace")))

    def text(self) -> str:
        return "".join(c for _, c in self.chunks)

    def when(self, pattern: str, timeout: float = 300) -> float:
        """The arrival time of the first chunk that completes a match of ``pattern``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = ""
            for t, chunk in list(self.chunks):
                text += chunk
                if re.search(pattern, text):
                    return t
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not seen in: {self.text()[-2000:]}")


def test_ctrl_c_in_the_cli_cancels_within_a_fraction_of_a_step(slow_model, tmp_path):
    out = tmp_path / "out.png"
    args = ["edit", "--model", slow_model, "--ref", ROOT / "assets" / "ref_red_circle.png", "--prompt", PROMPT]
    args += ["--width", "768", "--height", "768", "--budget", "128", "--steps", "4", "--cfg", "1", "-o", out]
    proc = subprocess.Popen(
        [sys.executable, "-m", "uniref_core", *map(str, args)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        err = StderrTimes(proc.stderr)
        one, two = err.when(r"\b1/4\b"), err.when(r"\b2/4\b")
        step = two - one
        time.sleep(0.3 * step)
        asked = time.monotonic()
        proc.send_signal(signal.SIGINT)
        done = err.when("cancelled in step 3 of 4")
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    assert done - asked < 0.35 * step, f"{done - asked:.2f} s after Ctrl-C, one step takes {step:.2f} s"
    assert not out.exists()
