"""The default model's recipe chain (training.build_default): each variant's SFT config trains the data
and start model the variant names, so `--recipe X` on a fresh machine rebuilds what X says."""

import json
from pathlib import Path

import pytest

from training.build_default import RECIPE, VARIANTS, main, shapecompose_info
from training.sft.config import load_config
from training.tasks.shapecompose import COMPOSE_ORDERS

WORK = Path("runs/uniref-default")  # the work folder every shipped config's paths lie in


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_recipe_config_trains_its_own_data_from_its_start(name):
    v = VARIANTS[name]
    cfg = load_config(v["config"])
    paths = lambda m: [Path(p) for p in (m if isinstance(m, list) else [m])]  # noqa: E731
    assert paths(cfg.train_manifest) == [WORK / v["data"] / "train" / "manifest.jsonl"]
    assert paths(cfg.val_manifest) == [WORK / v["data"] / "val" / "manifest.jsonl"]
    start = WORK / f"final-{v['start']}" if v.get("start") else WORK / "init"
    assert Path(cfg.model) == start
    if v.get("start"):
        assert v["start"] in VARIANTS and VARIANTS[v["start"]]["config"] != v["config"]
        # The continuation trains on the data its start was trained with or on data of its own; never on
        # another variant's output folder.
        assert Path(cfg.output_dir) != Path(load_config(VARIANTS[v["start"]]["config"]).output_dir)
    info = shapecompose_info(v)
    assert info["order"] in COMPOSE_ORDERS and info["ref_side"] == RECIPE["ref_side"]


def test_bad_nproc_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--nproc", "0"])
    assert e.value.code == 2 and "--nproc 0" in capsys.readouterr().err


def test_the_shipped_recipe_ends_with_msgrpo_from_the_sft_model(tiny_model_4x, tmp_path, monkeypatch):
    """--recipe fast2's last step: MSGRPO from the SFT export, on prompts of its own, under the standard
    launcher, exported to --out with the folder's name; run again, it trains nothing more. A tiny model
    and one small step stand in for the shipped config, whose paths are checked here."""
    import shutil

    import training.build_default as bd
    from training.common.checkpoint import model_fingerprint

    shipped = json.loads(bd.MSGRPO["config"].read_text())
    assert shipped["model"] == "models/uniref-default-sft"  # build_default's --sft-out
    assert Path(shipped["train_manifest"]) == WORK / bd.MSGRPO["data"]["data"] / "train" / "manifest.jsonl"
    assert Path(shipped["output_dir"]).parent == WORK
    small = {**shipped, "steps": 1, "group_size": 2, "groups_per_step": 1, "rollout_steps": 2, "sde_window": [0, 1],
             "budget": 64, "output_size": 64, "vl_budget": 56, "tensorboard": False}  # fmt: skip
    (tmp_path / "msgrpo.json").write_text(json.dumps(small))
    monkeypatch.setitem(bd.MSGRPO, "config", tmp_path / "msgrpo.json")
    monkeypatch.setitem(bd.MSGRPO, "data", {**bd.MSGRPO["data"], "train_samples": 2, "val_samples": 1})
    sft = tmp_path / "sft"
    shutil.copytree(tiny_model_4x, sft)
    (sft / "uniref.json").write_text(json.dumps({"name": "sft", "defaults": {"steps": 2}}))
    work = tmp_path / "work"
    out = bd.step_msgrpo(sft, tmp_path / "tuned", work, print, nproc=1)
    assert json.loads((out / "uniref.json").read_text()) == {"name": "tuned", "defaults": {"steps": 2}}
    trained = json.loads((out / "uniref_training.json").read_text())
    assert trained["base_model_fingerprint"] == model_fingerprint(sft) and trained["step"] == "1"
    ran = json.loads((work / "msgrpo.json").read_text())  # the shipped config, pointed at this build's folders
    assert ran["model"] == str(sft) and ran["output_dir"] == str(work / "msgrpo")
    assert sum(1 for _ in open(ran["train_manifest"])) == 2
    log = (work / "msgrpo" / "log.jsonl").read_text()
    bd.step_msgrpo(sft, tmp_path / "tuned", work, print, nproc=1)  # done: exported again, nothing trained
    assert (work / "msgrpo" / "log.jsonl").read_text() == log
