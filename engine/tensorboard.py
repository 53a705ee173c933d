"""TensorBoard logging for the training engine: ``tensorboard --logdir runs/NAME`` shows every stage.

Each stage writes ``STAGE_DIR/tb/``: the scalars of the JSONL log (loss terms, learning rate, throughput,
validation metrics), the per-epoch picture grids and the run's config as text. Only the main rank writes, and
only values the engine has already brought to the host at its log interval, so it adds no device sync.

``tensorboard`` is an optional extra (``pip install -e ".[tensorboard]"``): without it the run trains as
before, and says once how to turn this on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

_missing_notice_shown = False


class TensorBoardLog:
    """One stage's event files under ``folder``; every method is a no-op when tensorboard is not installed."""

    def __init__(self, folder: str | Path, resume_step: int | None = None) -> None:
        """``resume_step``: the step a resumed run continues from; the events past it go, as in the JSONL log.
        A fresh run removes the previous run's event files."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            _notice_missing()
            self.writer = None
            return
        self.folder = Path(folder)
        self._start_keeping(SummaryWriter, resume_step)

    def purge_after(self, step: int) -> None:
        """Drop the events past ``step`` (training went back there after a loss spike): the steps trained again
        take their place, as in the JSONL log."""
        if self.writer is not None:
            self.writer.close()
            self._start_keeping(type(self.writer), step)

    def _start_keeping(self, writer_class: type, step: int | None) -> None:
        """A fresh event file holding the folder's events up to ``step`` (none when None); the old files go.
        Rewritten rather than hidden behind a purge marker in a newer file: TensorBoard reads a folder's files in
        name order, and two files opened in one second are ordered by a counter compared as text (…10 before …9)."""
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
        old_files = sorted(self.folder.glob("events.out.tfevents.*"))
        kept = [] if step is None else [
            event for path in old_files for event in LegacyEventFileLoader(str(path)).Load()
            if not event.HasField("file_version") and event.step <= step]
        self.writer = writer_class(str(self.folder))
        for event in kept:
            self.writer.file_writer.add_event(event)
        self.writer.flush()
        for path in old_files:
            path.unlink()

    def scalars(self, record: Mapping[str, Any], step: int) -> None:
        """Every number of a log record except its bookkeeping (``step``, ``epoch``), tagged by its key."""
        if self.writer is None:
            return
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, tag: str, png: str | Path, step: int) -> None:
        """A picture grid the stage saved as PNG, as it is on disk."""
        if self.writer is None:
            return
        pixels = np.asarray(Image.open(png).convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def config(self, config: Mapping[str, Any], step: int) -> None:
        """The run's config as indented JSON (a code block, so TensorBoard keeps the layout)."""
        if self.writer is None:
            return
        text = json.dumps(dict(config), indent=2, ensure_ascii=False, default=str)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _notice_missing() -> None:
    global _missing_notice_shown
    if not _missing_notice_shown:
        _missing_notice_shown = True
        tqdm.write("TensorBoard logging is off (tensorboard is not installed); "
                   "pip install -e '.[tensorboard]' to watch runs with tensorboard --logdir runs/NAME")
