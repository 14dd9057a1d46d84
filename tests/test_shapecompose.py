"""ShapeCompose: the synthetic task generator and its checker, which becomes an RL reward.

The checker must not be fooled: ground truth scores ~1 and outputs that skip the work (a blank or grey
image, a heavy blur, noise, the right objects in the wrong slots, a copy of a reference) score ~0.
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` without `python -m`
    sys.path.insert(0, str(ROOT))

from training.tasks.shapecompose import (  # noqa: E402
    BACKGROUNDS,
    COLOURS,
    EDIT_KINDS,
    K_MAX,
    SHAPES,
    SPLIT_SEED_BASE,
    compatible_colours,
    draw_object,
    make_sample,
    make_split,
    read_manifest,
    render_background,
    render_target,
    score,
    split_seeds,
    write_manifest,
)

TEST = SPLIT_SEED_BASE["test"]


def held_out():
    """42 test-split samples: every edit kind twice, compose with K = 1..8 four times each."""
    out = [make_sample(TEST + 100 * i + j, kind=kind) for i in range(2) for j, kind in enumerate(EDIT_KINDS)]
    out += [make_sample(TEST + 1000 + 100 * i + k, k=k, kind="compose") for i in range(4) for k in range(1, K_MAX + 1)]
    return out


@pytest.fixture(scope="module")
def samples():
    return held_out()


def pixels(img):
    return np.asarray(img).tobytes()


# ---------------------------------------------------------------------------------------------
# adversarial outputs
# ---------------------------------------------------------------------------------------------


def wrong_colour_spec(spec):
    """The same scene with its first object in another colour (one that still shows on the background)."""
    sp = {**spec, "objects": [dict(o) for o in spec["objects"]]}
    o = sp["objects"][0]
    o["colour"] = next(c for c in compatible_colours(sp["background"]) if c != o["colour"])
    return sp


def swapped_spec(spec, k):
    """Objects swapped between slots (a cyclic shift: every slot gets another object); K = 1 or a single
    object: a recolour to a wrong colour."""
    objs = spec["objects"]
    if k == 1 or len(objs) < 2:
        return wrong_colour_spec(spec)
    pairs = [(o["shape"], o["colour"]) for o in objs]
    assert len(set(pairs)) == len(pairs)
    sp = {**spec, "objects": [dict(o) for o in objs]}
    for i, o in enumerate(sp["objects"]):
        o["shape"], o["colour"] = pairs[(i + 1) % len(pairs)]
    return sp


def adversaries(sample, rng):
    size = sample.spec["size"]
    return {
        "blank": render_background(sample.spec["background"], size, size),
        "grey": Image.new("RGB", (size, size), (128, 128, 128)),
        "blur": sample.target.filter(ImageFilter.GaussianBlur(size / 8)),
        "noise": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
        "swapped": render_target(swapped_spec(sample.spec, sample.k)),
        "reference_copy": sample.references[0].resize((size, size)),
    }


# ---------------------------------------------------------------------------------------------
# checker
# ---------------------------------------------------------------------------------------------


def test_ground_truth_scores_high_on_held_out_samples_of_every_kind_and_k(samples):
    assert len(samples) >= 40
    assert {s.kind for s in samples} == {"compose", *EDIT_KINDS}
    assert {s.k for s in samples} == set(range(1, K_MAX + 1))
    for s in samples:
        sc = score(s.target, s)
        assert len(sc.per_reference) == s.k
        assert min(sc.per_reference) >= 0.95, (s.seed, s.kind, sc.per_reference, sc.objects)
        assert sc.instruction >= 0.95, (s.seed, s.kind, sc.instruction, sc.details)
        assert sc.overall >= 0.95 and sc.quality >= 0.9
        assert all(0.0 <= v <= 1.0 for v in [*sc.per_reference, sc.instruction, sc.quality, sc.overall])


@pytest.mark.parametrize("case", ["blank", "grey", "blur", "noise", "swapped", "reference_copy"])
def test_adversarial_outputs_score_low(samples, case):
    rng = np.random.default_rng(7)
    for s in samples:
        img = adversaries(s, rng)[case]
        sc = score(img, s)
        mean_ref = float(np.mean(sc.per_reference))
        assert mean_ref <= 0.2, (case, s.seed, s.kind, s.k, sc.per_reference, sc.details)
        assert sc.instruction <= 0.2, (case, s.seed, s.kind, s.k, sc.instruction, sc.details)
        assert sc.overall <= 0.2


def test_checker_takes_any_output_size_and_any_spec_container(samples, tmp_path):
    s = next(x for x in samples if x.k == 5)
    for size in (64, 200, 512):
        sc = score(s.target.resize((size, size), Image.Resampling.BICUBIC), s)
        assert sc.instruction >= 0.9 and min(sc.per_reference) >= 0.9, (size, sc.details)
    row = {"spec": s.spec, "task": s.kind}
    assert score(s.target, row).instruction == score(s.target, s.spec).instruction == score(s.target, s).instruction
    assert score(s.target.convert("RGBA"), s).instruction >= 0.95


def test_checker_tolerates_mild_degradation_but_not_blur():
    """A reward needs signal on imperfect outputs: light noise, a tint, a slight blur keep most credit."""
    rng = np.random.default_rng(3)
    for s in make_split("test", 12, start=500):
        arr = np.asarray(s.target).astype(int)
        noisy = Image.fromarray(np.clip(arr + rng.integers(-8, 9, arr.shape), 0, 255).astype(np.uint8))
        tinted = Image.fromarray(np.clip(arr + np.array([8, -6, 5]), 0, 255).astype(np.uint8))
        for img in (noisy, tinted, s.target.filter(ImageFilter.GaussianBlur(1))):
            sc = score(img, s)
            assert sc.instruction >= 0.85 and min(sc.per_reference) >= 0.85, (s.seed, s.kind, sc.details)
        assert score(s.target.filter(ImageFilter.GaussianBlur(1)), s).quality < score(s.target, s).quality


def test_each_reference_is_scored_on_its_own(samples):
    """Break one object of a composition: only its reference (and the instruction) loses credit."""
    s = next(
        x
        for x in samples
        if x.kind == "compose" and x.k >= 4 and all(r["role"] == "object" for r in x.spec["references"])
    )
    sp = wrong_colour_spec(s.spec)
    sc = score(render_target(sp), s)
    broken = s.spec["objects"][0]["ref"]
    assert sc.per_reference[broken] <= 0.05
    assert all(v >= 0.95 for i, v in enumerate(sc.per_reference) if i != broken)
    assert sc.instruction <= 0.2


def test_copy_instead_of_move_and_pasted_reference_crops_are_caught():
    s = make_sample(TEST + 77, kind="move")
    e = s.spec["edit"]["object"]
    old = s.spec["references"][0]["objects"][e]
    both = s.target.copy()
    draw_object(both, old["shape"], old["colour"], old["centre"], old["size"])  # left in place as well
    sc = score(both, s)
    assert sc.instruction <= 0.2 and sc.per_reference[0] <= 0.2
    # A composition that pastes each reference's crop (object with its own background) into its slot.
    s = make_sample(TEST + 78, k=2, kind="compose")
    out = render_background(s.spec["background"], 128, 128)
    for o in s.spec["objects"]:
        ref = s.references[o["ref"]]
        r = s.spec["references"][o["ref"]]["object"]
        half = o["size"] * 0.8
        crop = ref.crop(
            (
                round(r["centre"][0] - r["size"] * 0.8),
                round(r["centre"][1] - r["size"] * 0.8),
                round(r["centre"][0] + r["size"] * 0.8),
                round(r["centre"][1] + r["size"] * 0.8),
            )
        )
        crop = crop.resize((round(2 * half), round(2 * half)))
        out.paste(crop, (round(o["centre"][0] - half), round(o["centre"][1] - half)))
    sc = score(out, s)
    assert max(sc.per_reference) <= 0.2 and sc.instruction <= 0.2


# ---------------------------------------------------------------------------------------------
# generator
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_pixels_and_splits_never_share_seeds():
    for seed in (0, 12345, TEST + 3):
        a, b = make_sample(seed), make_sample(seed)
        assert a.instruction == b.instruction and a.spec == b.spec and a.kind == b.kind
        assert pixels(a.target) == pixels(b.target)
        assert [pixels(r) for r in a.references] == [pixels(r) for r in b.references]
    assert pixels(make_sample(1).target) != pixels(make_sample(2).target)
    seeds = {split: set(split_seeds(split, 1000)) for split in SPLIT_SEED_BASE}
    assert (
        not (seeds["train"] & seeds["val"])
        and not (seeds["train"] & seeds["test"])
        and not (seeds["val"] & seeds["test"])
    )
    train, test = make_split("train", 4), make_split("test", 4)
    assert {s.seed for s in train}.isdisjoint({s.seed for s in test})
    assert [pixels(s.target) for s in test] == [pixels(s.target) for s in make_split("test", 4)]
    with pytest.raises(ValueError):
        split_seeds("train", 10, start=SPLIT_SEED_BASE["val"])  # would run into the val range


def test_every_k_generates_with_varied_reference_sizes_and_named_pictures():
    sizes = []
    for k in range(1, K_MAX + 1):
        for seed in range(TEST + 2000, TEST + 2006):
            s = make_sample(seed, k=k, kind="compose")
            assert s.k == k == len(s.references) == len(s.spec["references"])
            assert s.target.size == (128, 128) and s.target.mode == "RGB"
            named = {int(n) for n in re.findall(r"Picture (\d+)", s.instruction)}
            assert named == set(range(1, k + 1)), s.instruction
            roles = [r["role"] for r in s.spec["references"]]
            assert roles.count("background") <= 1 and len(s.spec["objects"]) == roles.count("object") >= 1
            slots = [o["slot"] for o in s.spec["objects"]]
            assert len(set(slots)) == len(slots) and all(o["slot"] in s.instruction for o in s.spec["objects"])
            pairs = [(o["shape"], o["colour"]) for o in s.spec["objects"]]
            assert len(set(pairs)) == len(pairs)
            for r in s.references:
                assert r.mode == "RGB" and 64 <= min(r.size) and max(r.size) <= 160
                sizes.append(r.size)
            for r in s.spec["references"]:  # objects shown large, so they survive K = 6 sharing a small budget
                if r["role"] == "object":
                    assert 0.58 <= r["object"]["size"] / min(r["width"], r["height"]) <= 0.86, r
    assert len(set(sizes)) > 100
    aspects = [w / h for w, h in sizes]
    assert min(aspects) < 0.6 and max(aspects) > 1.6
    assert make_sample(TEST, k=3, kind="compose", size=256).target.size == (256, 256)


def test_reading_order_puts_pictures_into_slots_in_order_and_free_order_shuffles_them():
    # "reading" (the default, what the built-in model learns): Picture 1 fills the first slot of the
    # layout, Picture 2 the second, ...; a background reference is the last picture.
    for k in range(2, K_MAX + 1):
        for seed in range(TEST + 4000, TEST + 4012):
            s = make_sample(seed, k=k, kind="compose")
            refs_in_slot_order = [o["ref"] for o in s.spec["objects"]]
            assert refs_in_slot_order == sorted(refs_in_slot_order), s.instruction
            roles = [r["role"] for r in s.spec["references"]]
            assert "background" not in roles[:-1], s.instruction
            first = re.findall(r"Picture (\d+)", s.instruction)
            assert first[: len(refs_in_slot_order)] == [str(r + 1) for r in refs_in_slot_order]
    # "free": only the words say which picture goes where.
    shuffled = bg_not_last = 0
    for seed in range(TEST + 4000, TEST + 4040):
        s = make_sample(seed, k=4, kind="compose", order="free")
        refs_in_slot_order = [o["ref"] for o in s.spec["objects"]]
        shuffled += refs_in_slot_order != sorted(refs_in_slot_order)
        roles = [r["role"] for r in s.spec["references"]]
        bg_not_last += "background" in roles[:-1]
        assert score(s.target, s).overall >= 0.95
    assert shuffled >= 20 and bg_not_last >= 2
    with pytest.raises(ValueError, match="compose order"):
        make_sample(1, k=2, kind="compose", order="random")


def test_edit_kinds_have_one_reference_and_change_the_scene():
    for j, kind in enumerate(EDIT_KINDS):
        for seed in range(TEST + 3000 + 10 * j, TEST + 3004 + 10 * j):
            s = make_sample(seed, kind=kind)
            assert s.kind == kind and s.k == 1 and s.references[0].size == s.target.size
            assert "Picture 1" in s.instruction and s.spec["edit"]["op"] == kind
            assert pixels(s.references[0]) != pixels(s.target)
            # the reference scores as an unedited scene: the edit is not done
            assert score(s.references[0], s).instruction <= 0.2
    with pytest.raises(ValueError):
        make_sample(1, k=2, kind="move")
    with pytest.raises(ValueError):
        make_sample(1, k=K_MAX + 1)
    with pytest.raises(ValueError):
        make_sample(1, kind="rotate")


def test_instructions_use_only_the_tiny_tokenizer_words():
    from uniref_core.tiny import _WORDS

    words = set()
    for s in make_split("train", 150) + make_split("test", 50):
        words |= set(re.findall(r"[A-Za-z]+", s.instruction))
    assert {w.lower() for w in words} - {w.lower() for w in _WORDS} == set()
    assert set(SHAPES) <= set(_WORDS) and set(COLOURS) <= set(_WORDS)
    for b in BACKGROUNDS.values():
        assert set(b.phrase.split()) <= set(_WORDS)


def test_manifest_round_trip(tmp_path, samples):
    chosen = samples[:3] + samples[-3:]
    path = write_manifest(chosen, tmp_path / "ds")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(chosen)
    for row, s in zip(rows, chosen):
        assert set(row) >= {"references", "instruction", "target", "task", "k", "spec"}
        assert row["task"] == s.kind and row["k"] == s.k == len(row["references"])
        assert not Path(row["target"]).is_absolute() and (path.parent / row["target"]).is_file()
    back = read_manifest(path)
    for a, b in zip(chosen, back):
        assert a.instruction == b.instruction and a.kind == b.kind and a.k == b.k and a.spec == b.spec
        assert pixels(a.target) == pixels(b.target)
        assert [pixels(r) for r in a.references] == [pixels(r) for r in b.references]
        assert score(b.target, b.spec).instruction >= 0.95


def test_rendered_shapes_are_told_apart_at_the_smallest_size():
    """Every shape drawn at ~20 px is recognised as itself, and as nothing else, by the checker."""
    for shape in SHAPES:
        spec = {
            "kind": "compose",
            "size": 128,
            "background": "gray",
            "edit": None,
            "references": [{"role": "object", "shape": shape, "colour": "red"}],
            "objects": [
                {
                    "shape": shape,
                    "colour": "red",
                    "slot": "centre",
                    "box": [44, 44, 84, 84],
                    "centre": [64, 64],
                    "size": 20,
                    "ref": 0,
                }
            ],
        }
        img = render_target(spec)
        assert score(img, spec).per_reference[0] >= 0.95, shape
        for other in SHAPES:
            if other != shape:
                wrong = {**spec, "objects": [{**spec["objects"][0], "shape": other}]}
                assert score(img, wrong).per_reference[0] <= 0.05, (shape, other)


def test_square_references_give_one_layout_per_k_and_the_same_task():
    """ref_side: every composition of one K plans to one SELF layout (so a training batch fills), and the
    sample is otherwise the one its seed makes (same instruction, same objects in the same slots)."""
    from uniref_core.budget import plan_references

    for k in (1, 2, 3, 6):
        free = make_split("train", 12, ks=(k,), kinds=("compose",))
        square = make_split("train", 12, ks=(k,), kinds=("compose",), ref_side=96)
        assert all(r.size == (96, 96) for s in square for r in s.references)
        assert [s.instruction for s in square] == [s.instruction for s in free]
        assert [s.spec["objects"] for s in square] == [s.spec["objects"] for s in free]
        layouts = {
            tuple(
                plan_references(
                    [r.size for r in s.references], "budget", 128 * 128, width=128, height=128, token_px=8
                ).img_shapes
            )
            for s in square
        }
        assert len(layouts) == 1
    with pytest.raises(ValueError, match="ref_side"):
        make_sample(0, k=2, kind="compose", ref_side=8)


def test_anchored_order_fixes_each_picture_role_and_sizes_objects_for_their_slot():
    """ "anchored" (what the built-in model ships on): at K ≥ 2 the last picture is always the background, the
    objects sit centred on a flat background at about the size SELF then gives their slot (96 px references
    at budget 128², K = 2, 3), and reading order holds; the checker still passes the ground truth."""
    from training.tasks.shapecompose import ANCHORED_OBJECT_FRAC
    from uniref_core.budget import plan_references

    for k in (1, 2, 3, 4):
        for seed in range(TEST + 6000, TEST + 6010):
            s = make_sample(seed, k=k, kind="compose", order="anchored", ref_side=96)
            roles = [r["role"] for r in s.spec["references"]]
            assert roles == ["object"] * (k - 1) + ["background"] if k >= 2 else roles == ["object"]
            assert f"on the background of Picture {k}" in s.instruction if k >= 2 else "Picture 2" not in s.instruction
            assert [o["ref"] for o in s.spec["objects"]] == list(range(len(s.spec["objects"])))
            plan = plan_references(
                [r.size for r in s.references], "budget", 128 * 128, width=128, height=128, token_px=8
            )
            for ref, rs, rp in zip(s.references, s.spec["references"], plan.references):
                if rs["role"] != "object":
                    continue
                o = rs["object"]
                assert o["centre"] == [48, 48] and BACKGROUNDS[rs["background"]].style == "flat"
                assert ANCHORED_OBJECT_FRAC[0] * 96 - 1 <= o["size"] <= ANCHORED_OBJECT_FRAC[1] * 96 + 1
                # The corners show the reference's own background, the centre the object's colour.
                px = np.asarray(ref)
                assert tuple(px[2, 2]) == BACKGROUNDS[rs["background"]].top
                assert np.abs(px[48, 48].astype(int) - COLOURS[rs["colour"]]).max() <= 2 or rs["shape"] == "ring"
                if k in (2, 3):  # under SELF the object arrives at its slot's size, within 25 %
                    slot = s.spec["objects"][0]["size"]
                    assert 0.75 <= o["size"] * rp.vae[0] / 96 / slot <= 1.25, (k, o["size"], rp.vae, slot)
            assert score(s.target, s).overall >= 0.95
