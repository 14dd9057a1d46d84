"""Sizes the device cannot hold are refused before any network runs, naming the largest that fits (uniref_core/memory).

What a user sees: an output or budget too large for the free memory ends at once with one message naming what to
lower and to what; that size then passes the same check and one token more does not; the CLI prints it as its one-line
error and SELF Encode raises it as a node error. The estimate is checked against one measured decode here (the sizes
and ratios of a fuller calibration: bench/bench_run_memory.py). The free memory is injected
(``UNIREF_MEMORY_AVAILABLE``), so nothing large runs.
"""

import copy
import ctypes
import os
import re
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import test_node_inputs
import torch
from conftest import make_refs

from uniref_core import memory
from uniref_core.__main__ import main
from uniref_core.errors import UniRefError
from uniref_core.pipeline import UniRefPipeline

nodes = test_node_inputs.nodes  # the node module over stand-in ComfyUI modules
PROMPT = "put the cat of Picture 1 on the sofa of Picture 2"
MiB = 2**20
LARGEST_OUTPUT = re.compile(r"the largest output that fits is (\d+)×(\d+)")
LARGEST_BUDGET = re.compile(r"the largest budget that fits is (\d+)²")


@pytest.fixture
def available(monkeypatch):
    """Pretend the device has this many bytes free."""

    def set_available(n: int) -> int:
        monkeypatch.setenv(memory.AVAILABLE_ENV, str(n))
        return n

    return set_available


def whole_run(pipe, plan, cfg=4.0):
    """The options ``encode`` checks with (the whole run of one image)."""
    return dict(phases=memory.PHASES, prompt_bytes=len(PROMPT.encode()), num_images=1, cfg=cfg)


def refusal(pipe, plan, **options) -> str:
    with pytest.raises(UniRefError) as err:
        pipe.check_memory(plan, **options)
    return str(err.value)


def test_a_too_large_output_is_refused_before_any_network_runs(pipe, available):
    refs = make_refs([(96, 64), (64, 64)])
    plan = pipe.plan(refs, budget=128 * 128, width=2048, height=1024)
    avail = available(pipe.memory_estimate(plan, **whole_run(pipe, plan)).peak // 3)
    ran = []
    hooks = [m.register_forward_pre_hook(lambda *a: ran.append(1)) for m in (pipe.c.text_encoder, pipe.c.vae)]
    try:
        with pytest.raises(UniRefError) as err:
            pipe.encode(refs, PROMPT, cfg=4.0, budget=128 * 128, width=2048, height=1024)
    finally:
        for h in hooks:
            h.remove()
    message = str(err.value)
    assert not ran, "the text encoder or VAE ran before the refusal"
    assert message.startswith("output 2048×1024 with 2 reference(s)")
    assert f"but {memory.gib(avail)} is free on cpu" in message
    assert "lower width/height" in message and "UNIREF_MEMORY_CHECK=0" in message


def test_the_largest_output_named_fits_and_one_token_more_does_not(pipe, available):
    plan = pipe.plan(make_refs([(64, 64)]), budget=64 * 64, width=3072, height=1536)
    options = whole_run(pipe, plan)
    available(pipe.memory_estimate(plan, **options).peak // 5)
    w, h = map(int, LARGEST_OUTPUT.search(refusal(pipe, plan, **options)).groups())
    t = pipe.token_px
    assert w % t == 0 and h % t == 0 and abs(w / h - 2) <= t / h  # the same aspect ratio, in whole tokens
    pipe.check_memory(replace(plan, output=(w, h)), **options)  # passes
    one_more = memory.output_at(3072, 1536, w // t + 1, t)  # the next size of that aspect ratio
    assert LARGEST_OUTPUT.search(refusal(pipe, replace(plan, output=one_more), **options))


def test_references_too_large_for_the_memory_name_the_largest_budget(pipe, available):
    refs = make_refs([(512, 512), (512, 384)])
    plan = pipe.plan(refs, budget=1024 * 1024, width=64, height=64)
    options = whole_run(pipe, plan)
    available(pipe.memory_estimate(plan, **options).peak // 3)
    side = int(LARGEST_BUDGET.search(refusal(pipe, plan, **options)).group(1))
    pipe.check_memory(pipe.plan(refs, budget=side * side, width=64, height=64), **options)
    step = 2 * pipe.token_px  # the planner's rounding of reference sides
    with pytest.raises(UniRefError):
        pipe.check_memory(pipe.plan(refs, budget=(side + step) ** 2, width=64, height=64), **options)


def test_several_images_are_counted_and_fewer_suggested(pipe, available):
    plan = pipe.plan(make_refs([(64, 64)]), budget=64 * 64, width=512, height=512)
    one = pipe.memory_estimate(plan, phases=("decoding",), num_images=1).peak
    available(int(2.5 * one * memory.CPU_HEAP_SLACK))
    message = refusal(pipe, plan, phases=("decoding",), num_images=4)
    assert "× 4 images" in message and "make 2 images per run instead of 4" in message


def test_the_override_lets_a_run_start(pipe, available, monkeypatch):
    plan = pipe.plan(make_refs([(64, 64)]), budget=64 * 64, width=1024, height=1024)
    available(1)
    monkeypatch.setenv(memory.CHECK_ENV, "0")
    pipe.check_memory(plan, **whole_run(pipe, plan))


def test_the_cli_prints_the_refusal_as_its_one_line_error(pipe, tiny_model, tmp_path, capsys, available, monkeypatch):
    available(64 * MiB)
    # The session's model instead of a second load (seconds): the CLI's own path from there on.
    monkeypatch.setattr(UniRefPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: cls(pipe.c)))
    ref = tmp_path / "ref.png"
    make_refs([(64, 64)])[0].save(ref)
    argv = ["edit", "--model", str(tiny_model), "--ref", str(ref), "--prompt", PROMPT, "-o", str(tmp_path / "o.png")]
    assert main([*argv, "--width", "2048", "--height", "2048", "--budget", "64", "--quiet"]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the weights' loading bar
    assert last.startswith("error: output 2048×2048 with 1 reference(s)") and LARGEST_OUTPUT.search(last)
    assert "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_self_encode_raises_it_as_a_node_error(nodes, pipe, available):
    import importlib

    available(64 * MiB)
    model = mock.MagicMock()  # the engine as the pack imports it, so its error is the node module's UniRefError
    engine = importlib.import_module(nodes.__name__.rsplit(".", 2)[0] + ".uniref_core.pipeline")
    model.load.return_value = engine.UniRefPipeline(pipe.c)
    with pytest.raises(nodes.UniRefError, match=r"output 2048×2048 .* the largest output that fits is"):
        nodes.SelfEncode.execute(
            model, make_refs([(64, 64)]), PROMPT, budget="custom", custom_budget=64, width=2048, height=2048
        )


def test_a_host_that_loads_the_transformer_later_checks_only_the_encoding_at_encode(pipe, available):
    # ComfyUI: SELF Encode runs with the transformer still off the device; the sampler node checks the rest.
    import dataclasses

    elsewhere = UniRefPipeline(dataclasses.replace(pipe.c, transformer=copy.deepcopy(pipe.c.transformer).to("meta")))
    refs = make_refs([(64, 64)])
    plan = pipe.plan(refs, budget=64 * 64, width=2048, height=1024)
    encoding = pipe.memory_estimate(plan, phases=("prompt", "references"), prompt_bytes=len(PROMPT.encode()), cfg=2.0)
    available(memory.required(encoding, "cpu") + 16 * MiB)  # too little for the decode, enough to encode
    with pytest.raises(UniRefError, match="to decode the image"):
        pipe.encode(refs, PROMPT, cfg=2.0, budget=64 * 64, width=2048, height=1024)
    cond = elsewhere.encode(refs, PROMPT, cfg=2.0, budget=64 * 64, width=2048, height=1024)
    assert cond.plan.output == (2048, 1024)


def test_the_sampler_node_asks_comfyui_to_free_what_the_run_needs(nodes, pipe):
    import importlib

    engine = importlib.import_module(nodes.__name__.rsplit(".", 2)[0] + ".uniref_core.pipeline")
    ours = engine.UniRefPipeline(pipe.c)
    cond = ours.encode(make_refs([(64, 64)]), PROMPT, cfg=2.0, budget=64 * 64, width=256, height=128)
    model = mock.MagicMock(pipe=ours)
    model.load.side_effect = RuntimeError("stop before sampling")
    device = nodes.mm.get_torch_device.return_value = torch.device("cpu")
    with pytest.raises(RuntimeError, match="stop before sampling"):
        nodes.UniRefSampler.execute(model, cond, seed=0, steps=2, cfg=2.0, sampler="ode", denoise=1.0)
    options = engine.SamplingOptions(steps=2, cfg=2.0)
    expected = ours.memory_required(
        cond.plan, device, phases=("sampling", "decoding"), text_tokens=cond.positive.embeds.shape[1], cfg=2.0
    )
    assert model.load.call_args.kwargs["memory_required"] == expected == ours.sample_memory_required(cond, options)


def _status(key: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) * 1024


def _measured_decode(pipe, size: int) -> int:
    """The growth of a forked copy of this process over one ``size``² decode, measured as bench/bench_run_memory.py
    measures (glibc told to return what is freed, so a long-lived heap's slack is not counted: that is
    memory.CPU_HEAP_SLACK's)."""
    latents = torch.randn(1, (size // pipe.token_px) ** 2, 64)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, exit without running pytest's teardown
        try:
            ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 65536)
            torch.set_num_threads(1)  # the parent's thread pool does not survive a fork
            pipe.decode(latents[:, :4], 2 * pipe.token_px, 2 * pipe.token_px)  # code pages: not the run's
            open("/proc/self/clear_refs", "w").write("5")
            start = _status("VmRSS")
            pipe.decode(latents, size, size)
            os.write(write, str(_status("VmHWM") - start).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        measured = f.read()
    os.waitpid(pid, 0)
    return int(measured)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux: the peak is read from /proc")
def test_the_estimate_is_above_a_measured_decode_and_within_1_5x(pipe):
    # A 512² decode: the largest phase of a run at that size on this model (bench/README.md has the others).
    size = 512
    measured = _measured_decode(pipe, size)
    plan = pipe.plan(make_refs([(64, 64)]), budget=64 * 64, width=size, height=size)
    estimate = pipe.memory_estimate(plan, phases=("decoding",)).peak
    assert measured <= estimate <= 1.5 * measured, f"estimate {estimate / MiB:.0f} MiB, measured {measured / MiB:.0f}"


def test_cpu_room_is_the_lower_of_memavailable_and_the_cgroup_limit(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 64000000 kB\nMemAvailable: 8000000 kB\n")
    (proc / "self" / "cgroup").write_text("0::/job\n")
    (cg / "job").mkdir(parents=True)
    (cg / "job" / "memory.max").write_text(f"{4 * 2**30}\n")
    (cg / "job" / "memory.current").write_text(f"{3 * 2**30}\n")
    (cg / "job" / "memory.stat").write_text(f"anon 1\ninactive_file {2**29}\n")  # reclaimable: not used
    assert memory.cpu_available_bytes(str(proc), str(cg)) == 2**30 + 2**29
    (cg / "job" / "memory.max").write_text("max\n")
    assert memory.cpu_available_bytes(str(proc), str(cg)) == 8000000 * 1024
    # cgroup v1: the memory controller's own hierarchy.
    (proc / "self" / "cgroup").write_text("4:memory:/job\n1:cpu:/\n")
    (cg / "memory" / "job").mkdir(parents=True)
    (cg / "memory" / "job" / "memory.limit_in_bytes").write_text(f"{2**30}\n")
    (cg / "memory" / "job" / "memory.usage_in_bytes").write_text(f"{2**29}\n")
    assert memory.cpu_available_bytes(str(proc), str(cg)) == 2**29


def test_cuda_room_counts_what_torchs_cache_holds_unused(monkeypatch):
    monkeypatch.delenv(memory.AVAILABLE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 6 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4 * 2**30)
    assert memory.available_bytes("cuda:0") == 12 * 2**30


def test_a_bad_override_names_the_variable(monkeypatch):
    monkeypatch.setenv(memory.AVAILABLE_ENV, "lots")
    with pytest.raises(UniRefError, match="UNIREF_MEMORY_AVAILABLE is 'lots'"):
        memory.available_bytes("cpu")
    assert memory.parse_bytes("1.5GiB") == 3 * 2**29 and memory.parse_bytes("512m") == 512 * MiB
