"""The default model's recipe (training.build_default): each SFT phase's config trains the data and start model
the recipe names, the shipped configs (bases merged in) say what they said before they were split into a base and
overrides, and the recipe ends with MSGRPO from the SFT model."""

import json
from pathlib import Path

import pytest

from training.build_default import ANCHORED, MSGRPO, RECIPE, SFT_DATA, SFT_PHASES, main, shapecompose_info
from training.build_default import WORK as DEFAULT_WORK
from training.common.config import ConfigError, read_config_data
from training.rl.config import config_from_dict as rl_config_from_dict
from training.rl.config import load_config as load_rl_config
from training.sft.config import config_from_dict as sft_config_from_dict
from training.sft.config import load_config
from training.tasks.shapecompose import COMPOSE_ORDERS

WORK = Path(DEFAULT_WORK)  # the work folder every shipped config's paths lie in
CONFIGS = SFT_PHASES[0].parent

# The shipped configs as whole files before they were split into a base and overrides (default_model_fast.json,
# default_model_fast2.json, msgrpo_default.json and msgrpo_ablation.json at commit 31dc2d4): what they load to now.
_SFT_SHARED = {
    "train_manifest": "runs/uniref-default/data-anchored/train/manifest.jsonl",
    "val_manifest": "runs/uniref-default/data-anchored/val/manifest.jsonl",
    "seed": 0,
    "lora": None,
    "micro_batch_size": 4,
    "mixed_precision": "no",
    "ema_decay": 0.998,
    "vl_budget": 112,
    "logit_normal": {"mean": 0.5, "std": 1.0, "pure_noise": 0.25},
    "schedule": "cosine",
    "max_grad_norm": 1.0,
    "eval_every": 0,
    "eval_samples": 8,
    "eval_steps": 20,
    "eval_cfg": 1.0,
    "save_every": 200,
    "keep_checkpoints": 4,
    "log_every": 10,
}
_MSGRPO_SHARED = {
    "model": "models/uniref-default-sft",
    "rewards": [{"source": "checker", "weight": 1.0}],
    "steps": 100,
    "lr": 1e-4,
    "warmup": 3,
    "group_size": 6,
    "groups_per_step": 4,
    "rollout_steps": 10,
    "sde_window": [0, 4],
    "eta": 0.7,
    "cfg": 1.0,
    "budget": 128,
    "output_size": 128,
    "clip_range": 1e-4,
    "adv_clip_max": 5.0,
    "beta": 0.0,
    "lora": None,
    "save_every": 20,
    "keep_checkpoints": 1,
    "grid_every": 10,
    "seed": 0,
}
BEFORE = {
    "sft_default_1.json": {
        **_SFT_SHARED,
        "model": "runs/uniref-default/init",
        "output_dir": "runs/uniref-default/sft-fast",
        "stages": [{"budget": 128, "steps": 4400, "lr": 0.002, "batch_size": 8, "output_size": 128}],
        "warmup": 100,
    },
    "sft_default_2.json": {
        **_SFT_SHARED,
        "model": "runs/uniref-default/final-fast",
        "output_dir": "runs/uniref-default/sft-fast2",
        "stages": [{"budget": 128, "steps": 6000, "lr": 0.0015, "batch_size": 8, "output_size": 128}],
        "warmup": 50,
    },
    "msgrpo_default.json": {
        **_MSGRPO_SHARED,
        "train_manifest": "runs/uniref-default/rl-data/train/manifest.jsonl",
        "output_dir": "runs/uniref-default/msgrpo",
        "aggregation": "sum",
    },
    "msgrpo_ablation.json": {
        **_MSGRPO_SHARED,
        "train_manifest": "runs/rl-data/train/manifest.jsonl",
        "output_dir": "runs/rl/min",
        "aggregation": "min",
    },
}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_shipped_configs_load_to_what_they_said_before_the_split(name):
    path = CONFIGS / name
    assert "base" in json.loads(path.read_text())  # an override of a base, not a whole config
    assert read_config_data(path) == BEFORE[name]
    if name.startswith("sft"):
        assert load_config(path) == sft_config_from_dict(BEFORE[name])
        assert load_config(path).hash() == sft_config_from_dict(BEFORE[name]).hash()  # old runs still resume
    else:
        assert load_rl_config(path) == rl_config_from_dict(BEFORE[name])


def test_a_base_is_merged_tables_by_key_lists_whole_the_file_winning(tmp_path):
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "root.json").write_text(
        json.dumps({"lr": 1.0, "sde_window": [0, 4], "logit_normal": {"mean": 0.5, "std": 1.0}, "seed": 3})
    )
    (tmp_path / "bases" / "mid.toml").write_text('base = "root.json"\nseed = 4\n')  # relative to mid.toml
    (tmp_path / "run.json").write_text(
        json.dumps({"base": "bases/mid.toml", "sde_window": [1], "logit_normal": {"std": 2.0}, "lr": None})
    )
    assert read_config_data(tmp_path / "run.json") == {
        "lr": None,
        "sde_window": [1],
        "logit_normal": {"mean": 0.5, "std": 2.0},
        "seed": 4,
    }


@pytest.mark.parametrize(
    "files, message",
    [
        ({"run.json": {"base": "nowhere.json"}}, "run.json: its base 'nowhere.json' ("),
        ({"run.json": {"base": "a.json"}, "a.json": {"base": "run.json"}}, "is circular"),
        ({"run.json": {"base": "run.json"}}, "is circular"),
        ({"run.json": {"base": 3}}, "base is 3: give the path of the config it overrides"),
    ],
)
def test_a_missing_or_circular_base_is_refused_naming_the_file(tmp_path, files, message):
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "run.json")
    assert message in str(e.value) and str(tmp_path / "run.json") in str(e.value)


def test_each_sft_phase_trains_the_recipe_data_from_the_phase_before():
    """Every phase trains the recipe's data sets, each from where the phase before is exported."""
    paths = lambda m: [Path(p) for p in (m if isinstance(m, list) else [m])]  # noqa: E731
    manifests = lambda split, sets: [WORK / d["folder"] / split / "manifest.jsonl" for d in sets]  # noqa: E731
    cfgs = [load_config(p) for p in SFT_PHASES]
    for i, cfg in enumerate(cfgs):
        assert paths(cfg.train_manifest) == manifests("train", SFT_DATA)
        assert paths(cfg.val_manifest) == manifests("val", SFT_DATA)
        if i == 0:
            assert Path(cfg.model) == WORK / "init"
        else:  # where the phase before is exported: a model folder of its own in the work folder
            assert Path(cfg.model).parent == WORK
            assert Path(cfg.model) not in {Path(c.output_dir) for c in cfgs} | {Path(c.model) for c in cfgs[:i]}
    assert len({Path(c.output_dir) for c in cfgs}) == len(cfgs)  # no phase resumes another's run
    info = shapecompose_info(ANCHORED)
    assert info["order"] in COMPOSE_ORDERS and info["ref_side"] == RECIPE["ref_side"]
    assert MSGRPO["data"]["order"] in COMPOSE_ORDERS


def test_sft_phases_run_in_order_each_exported_where_the_next_starts(tmp_path, monkeypatch):
    """The steps' order and skips, with the steps themselves recorded instead of run: training starts at the last
    phase whose start model exists (a phase's export, or one copied there to continue a build); the last phase
    always ends with its export to --sft-out."""
    import shutil

    import training.build_default as bd

    monkeypatch.chdir(tmp_path)  # the shipped configs' relative paths land here
    calls = []

    def export(cfg, dest, work, log, shapecompose):
        calls.append(("export", Path(cfg.output_dir).name, dest))
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "model_index.json").write_text("{}")
        return {"final": dest}

    monkeypatch.setattr(bd, "step_data", lambda work, log, data: calls.append(("data", data["folder"])))
    monkeypatch.setattr(bd, "step_init", lambda work, log: calls.append(("init",)))
    monkeypatch.setattr(bd, "step_sft", lambda path, log, nproc: calls.append(("sft", path.name)) or load_config(path))
    monkeypatch.setattr(bd, "step_export", export)
    out = tmp_path / "sft-out"
    starts = [Path(load_config(p).model) for p in SFT_PHASES[1:]]
    data = [("data", d["folder"]) for d in SFT_DATA]
    assert bd.step_build_sft(out, WORK, print) == {"final": out}
    names = [p.name for p in SFT_PHASES]
    runs = [Path(load_config(p).output_dir).name for p in SFT_PHASES]
    dests = starts + [out]

    def trained(first):
        return [c for i in range(first, len(names)) for c in (("sft", names[i]), ("export", runs[i], dests[i]))]

    assert calls == data + [("init",)] + trained(0)
    calls.clear()
    bd.step_build_sft(out, WORK, print)  # every phase's start exists: only the last phase (done: it resumes)
    assert calls == data + trained(len(names) - 1)
    calls.clear()
    shutil.rmtree(starts[0])  # no phase's start is there: from init again
    bd.step_build_sft(out, WORK, print)
    assert calls == data + [("init",)] + trained(0)


def test_another_work_folder_gets_the_phase_configs_with_their_paths_moved_there(tmp_path, monkeypatch):
    """--work elsewhere: each phase runs with the shipped config, its base merged in and every path under the
    default work folder moved into the new one (other paths, such as the base, untouched)."""
    import training.build_default as bd

    monkeypatch.chdir(tmp_path)  # the default work folder (relative) lands here
    work = tmp_path / "elsewhere"
    for shipped in SFT_PHASES:
        written = bd.build_config(shipped, work)
        assert written == work / shipped.name
        cfg, default = load_config(written), load_config(shipped)
        assert Path(cfg.output_dir) == work / Path(default.output_dir).relative_to(WORK)
        assert Path(cfg.model) == work / Path(default.model).relative_to(WORK)
        assert [Path(m) for m in cfg.train_manifest] == [
            work / Path(m).relative_to(WORK) for m in default.train_manifest
        ]
        assert cfg.stages == default.stages and cfg.ema_decay == default.ema_decay
    assert load_config(bd.build_config(SFT_PHASES[0], WORK)).hash() == load_config(SFT_PHASES[0]).hash()  # resumes


def test_the_recipe_flag_is_gone(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--recipe", "fast2"])
    assert e.value.code == 2 and "--recipe" in capsys.readouterr().err


def test_bad_nproc_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--nproc", "0"])
    assert e.value.code == 2 and "--nproc 0" in capsys.readouterr().err


def test_the_shipped_recipe_ends_with_msgrpo_from_the_sft_model(tiny_model_4x, tmp_path, monkeypatch):
    """The recipe's last step: MSGRPO from the SFT export, on prompts of its own, under the standard
    launcher, exported to --out with the folder's name; run again, it trains nothing more. A tiny model
    and one small step stand in for the shipped config, whose paths are checked here."""
    import shutil

    import training.build_default as bd
    from training.common.checkpoint import model_fingerprint

    shipped = read_config_data(bd.MSGRPO["config"])
    assert shipped["model"] == "models/uniref-default-sft"  # build_default's --sft-out
    assert Path(shipped["train_manifest"]) == WORK / bd.MSGRPO["data"]["folder"] / "train" / "manifest.jsonl"
    assert Path(shipped["output_dir"]).parent == WORK
    small = {
        **shipped,
        "steps": 1,
        "group_size": 2,
        "groups_per_step": 1,
        "rollout_steps": 2,
        "sde_window": [0, 1],
        "budget": 64,
        "output_size": 64,
        "vl_budget": 56,
        "tensorboard": False,
    }
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
