"""A checkpoint that one process of a multi-process run cannot write ends the run on every process with its
one-line error. Before, the others waited at a barrier for the process that stopped: torchrun then killed them
(no word from them), and a launcher that does not tear a job down would have left them waiting."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.training_runs import make_config

ROOT = Path(__file__).resolve().parents[1]

# Rank 0 (which writes the weights of a data-parallel checkpoint) meets a full disk at step 2.
FULL_DISK_AT_STEP_2 = """
import sys
from pathlib import Path
from safetensors import SafetensorError
from training.common import checkpoint as ckpt_mod
from training.sft.trainer import main

real_save = ckpt_mod.save_file

def disk_full(tensors, filename, *args, **kw):
    if Path(filename).parent.name == "step_00000002.tmp":
        why = "I/O error: No space left on device (os error 28)"
        raise SafetensorError(f'Error while serializing: {why} at path "{filename}"')
    return real_save(tensors, filename, *args, **kw)

ckpt_mod.save_file = disk_full
sys.exit(main(["--config", sys.argv[1]]))
"""


def test_a_full_disk_on_one_process_stops_every_process(tiny_model, data, tmp_path):
    out = tmp_path / "run"
    cfg = make_config(tiny_model, data, out, save_every=1)
    cfg["stages"] = [{**cfg["stages"][0], "steps": 3}]
    (tmp_path / "sft.json").write_text(json.dumps(cfg))
    (tmp_path / "child.py").write_text(FULL_DISK_AT_STEP_2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    proc = subprocess.run(
        [*cmd, str(tmp_path / "child.py"), str(tmp_path / "sft.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    err = proc.stderr
    assert "checkpoint step_00000002 could not be written: the disk holding" in err  # rank 0, its own error
    assert "checkpoint step_00000002 could not be written: 1 other process(es) could not write their part" in err
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]  # no half checkpoint left
