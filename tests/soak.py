"""Soak a real ComfyUI host: many prompts in a row through /prompt, mixing good graphs, bad inputs, interrupts
and /free, on one 0.30.0 host with this pack and the built-in default model.

    with soak_host() as host:
        report = Soak(host, seed=0).run(60)
    assert not report.failures, report.summary()

After every prompt: the server answers and its queue is empty; a bad input's error carries the expected message
(ours, or the host's where the host itself checks the input) at the expected stage; a good graph's image is
pixel-equal to that graph's first run, which is made right after /free on a freshly loaded model (interrupted
prompts are not compared); an interrupt, sent once the sampler has reported a random step of the first half of a
longer run, ended the prompt as interrupted, and how soon is measured; the host's resident memory is read from /proc.
A host process that exits ends the soak at once, with its log tail. tests/test_soak.py runs a reduced count,
bench/bench_soak.py the full one.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from comfyhost import ComfyHost, output_images
from PIL import Image
from workflow_api import ui_to_api

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.30.0"
# The shipped workflows on the pack's loader (uniref_native_compose takes ComfyUI's single files, not this model).
WORKFLOWS = ("uniref_single_edit", "uniref_multi_compose")
# A second instruction per workflow, so the good graphs differ in their encoding too (None: the shipped one).
PROMPTS = {
    "uniref_single_edit": (None, "Make the background of Picture 1 darker."),
    "uniref_multi_compose": (None, "Put the object from Picture 2 on the left and Picture 1 on the right."),
}
PROBE = ROOT / "tests" / "host_shims" / "uniref_soak_probe"
NAN_LORA = "soak_nan.safetensors"
FAKE_IMAGE = "soak_not_an_image.png"
TRUNCATED_IMAGE = "soak_truncated.png"
# The memory after this many prompts (each kind of prompt among them) is what the end of a run is held to.
WARM_UP = 20
# Each kind's share of a run (Soak.plan).
KINDS = {"good": 0.45, "bad": 0.30, "interrupt": 0.15, "free": 0.10}
# Interrupted prompts: output side (the good graphs' is the model's default, 128²) and steps, so that the half of the
# run left after the interrupt is many times what /interrupt takes to reach the host.
INTERRUPT_SIDE = 256
TERMINAL = ("execution_success", "execution_error", "execution_interrupted")
POLL_S = 0.01


# ---------------------------------------------------------------- the graphs


def node_of(prompt: dict, class_type: str) -> dict:
    return next(n for n in prompt.values() if n["class_type"] == class_type)


def insert_lora(prompt: dict, lora_name: str, strength: float = 1.0) -> None:
    """A UniRef LoRA node between the loader and every node that took the loader's model."""
    load_id = next(k for k, n in prompt.items() if n["class_type"] == "UniRefLoadModel")
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if value == [load_id, 0]:
                node["inputs"][name] = ["soak_lora", 0]
    prompt["soak_lora"] = {
        "class_type": "UniRefLora",
        "inputs": {"model": [load_id, 0], "lora_name": lora_name, "strength": strength},
    }


@dataclass(frozen=True)
class BadInput:
    """One bad input: how it changes a good graph and what its error must say. ``stage``: "validation" (the
    host refuses the prompt at /prompt), "execution" (a node error while it runs) or "accepted" (the host makes
    do and the prompt gives an image); ``ours``: the message is the pack's (a UniRefError), not the host's own
    check."""

    name: str
    change: Callable[[dict], None]
    expected: str
    stage: str
    ours: bool


def _encode(**change) -> Callable[[dict], None]:
    return lambda p: node_of(p, "UniRefSelfEncode")["inputs"].update(change)


def _sampler(**change) -> Callable[[dict], None]:
    return lambda p: node_of(p, "UniRefSampler")["inputs"].update(change)


def _loader(**change) -> Callable[[dict], None]:
    return lambda p: node_of(p, "UniRefLoadModel")["inputs"].update(change)


def _first_image(name: str) -> Callable[[dict], None]:
    return lambda p: node_of(p, "LoadImage")["inputs"].update(image=name)


BAD_INPUTS = (
    # SELF Encode's validate_inputs takes only width and height: ComfyUI checks the rest against the schema.
    BadInput("custom_budget -64", _encode(budget="custom", custom_budget=-64), "custom_budget", "validation", False),
    BadInput("custom_budget 0", _encode(budget="custom", custom_budget=0), "custom_budget", "validation", False),
    BadInput(
        "custom_budget 100000", _encode(budget="custom", custom_budget=100000), "custom_budget", "validation", False
    ),
    BadInput("budget 999999²", _encode(budget="999999²"), "999999²", "validation", False),
    BadInput("width 9000", _encode(width=9000, height=64), "SELF Encode: width is 9000", "validation", True),
    BadInput("8192² output", _encode(width=8192, height=8192), "lower width and height", "execution", True),
    BadInput("NaN LoRA", lambda p: insert_lora(p, NAN_LORA), f"LoRA {NAN_LORA} at strength 1", "execution", True),
    BadInput("prompt not UTF-8", _encode(prompt="caf\udce9"), "prompt is not valid UTF-8 text", "execution", True),
    BadInput(
        "negative prompt not UTF-8",
        _encode(negative_prompt="\ud800"),
        "negative prompt is not valid UTF-8 text",
        "execution",
        True,
    ),
    BadInput("prompt too long", _encode(prompt="red " * 5000), "prompt is too long", "execution", True),
    BadInput("seed -1", _sampler(seed=-1), "seed", "validation", False),
    BadInput("seed 2**64", _sampler(seed=2**64), "seed", "validation", False),
    BadInput("missing model", _loader(model="does-not-exist"), "does-not-exist", "validation", False),
    BadInput("model path traversal", _loader(model="../../../etc"), "../../../etc", "validation", False),
    BadInput(
        "LoRA path traversal",
        lambda p: insert_lora(p, "../../../etc/passwd"),
        "../../../etc/passwd",
        "validation",
        False,
    ),
    # LoadImage is the host's node: it opens the file and its own error names it.
    BadInput("reference not an image", _first_image(FAKE_IMAGE), "cannot identify image file", "execution", False),
    # ... and loads a truncated file as far as it goes (PIL's LOAD_TRUNCATED_IMAGES), the rest grey.
    BadInput("reference truncated", _first_image(TRUNCATED_IMAGE), "", "accepted", False),
)


@dataclass(frozen=True)
class GoodGraph:
    workflow: str
    prompt: int  # index into PROMPTS[workflow]
    seed: int

    @property
    def label(self) -> str:
        return f"{self.workflow.removeprefix('uniref_')}/p{self.prompt}/s{self.seed}"


# ---------------------------------------------------------------- results


@dataclass
class Outcome:
    """One prompt of the soak. ``result`` says what happened; ``problem`` is set when it was not what is expected."""

    index: int
    kind: str
    label: str
    result: str
    seconds: float
    rss_mib: float = 0.0  # the host's VmRSS after the prompt
    anon_mib: float = 0.0  # its RssAnon: the heap, which a leak grows (VmRSS also counts file pages)
    available_mib: float = 0.0  # the machine's MemAvailable then
    problem: str = ""
    act_s: float | None = None  # interrupts: from POST /interrupt to the host's "interrupted" (its own timestamp)
    seen_s: float | None = None  # interrupts: from POST /interrupt to that message's arrival on the websocket
    steps_after: int | None = None  # interrupts: the sampler's progress messages that came after POST /interrupt
    step_s: float | None = None  # the median time between the prompt's progress messages
    probe: dict = field(default_factory=dict)  # what the host's memory is made of (soak_host(probe=True))


@dataclass
class SoakReport:
    """The outcomes of a run. Memory: the host's after ``early_index`` prompts against its memory at the end. VmRSS
    also counts file pages (libraries, model files), which the kernel takes back when another process needs the
    memory and ComfyUI's RAM-pressure cache lets go of outputs then too, so a drop means little; a leak grows
    both VmRSS and RssAnon."""

    outcomes: list[Outcome]
    early_index: int
    wall_s: float
    model_loads: int
    log_problems: list[str] = field(default_factory=list)

    @property
    def early(self) -> Outcome:
        return self.outcomes[min(self.early_index, len(self.outcomes)) - 1]

    @property
    def end(self) -> Outcome:
        """The last prompt after which the host's memory was read (none is after the host died)."""
        return next((o for o in reversed(self.outcomes) if o.rss_mib), self.outcomes[-1])

    @property
    def drift(self) -> float:
        """VmRSS at the end over VmRSS after ``early_index`` prompts, less 1."""
        return self.end.rss_mib / self.early.rss_mib - 1

    @property
    def anon_drift(self) -> float:
        return self.end.anon_mib / self.early.anon_mib - 1

    @property
    def min_available_mib(self) -> float:
        return min(o.available_mib for o in self.outcomes if o.rss_mib)

    @property
    def failures(self) -> list[str]:
        found = [f"#{o.index} {o.kind} {o.label}: {o.problem}" for o in self.outcomes if o.problem]
        return found + self.log_problems

    @property
    def interrupts(self) -> list[Outcome]:
        """The interrupts that ended the prompt as interrupted."""
        return [o for o in self.outcomes if o.kind == "interrupt" and o.result == "interrupted"]

    def count(self, kind: str, result: str | None = None) -> int:
        return sum(o.kind == kind and (result is None or o.result == result) for o in self.outcomes)

    def summary(self) -> str:
        kinds = Counter(o.kind for o in self.outcomes)
        results = Counter((o.kind, o.result) for o in self.outcomes)
        lines = [
            f"{len(self.outcomes)} prompts in {self.wall_s:.0f} s: " + ", ".join(f"{kinds[k]} {k}" for k in KINDS)
        ]
        lines += [f"  {kind:9s} {result}: {n}" for (kind, result), n in sorted(results.items())]
        acted = self.interrupts
        if acted:
            act = [o.act_s for o in acted]
            ratios = [o.act_s / o.step_s for o in acted]
            lines.append(
                f"  {len(acted)} interrupts acted {statistics.median(act):.3f} s after /interrupt in median, "
                f"{max(act):.3f} s max: {statistics.median(ratios):.2f} of a sampling step median, "
                f"{max(ratios):.2f} max (a step {statistics.median(o.step_s for o in acted):.2f} s); "
                f"at most {max(o.steps_after for o in acted)} step reported after /interrupt; "
                f"on the websocket within {max(o.seen_s for o in acted):.2f} s"
            )
        lines.append(f"  model loads: {self.model_loads}")
        early, end = self.early, self.end
        if early.rss_mib:  # 0: the host died before its memory was read
            lines.append(
                f"  VmRSS after {early.index} prompts {early.rss_mib:.0f} MiB, at the end {end.rss_mib:.0f} MiB "
                f"({self.drift:+.1%}); RssAnon {early.anon_mib:.0f} -> {end.anon_mib:.0f} MiB "
                f"({self.anon_drift:+.1%}); the machine's MemAvailable down to {self.min_available_mib:.0f} MiB"
            )
        failures = self.failures
        lines.append(f"  problems: {len(failures)}")
        lines += [f"    {f}" for f in failures]
        return "\n".join(lines)


# ---------------------------------------------------------------- the host


def _write_nan_lora(path: Path) -> Path:
    """A LoRA for the built-in model whose first attention query layer is NaN: every prompt through it makes
    non-finite latents."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = ROOT / "models" / "uniref-default" / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        out_features, in_features = f.get_slice("transformer_blocks.0.attn.to_q.weight").get_shape()
    key = "diffusion_model.transformer_blocks.0.attn.to_q"
    save_file(
        {
            f"{key}.lora_A.weight": torch.full((4, in_features), float("nan")),
            f"{key}.lora_B.weight": torch.ones(out_features, 4),
        },
        str(path),
    )
    return path


@contextlib.contextmanager
def soak_host(threads: int | None = 1, probe: bool = False):
    """One 0.30.0 host with this pack, its built-in default model (not a test model), a NaN LoRA in
    models/loras/ and two broken image files in input/. ``threads``: OMP_NUM_THREADS for the host (None: torch's
    default), 1 by default so the soak shares a small machine without oversubscribing it. ``probe``: with the
    test-only route /uniref_soak/memory (tests/host_shims/uniref_soak_probe)."""
    saved = {k: os.environ.get(k) for k in ("UNIREF_DEFAULT_MODEL", "OMP_NUM_THREADS")}
    os.environ.pop("UNIREF_DEFAULT_MODEL", None)
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="uniref-soak-") as tmp:
            lora = _write_nan_lora(Path(tmp) / NAN_LORA)
            packs = {PROBE.name: PROBE} if probe else {}
            host = ComfyHost(VERSION, ROOT, models={f"loras/{NAN_LORA}": lora}, start_timeout=300, extra_packs=packs)
            with host:
                (host.input_dir / FAKE_IMAGE).write_text("this is a text file with an image's name\n")
                png = (ROOT / "assets" / "edit_scene.png").read_bytes()
                (host.input_dir / TRUNCATED_IMAGE).write_bytes(png[: len(png) // 2])
                yield host
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def proc_mib(path: str, *keys: str) -> list[float]:
    """Fields of a /proc file in kB (``VmRSS:  123 kB``), in MiB."""
    fields = dict(line.split(":", 1) for line in Path(path).read_text().splitlines() if ":" in line)
    return [int(fields[k].split()[0]) / 1024 for k in keys]


# ---------------------------------------------------------------- the soak


@dataclass
class _Run:
    """One queued prompt as followed on the websocket: its end, progress times and history entry."""

    prompt_id: str
    end: str = ""  # the terminal message's type
    end_data: dict = field(default_factory=dict)
    end_t: float = 0.0
    start_t: float | None = None  # when execution_start arrived
    progress_t: list = field(default_factory=list)
    entry: dict = field(default_factory=dict)

    @property
    def step_s(self) -> float | None:
        gaps = np.diff(self.progress_t)
        return float(np.median(gaps)) if len(gaps) else None


class Soak:
    """Sends prompts drawn from a seeded RNG to one host and checks each; ``run(n)`` returns a SoakReport."""

    def __init__(
        self,
        host: ComfyHost,
        seed: int = 0,
        good_steps: int = 4,
        interrupt_steps: int = 20,
        seeds: tuple[int, ...] = (0, 1, 2),
        kinds: dict[str, float] = KINDS,
        timeout: float = 600,
        probe: bool = False,
    ):
        self.host = host
        self.probe = probe  # read /uniref_soak/memory after each prompt (a host from soak_host(probe=True))
        self.rng = random.Random(seed)
        self.good_steps = good_steps
        self.interrupt_steps = interrupt_steps
        self.kinds = kinds  # kind -> weight in the draw
        self.timeout = timeout
        info = host.object_info()
        self.base = {w: ui_to_api(json.loads((ROOT / "workflows" / f"{w}.json").read_text()), info) for w in WORKFLOWS}
        self.goods = [GoodGraph(w, p, s) for w in WORKFLOWS for p in range(len(PROMPTS[w])) for s in seeds]
        self.references: dict[GoodGraph, np.ndarray] = {}
        self.step_s: list[float] = []  # every good prompt's median step time, for the interrupt delays
        self.runs = 0  # makes each run's no-op inputs unique (see _vary)
        self.bad_deck: list[BadInput] = []

    # -- one prompt

    def graph(self, good: GoodGraph, steps: int | None = None) -> dict:
        prompt = copy.deepcopy(self.base[good.workflow])
        text = PROMPTS[good.workflow][good.prompt]
        if text is not None:
            node_of(prompt, "UniRefSelfEncode")["inputs"]["prompt"] = text
        node_of(prompt, "UniRefSampler")["inputs"].update(seed=good.seed, steps=steps or self.good_steps)
        node_of(prompt, "SaveImage")["inputs"]["filename_prefix"] = "soak"
        return prompt

    def _vary(self, prompt: dict, fresh: bool = False) -> dict:
        """ComfyUI keeps every node's output by its inputs (0.30.0 until RAM runs short), so a repeat would replay
        the cache. Inputs that cannot change the image are varied instead: eta (unused by the ode sampler) on
        every run, so the sampler always runs again; custom_budget (unused under the model's default budget) and
        the loader's dtype (auto is fp32 on a CPU host) at random, so the encoder and the loader sometimes do.
        ``fresh``: the first run of a graph, on the loader and encoder settings of the shipped workflow."""
        self.runs += 1
        node_of(prompt, "UniRefSampler")["inputs"]["eta"] = round(0.01 + 0.001 * (self.runs % 1990), 3)
        if not fresh:
            if self.rng.random() < 0.5:
                node_of(prompt, "UniRefSelfEncode")["inputs"]["custom_budget"] = self.rng.randrange(64, 4097, 32)
            node_of(prompt, "UniRefLoadModel")["inputs"]["dtype"] = self.rng.choice(("auto", "fp32"))
        return prompt

    def follow(self, prompt_id: str, ws, on_tick: Callable[[_Run, float], None] | None = None) -> _Run:
        """Wait for the prompt's end on the websocket, timing its progress messages; then read its history."""
        run = _Run(prompt_id)
        seen = 0
        deadline = time.monotonic() + self.timeout
        while not run.end:
            messages = [
                m
                for m in ws.of_type("execution_start", "progress", *TERMINAL)
                if (m.get("data") or {}).get("prompt_id") == prompt_id
            ]
            now = time.monotonic()
            for m in messages[seen:]:
                if m["type"] == "execution_start":
                    run.progress_t.clear()
                    run.start_t = now
                elif m["type"] == "progress":  # only the sampler reports progress in these graphs
                    run.progress_t.append(now)
                elif m["type"] in TERMINAL:
                    run.end, run.end_data, run.end_t = m["type"], m["data"], now
            seen = len(messages)
            if on_tick is not None and not run.end:
                on_tick(run, now)
            if self.host.proc is None or self.host.proc.poll() is not None:
                raise HostGone(self.host)
            if now > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not end within {self.timeout:.0f} s (queue hung?)")
            time.sleep(POLL_S)
        run.entry = self.host.wait(prompt_id, timeout=60)
        return run

    def image(self, run: _Run) -> np.ndarray:
        images = output_images(run.entry)
        if len(images) != 1:
            raise AssertionError(f"{len(images)} images in the history entry")
        meta = images[0]
        data = self.host.view(meta["filename"], meta["subfolder"], meta["type"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def free(self) -> None:
        self.host._request("POST", "/free", {"unload_models": True, "free_memory": True})

    # -- the kinds

    def good(self, index: int, free_during: bool = False) -> Outcome:
        good = self.rng.choice(self.goods)
        kind = "free" if free_during else "good"
        fresh = good not in self.references
        if fresh:  # the reference: the first run of this graph, on a model loaded anew after /free
            self.free()
            time.sleep(1.0)  # ComfyUI's worker applies /free when it next wakes, at once when idle
        prompt = self._vary(self.graph(good), fresh)
        t0 = time.monotonic()
        delay = self.rng.uniform(0, self._estimate(self.good_steps)) if free_during else None

        def tick(run: _Run, now: float) -> None:
            nonlocal delay
            if delay is not None and run.start_t is not None and now - run.start_t >= delay:
                self.free()
                delay = None

        with self.host.listen() as ws:
            prompt_id = self.host.queue(prompt, ws.client_id)
            if isinstance(prompt_id, dict):
                return Outcome(index, kind, good.label, "refused", 0, problem=json.dumps(prompt_id)[:500])
            run = self.follow(prompt_id, ws, tick)
        seconds = time.monotonic() - t0
        if run.end != "execution_success":
            return Outcome(index, kind, good.label, run.end, seconds, problem=_message(run))
        image = self.image(run)
        if run.step_s:
            self.step_s.append(run.step_s)
        if fresh:
            self.references[good] = image
            return Outcome(index, kind, good.label, "reference", seconds, step_s=run.step_s)
        ref = self.references[good]
        if image.shape != ref.shape or not np.array_equal(image, ref):
            diff = "shape" if image.shape != ref.shape else f"max |diff| {np.abs(image.astype(int) - ref).max()}"
            return Outcome(index, kind, good.label, "different image", seconds, problem=f"not the reference: {diff}")
        return Outcome(index, kind, good.label, "same image", seconds, step_s=run.step_s)

    def bad(self, index: int) -> Outcome:
        if not self.bad_deck:  # every bad input once, in a shuffled order, before any comes again
            self.bad_deck = self.rng.sample(BAD_INPUTS, len(BAD_INPUTS))
        bad = self.bad_deck.pop()
        good = self.rng.choice(self.goods)
        prompt = self._vary(self.graph(good, steps=1))  # 1 step: enough for every check to be reached
        bad.change(prompt)
        t0 = time.monotonic()
        with self.host.listen() as ws:
            result = self.host.queue(prompt, ws.client_id)
            if isinstance(result, dict):
                stage, text, origin = "validation", json.dumps(result, ensure_ascii=False), ""
            else:
                run = self.follow(result, ws)
                stage, text = "execution", _message(run)
                origin = run.end_data.get("exception_type", "") if run.end == "execution_error" else run.end
        seconds = time.monotonic() - t0
        problem = ""
        if bad.stage == "accepted":
            if stage != "execution" or run.end != "execution_success" or len(output_images(run.entry)) != 1:
                problem = f"expected an image, got {text[:300]}"
        elif stage != bad.stage:
            problem = f"refused at {stage}, expected at {bad.stage}: {text[:300]}"
        elif bad.expected not in text:
            problem = f"the error does not say {bad.expected!r}: {text[:500]}"
        elif stage == "execution" and bad.ours and not origin.endswith("UniRefError"):
            problem = f"{origin} instead of our message: {text[:300]}"
        result = "unexpected" if problem else ("image" if bad.stage == "accepted" else "error as expected")
        return Outcome(index, "bad", bad.name, result, seconds, problem=problem)

    def interrupt(self, index: int) -> Outcome:
        """A good graph at a larger size and more steps, with a seed of its own, interrupted once the host reported
        a random step of the first half of its sampling: the rest of the run is far longer than the way of
        /interrupt to the host, so the interrupt always lands mid-run and must end the prompt there."""
        good = GoodGraph(self.rng.choice(WORKFLOWS), 0, self.rng.randrange(10_000, 2**32))
        prompt = self._vary(self.graph(good, steps=self.interrupt_steps))
        node_of(prompt, "UniRefSelfEncode")["inputs"].update(width=INTERRUPT_SIDE, height=INTERRUPT_SIDE)
        at_step = self.rng.randint(2, self.interrupt_steps // 2)  # 2: a step's time is known by then
        posted: list[tuple[float, float, int]] = []  # wall clock, monotonic clock, steps reported by then

        def tick(run: _Run, now: float) -> None:
            if not posted and len(run.progress_t) >= at_step:
                wall, mono = time.time(), time.monotonic()
                self.host._request("POST", "/interrupt", {"prompt_id": run.prompt_id})
                posted.append((wall, mono, len(run.progress_t)))

        t0 = time.monotonic()
        with self.host.listen() as ws:
            prompt_id = self.host.queue(prompt, ws.client_id)
            if isinstance(prompt_id, dict):
                return Outcome(index, "interrupt", good.label, "refused", 0, problem=json.dumps(prompt_id)[:500])
            run = self.follow(prompt_id, ws, tick)
        seconds = time.monotonic() - t0
        label = f"{good.workflow.removeprefix('uniref_')} at step {at_step}/{self.interrupt_steps}"
        if run.end != "execution_interrupted" or not posted:
            result = "finished first" if run.end == "execution_success" else run.end
            return Outcome(index, "interrupt", label, result, seconds, problem=f"not interrupted: {_message(run)}")
        messages = [m[0] for m in run.entry.get("status", {}).get("messages", [])]
        if "execution_interrupted" not in messages or output_images(run.entry):
            problem = f"the history says {messages} with {len(output_images(run.entry))} images"
            return Outcome(index, "interrupt", label, "interrupted", seconds, problem=problem)
        wall, mono, steps_done = posted[0]
        # The host stamps its messages (ms): the time to act, without the websocket's way back to the driver.
        return Outcome(
            index,
            "interrupt",
            label,
            "interrupted",
            seconds,
            act_s=max(0.0, run.end_data["timestamp"] / 1000 - wall),
            seen_s=run.end_t - mono,
            steps_after=len(run.progress_t) - steps_done,
            step_s=run.step_s,
        )

    def free_idle(self, index: int) -> Outcome:
        t0 = time.monotonic()
        self.free()
        return Outcome(index, "free", "idle", "freed", time.monotonic() - t0)

    def _estimate(self, steps: int) -> float:
        """Expected seconds from a prompt's start to its end at this many steps (loading and encoding included)."""
        step = statistics.median(self.step_s) if self.step_s else 1.0
        return 2.0 + steps * step

    def plan(self, n: int, early: int = 0) -> list[str]:
        """n kinds in their shares of ``self.kinds`` (largest remainders round up), in a shuffled order in which the
        first ``early`` prompts hold every kind (the memory after them is the baseline of the rest)."""
        total = sum(self.kinds.values())
        exact = {k: n * w / total for k, w in self.kinds.items()}
        counts = {k: int(x) for k, x in exact.items()}
        for k in sorted(exact, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
            counts[k] += 1
        kinds = [k for k, c in counts.items() for _ in range(c)]
        self.rng.shuffle(kinds)
        for kind in counts:
            window = Counter(kinds[:early])
            if counts[kind] and not window[kind] and early:
                spare = next(i for i in range(early) if window[kinds[i]] > 1)  # a kind the window holds twice
                later = kinds.index(kind, early)
                kinds[spare], kinds[later] = kinds[later], kinds[spare]
        return kinds

    def step(self, index: int, kind: str) -> Outcome:
        if kind == "good":
            return self.good(index)
        if kind == "bad":
            return self.bad(index)
        if kind == "interrupt":
            return self.interrupt(index)
        return self.good(index, free_during=True) if self.rng.random() < 0.5 else self.free_idle(index)

    def check_serving(self) -> str:
        """'' when the host answers and its queue is empty, else what is wrong."""
        if self.host.proc is None or self.host.proc.poll() is not None:
            return str(HostGone(self.host))
        try:
            self.host.get_json("/system_stats", timeout=10)
            queue = self.host.get_json("/queue", timeout=10)
        except OSError as e:
            return f"the host does not answer: {e}"
        if queue.get("queue_running") or queue.get("queue_pending"):
            return f"queue not empty after the prompt: {len(queue['queue_running'])} running"
        return ""

    # -- the whole run

    def run(self, n: int, on_outcome: Callable[[Outcome], None] | None = None) -> SoakReport:
        early_index = min(WARM_UP, max(1, n // 2))
        loads_before = self.host.log_text().count("UniRef: loading model")
        t0 = time.monotonic()
        outcomes: list[Outcome] = []
        for index, kind in enumerate(self.plan(n, early_index), start=1):
            try:
                outcome = self.step(index, kind)
            except (RuntimeError, AssertionError, OSError) as e:
                outcome = Outcome(index, "error", "", "driver error", 0, problem=f"{type(e).__name__}: {e}")
            serving = self.check_serving()
            if serving:
                if serving not in outcome.problem:
                    outcome.problem = "; ".join(filter(None, (outcome.problem, serving)))
                outcomes.append(outcome)
                break  # the host is gone or stuck: nothing after this would mean anything
            outcome.rss_mib, outcome.anon_mib = proc_mib(f"/proc/{self.host.proc.pid}/status", "VmRSS", "RssAnon")
            (outcome.available_mib,) = proc_mib("/proc/meminfo", "MemAvailable")
            if self.probe:
                outcome.probe = self.host.get_json("/uniref_soak/memory", timeout=60)
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
        log = self.host.log_text()
        return SoakReport(
            outcomes=outcomes,
            early_index=early_index,
            wall_s=time.monotonic() - t0,
            model_loads=log.count("UniRef: loading model") - loads_before,
            log_problems=_log_problems(log, outcomes),
        )


class HostGone(RuntimeError):
    """The host process exited: the soak stops at once, with its exit code and log tail."""

    def __init__(self, host: ComfyHost):
        code = host.proc.returncode if host.proc is not None else None
        super().__init__(f"the host process is gone (exit code {code})\n--- log tail ---\n{host.log_tail(30)}")


def _message(run: _Run) -> str:
    if run.end == "execution_error":
        return str(run.end_data.get("exception_message", ""))
    return run.end or "no end"


def _log_problems(log: str, outcomes: list[Outcome]) -> list[str]:
    """What the host's log shows beyond the node errors the soak caused: request handlers that failed, tasks
    that died, and more tracebacks of node errors than execution-stage errors were sent."""
    problems = []
    for marker in ("Error handling request", "Task exception was never retrieved", "Exception in thread"):
        if marker in log:
            problems.append(f"host log: {log.count(marker)} × {marker!r}")
    node_errors = log.count("!!! Exception during processing !!!")
    expected = sum(
        o.kind == "bad" and not o.problem and b.stage == "execution"
        for o in outcomes
        for b in BAD_INPUTS
        if b.name == o.label
    )
    if node_errors != expected:
        problems.append(f"host log: {node_errors} node errors, {expected} expected from the bad inputs")
    return problems
