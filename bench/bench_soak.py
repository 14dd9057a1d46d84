"""The full soak of issue 37 on the real ComfyUI 0.30.0 host: 200 prompts (seeded) of good graphs, bad inputs,
interrupts and /free through /prompt, with the figures bench/README.md reports.

    PYTHONPATH=. .venv/bin/python bench/bench_soak.py [--prompts 200] [--seed 0] [--probe] [--json out.json]

Prints the prompts by kind, how many good images were pixel-equal to their graph's first run, how many bad prompts
got the expected message, how soon the interrupts acted (as a fraction of a sampling step), the host's VmRSS and
RssAnon after the warm-up (20 prompts) and at the end with the drift, and the wall time. ``--probe`` adds the
test-only route tests/host_shims/uniref_soak_probe and prints, every 20 prompts, what the host's memory is made of
(live CPU tensors, Python objects, glibc's heap in use and freed but held). tests/test_soak.py is the same at a
reduced count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from soak import Outcome, Soak, SoakReport, soak_host  # noqa: E402


def progress(outcome: Outcome) -> None:
    line = f"#{outcome.index:3d} {outcome.kind:9s} {outcome.label[:40]:40s} {outcome.result:16s}"
    line += f" {outcome.seconds:5.1f} s  VmRSS {outcome.rss_mib:5.0f}  RssAnon {outcome.anon_mib:5.0f} MiB"
    if outcome.probe and outcome.index % 20 == 0:
        probe, heap = outcome.probe, outcome.probe.get("malloc", {})
        line += (
            f"\n      probe: {probe['tensors']} tensors {probe['tensor_mib']:.0f} MiB, {probe['objects']} objects, "
            f"{probe['watched']}; malloc in use {heap.get('in_use', 0):.0f} MiB, freed but held "
            f"{heap.get('free_held', 0):.0f} MiB, mmapped {heap.get('mmapped', 0):.0f} MiB"
        )
    if outcome.problem:
        line += f"\n      PROBLEM: {outcome.problem[:400]}"
    print(line, flush=True)


def figures(report: SoakReport) -> dict:
    """The bench's figures, as bench/README.md lists them."""
    outcomes = report.outcomes
    kinds = {k: report.count(k) for k in ("good", "bad", "interrupt", "free")}
    compared = [o for o in outcomes if o.result in ("same image", "different image")]
    bad = [o for o in outcomes if o.kind == "bad"]
    acted = report.interrupts
    ratios = [o.act_s / o.step_s for o in acted]
    early, end = report.early, report.end
    return {
        "prompts": len(outcomes),
        "kinds": kinds,
        "references": sum(o.result == "reference" for o in outcomes),
        "images_compared": len(compared),
        "images_equal": sum(o.result == "same image" for o in compared),
        "bad_prompts": len(bad),
        "bad_expected_message": sum(not o.problem for o in bad),
        "interrupts_acted": len(acted),
        "interrupt_s_median": statistics.median(o.act_s for o in acted) if acted else None,
        "interrupt_s_max": max(o.act_s for o in acted) if acted else None,
        "interrupt_steps_median": statistics.median(ratios) if ratios else None,
        "interrupt_steps_max": max(ratios) if ratios else None,
        "step_s_median": statistics.median(o.step_s for o in acted) if acted else None,
        "early_index": early.index,
        "rss_early_mib": early.rss_mib,
        "rss_end_mib": end.rss_mib,
        "rss_drift": report.drift,
        "anon_early_mib": early.anon_mib,
        "anon_end_mib": end.anon_mib,
        "anon_drift": report.anon_drift,
        "wall_s": report.wall_s,
        "problems": report.failures,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", action="store_true", help="report what the host's memory is made of")
    p.add_argument("--json", type=Path, help="every outcome and the figures")
    args = p.parse_args(argv)

    with soak_host(probe=args.probe) as host:
        report = Soak(host, seed=args.seed, probe=args.probe).run(args.prompts, on_outcome=progress)
    print()
    print(report.summary())
    result = figures(report)
    print(json.dumps({k: v for k, v in result.items() if k != "problems"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"figures": result, "outcomes": [asdict(o) for o in report.outcomes]}))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
