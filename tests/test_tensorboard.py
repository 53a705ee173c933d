"""TensorBoard logging through the engine: the event file holds the log's scalars, the grids and the config."""

import builtins
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from engine import Trainer, TrainConfig
from engine.images import save_grid
from engine.runlog import read_records

pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install -e '.[tensorboard]'")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.summary.writer import event_file_writer  # noqa: E402

X = torch.linspace(-1, 1, 32)[:, None]


class Line(nn.Module):
    def __init__(self):
        super().__init__()
        self.fit = nn.Linear(1, 1)

    def forward(self, batch, step):
        error = self.fit(batch) - 3 * batch
        return error.square().mean(), {"abs_error": error.abs().mean()}


def train(out, epochs=2, resume=False):
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=0.05, warmup_steps=1, log_every=2)
    trainer = Trainer(Line(), cfg, out, num_train_items=len(X), resume=resume, device="cpu",
                      run_config={"stage": "line", "train": {"lr": 0.05}})

    def on_epoch_end(epoch, trainer):
        trainer.log_image("samples", save_grid(torch.rand(2, 3, 8, 8) * 2 - 1, out / f"grid_{epoch}.png", nrow=2))
        return {"val/loss": 0.5 / epoch}

    trainer.fit(lambda rows, generator: X[rows], on_epoch_end)
    return trainer


def events(folder):
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_event_file_holds_the_logged_scalars_grids_and_config(tmp_path):
    train(tmp_path / "run")
    tb = events(tmp_path / "run" / "tb")
    tags = tb.Tags()
    assert {"train/loss", "train/abs_error", "lr", "samples_per_s", "val/loss"} <= set(tags["scalars"])
    assert tags["images"] == ["samples"] and len(tb.Images("samples")) == 2
    assert "config/text_summary" in tags["tensors"]
    config_text = tb.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"stage": "line"' in config_text
    # the same numbers as the JSONL log, at the same steps
    logged = [(r["step"], r["train/loss"]) for r in read_records(tmp_path / "run" / "log.jsonl") if r["kind"] == "train"]
    shown = [(e.step, e.value) for e in tb.Scalars("train/loss")]
    assert [s for s, _ in shown] == [s for s, _ in logged]
    assert all(v == pytest.approx(w, rel=1e-6) for (_, v), (_, w) in zip(shown, logged))
    assert [e.value for e in tb.Scalars("val/loss")] == pytest.approx([0.5, 0.25])


def test_a_rolled_back_spike_shows_the_steps_trained_again_not_the_spiked_ones(tmp_path, monkeypatch):
    # the worst case for TensorBoard's name order: both event files opened in one second, the writer's file
    # counter crossing from 9 to 10
    monkeypatch.setattr(event_file_writer, "time", SimpleNamespace(time=lambda: 1_800_000_000.0))
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, warmup_steps=1, log_every=2, spike_rollbacks=1)
    trainer = Trainer(Line(), cfg, tmp_path / "run", num_train_items=len(X), device="cpu")
    spike_left = [True]

    def make_batch(rows, generator):  # step 7's inputs 100x larger, once: a spike in steps 7-8, back to step 4
        if trainer.step == 6 and spike_left[0]:
            spike_left[0] = False
            return 100 * X[rows]
        return X[rows]

    trainer.fit(make_batch)
    assert trainer.spike_rollbacks_used == 1
    logged = [(r["step"], r["train/loss"]) for r in read_records(tmp_path / "run" / "log.jsonl")
              if r["kind"] == "train"]
    shown = [(e.step, e.value) for e in events(tmp_path / "run" / "tb").Scalars("train/loss")]
    assert [s for s, _ in shown] == [s for s, _ in logged] == [2, 4, 6, 8]
    assert all(v == pytest.approx(w, rel=1e-6) for (_, v), (_, w) in zip(shown, logged))


def test_a_fresh_run_replaces_the_old_events(tmp_path):
    train(tmp_path / "run", epochs=1)
    train(tmp_path / "run", epochs=1)
    assert len(events(tmp_path / "run" / "tb").Scalars("val/loss")) == 1


def test_without_tensorboard_the_run_trains_and_says_once_how_to_enable_it(tmp_path, monkeypatch, capsys):
    import engine.tensorboard

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.setattr(engine.tensorboard, "_missing_notice_shown", False)
    train(tmp_path / "a", epochs=1)
    train(tmp_path / "b", epochs=1)
    out = capsys.readouterr()
    assert (out.out + out.err).count("pip install -e '.[tensorboard]'") == 1
    assert not (tmp_path / "a" / "tb").exists() and (tmp_path / "a" / "log.jsonl").is_file()


def test_a_resumed_run_shows_the_steps_of_its_log_the_checkpoints_kept_and_the_replayed_once(tmp_path):
    class Killed(Exception):
        pass

    def run(resume):
        cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, warmup_steps=1, log_every=2)
        trainer = Trainer(Line(), cfg, tmp_path / "run", num_train_items=len(X), resume=resume, device="cpu")

        def make_batch(rows, generator):  # killed in step 7, after step 6 was logged; the checkpoint is step 4's
            if trainer.step == 6 and not resume:
                raise Killed
            return X[rows]

        trainer.fit(make_batch, lambda epoch, t: {"val/loss": 0.5 / epoch})

    with pytest.raises(Killed):
        run(resume=False)
    run(resume=True)
    records = read_records(tmp_path / "run" / "log.jsonl")
    tb = events(tmp_path / "run" / "tb")
    for kind, tag in (("train", "train/loss"), ("epoch", "val/loss")):
        logged = [(r["step"], r[tag]) for r in records if r["kind"] == kind]
        shown = [(e.step, e.value) for e in tb.Scalars(tag)]
        assert [s for s, _ in shown] == [s for s, _ in logged]
        assert all(v == pytest.approx(w, rel=1e-6) for (_, v), (_, w) in zip(shown, logged))
    assert [s for s, _ in shown] == [4, 8]
