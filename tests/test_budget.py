"""SELF size planning: what an artist sees in `plan` and what the sequence length will be."""

import math
import re

import numpy as np
import pytest
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as diffusers_dims

from uniref_core.budget import (
    BUDGETS,
    MIN_SIDE_PX,
    allocate_budget,
    allocate_per_image,
    calculate_dimensions,
    output_size,
    parse_area,
    plan_references,
    rounding_slack,
    tokens_of,
)
from uniref_core.errors import UniRefError


def random_sizes(rng, k):
    """Odd sizes: aspect ratios from 1:8 to 8:1, sides from 50 to 5000 px."""
    sizes = []
    for _ in range(k):
        ratio = math.exp(rng.uniform(-math.log(8), math.log(8)))
        area = math.exp(rng.uniform(math.log(200 * 200), math.log(4000 * 3000)))
        w = max(1, round(math.sqrt(area * ratio)))
        sizes.append((w, max(1, round(area / w))))
    return sizes


@pytest.mark.parametrize("budget", list(BUDGETS.values()))
def test_self_keeps_reference_tokens_within_budget_for_every_k_up_to_16(budget):
    rng = np.random.default_rng(budget)
    for k in range(1, 17):
        for _ in range(40):
            sizes = random_sizes(rng, k)
            try:
                out = allocate_budget(sizes, budget)
            except UniRefError as e:
                # Only a reference too thin for its share may be refused, and the message says so.
                assert "below the 32 px minimum" in str(e)
                continue
            tokens = sum(tokens_of(w, h) for w, h in out)
            assert tokens <= budget / 256 + rounding_slack(out) / 256
            # Rounding slack is small next to the budget: within 1 token per 16 px of perimeter.
            assert sum(w * h for w, h in out) <= budget + rounding_slack(out)
            assert all(w % 32 == 0 and h % 32 == 0 and min(w, h) >= MIN_SIDE_PX for w, h in out)


def test_budget_mode_sequence_does_not_grow_with_k_but_per_image_does():
    one = [(1200, 900)]
    six = [(1200, 900), (800, 800), (640, 960), (1920, 1080), (500, 700), (1000, 1000)]
    b1 = sum(tokens_of(*s) for s in allocate_budget(one, 1024 * 1024))
    b6 = sum(tokens_of(*s) for s in allocate_budget(six, 1024 * 1024))
    p6 = sum(tokens_of(*s) for s in allocate_per_image(six))
    assert b6 <= 1.1 * b1
    assert p6 >= 5.5 * b1


def test_budget_keeps_order_and_aspect_ratio():
    sizes = [(3000, 1000), (500, 2000), (1024, 1024)]
    out = allocate_budget(sizes, 1536 * 1536)
    for (w, h), (ow, oh) in zip(sizes, out):
        # Rounding to 32 px moves the ratio by at most one multiple per side.
        assert abs(ow / oh - w / h) <= (w / h) * (32 / min(ow, oh) + 32 / max(ow, oh)) + 1e-9
    # One shared scale: the larger source stays larger.
    assert out[0][0] * out[0][1] > out[2][0] * out[2][1] > out[1][0] * out[1][1]


def test_no_upscale_keeps_small_references_at_their_size():
    out = allocate_budget([(64, 96), (128, 128)], 1024 * 1024, upscale=False)
    assert out == [(64, 96), (128, 128)]
    up = allocate_budget([(64, 96), (128, 128)], 1024 * 1024, upscale=True)
    assert up[1][0] > 128


def test_per_image_mode_is_diffusers_arithmetic():
    for w, h in [(1200, 900), (333, 1001), (4096, 512), (64, 64)]:
        assert calculate_dimensions(1024 * 1024, w / h) == diffusers_dims(1024 * 1024, w / h)
        assert allocate_per_image([(w, h)]) == [diffusers_dims(1024 * 1024, w / h)]


def test_too_thin_reference_names_it_and_the_budget_that_fits():
    sizes = [(1000, 1000)] * 5 + [(4000, 100)]
    with pytest.raises(UniRefError) as e:
        allocate_budget(sizes, 256 * 256)
    msg = str(e.value)
    assert "reference 6 is 4000×100 px" in msg
    needed = int(re.search(r"\((\d+) px\)", msg).group(1))
    # The suggested budget really places it.
    out = allocate_budget(sizes, needed)
    assert min(out[5]) >= MIN_SIDE_PX


def test_absurd_aspect_ratio_is_refused_with_the_fix():
    with pytest.raises(UniRefError, match=r"reference 2 is 12000×80 px: aspect ratio beyond 1:64.*crop"):
        allocate_budget([(100, 100), (12000, 80)], 2048 * 2048)


def test_no_reference_and_bad_budget_are_clear():
    with pytest.raises(UniRefError, match="connect at least one reference"):
        allocate_budget([], 1024 * 1024)
    with pytest.raises(UniRefError, match="budget is 0 px"):
        allocate_budget([(10, 10)], 0)
    with pytest.raises(UniRefError, match="mode is 'fast'"):
        plan_references([(10, 10)], mode="fast")


def test_output_size_explicit_or_matching_a_reference():
    assert output_size([(100, 50)], 512, 256) == (512, 256)
    with pytest.raises(UniRefError, match="output width is 500 px.*multiple of 16; try 496"):
        output_size([(100, 50)], 500, 256)
    with pytest.raises(UniRefError, match="give both width and height"):
        output_size([(100, 50)], 512, None)
    w, h = output_size([(100, 50), (50, 100)], match_ref=2)
    assert (w, h) == diffusers_dims(1024 * 1024, 0.5) and h > w
    with pytest.raises(UniRefError, match="match_ref is 3 but there are 2 references"):
        output_size([(100, 50), (50, 100)], match_ref=3)


def test_plan_reports_tokens_and_sequence():
    plan = plan_references([(1024, 768), (512, 512)], "budget", 1024 * 1024, width=1024, height=1024)
    assert plan.output_tokens == 4096
    assert plan.reference_tokens == sum(r.tokens for r in plan.references)
    assert plan.sequence_length == 4096 + plan.reference_tokens
    assert plan.img_shapes[0] == (1, 64, 64)
    assert plan.img_shapes[1] == (1, plan.references[0].vae[1] // 16, plan.references[0].vae[0] // 16)
    # The VL copies default to ~384² each: about 190 vision tokens per reference.
    assert all(150 <= r.vl_tokens <= 220 for r in plan.references)


def test_vl_budget_shares_one_area():
    plan = plan_references([(1000, 1000)] * 4, "budget", 1024 * 1024, vl_budget=384 * 384)
    assert plan.vl_tokens <= 220
    default = plan_references([(1000, 1000)] * 4, "budget", 1024 * 1024)
    assert default.vl_tokens >= 4 * 150


def test_parse_area():
    assert parse_area("1024") == 1024 * 1024
    assert parse_area("1536x1024") == 1536 * 1024
    assert parse_area("1048576") == 1048576
    with pytest.raises(UniRefError, match="not a size"):
        parse_area("big")


@pytest.mark.parametrize(
    "options, fix",
    [
        ({"width": 8192, "height": 8192}, "lower width and height (or the output area)"),
        ({"budget": 8192 * 8192, "width": 1024, "height": 1024}, "lower the budget"),
        ({"budget": 100000 * 100000}, "lower the budget"),
    ],
)
def test_a_sequence_no_device_runs_in_a_step_is_refused_naming_what_to_lower(options, fix):
    with pytest.raises(UniRefError, match=re.escape(fix)) as err:
        plan_references([(1024, 768), (640, 640)], **options)
    assert "the engine runs at most 131072" in str(err.value)


def test_the_largest_sequence_the_engine_runs_is_planned():
    plan = plan_references([(1024, 1024)], budget=4096 * 4096, width=4096, height=4096)
    assert plan.sequence_length == 131072
