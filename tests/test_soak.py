"""The soak of issue 37 at a reduced count: one 0.30.0 host with the built-in model takes a seeded mix of good
graphs, bad inputs, interrupts and /free in a row and keeps serving, with our messages, the same images and flat
memory (tests/soak.py; the full 200 prompts: bench/bench_soak.py)."""

import os

import pytest
from soak import BAD_INPUTS, Soak, soak_host

pytestmark = pytest.mark.comfy
if os.environ.get("UNIREF_SKIP_COMFY") == "1":
    pytest.skip("UNIREF_SKIP_COMFY=1: ComfyUI host tests skipped", allow_module_level=True)

# About 2 min on 2 shared CPU cores, host start included.
PROMPTS = 40
# More bad inputs than the bench's mix (they take no time), so each of them comes at least once.
KINDS = {"good": 0.30, "bad": 0.46, "interrupt": 0.15, "free": 0.09}


@pytest.mark.xfail(
    strict=False,
    reason="issue 37 open: on an idle machine most interrupts land after the 3-step prompt finished (1 of 6 acted), "
    "and anon memory still grows 13 % in the warm-up window (flat only after ~100 prompts)",
)
def test_a_mixed_run_keeps_serving_with_our_messages_the_same_images_and_flat_memory():
    with soak_host() as host:
        # One seed per graph: 4 distinct good graphs, so most good prompts are repeats compared with a reference.
        report = Soak(host, seed=37, good_steps=3, seeds=(0,), kinds=KINDS).run(PROMPTS)
    print(report.summary())
    assert not report.failures, report.summary()
    assert len(report.outcomes) == PROMPTS
    assert report.count("good", "same image") + report.count("free", "same image") >= 5, report.summary()
    assert {o.label for o in report.outcomes if o.kind == "bad"} == {b.name for b in BAD_INPUTS}
    assert report.count("interrupt", "interrupted") >= 3, report.summary()
    assert report.model_loads >= 2, report.summary()  # /free unloaded the model and the next prompt loaded it
    # A leak grows the host's memory; a drop is the kernel or ComfyUI's RAM-pressure cache giving memory back.
    assert report.drift <= 0.10 and report.anon_drift <= 0.10, report.summary()
