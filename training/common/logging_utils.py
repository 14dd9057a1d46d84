"""Run logs: a JSONL record per step, TensorBoard events, a loss plot per stage and evaluation grids.

Everything here runs on the main process only (the trainer passes ``enabled=False`` elsewhere).
TensorBoard and matplotlib are optional: without them the JSONL log and a plain PIL plot remain.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
STAGE_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"]


def _parse(line: str) -> dict | None:
    """One log record, or None for a blank line or the torn last line of a killed run."""
    try:
        return json.loads(line) if line.strip() else None
    except ValueError:
        return None


class RunLogger:
    def __init__(self, output_dir, enabled: bool = True, tensorboard: bool = True):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.path = self.dir / LOG_FILE
        self.tb = None
        self.notes: list[str] = []
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:  # tensorboard is a dev extra: `pip install tensorboard` to get events
                self.notes.append("tensorboard is not installed: no TensorBoard events (log.jsonl has everything)")

    def start_fresh(self) -> None:
        """A run that resumes no checkpoint (also after a kill before the first one) starts an empty log."""
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records a killed run wrote after the checkpoint it resumes from."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if (r := _parse(ln)) and r["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key in ("step", "stage", "kind") or not isinstance(value, (int, float)):
                    continue
                tag = (
                    f"{key}/stage{record['stage']}" if key == "loss" and "stage" in record else key
                )  # RL has no stages
                self.tb.add_scalar(tag if record.get("kind") != "eval" else f"eval/{key}", value, step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        if self.enabled and self.tb is not None:
            import numpy as np

            self.tb.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def records(self, kind: str = "train") -> list[dict]:
        if not self.path.is_file():
            return []
        rows = [r for ln in self.path.read_text().splitlines() if (r := _parse(ln))]
        return [r for r in rows if r.get("kind", "train") == kind]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


# --------------------------------------------------------------------------------------------------
# Loss plot
# --------------------------------------------------------------------------------------------------


def plot_loss(records: list[dict], path, stage_labels: list[str] | None = None) -> Path:
    """Loss against step, one colour per stage (matplotlib when installed, else a plain PIL chart)."""
    by_stage: dict[int, list[tuple[int, float]]] = {}
    for r in records:
        if "loss" in r and math.isfinite(r["loss"]):
            by_stage.setdefault(r["stage"], []).append((r["step"], r["loss"]))

    def label(s: int) -> str:
        return f"stage {s}" + (f" ({stage_labels[s - 1]})" if stage_labels and s <= len(stage_labels) else "")

    return _plot(by_stage, Path(path), label, "flow-matching loss", log_scale=True)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (the first points average what there is)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_series(records: list[dict], path, prefix: str, ylabel: str, smooth: int = 1) -> Path:
    """Every ``prefix…`` field of the records against step, one line each (MSGRPO: reward per signal)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith(prefix) and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key[len(prefix) :], []).append((r["step"], float(value)))
    return _plot(series, Path(path), str, ylabel, smooth=smooth)


def _plot(series: dict, path: Path, label, ylabel: str, log_scale: bool = False, smooth: int = 1) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(series, path, label)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, (name, pts) in enumerate(sorted(series.items())):
        xs, ys = zip(*pts)
        colour = STAGE_COLOURS[i % len(STAGE_COLOURS)]
        if smooth > 1:  # RL rewards swing with each step's prompts: raw faint, the trailing mean drawn over it
            ax.plot(xs, ys, color=colour, lw=0.6, alpha=0.3)
            ax.plot(
                xs, moving_average(list(ys), smooth), color=colour, lw=1.5, label=f"{label(name)} (mean of {smooth})"
            )
        else:
            ax.plot(xs, ys, color=colour, lw=1, label=label(name))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ys_all = [y for pts in series.values() for _, y in pts]
    if log_scale and ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 20:
        ax.set_yscale("log")  # long runs fall by orders of magnitude; short ones read better linear
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_pil(by_stage, path: Path, label) -> Path:
    w, h, pad = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pts = [p for v in by_stage.values() for p in v]
    d.rectangle((pad, pad // 2, w - pad // 2, h - pad), outline="black")
    if pts:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        sx = (w - 1.5 * pad) / max(x1 - x0, 1)
        sy = (h - 1.5 * pad) / max(y1 - y0, 1e-12)
        for i, (stage, v) in enumerate(sorted(by_stage.items())):
            colour = STAGE_COLOURS[i % len(STAGE_COLOURS)]
            line = [(pad + (x - x0) * sx, h - pad - (y - y0) * sy) for x, y in v]
            d.line(line if len(line) > 1 else line * 2, fill=colour, width=2)
            d.text((pad + 8, pad // 2 + 6 + 14 * i), label(stage), fill=colour)
        d.text((4, pad // 2), f"{y1:.3g}", fill="black")
        d.text((4, h - pad - 10), f"{y0:.3g}", fill="black")
        d.text((pad, h - pad + 6), f"step {x0}", fill="black")
        d.text((w - 3 * pad, h - pad + 6), f"step {x1}", fill="black")
    img.save(path)
    return path


# --------------------------------------------------------------------------------------------------
# Evaluation grid
# --------------------------------------------------------------------------------------------------


def _fit(image: Image.Image, cell: int) -> Image.Image:
    scale = cell / max(image.size)
    return image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
    )


def make_grid(
    rows: list[tuple[list[Image.Image], Image.Image, Image.Image]], cell: int = 128, captions: list[str] | None = None
) -> Image.Image:
    """One row per sample: references | target | prediction, each fitted into a ``cell`` square."""
    max_refs = max((len(r[0]) for r in rows), default=1)
    cols = max_refs + 2
    gap, text_h = 4, 14
    width = cols * (cell + gap) + gap + cell // 2  # a wider gap before the target column
    height = len(rows) * (cell + gap + text_h) + gap + text_h
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    heads = [f"Picture {k}" for k in range(1, max_refs + 1)] + ["target", "prediction"]
    for c, head in enumerate(heads):
        d.text((gap + c * (cell + gap) + (cell // 2 if c >= max_refs else 0), 2), head, fill="black")
    for r, (refs, target, pred) in enumerate(rows):
        y = text_h + gap + r * (cell + gap + text_h)
        cells = [(c, im) for c, im in enumerate(refs)] + [(max_refs, target), (max_refs + 1, pred)]
        for c, im in cells:
            x = gap + c * (cell + gap) + (cell // 2 if c >= max_refs else 0)
            grid.paste(_fit(im, cell), (x, y))
        if captions:
            d.text((gap, y + cell + 1), captions[r][: width // 6], fill="black")
    return grid
