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
