"""The stage-folder convention shared by the VAE, CLIP and UNet stages.

A stage folder holds ``config.json`` (kind, configs, code version, lineage), ``model.safetensors`` and
``metrics.json``. ``config.json`` is written last and atomically, so its presence means the folder is
complete; a half-written folder never looks finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import config_from_dict, config_to_dict
from .errors import UserError

CODE_VERSION = "0.1.0"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
LOCK_FILE = ".lock"


class StageError(UserError):
    """A stage folder that is missing, incomplete, of the wrong kind, or does not fit its neighbours."""


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)``, fsync the file, then rename it over ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as indented UTF-8 JSON."""
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def file_fingerprint(path: str | Path) -> str:
    """Short content hash of a file: the identity that lineage records refer to."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


@dataclass
class StageInfo:
    """What ``config.json`` says about a stage folder."""

    path: Path
    kind: str
    model: dict[str, Any]
    training: dict[str, Any]
    trained_on: dict[str, str]
    fingerprint: str
    code_version: str


def save_stage(folder: str | Path, *, kind: str, model_config: Mapping[str, Any], weights: Mapping[str, torch.Tensor],
               training: Mapping[str, Any] | None = None, trained_on: Mapping[str, str] | None = None,
               metrics: Mapping[str, Any] | None = None) -> str:
    """Write a complete stage folder and return its fingerprint (hash of the weights file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"kind": kind}))
    fingerprint = file_fingerprint(folder / WEIGHTS_FILE)
    if metrics is not None:
        write_json(folder / METRICS_FILE, dict(metrics))
    write_json(folder / CONFIG_FILE, {
        "kind": kind,
        "code_version": CODE_VERSION,
        "fingerprint": fingerprint,
        "model": dict(model_config),
        "training": dict(training or {}),
        "trained_on": dict(trained_on or {}),
    })
    return fingerprint


# how a lineage record's inputs read in a difference: the data (its images), its captions, the captions as the
# stage trained on them (the UNet's, with colour sentences), a tokenizer, the weights a stage started from, the
# UNet's silhouette twin groups (what balance_twins weighted), otherwise an upstream stage ("vae", "clip")
_INPUT_NAMES = {"data": "other data", "captions": "other captions",
                "trained_captions": "other training captions (their colour sentences, trimming or recoloured "
                                    "copies differ)",
                "tokenizer": "another tokenizer", "init": "other starting weights",
                "twin_groups": "other silhouette twin groups (balance_twins' draw weights)"}


def lineage_differences(recorded: Mapping[str, str], asked: Mapping[str, tuple[str | None, str]]) -> list[str]:
    """How the inputs a stage or checkpoint was trained on (its ``trained_on``) differ from ``asked``,
    ``{input: (fingerprint, where)}``, one line each. A fingerprint of ``None`` is an upstream stage about to be
    trained again; an input the record does not name is not compared (a record only names what it used)."""
    differences = []
    for name, (fingerprint, where) in asked.items():
        if fingerprint is None:
            stage = "UNet stage it started from" if name == "init" else f"{name.upper()} stage it was trained on"
            differences.append(f"the {stage} is about to be trained again")
        elif name in recorded and recorded[name] != fingerprint:
            other = _INPUT_NAMES.get(name, f"another {name.upper()} stage")
            differences.append(f"it was trained on {other}{f' than {where}' if where else ''}")
    return differences


def is_complete(folder: str | Path) -> bool:
    """True when the folder holds a finished stage (its ``config.json`` and weights exist)."""
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def check_folder_path(folder: str | Path, flag: str, named: str | Path | None = None) -> None:
    """Refuse, before any work, a folder to write into that cannot be one: a file, a path below a file, or a
    folder (or the nearest one above it) this process may not write into. ``named``: what ``flag`` gave, when that
    is a file to write in ``folder``."""
    folder = Path(folder)
    named = folder if named is None else named
    nearest = next(path for path in (folder, *folder.parents) if path.exists() or path == Path(path.anchor))
    if not nearest.is_dir():
        raise StageError(f"{flag} {named} cannot be written: {nearest} is a file, not a folder; pass another {flag}")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise StageError(f"{flag} {named} cannot be written: {nearest} is not writable; pass another {flag}")


def check_training_folder(folder: str | Path, checkpoints: Sequence[Path], resume: bool, overwrite: bool) -> None:
    """Refuse to train into ``folder`` where that would lose work, unless asked to (``overwrite``): a finished
    stage (replacing it silently would break the lineage of every run that uses it) unless resuming it from its
    checkpoint, ``checkpoints[0]``, and an interrupted training's checkpoints (the stage's, and a phase's before
    it) unless resuming it.

    Nothing is removed here: the trainer un-finishes the folder when it starts afresh, so a mistake found
    between this check and training (a wrong data path, say) leaves the finished stage as it was.
    """
    folder = Path(folder)
    check_folder_path(folder, "--out")
    if overwrite:
        return
    if is_complete(folder):
        if not resume:
            raise StageError(f"{folder} already holds a finished stage; continue it with --resume, write to a new "
                             "--out folder, or pass --overwrite to replace it")
        if not checkpoints[0].is_file():
            raise StageError(f"{folder} holds a finished stage without the checkpoint --resume continues from "
                             f"({checkpoints[0]}); use it as it is, write to a new --out folder, or pass --overwrite "
                             "to train it again")
        return
    interrupted = [path for path in checkpoints if path.is_file()]
    if interrupted and not resume:
        raise StageError(f"{folder} holds an interrupted training's checkpoint ({interrupted[0]}); continue it with "
                         "--resume, or pass --overwrite to start it again")


def record_preset(folder: str | Path, name: str, reason: str) -> None:
    """Add the preset the stage was trained with (and why it was chosen) to its ``config.json``."""
    path = Path(folder) / CONFIG_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    data["preset"] = {"name": name, "reason": reason}
    write_json(path, data)


@contextlib.contextmanager
def folder_lock(folder: str | Path, holder: str) -> Iterator[None]:
    """Hold ``folder`` (created if missing) for one command while the block runs: a second command writing to it
    stops at once with an error naming the holder, instead of training over the first one's files. The lock is
    the operating system's (``flock`` on ``folder/.lock``), so a killed command leaves no stale lock behind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise StageError(f"{folder} is in use by another command ({fh.read().strip() or 'holder unknown'}); "
                             "wait for it to finish, or write to another folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{holder}, pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        yield  # closing the file releases the lock


def remove_empty_folders(folder: str | Path) -> None:
    """Remove ``folder`` and the folders below it that hold no file (what an early failure leaves behind)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


def read_stage(folder: str | Path, kind: str | None = None) -> StageInfo:
    """Read a stage folder's ``config.json``; errors name the folder and what to do."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StageError(f"stage folder {folder} does not exist; train that stage first or pass the right path")
    if not is_complete(folder):
        raise StageError(f"stage folder {folder} is incomplete (no {CONFIG_FILE} or {WEIGHTS_FILE}); "
                         "finish its training (rerun with --resume) or pass a finished folder")
    data = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    if kind is not None and data.get("kind") != kind:
        raise StageError(f"{folder} holds a '{data.get('kind')}' stage, but a '{kind}' stage was expected")
    return StageInfo(path=folder, kind=data["kind"], model=data["model"], training=data.get("training", {}),
                     trained_on=data.get("trained_on", {}), fingerprint=data["fingerprint"],
                     code_version=data.get("code_version", "?"))


def load_weights(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The stage's state dict, read from safetensors (never unpickled); a damaged file is a ``StageError``."""
    path = Path(folder) / WEIGHTS_FILE
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors reports truncation and corruption with several exception types
        raise StageError(f"weights file {path} is truncated or corrupt ({type(err).__name__}: {err}); copy the "
                         "stage folder again, or train the stage again (--overwrite)") from None


StageModelT = TypeVar("StageModelT", bound="StageModel")


class StageModel(nn.Module):
    """A model that is one stage: ``save`` writes its stage folder, ``load`` rebuilds it from one.

    Subclasses set ``STAGE_KIND`` and ``CONFIG_CLASS`` and keep their architecture config in ``self.config``;
    one that needs more than its config to be built (CLIP's tokenizer) overrides ``from_config_in``.
    """

    STAGE_KIND: str
    CONFIG_CLASS: type

    def save(self, folder: str | Path, training: Mapping[str, Any] | None = None,
             trained_on: Mapping[str, str] | None = None, metrics: Mapping[str, Any] | None = None) -> str:
        """Write the stage folder (config.json last) and return its fingerprint."""
        return save_stage(folder, kind=self.STAGE_KIND, model_config=config_to_dict(self.config),
                          weights=self.state_dict(), training=training, trained_on=trained_on, metrics=metrics)

    @classmethod
    def from_config_in(cls: type[StageModelT], folder: Path, config: Any) -> StageModelT:
        """A fresh model of ``config``, the architecture saved in ``folder``."""
        return cls(config)

    @classmethod
    def load(cls: type[StageModelT], folder: str | Path, device: str | torch.device = "cpu") -> StageModelT:
        """The model of a finished stage folder, in eval mode on ``device``."""
        info = read_stage(folder, kind=cls.STAGE_KIND)
        model = cls.from_config_in(Path(folder), config_from_dict(cls.CONFIG_CLASS, info.model))
        model.load_state_dict(load_weights(folder))
        return model.to(device).eval()
