"""Print the MSGRPO ablation table of training/README.md from scripts/msgrpo_ablation.sh's evaluations.

``python scripts/msgrpo_table.py [runs/rl]``: one row per arm and sampling seed, then the mean of both
seeds. Files ``<arm>-eval*-seed<S>.json`` of one arm and seed are merged (K = 2, 3 in one, K = 4…6 in
another). A K evaluated at another seed of the same arm only is taken from there and marked "*" (K = 4…6
cost ~5 min a seed); a K with no evaluation at all is "–" and the mean over K = 2…6 says it is incomplete.
"""

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ARMS = ("start", "min", "normalized_sum", "sum")
KS = (2, 3, 4, 5, 6)


def load(folder: Path) -> dict:
    found: dict = defaultdict(dict)  # (arm, seed) -> {k: scores}
    for path in sorted(folder.glob("*-eval*-seed*.json")):
        m = re.fullmatch(r"(.+?)-eval.*-seed(\d+)\.json", path.name)
        if m:
            per_k = json.loads(path.read_text())["per_k"]
            found[(m[1], int(m[2]))].update({int(k): v for k, v in per_k.items()})
    return found


def row(name: str, per_k: dict, borrowed: dict) -> tuple[str, float | None]:
    cells = []
    per_k = {**borrowed, **per_k}
    for k in KS:
        s = per_k.get(k)
        mark = "*" if k in borrowed else ""
        cells.append(
            f"{s['per_reference']:.3f} / {s['per_reference_min']:.3f} / {s['instruction']:.3f}{mark}" if s else "–"
        )
    have = [per_k[k]["per_reference_min"] for k in KS if k in per_k]
    mean = sum(have) / len(KS) if len(have) == len(KS) else None
    tail = f"{mean:.3f}" if mean is not None else f"({len(have)} of {len(KS)} K evaluated)"
    return f"| {name} | " + " | ".join(cells) + f" | {tail} |", mean


def main(argv=None) -> int:
    folder = Path((argv or sys.argv[1:] or ["runs/rl"])[0])
    found = load(folder)
    print("| arm, seed | " + " | ".join(f"K = {k} ref / min / instr" for k in KS) + " | mean K = 2…6 of min |")
    print("|---" * (len(KS) + 2) + "|")
    arms = [a for a in ARMS if any(key[0] == a for key in found)] + sorted({a for a, _ in found} - set(ARMS))
    for arm in arms:
        means = []
        seeds = sorted(s for a, s in found if a == arm)
        for seed in seeds:
            borrowed = {}
            for other in (o for o in seeds if o != seed):
                borrowed.update(
                    {k: v for k, v in found[(arm, other)].items() if k not in borrowed and k not in found[(arm, seed)]}
                )
            line, mean = row(f"{arm}, seed {seed}", found[(arm, seed)], borrowed)
            print(line)
            means.append(mean)
        if len(means) > 1 and None not in means:
            print(
                f"| {arm}, mean of {len(means)} seeds | "
                + " | " * (len(KS) - 1)
                + f" | {sum(means) / len(means):.3f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
