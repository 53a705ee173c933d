"""The training log: one JSON object per line, a loss-curve plot drawn from it, and the loss-spike rule read from it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from .stage import atomic_write  # noqa: E402

# A log interval whose mean gradient norm is this many times the median of the previous ones is a loss spike
# (the UNet stage's 256-px phase spiked at its warm-up's end in two of six default runs, and did not recover)
SPIKE_FACTOR = 2.5
SPIKE_HISTORY = 5  # log intervals the median is taken over


def append_record(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line (flushed, so a killed run keeps what it logged)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
        fh.flush()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a log; a last line cut short (a run killed, or a log read, while it was written) is left
    out, a damaged line before it is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
    return records


def epoch_values(path: str | Path, key: str) -> dict[int, float]:
    """``{epoch: value}`` of ``key`` in the log's end-of-epoch records that have it (a rollback truncates the log,
    so an epoch trained again appears once)."""
    return {r["epoch"]: r[key] for r in read_records(path) if r.get("kind") == "epoch" and key in r}


def truncate_after(path: str | Path, step: int) -> None:
    """Drop records past ``step``: a resumed run re-logs the steps it replays."""
    records = [r for r in read_records(path) if r.get("step", 0) <= step]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    # atomic: the stages read their final figures from this log, and a resume truncates it first thing
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def plot_losses(log_path: str | Path, png_path: str | Path, title: str = "") -> None:
    """Plot every ``train/*`` series of the log against the step, one panel each, and the ``val/*`` points in one
    panel (one ruler: the validation loss beside the training images' and the probe EMAs'); a dotted line where a
    loss spike was rolled back to."""
    records = read_records(log_path)
    rollback_steps = [r["step"] for r in records if r.get("kind") == "rollback"]
    train_keys = sorted({k for r in records if r.get("kind") == "train" for k in r if k.startswith("train/")})
    val_keys = sorted({k for r in records if r.get("kind") == "epoch" for k in r
                       if k.startswith("val/") and isinstance(r[k], (int, float))})
    panels = [(key, [key]) for key in train_keys] + ([("val", val_keys)] if val_keys else [])
    if not panels:
        return
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels):
        kind = "epoch" if name == "val" else "train"
        for key in keys:
            steps, values = zip(*[(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r])
            ax.plot(steps, values, marker="o" if kind == "epoch" else None, markersize=3, linewidth=1, label=key)
        for step in rollback_steps:
            ax.axvline(step, color="tab:red", linestyle=":", linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(keys) > 1:
            ax.legend(fontsize=6)
        if kind == "train" and min(values) > 0 and max(values) / max(min(values), 1e-12) > 20:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


def spike_ratio(previous: Sequence[float], grad_norm: float) -> float | None:
    """``grad_norm`` over the median of the previous log intervals' mean gradient norms (the last
    ``SPIKE_HISTORY``), when that exceeds ``SPIKE_FACTOR``; None otherwise, or with fewer than three before. A
    gradient norm that is not finite (NaN, infinity) is a spike whatever came before: ``inf``. A median of 0 (no
    gradient reached the weights) gives no scale to compare against: None."""
    if not math.isfinite(grad_norm):
        return math.inf
    levels = sorted(previous[-SPIKE_HISTORY:])
    if len(levels) < 3 or levels[len(levels) // 2] <= 0:
        return None
    ratio = grad_norm / levels[len(levels) // 2]
    return ratio if ratio > SPIKE_FACTOR else None


def rollbacks(log_path: str | Path) -> list[dict[str, Any]]:
    """The spikes the trainer rolled back (``TrainConfig.spike_rollbacks``): ``{"step"`` (where training went
    back to), ``"first_step", "last_step", "grad_norm", "ratio"`` (the spike), ``"lr_scale"}`` (from then on),
    and for an interval with no finite step or most steps skipped ``"nonfinite"``: what a replay of its last
    skipped step's batch found, with ``"cudnn_attention_off": true`` when that was cuDNN's attention, turned off
    from there (and ``"skipped"``, how many, when some step was taken; ``"ratio"`` is then None unless the
    gradient norm spiked too)."""
    return [{k: v for k, v in r.items() if k != "kind"} for r in read_records(log_path) if r.get("kind") == "rollback"]


def cudnn_attention_off(log_path: str | Path) -> list[dict[str, Any]]:
    """The intervals whose non-finite gradients cuDNN's attention made (no finite step, or most skipped) when no
    rollback was left: the trainer turned it off and trained on from the weights the skipped steps left alone. The
    spike's keys (``rollbacks``), with ``"step"`` the step training went on from."""
    return [{k: v for k, v in r.items() if k != "kind"} for r in read_records(log_path)
            if r.get("kind") == "cudnn_attention_off"]


def train_intervals(log_path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each ``train`` record of a stage's log with the first step of the log interval it averages."""
    last_step = 0
    for record in read_records(log_path):
        if record.get("kind") == "train":
            yield last_step + 1, record
            last_step = record["step"]


def skipped_steps(log_path: str | Path) -> list[dict[str, Any]]:
    """The log intervals in which the trainer skipped steps whose gradient was not finite:
    ``{"first_step", "last_step", "skipped"}`` (how many) each."""
    return [{"first_step": first, "last_step": record["step"], "skipped": round(record["train/skipped_steps"])}
            for first, record in train_intervals(log_path) if record.get("train/skipped_steps", 0) > 0]


def loss_spikes(log_path: str | Path) -> list[dict[str, Any]]:
    """The log intervals of a stage's log that look like loss spikes, by the rule the trainer warns with:
    ``{"first_step", "last_step", "grad_norm", "ratio"}`` each; not those the trainer trained on from with cuDNN's
    attention turned off (``cudnn_attention_off``: their steps were skipped, the weights left alone)."""
    harmless = {(r["first_step"], r["last_step"]) for r in cudnn_attention_off(log_path)}
    spikes, norms = [], []
    for first, record in train_intervals(log_path):
        if "train/grad_norm" not in record:
            continue
        ratio = spike_ratio(norms, record["train/grad_norm"])
        if ratio is not None and (first, record["step"]) not in harmless:
            spikes.append({"first_step": first, "last_step": record["step"],
                           "grad_norm": record["train/grad_norm"], "ratio": ratio})
        if math.isfinite(record["train/grad_norm"]):  # as the trainer: a NaN would spoil the level
            norms.append(record["train/grad_norm"])
    return spikes
