import copy
import gc
import json
import math
import os
import shlex
import subprocess
import sys
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from torch import nn

from clip.config import CLIPConfig
from diffusion.config import PRESETS as UNET_PRESETS
from diffusion.config import UNetTrainConfig
import engine.trainer
from engine import ConfigError, Trainer, TrainConfig, apply_overrides, build_config, read_stage, save_stage
from data import DataError
from engine.cli import comma_choices, command_line, run_stage_cli, stage_parser
from engine.config import config_from_dict, config_to_dict, parse_overrides, validate_config
from engine.ema import EMA, power_profile_exponent, power_profile_std
from engine.runlog import (cudnn_attention_off, loss_spikes, read_records, rollbacks, skipped_steps, spike_ratio,
                           truncate_after)
from engine.stage import StageError, folder_lock, is_complete, load_weights
from engine.trainer import TrainingDiverged, checkpoint_path, lr_factor, read_checkpoint
from unet.config import UNetConfig
from vae.config import PRESETS as VAE_PRESETS, VAEConfig, VAETrainConfig


@dataclass
class ArchConfig:
    width: int = 8
    mults: tuple[int, ...] = (1, 2)
    dropout: float | None = None


@dataclass
class RunConfig:
    model: ArchConfig = field(default_factory=ArchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    crop: int = 32
    use_gan: bool = True


def test_overrides_reach_nested_fields_with_types():
    cfg = apply_overrides(RunConfig(), {"lr": "3e-4", "width": "16", "mults": "1,2,4", "use_gan": "false",
                                        "model.dropout": "0.1", "train.epochs": 7})
    assert cfg.train.lr == 3e-4 and cfg.model.width == 16 and cfg.model.mults == (1, 2, 4)
    assert cfg.use_gan is False and cfg.model.dropout == 0.1 and cfg.train.epochs == 7
    assert apply_overrides(RunConfig(), {"dropout": "none"}).model.dropout is None


def test_unknown_or_bad_override_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown config key 'lrr'.*lr"):
        apply_overrides(RunConfig(), {"lrr": "1"})
    with pytest.raises(ConfigError, match="cannot read 'abc' as int"):
        apply_overrides(RunConfig(), {"width": "abc"})
    with pytest.raises(ConfigError, match="--key=value"):
        parse_overrides(["--lr", "3"])
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config(RunConfig, {"tiny": {}}, "huge")


def test_presets_then_overrides_and_json_round_trip():
    cfg = build_config(RunConfig, {"tiny": {"width": 4, "epochs": 2}}, "tiny", {"epochs": "5"})
    assert cfg.model.width == 4 and cfg.train.epochs == 5
    again = config_from_dict(RunConfig, json.loads(json.dumps(config_to_dict(cfg))))
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown keys"):
        config_from_dict(RunConfig, {"nope": 1})


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_ema_tracks_and_swaps():
    layer = nn.Linear(2, 2)
    ema = EMA(layer, decay=0.5)
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update()  # effective decay min(0.5, 2/11) = 2/11
    expected = start + (1 - 2 / 11) * 1.0
    with ema.swapped_in():
        torch.testing.assert_close(layer.weight, expected)
    torch.testing.assert_close(layer.weight, start + 1.0)


def test_power_ema_is_the_closed_form_average_of_every_step():
    # EDM2's profile: after n updates the shadow is sum_k w_k (k^(g+1) - (k-1)^(g+1)) / n^(g+1), a step-k weight
    # growing as k^g, whatever n is
    assert power_profile_exponent(0.10) == pytest.approx(6.94, abs=0.01)  # EDM2's own pairing
    for std in (0.05, 0.15, 0.28):
        assert power_profile_std(power_profile_exponent(std)) == pytest.approx(std, rel=1e-9)
    layer = nn.Linear(1, 1, bias=False)
    ema = EMA(layer, std=0.10)
    g, n = ema.exponent, 30
    for k in range(1, n + 1):
        with torch.no_grad():
            layer.weight.fill_(float(k))
        ema.update()
    expected = sum(k * (k ** (g + 1) - (k - 1) ** (g + 1)) for k in range(1, n + 1)) / n ** (g + 1)
    with ema.swapped_in():
        assert layer.weight.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(n * (g + 1) / (g + 2), abs=1)  # the profile's mean, (g+1)/(g+2) of the way
    with pytest.raises(ValueError, match="either a decay or a std"):
        EMA(layer, decay=0.9, std=0.1)
    with pytest.raises(ValueError, match=r"std must be in \(0, 0.2887\)"):
        EMA(layer, std=0.5)


def test_ema_settings_are_checked_with_the_fix_named():
    with pytest.raises(ConfigError, match="ema_decay=0.999 and ema_std=0.1 both ask for the EMA; set one of them to 0"):
        TrainConfig(ema_decay=0.999, ema_std=0.1).validate()
    with pytest.raises(ConfigError, match=r"ema_probe_stds: 0.5 is no power-function EMA width; use a share"):
        TrainConfig(ema_probe_stds=(0.05, 0.5)).validate()
    assert apply_overrides(TrainConfig(), {"ema_probe_stds": "0.05,0.1"}).ema_probe_stds == (0.05, 0.1)


@pytest.mark.parametrize("config, field, value", [
    ("unet", "head_dim", 0), ("unet", "norm_groups", 0), ("unet", "channel_mult", (1, 0)), ("unet", "context_dim", 0),
    ("vae", "norm_groups", 0), ("vae", "channel_mult", ()), ("clip", "text_heads", 0), ("clip", "image_channels", ()),
    ("train", "batch_size", 0), ("unet_train", "sample_seeds", 0)])
def test_a_size_below_one_is_refused_naming_its_field(config, field, value):
    # these failed late: a division by zero, or an empty layer at the first forward
    classes = {"unet": UNetConfig, "vae": VAEConfig, "clip": CLIPConfig, "train": TrainConfig,
               "unet_train": UNetTrainConfig}
    cfg = classes[config]()
    setattr(cfg, field, value)
    named = rf"{type(cfg).__name__}: {field} (must be|needs at least one entry, each) >= 1"
    with pytest.raises(ConfigError, match=named):
        validate_config(cfg)


@pytest.mark.parametrize("settings, named", [
    ({"lr": float("nan")}, "lr must be a finite number >= 0"), ({"lr": -1e-4}, "lr must be"),
    ({"beta2": 1.5}, r"beta2 must be in \[0, 1\)"), ({"beta1": -0.1}, "beta1 must be"),
    ({"min_lr_ratio": -1.0}, r"min_lr_ratio must be in \[0, 1\]"), ({"weight_decay": -0.1}, "weight_decay"),
    ({"checkpoint_every_steps": -1}, "checkpoint_every_steps must be >= 0"),
    ({"checkpoint_every_steps": 30, "log_every": 20}, "a multiple of log_every=20, got 30")])
def test_optimizer_settings_torch_would_refuse_late_or_never_are_refused_first(settings, named):
    # AdamW refuses most of these only when a stage builds it (after the stages before it trained); a negative
    # min_lr_ratio it takes, and the cosine then ends in gradient ascent
    with pytest.raises(ConfigError, match=named):
        TrainConfig(**settings).validate()


def test_stage_loss_and_vocabulary_settings_are_checked():
    with pytest.raises(ConfigError, match="vocab_size must be >= 259"):
        validate_config(CLIPConfig(vocab_size=100))
    with pytest.raises(ConfigError, match="dropout in"):
        validate_config(CLIPConfig(dropout=1.5))
    with pytest.raises(ConfigError, match="loss weights must be >= 0"):
        build_config(VAETrainConfig, VAE_PRESETS, "tiny", {"kl_weight": "-1"})


def test_a_fixed_length_tuple_key_takes_exactly_its_values():
    cfg = UNetTrainConfig()
    assert apply_overrides(cfg, {"augment.log2_scale": "(-0.5, 0.1)"}).augment.log2_scale == (-0.5, 0.1)
    for raw in ("-0.5", "-0.5,0.1,0.2"):
        with pytest.raises(ConfigError, match="'augment.log2_scale' takes 2 comma-separated values"):
            apply_overrides(cfg, {"augment.log2_scale": raw})
    assert apply_overrides(cfg, {"model.channel_mult": "1,2,2"}).model.channel_mult == (1, 2, 2)  # any length


def test_stage_folder_round_trip_and_errors(tmp_path):
    weights = {"w": torch.randn(3, 3)}
    fp = save_stage(tmp_path / "s", kind="vae", model_config={"a": 1}, weights=weights,
                    trained_on={"data": "abc"}, metrics={"psnr": 30.0})
    info = read_stage(tmp_path / "s", "vae")
    assert info.fingerprint == fp and info.model == {"a": 1} and info.trained_on == {"data": "abc"}
    torch.testing.assert_close(load_weights(tmp_path / "s")["w"], weights["w"])
    with pytest.raises(StageError, match="'vae' stage, but a 'clip'"):
        read_stage(tmp_path / "s", "clip")
    with pytest.raises(StageError, match="does not exist"):
        read_stage(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    with pytest.raises(StageError, match="incomplete"):
        read_stage(tmp_path / "half")
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_a_held_folder_stops_a_second_command_with_the_holder_named_and_a_killed_holder_leaves_no_lock(tmp_path):
    folder = tmp_path / "run"
    with folder_lock(folder, "train_all.py --run a"):
        with pytest.raises(StageError, match=r"run is in use by another command \(train_all.py --run a, pid \d+ on "):
            with folder_lock(folder, "second"):
                pass
    with folder_lock(folder, "second"):  # released when the block ends
        pass
    script = (f"import time\nfrom engine.stage import folder_lock\nwith folder_lock({str(folder)!r}, 'killed'):\n"
              "    print('held', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageError, match=r"in use by another command \(killed, pid"):
            with folder_lock(folder, "third"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(folder, "third"):  # the operating system dropped the killed process's lock
        pass


# ---------------------------------------------------------------- training engine
class ToyModule(nn.Module):
    """Regression with dropout and input noise, so the RNG state matters for exact resume."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.2), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, batch, step):
        x, y = batch
        pred = self.net(x + 0.01 * torch.randn_like(x))
        loss = (pred - y).square().mean()
        return loss, {"mse": loss.detach()}


DATA_X = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
DATA_Y = DATA_X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def make_batch(indices, generator):
    sign = torch.where(torch.rand(len(indices), 1, generator=generator, device=indices.device) < 0.5, -1.0, 1.0)
    return DATA_X.to(indices.device)[indices] * sign, DATA_Y.to(indices.device)[indices] * sign


def train(out, epochs, resume=False, crash_at=None, device="cpu", trained_on=None, item_weights=None, **overrides):
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=1e-2, warmup_steps=3, ema_decay=0.9, log_every=2, **overrides)
    trainer = Trainer(ToyModule(), cfg, out, num_train_items=len(DATA_X), resume=resume, device=device,
                      trained_on=trained_on, item_weights=item_weights)

    def batches(indices, generator):
        if crash_at is not None and trainer.step == crash_at:
            raise KeyboardInterrupt  # stands in for a killed process
        return make_batch(indices, generator)

    trainer.fit(batches, on_epoch_end=lambda epoch, t: {"val/probe": float(torch.rand(()))})
    return trainer


def test_a_trained_trainer_is_freed_without_a_garbage_collection(tmp_path):
    """No reference cycle runs through the trainer: under DDP its wrapper holds the process group, which must go
    when the trainer does, not at the interpreter's teardown, where freeing gloo's work can abort the process."""
    train(tmp_path / "first", epochs=1)  # the first trainer's lazy imports leave frames in cycles of their own
    gc.disable()
    try:
        trainer = train(tmp_path / "second", epochs=2, spike_rollbacks=1)
        freed = weakref.ref(trainer)
        del trainer
        assert freed() is None
    finally:
        gc.enable()


def _same_state(a: Trainer, b: Trainer):
    for (name, p), q in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        assert torch.equal(p, q), name
    for ema_a, ema_b in [(a.ema, b.ema)] + [(a.ema_probes[std], b.ema_probes[std]) for std in a.ema_probes]:
        for s, t in zip(ema_a.shadow.values(), ema_b.shadow.values()):
            assert torch.equal(s, t)
    assert a.step == b.step and a.optimizer.state_dict()["state"][0]["step"] == b.optimizer.state_dict()["state"][0]["step"]


def test_loss_decreases(tmp_path):
    trainer = train(tmp_path / "run", epochs=6)
    records = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < 0.5 * losses[0]
    assert (tmp_path / "run" / "loss.png").is_file() and trainer.step == 6 * 8
    assert sum(r["kind"] == "epoch" for r in records) == 6


def test_each_log_interval_records_its_largest_gradient_norm_and_a_spike_is_reported(tmp_path, capsys):
    def records(out):
        return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    train(tmp_path / "smooth", epochs=6)
    smooth = [r for r in records(tmp_path / "smooth") if r["kind"] == "train"]
    assert all(r["train/grad_norm_max"] >= r["train/grad_norm"] > 0 for r in smooth)
    assert any(r["train/grad_norm_max"] > 1.01 * r["train/grad_norm"] for r in smooth)  # a peak, not the mean
    assert "loss spike" not in capsys.readouterr().out

    cfg = TrainConfig(epochs=6, batch_size=8, lr=1e-2, warmup_steps=3, ema_decay=0.9, log_every=2)
    trainer = Trainer(ToyModule(), cfg, tmp_path / "spiky", num_train_items=len(DATA_X), device="cpu")

    def batches(indices, generator):  # two steps of targets far off: the gradient jumps there
        x, y = make_batch(indices, generator)
        return (x, 100 * y) if trainer.step in (30, 31) else (x, y)

    trainer.fit(batches)
    norms = {r["step"]: r["train/grad_norm_max"] for r in records(tmp_path / "spiky") if r["kind"] == "train"}
    assert norms[32] > 20 * max(norms[30], norms[34])  # the interval of steps 31-32 holds the peak
    assert "spiky: loss spike? the gradient norm averaged" in capsys.readouterr().out
    # the log read back afterwards finds the same interval by the same rule, and none in the smooth run
    [spike] = loss_spikes(tmp_path / "spiky" / "log.jsonl")
    assert (spike["first_step"], spike["last_step"]) == (31, 32) and spike["ratio"] > 2.5
    assert loss_spikes(tmp_path / "smooth" / "log.jsonl") == []
    # a NaN interval counts as a spike but, as in the trainer, not in the level later intervals are measured by
    log = tmp_path / "nan.jsonl"
    log.write_text("".join(json.dumps({"kind": "train", "step": 10 * (i + 1), "train/grad_norm": g}) + "\n"
                           for i, g in enumerate([0.2, 0.2, float("nan"), 0.2, 0.2, 0.6])))
    assert [(s["last_step"], s["ratio"]) for s in loss_spikes(log)] == [(30, math.inf), (60, pytest.approx(3.0))]


def test_spike_ratio_against_the_median_of_the_intervals_before():
    assert spike_ratio([1.0, 1.0], 10.0) is None  # fewer than three intervals before: no level yet
    assert spike_ratio([1.0, 2.0, 0.5, 1.0, 9.0], 3.0) == pytest.approx(3.0)  # median 1.0
    assert spike_ratio([1.0, 2.0, 0.5, 1.0, 9.0], 2.4) is None  # under the factor
    assert spike_ratio([9.0, 9.0, 9.0, 1.0, 1.0, 1.0, 9.0, 9.0], 3.0) == pytest.approx(3.0)  # the last five count
    assert spike_ratio([1.0, 1.0, 1.0], float("nan")) == spike_ratio([], float("inf")) == float("inf")
    assert spike_ratio([0.0, 0.0, 0.0], 0.5) is None  # no gradient before: no scale, and no division by zero


def test_a_step_whose_gradient_is_not_finite_is_skipped_and_leaves_weights_and_moments_alone(tmp_path, capsys):
    cfg = TrainConfig(epochs=6, batch_size=8, lr=1e-2, warmup_steps=3, ema_decay=0.9, log_every=2, spike_rollbacks=2)
    trainer = Trainer(ToyModule(), cfg, tmp_path / "skip", num_train_items=len(DATA_X), device="cpu")
    seen = {}

    def batches(indices, generator):  # NaN targets at step 30 only; the state on entering steps 30 and 31 kept
        if trainer.step in (30, 31):
            seen[trainer.step] = copy.deepcopy(trainer.optimizer.state_dict()), [p.detach().clone() for p in
                                                                                 trainer.module.parameters()]
        x, y = make_batch(indices, generator)
        return (x, y * float("nan")) if trainer.step == 30 else (x, y)

    trainer.fit(batches)
    (moments_before, weights_before), (moments_after, weights_after) = seen[30], seen[31]
    assert all(torch.equal(a, b) for a, b in zip(weights_before, weights_after))
    for key, state in moments_before["state"].items():  # moments and AdamW's own step count untouched
        assert all(torch.equal(state[name], moments_after["state"][key][name]) for name in state)
    assert all(torch.isfinite(p).all() for p in trainer.module.parameters())
    assert all(torch.isfinite(t).all() for t in trainer.ema.shadow.values())
    log = tmp_path / "skip" / "log.jsonl"
    assert rollbacks(log) == [] and trainer.spike_rollbacks_used == 0 and loss_spikes(log) == []
    assert skipped_steps(log) == [{"first_step": 31, "last_step": 32, "skipped": 1}]
    train_log = {r["step"]: r for r in read_records(log) if r["kind"] == "train"}
    interval, before = train_log[32], train_log[30]  # means over the one step taken, not diluted by the skip
    assert interval["train/skipped_steps"] == 1
    for key in ("train/loss", "train/grad_norm"):
        assert 0.5 * before[key] < interval[key] < 2 * before[key]
    assert all(r["train/skipped_steps"] == 0 for r in read_records(log) if r["kind"] == "train" and r["step"] != 32)
    assert "skip: 1 of steps 31-32 skipped: the gradient was not finite" in capsys.readouterr().out


def test_a_folder_to_write_that_cannot_be_one_is_refused(tmp_path):
    from engine.stage import check_folder_path

    check_folder_path(tmp_path / "new" / "deeper", "--out")  # made later: nothing to refuse
    (tmp_path / "afile").write_text("")
    with pytest.raises(StageError, match=r"--out .*afile is a file, not a folder; pass another --out"):
        check_folder_path(tmp_path / "afile", "--out")
    with pytest.raises(StageError, match=r"--run .*afile/x cannot be written: .*afile is a file, not a folder"):
        check_folder_path(tmp_path / "afile" / "x", "--run")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(StageError, match=r"cannot be written: .*locked is not writable"):
            check_folder_path(locked / "x", "--out")


def test_a_file_that_is_not_a_picture_is_a_user_error(tmp_path):
    from engine.errors import UserError
    from engine.images import read_grid

    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(UserError, match="notes.png is not a picture"):
        read_grid(tmp_path / "notes.png", 64)


def test_a_negative_loss_weight_is_refused():
    with pytest.raises(ConfigError, match="loss.min_snr_gamma must be >= 0, got -1.0"):
        build_config(UNetTrainConfig, UNET_PRESETS, "tiny", {"loss.min_snr_gamma": "-1"})


def test_without_clipping_a_step_whose_gradient_is_not_finite_is_still_skipped(tmp_path, capsys):
    # the VAE stage trains with grad_clip=0: its norm is measured for the skip, not clipped or logged
    cfg = TrainConfig(epochs=6, batch_size=8, lr=1e-2, warmup_steps=3, ema_decay=0.9, log_every=2, grad_clip=0.0)
    trainer = Trainer(ToyModule(), cfg, tmp_path / "noclip", num_train_items=len(DATA_X), device="cpu")
    seen = {}

    def batches(indices, generator):  # NaN targets at step 30 only
        if trainer.step in (30, 31):
            seen[trainer.step] = [p.detach().clone() for p in trainer.module.parameters()]
        x, y = make_batch(indices, generator)
        return (x, y * float("nan")) if trainer.step == 30 else (x, y)

    trainer.fit(batches)
    assert all(torch.equal(a, b) for a, b in zip(seen[30], seen[31]))
    assert all(torch.isfinite(p).all() for p in trainer.module.parameters())
    log = tmp_path / "noclip" / "log.jsonl"
    assert skipped_steps(log) == [{"first_step": 31, "last_step": 32, "skipped": 1}]
    assert all("train/grad_norm" not in r for r in read_records(log) if r["kind"] == "train")
    assert "noclip: 1 of steps 31-32 skipped: the gradient was not finite" in capsys.readouterr().out
    every = Trainer(ToyModule(), cfg, tmp_path / "allnan", num_train_items=len(DATA_X), device="cpu")
    with pytest.raises(TrainingDiverged, match=r"every step of steps 1-2 had a gradient that is not finite"):
        every.fit(lambda indices, generator: tuple(t * float("nan") for t in make_batch(indices, generator)))


def test_an_interval_with_no_finite_gradient_is_rolled_back_and_with_no_rollback_left_stops(tmp_path):
    trainers, poisoned = [], set()

    def batches(indices, generator):  # NaN targets once, at steps 30 and 31 (the whole log interval 31-32)
        x, y = make_batch(indices, generator)
        if trainers[-1].step in poisoned:
            poisoned.discard(trainers[-1].step)
            return x, y * float("nan")
        return x, y

    for name, rollbacks_allowed in (("rolled_back", 2), ("none_left", 0)):
        cfg = TrainConfig(epochs=6, batch_size=8, lr=1e-2, warmup_steps=3, ema_decay=0.9, log_every=2,
                          spike_rollbacks=rollbacks_allowed)
        trainers.append(Trainer(ToyModule(), cfg, tmp_path / name, num_train_items=len(DATA_X), device="cpu"))
        poisoned.update((30, 31))
        if rollbacks_allowed:
            trainers[-1].fit(batches)
            [rollback] = rollbacks(tmp_path / name / "log.jsonl")
            # the replay of step 32's batch is clean: the targets were poisoned once, at steps 30 and 31
            assert rollback["first_step"] == 31 and rollback["nonfinite"].startswith("finite throughout")
            assert all(torch.isfinite(p).all() for p in trainers[-1].module.parameters())
            assert all(torch.isfinite(t).all() for t in trainers[-1].ema.shadow.values())
        else:
            with pytest.raises(TrainingDiverged, match=r"every step of steps 31-32 had a gradient that is not finite "
                                                       r"\(each was skipped\), .*lower learning rate"):
                trainers[-1].fit(batches)


class Trap(nn.Module):
    """The identity until ``sprung``, then NaN on every output: weights that stay finite yet make every step
    non-finite from then on."""

    sprung = False

    def forward(self, x):
        return x * float("nan") if self.sprung else x


def test_an_interval_with_no_finite_step_says_where_a_replay_of_its_last_batch_turns_non_finite(tmp_path, capsys):
    module = ToyModule()
    module.net[1] = Trap()  # in place of the dropout: Linear, Trap, ReLU, Linear
    cfg = TrainConfig(epochs=6, batch_size=8, lr=1e-2, warmup_steps=3, ema_decay=0.9, log_every=2, spike_rollbacks=1)
    trainer = Trainer(module, cfg, tmp_path / "trap", num_train_items=len(DATA_X), device="cpu")

    def batches(indices, generator):
        module.net[1].sprung = trainer.step >= 30
        return make_batch(indices, generator)

    where = "first non-finite in the forward, at the output of net.1"
    with pytest.raises(TrainingDiverged, match=rf"steps 31-32 .*no rollback is left \(a replay of the last batch: "
                                               rf"{where}\); train the stage again"):
        trainer.fit(batches)  # rolled back once to step 30, where the trap springs again
    [rollback] = rollbacks(tmp_path / "trap" / "log.jsonl")
    assert rollback["nonfinite"] == where
    assert f"no step with a finite gradient (a replay of the last batch: {where})" in capsys.readouterr().out
    assert all(p.grad is None for p in module.parameters())  # the replay's gradients are not left behind


def spiky_train(out, epochs, spike_at=(30,), crash_at=None, resume=False, **overrides):
    """``train`` with targets 100x off for two steps from each of ``spike_at``, once: a step trained again after a
    rollback gets the true targets (as a retried step does not meet the same accident). ``crash_at``: ``(step,
    rollbacks)``, killed at that step once that many rollbacks were made."""
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=1e-2, warmup_steps=3, ema_decay=0.9, log_every=2, **overrides)
    trainer = Trainer(ToyModule(), cfg, out, num_train_items=len(DATA_X), resume=resume, device="cpu")
    pending = {step + k for step in spike_at for k in (0, 1)}
    trainer.lr_used = {}  # step -> the learning rate its update used (the last pass's, for a replayed step)

    def batches(indices, generator):
        if crash_at == (trainer.step, trainer.spike_rollbacks_used):
            raise KeyboardInterrupt
        trainer.lr_used[trainer.step] = trainer.optimizer.param_groups[0]["lr"]
        x, y = make_batch(indices, generator)
        if trainer.step in pending:
            pending.discard(trainer.step)
            return x, 100 * y
        return x, y

    trainer.fit(batches, on_epoch_end=lambda epoch, t: {"val/probe": float(torch.rand(()))})
    return trainer


def train_records(out):
    return [r for r in read_records(out / "log.jsonl") if r["kind"] == "train"]


# log every 2 steps, epochs of 8: a spike in steps 31-32 goes back to the snapshot of step 28 (mid-epoch), one in
# steps 35-36 to that of step 32, taken after the epoch's end (its callback, its record, its checkpoint)
@pytest.mark.parametrize("spike_at, back_to", [(30, 28), (34, 32)])
def test_a_rolled_back_spike_leaves_no_trace_and_the_rollback_is_inert_without_one(tmp_path, capsys, spike_at,
                                                                                    back_to):
    smooth = train(tmp_path / "smooth", epochs=6)
    watched = train(tmp_path / "watched", epochs=6, spike_rollbacks=2)  # snapshots taken, none used
    _same_state(smooth, watched)
    damaged = spiky_train(tmp_path / "damaged", epochs=6, spike_at=(spike_at,))
    assert "train the stage again" in capsys.readouterr().out
    # backoff 1: the replay from the snapshot is the smooth run itself, bit for bit
    rolled = spiky_train(tmp_path / "rolled", epochs=6, spike_at=(spike_at,), spike_rollbacks=1,
                         spike_lr_backoff=1.0)
    _same_state(smooth, rolled)
    assert not torch.equal(damaged.module.net[0].weight, smooth.module.net[0].weight)
    out = capsys.readouterr().out
    assert f"rolled: rolled back from step {spike_at + 2} to step {back_to}" in out
    assert "train the stage again" not in out and rolled.spike_rollbacks_used == 1
    # the log: the spike's record, where training went back to, and the replayed steps in place of the spiked ones
    [rollback] = rollbacks(tmp_path / "rolled" / "log.jsonl")
    assert (rollback["step"], rollback["first_step"], rollback["last_step"]) == (back_to, spike_at + 1, spike_at + 2)
    assert rollback["ratio"] > 2.5 and rollback["lr_scale"] == 1.0
    assert loss_spikes(tmp_path / "rolled" / "log.jsonl") == []
    same = ("step", "train/loss", "train/grad_norm", "lr")
    assert [[r[k] for k in same] for r in train_records(tmp_path / "rolled")] == \
        [[r[k] for k in same] for r in train_records(tmp_path / "smooth")]
    epochs = [r["epoch"] for r in read_records(tmp_path / "rolled" / "log.jsonl") if r["kind"] == "epoch"]
    assert epochs == [1, 2, 3, 4, 5, 6]


def test_after_a_rollback_the_learning_rate_is_scaled_by_the_backoff_and_a_resume_keeps_it(tmp_path):
    # the spike (steps 33-34) is seen at step 34, after the checkpoint of step 32: the rollback to step 30 must
    # replace that checkpoint, or a resume would continue without the rollback's lower learning rate
    smooth = {r["step"]: r["lr"] for r in train_records(train(tmp_path / "smooth", epochs=6).out_dir)}
    straight = spiky_train(tmp_path / "a", epochs=6, spike_at=(32,), spike_rollbacks=1, spike_lr_backoff=0.5,
                           checkpoint_every_steps=2)
    after = {r["step"]: r["lr"] for r in train_records(tmp_path / "a")}  # the next step's, as logged then
    assert [r["step"] for r in rollbacks(tmp_path / "a" / "log.jsonl")] == [30]
    assert all(after[s] == pytest.approx(smooth[s]) for s in after if s <= 30)
    assert all(after[s] == pytest.approx(0.5 * smooth[s]) for s in after if s > 30)
    assert straight.lr_used[30] == pytest.approx(0.5 * smooth[30])  # from the first step after going back
    with pytest.raises(KeyboardInterrupt):  # killed in the replay's first steps, before any new checkpoint
        spiky_train(tmp_path / "b", epochs=6, spike_at=(32,), spike_rollbacks=1, spike_lr_backoff=0.5,
                    checkpoint_every_steps=2, crash_at=(31, 1))
    resumed = spiky_train(tmp_path / "b", epochs=6, spike_at=(), resume=True, spike_rollbacks=1,
                          spike_lr_backoff=0.5, checkpoint_every_steps=2)
    assert resumed.lr_scale == 0.5 and resumed.spike_rollbacks_used == 1
    _same_state(straight, resumed)
    assert len(rollbacks(tmp_path / "b" / "log.jsonl")) == 1


def test_a_second_rollback_to_the_same_snapshot_lowers_the_rate_again(tmp_path):
    # a spike in steps 33-34 goes back to step 30's snapshot; the replay spikes again in steps 31-32, before any
    # newer snapshot: back to the same one, whose scheduler state must not bring the first backoff's rate back
    cfg = TrainConfig(epochs=6, batch_size=8, lr=1e-2, warmup_steps=3, ema_decay=0.9, log_every=2, spike_rollbacks=2,
                      spike_lr_backoff=0.5)
    trainer = Trainer(ToyModule(), cfg, tmp_path / "twice", num_train_items=len(DATA_X), device="cpu")
    spoiled = {(32, 0), (33, 0), (30, 1), (31, 1)}  # (step, rollbacks used so far)

    def batches(indices, generator):
        x, y = make_batch(indices, generator)
        return (x, 100 * y) if (trainer.step, trainer.spike_rollbacks_used) in spoiled else (x, y)

    trainer.fit(batches)
    assert [(r["step"], r["lr_scale"]) for r in rollbacks(tmp_path / "twice" / "log.jsonl")] == [(30, 0.5),
                                                                                                 (30, 0.25)]
    assert trainer.lr_scale == 0.25


def test_a_run_resumed_before_a_spike_rolls_it_back_as_the_uninterrupted_run_does(tmp_path):
    straight = spiky_train(tmp_path / "a", epochs=6, spike_at=(32,), spike_rollbacks=1, checkpoint_every_steps=2)
    with pytest.raises(KeyboardInterrupt):  # killed before the spike: the snapshots in memory are lost
        spiky_train(tmp_path / "b", epochs=6, spike_at=(32,), spike_rollbacks=1, checkpoint_every_steps=2,
                    crash_at=(31, 0))
    resumed = spiky_train(tmp_path / "b", epochs=6, spike_at=(32,), resume=True, spike_rollbacks=1,
                          checkpoint_every_steps=2)
    assert resumed.spike_rollbacks_used == 1 and resumed.lr_scale == straight.lr_scale
    assert rollbacks(tmp_path / "b" / "log.jsonl") == rollbacks(tmp_path / "a" / "log.jsonl")
    _same_state(straight, resumed)


def test_a_spike_past_the_last_rollback_is_warned_of_and_stays_in_the_log(tmp_path, capsys):
    spiky_train(tmp_path / "run", epochs=8, spike_at=(30, 50), spike_rollbacks=1)
    out = capsys.readouterr().out
    assert out.count("rolled back from step") == 1 and "train the stage again" in out
    assert [r["last_step"] for r in rollbacks(tmp_path / "run" / "log.jsonl")] == [32]
    assert [s["last_step"] for s in loss_spikes(tmp_path / "run" / "log.jsonl")] == [52]


def test_spike_rollback_settings_are_checked_with_the_fix_named():
    with pytest.raises(ConfigError, match="grad_clip > 0, or spike_rollbacks=0"):
        TrainConfig(spike_rollbacks=1, grad_clip=0.0).validate()
    with pytest.raises(ConfigError, match=r"spike_lr_backoff must be in \(0, 1\]"):
        TrainConfig(spike_rollbacks=1, spike_lr_backoff=1.5).validate()
    with pytest.raises(ConfigError, match="spike_rollbacks must be >= 0"):
        TrainConfig(spike_rollbacks=-1).validate()


def test_a_log_cut_short_in_its_last_line_reads_back_whole_records_and_a_damaged_middle_line_is_an_error(tmp_path):
    log = tmp_path / "log.jsonl"
    whole = [{"kind": "train", "step": 10, "train/loss": 0.5}, {"kind": "train", "step": 20, "train/loss": 0.4}]
    log.write_text("".join(json.dumps(r) + "\n" for r in whole) + '{"kind": "train", "st')  # killed mid-write
    assert read_records(log) == whole
    log.write_text(json.dumps(whole[0]) + '\n{"kind": "tr\n' + json.dumps(whole[1]) + "\n")
    with pytest.raises(json.JSONDecodeError):
        read_records(log)


def test_resume_at_epoch_boundary_is_exact(tmp_path):
    straight = train(tmp_path / "a", epochs=4)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", epochs=4, crash_at=2 * 8 + 3)  # killed during epoch 3
    resumed = train(tmp_path / "b", epochs=4, resume=True)
    assert resumed.resumed
    _same_state(straight, resumed)


def test_last_epoch_metrics_survive_a_resume_with_nothing_left_to_train(tmp_path):
    trainer = train(tmp_path / "run", epochs=2)
    probe = trainer.last_epoch_metrics()["val/probe"]
    records = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert probe == [r for r in records if r["kind"] == "epoch"][-1]["val/probe"]
    finished = train(tmp_path / "run", epochs=2, resume=True)  # no epoch runs, the callback is not called
    assert finished.step == trainer.step and finished.last_epoch_metrics() == {"val/probe": probe}


def test_killed_run_resumes_mid_epoch_exactly(tmp_path):
    probes = (0.05, 0.2)  # power-function EMAs beside the fixed-decay one: resumed exactly too
    straight = train(tmp_path / "a", epochs=3, checkpoint_every_steps=4, ema_probe_stds=probes)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", epochs=3, checkpoint_every_steps=4, crash_at=13, ema_probe_stds=probes)
    state = torch.load(tmp_path / "b" / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 12  # the last checkpoint
    resumed = train(tmp_path / "b", epochs=3, resume=True, checkpoint_every_steps=4, ema_probe_stds=probes)
    _same_state(straight, resumed)
    assert not torch.equal(*(straight.ema_probes[std].shadow["net.0.weight"] for std in probes))
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # replayed steps were not logged twice


def test_a_weighted_run_resumes_exactly_from_an_epochs_end_and_from_inside_an_epoch(tmp_path):
    weights = (torch.arange(len(DATA_X)) % 3).double()  # a third of the items never drawn, the rest 1:2
    straight = train(tmp_path / "a", epochs=3, checkpoint_every_steps=4, item_weights=weights)
    with pytest.raises(KeyboardInterrupt):  # 8 steps an epoch: killed after step 8's checkpoint, the first's end
        train(tmp_path / "b", epochs=3, checkpoint_every_steps=4, crash_at=10, item_weights=weights)
    assert read_checkpoint(checkpoint_path(tmp_path / "b"))["step"] == 8
    with pytest.raises(KeyboardInterrupt):  # resumed there, killed again after step 12's, inside the second epoch
        train(tmp_path / "b", epochs=3, checkpoint_every_steps=4, crash_at=13, resume=True, item_weights=weights)
    assert read_checkpoint(checkpoint_path(tmp_path / "b"))["step"] == 12
    for other in (weights.flip(0), None):  # other draws than the run it continues: refused, the checkpoint kept
        with pytest.raises(ConfigError, match="it drew its training items with other item_weights"):
            train(tmp_path / "b", epochs=3, checkpoint_every_steps=4, resume=True, item_weights=other)
    resumed = train(tmp_path / "b", epochs=3, checkpoint_every_steps=4, resume=True, item_weights=weights)
    assert resumed.resumed
    _same_state(straight, resumed)


def drawing_trainer(tmp_path, item_weights, **overrides) -> Trainer:
    cfg = TrainConfig(epochs=2, batch_size=8, **{"passes_per_epoch": 2, **overrides})
    return Trainer(ToyModule(), cfg, tmp_path, num_train_items=len(DATA_X), device="cpu", item_weights=item_weights)


def test_an_ema_of_a_model_with_batchnorm_is_refused_naming_the_setting(tmp_path):
    class WithBatchNorm(ToyModule):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(4)

    for setting in ({"ema_decay": 0.99}, {"ema_std": 0.1}, {"ema_probe_stds": (0.05,)}):
        named = next(iter(setting))
        with pytest.raises(ConfigError, match=rf"EMA cannot average .* with BatchNorm .*; set {named} to 0"):
            Trainer(WithBatchNorm(), TrainConfig(epochs=1, batch_size=8, **setting), tmp_path,
                    num_train_items=len(DATA_X), device="cpu")
    Trainer(WithBatchNorm(), TrainConfig(epochs=1, batch_size=8, ema_decay=0.0), tmp_path,  # no EMA: allowed
            num_train_items=len(DATA_X), device="cpu")
    Trainer(ToyModule(), TrainConfig(epochs=1, batch_size=8, ema_decay=0.99), tmp_path, num_train_items=len(DATA_X),
            device="cpu")  # an EMA without BatchNorm: allowed


def test_item_weights_draw_only_weighted_items_the_same_for_a_seed_and_epoch_and_every_rank_its_shard(tmp_path):
    two = torch.zeros(len(DATA_X))
    two[[3, 17]] = torch.tensor([1.0, 3.0])
    drawn = drawing_trainer(tmp_path, two)._epoch_indices(0)
    assert drawn.shape == (16, 1, 8) and set(drawn.unique().tolist()) == {3, 17}  # 2 passes of 64 draws
    assert 0.6 < (drawn == 17).double().mean() < 0.9  # in proportion to the weights: 3 / 4
    weights = torch.linspace(0.1, 1.0, len(DATA_X))
    trainer = drawing_trainer(tmp_path, weights)
    assert torch.equal(trainer._epoch_indices(1), drawing_trainer(tmp_path, weights)._epoch_indices(1))
    assert not torch.equal(trainer._epoch_indices(0), trainer._epoch_indices(1))
    assert not torch.equal(trainer._epoch_indices(1), drawing_trainer(tmp_path, weights, seed=1)._epoch_indices(1))
    # two processes (as DDP sets them up: half the micro-batch each) split each global batch of the same draws
    shards = []
    for rank in (0, 1):
        trainer.env, trainer.micro_batch = replace(trainer.env, rank=rank, world_size=2), 4
        shards.append(trainer._epoch_indices(1))
    assert torch.equal(torch.cat(shards, dim=-1), drawing_trainer(tmp_path, weights)._epoch_indices(1))


def test_without_item_weights_the_draws_are_one_seeded_permutation_per_pass_as_before(tmp_path):
    trainer = drawing_trainer(tmp_path, None, grad_accum=2)
    for epoch in (0, 3):
        g = torch.Generator().manual_seed(engine.trainer._seed_for(trainer.cfg.seed, epoch))
        passes = torch.cat([torch.randperm(len(DATA_X), generator=g) for _ in range(2)])
        assert torch.equal(trainer._epoch_indices(epoch), passes.view(16, 2, 4))


@pytest.mark.parametrize("weights, problem", [
    (torch.ones(63), r"item_weights has shape \(63,\) for 64 training items; give one weight per item"),
    (torch.ones(64, 1), r"item_weights has shape \(64, 1\)"),
    (torch.ones(64).index_fill(0, torch.tensor([5]), -1.0), "negative or non-finite weight; give every item"),
    (torch.ones(64).index_fill(0, torch.tensor([5]), float("nan")), "negative or non-finite weight"),
    (torch.zeros(64), "item_weights are all zero; give at least one item a positive weight"),
])
def test_bad_item_weights_are_refused_at_construction_naming_the_fix(tmp_path, weights, problem):
    with pytest.raises(ConfigError, match=problem):
        drawing_trainer(tmp_path / "run", weights)
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the checkpoint is loaded onto it")
def test_killed_run_resumes_exactly_on_the_gpu(tmp_path):
    # the RNG states come back on the GPU with the rest of the checkpoint, and must be handed back on the CPU
    straight = train(tmp_path / "a", epochs=3, checkpoint_every_steps=4, device="cuda")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", epochs=3, checkpoint_every_steps=4, crash_at=13, device="cuda")
    resumed = train(tmp_path / "b", epochs=3, resume=True, checkpoint_every_steps=4, device="cuda")
    assert resumed.resumed
    _same_state(straight, resumed)


def test_a_step_checkpoint_at_an_epochs_end_is_written_whatever_the_epoch_setting(tmp_path):
    with pytest.raises(KeyboardInterrupt):  # 8 steps an epoch: step 8 ends epoch 1, which the epoch setting skips
        train(tmp_path / "run", epochs=3, checkpoint_every_epochs=3, checkpoint_every_steps=8, crash_at=10)
    assert torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)["step"] == 8


def test_a_log_truncated_while_the_disk_fails_keeps_every_record(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    records = [{"kind": "train", "step": s, "train/loss": 1.0 / s} for s in (10, 20, 30)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))

    def disk_full(path, text, encoding=None):
        with open(path, "w", encoding=encoding) as fh:
            fh.write(text[:5])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError):
        truncate_after(log, 20)
    monkeypatch.undo()
    assert read_records(log) == records  # the rewrite went to a temporary file; the log is whole


class TrainingStarted(Exception):
    pass


def run_stage_command(folder, *flags, train_fails=TrainingStarted, calls=None):
    """A stage command (``engine.cli``) whose training stub adds its ``resume`` to ``calls``, then raises."""

    def train(cfg, data, out, resume, device):
        (calls if calls is not None else []).append(resume)
        raise train_fails("stands in for the stage's data loading and training")

    parser = stage_parser("python -m toy.train", "a toy stage", "toy")
    run_stage_cli(parser, ["--data", "shapes", "--out", str(folder), "--preset", "tiny", *flags], TrainConfig,
                  {"tiny": {}, "full": {}}, train)


def test_the_stage_command_refuses_what_would_lose_trained_work_and_removes_nothing_before_training(tmp_path):
    folder = tmp_path / "stage"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_text("weights")
    with pytest.raises(StageError, match="already holds a finished stage; continue it with --resume.*--overwrite"):
        run_stage_command(folder)
    with pytest.raises(StageError, match="finished stage without the checkpoint --resume continues from"):
        run_stage_command(folder, "--resume")  # it would train the finished stage again, with today's settings
    with pytest.raises(DataError):  # --overwrite, then a mistake found before training (a wrong data path)
        run_stage_command(folder, "--overwrite", train_fails=DataError)
    assert is_complete(folder)  # still the finished stage: nothing was removed before training started
    (folder / "config.json").unlink()
    checkpoint_path(folder).parent.mkdir()
    checkpoint_path(folder).write_text("an interrupted run's state")
    with pytest.raises(StageError, match="interrupted training's checkpoint .*--resume, or pass --overwrite"):
        run_stage_command(folder)  # it would start over and write over the checkpoint
    calls = []
    for flags in (("--resume",), ("--overwrite",)):
        with pytest.raises(TrainingStarted):
            run_stage_command(folder, *flags, calls=calls)
    assert calls == [True, False]


def test_a_fresh_training_un_finishes_its_folder_and_a_resumed_one_does_not(tmp_path):
    trainer = train(tmp_path / "run", epochs=1)
    (tmp_path / "run" / "config.json").write_text("{}")  # as a saved stage has
    train(tmp_path / "run", epochs=1, resume=True)
    assert (tmp_path / "run" / "config.json").is_file()
    assert checkpoint_path(tmp_path / "run").is_file()
    Trainer(ToyModule(), trainer.cfg, tmp_path / "run", num_train_items=len(DATA_X), device="cpu")
    assert not (tmp_path / "run" / "config.json").exists()  # a half-replaced stage never reads as finished
    assert not checkpoint_path(tmp_path / "run").exists()  # nor does a --resume after a crash find its state


def test_resume_refuses_a_different_batch_size(tmp_path):
    train(tmp_path / "a", epochs=1)
    cfg = TrainConfig(epochs=2, batch_size=16)
    with pytest.raises(ConfigError, match="batch_size"):
        Trainer(ToyModule(), cfg, tmp_path / "a", num_train_items=64, resume=True, device="cpu")


def test_resume_refuses_other_learning_settings_but_not_other_running_ones(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "a", epochs=3, crash_at=10)  # last checkpoint: the end of epoch 1
    cfg = TrainConfig(epochs=3, batch_size=8, lr=2e-2, warmup_steps=3, ema_decay=0.9, log_every=2)
    with pytest.raises(ConfigError, match=r"cannot resume .*: it differs from what is asked \(lr was 0.01, now "
                                          r"0.02\); ask for what it was trained with, or delete that checkpoint"):
        Trainer(ToyModule(), cfg, tmp_path / "a", num_train_items=len(DATA_X), resume=True, device="cpu")
    resumed = train(tmp_path / "a", epochs=3, resume=True, checkpoint_every_steps=6)  # how it runs: allowed
    assert resumed.resumed and resumed.step == 3 * 8


def test_a_mid_epoch_resume_by_another_number_of_processes_gives_each_rank_a_fresh_stream(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "a", epochs=3, crash_at=13, checkpoint_every_steps=6)  # last checkpoint: step 12, mid-epoch
    path = checkpoint_path(tmp_path / "a")
    state = torch.load(path, weights_only=True)
    assert state["step"] == 12 and len(state["rng"]) == 1
    written_by_two = {**state, "rng": state["rng"] * 2, "world_size": 2}  # as two processes would have left it
    torch.save(written_by_two, path)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-2, warmup_steps=3, ema_decay=0.9, log_every=2,
                      checkpoint_every_steps=6)
    streams = [Trainer(ToyModule(), cfg, tmp_path / "a", num_train_items=len(DATA_X), resume=True,
                       device="cpu").generator.get_state() for _ in range(2)]
    assert torch.equal(streams[0], streams[1])  # a stream fixed by the seed, epoch, rank and step
    assert not torch.equal(streams[0], torch.Generator().get_state())  # not the unseeded default every rank shares
    assert not torch.equal(streams[0], state["rng"][0]["generator"])  # nor the other run's rank 0 stream


def test_resume_refuses_a_checkpoint_trained_on_other_inputs(tmp_path):
    inputs = {"data": "d1", "vae": "v1"}
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "a", epochs=3, crash_at=10, trained_on=inputs)
    assert read_checkpoint(checkpoint_path(tmp_path / "a"), mmap=True)["trained_on"] == inputs
    with pytest.raises(ConfigError, match=r"cannot resume .*: it differs from what is asked \(it was trained on "
                                          r"another VAE stage\)"):
        train(tmp_path / "a", epochs=3, resume=True, trained_on={"data": "d1", "vae": "v2"})
    assert train(tmp_path / "a", epochs=3, resume=True, trained_on=inputs).resumed


def test_deterministic_training_holds_torch_to_deterministic_kernels_while_it_trains_and_learns_the_same(tmp_path):
    seen = []
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup_steps=3, ema_decay=0.9, log_every=2, deterministic=True)
    trainer = Trainer(ToyModule(), cfg, tmp_path / "det", num_train_items=len(DATA_X), device="cpu")

    def batches(indices, generator):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return make_batch(indices, generator)

    trainer.fit(batches, on_epoch_end=lambda epoch, t: seen.append(torch.are_deterministic_algorithms_enabled()) or {})
    assert len(seen) == 2 * 8 + 2 and all(seen)  # every step and every epoch's callback
    assert not torch.are_deterministic_algorithms_enabled()  # not left on for what runs after the stage
    _same_state(train(tmp_path / "a", epochs=2, deterministic=True), train(tmp_path / "b", epochs=2))  # on a CPU
    torch.use_deterministic_algorithms(True, warn_only=True)  # a caller's own setting comes back as it was
    try:
        train(tmp_path / "c", epochs=1, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


class CudnnTrap(nn.Module):
    """Once ``sprung``, the identity with an infinite derivative while SDPA may pick cuDNN's attention (a stand-in on
    the CPU for its backward returning NaN from finite inputs); the plain identity otherwise."""

    sprung = False

    def forward(self, x):
        return torch.sqrt(x - x.detach()) + x if self.sprung and torch.backends.cuda.cudnn_sdp_enabled() else x


class NonFiniteTrap(CudnnTrap):
    """Once ``sprung``, the identity with an infinite derivative whatever the attention back-end."""

    def forward(self, x):
        return torch.sqrt(x - x.detach()) + x if self.sprung else x


@pytest.mark.parametrize("rollbacks_allowed", [1, 0])
def test_when_cudnn_attention_makes_every_gradient_non_finite_it_is_turned_off_and_training_goes_on(
        tmp_path, capsys, rollbacks_allowed):
    module = ToyModule()
    module.net[1] = CudnnTrap()  # in place of the dropout (no weights either way)
    cfg = TrainConfig(epochs=6, batch_size=8, lr=1e-2, warmup_steps=3, ema_decay=0.9, log_every=2,
                      spike_rollbacks=rollbacks_allowed)
    trainer = Trainer(module, cfg, tmp_path / "run", num_train_items=len(DATA_X), device="cpu")

    def batches(indices, generator):
        module.net[1].sprung = trainer.step >= 30
        return make_batch(indices, generator)

    trainer.fit(batches)  # to the end: no TrainingDiverged
    assert not trainer.cudnn_attention and torch.backends.cuda.cudnn_sdp_enabled()  # off for the stage only
    assert all(torch.isfinite(p).all() for p in module.parameters())
    out = capsys.readouterr().out
    assert "cuDNN's attention made the gradients of steps 31-32 non-finite" in out
    assert "damaged" not in out  # the skips left the weights alone, and the cause is gone
    log = tmp_path / "run" / "log.jsonl"
    if rollbacks_allowed:  # the skipped steps trained again without cuDNN's attention, at the same learning rate
        [rollback] = rollbacks(log)
        assert rollback["cudnn_attention_off"] and rollback["lr_scale"] == 1.0 and trainer.lr_scale == 1.0
        assert rollback["nonfinite"].endswith("; finite with cuDNN's attention kernels off")
        assert skipped_steps(log) == [] and cudnn_attention_off(log) == []
    else:  # the weights the skips left alone train on, and the log says why the spike stays in it
        assert rollbacks(log) == [] and skipped_steps(log) == [{"first_step": 31, "last_step": 32, "skipped": 2}]
        [switch] = cudnn_attention_off(log)
        assert (switch["first_step"], switch["last_step"], switch["step"]) == (31, 32, 32)
        assert switch["nonfinite"].endswith("; finite with cuDNN's attention kernels off")
    assert read_checkpoint(trainer.checkpoint_path, "cpu")["cudnn_attention"] is False
    resumed = Trainer(ToyModule(), cfg, tmp_path / "run", num_train_items=len(DATA_X), resume=True, device="cpu")
    assert resumed.resumed and not resumed.cudnn_attention  # a resume keeps it off


@pytest.mark.parametrize("made_by_cudnn", [True, False])
def test_an_interval_with_most_steps_skipped_replays_its_last_skipped_step_and_turns_cudnn_attention_off_if_it_made_them(
        tmp_path, capsys, monkeypatch, made_by_cudnn):
    def run(out):
        module = ToyModule()
        module.net[1] = CudnnTrap() if made_by_cudnn else NonFiniteTrap()
        cfg = TrainConfig(epochs=6, batch_size=8, lr=1e-2, warmup_steps=3, ema_decay=0.9, log_every=4,
                          spike_rollbacks=1)
        trainer = Trainer(module, cfg, out, num_train_items=len(DATA_X), device="cpu")
        calls = []

        def batches(indices, generator):  # from step 25 on, 3 of each 4 steps' gradients are not finite
            module.net[1].sprung = trainer.step >= 24 and trainer.step % 4 != 3
            calls.append((trainer.step, indices.clone(), generator is not trainer.generator))  # a replay: its own
            return make_batch(indices, generator)

        trainer.fit(batches)
        return trainer, module, calls

    trainer, module, calls = run(tmp_path / "run")
    out = capsys.readouterr().out
    assert "3 of steps 25-28 skipped: the gradient was not finite" in out
    assert "run: a replay of the last skipped step's batch: first non-finite gradients in the backward" in out
    assert "loss spike?" not in out  # the steps taken were sound: no spike by the gradient norm
    replay = next(n for n, (_, _, replay) in enumerate(calls) if replay)
    assert calls[replay - 1][0] == 27  # after step 28 (step count 27): steps 25-27 skipped, 28 taken
    assert torch.equal(calls[replay][1], calls[replay - 2][1])  # step 27's batch (step count 26)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    log = tmp_path / "run" / "log.jsonl"
    if made_by_cudnn:  # off from here, and the skipped steps trained again at the same learning rate
        assert "cuDNN's attention made the gradients of steps 25-28 non-finite" in out and not trainer.cudnn_attention
        [rollback] = rollbacks(log)
        assert rollback["skipped"] == 3 and rollback["ratio"] is None and rollback["lr_scale"] == 1.0
        assert rollback["nonfinite"].endswith("; finite with cuDNN's attention kernels off")
        assert skipped_steps(log) == []
    else:  # reported at each such interval, and training goes on: three of four steps skipped to the end
        assert "not finite with cuDNN's attention kernels off either" in out and trainer.cudnn_attention
        assert rollbacks(log) == [] and len(skipped_steps(log)) == sum(replay for *_, replay in calls) == 6
        monkeypatch.setattr(engine.trainer, "MOSTLY_SKIPPED", 1.0)  # no replay: training went on as without one
        unreplayed, _, calls = run(tmp_path / "unreplayed")
        assert not any(replay for *_, replay in calls)
        _same_state(trainer, unreplayed)


def test_cudnn_attention_off_holds_sdpa_away_from_cudnn_while_it_trains_and_resumes_a_run_trained_with_it(tmp_path):
    seen = []
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup_steps=3, ema_decay=0.9, log_every=2,
                      cudnn_attention=False)
    trainer = Trainer(ToyModule(), cfg, tmp_path / "off", num_train_items=len(DATA_X), device="cpu")

    def batches(indices, generator):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return make_batch(indices, generator)

    trainer.fit(batches, on_epoch_end=lambda epoch, t: seen.append(torch.backends.cuda.cudnn_sdp_enabled()) or {})
    assert len(seen) == 2 * 8 + 2 and not any(seen)  # every step and every epoch's callback
    assert torch.backends.cuda.cudnn_sdp_enabled()  # torch's own default is back for what runs after the stage
    # how it runs, not what it learns: a run trained with cuDNN's attention resumes with it off (the remedy)
    train(tmp_path / "a", epochs=1)
    assert train(tmp_path / "a", epochs=1, resume=True, cudnn_attention=False).resumed


def test_truncated_checkpoint_is_named_with_what_to_do(tmp_path):
    trainer = train(tmp_path / "a", epochs=1)
    path = trainer.checkpoint_path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StageError, match=f"checkpoint {path} is truncated or corrupt.*delete it"):
        train(tmp_path / "a", epochs=2, resume=True)


def test_truncated_weights_file_is_named_with_what_to_do(tmp_path):
    save_stage(tmp_path / "s", kind="toy", model_config={}, weights={"w": torch.ones(64, 64)})
    path = tmp_path / "s" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StageError, match=f"weights file {path} is truncated or corrupt"):
        load_weights(tmp_path / "s")


def test_batch_larger_than_data_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="larger than the training set"):
        Trainer(ToyModule(), TrainConfig(batch_size=128), tmp_path, num_train_items=64, device="cpu")


class RampedToyModule(ToyModule):
    """Uses ``step`` the way the stages do (a warm-up ramp), which must not recompile under torch.compile."""

    def forward(self, batch, step):
        loss, logs = super().forward(batch, step)
        return loss * min(1.0, (step + 1) / 5), logs


def test_compiled_training_traces_the_step_once(tmp_path, monkeypatch):
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()  # dynamo's frame counter, without inductor: seconds on a CPU
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: compile_(module, backend=counter))
    torch._dynamo.reset()
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_steps=3, log_every=2, compile=True)
    trainer = Trainer(RampedToyModule(), cfg, tmp_path / "run", num_train_items=len(DATA_X), device="cpu")
    trainer.fit(make_batch)
    assert trainer.step == 8
    assert counter.frame_count == 1  # the first step's value is not baked in: no second compile at step 1


def test_a_recorded_command_splits_back_into_the_arguments_it_was_given(monkeypatch):
    args = ["--run", "runs/a b", "--variant", "weak: --clip.epochs=1", "--note", "it's"]
    line = command_line("python -m pipelines.study", args)
    assert shlex.split(line) == ["python", "-m", "pipelines.study", *args]
    monkeypatch.setattr(sys, "argv", ["study.py", "--steps", "3"])  # no argv given: the process's own
    assert command_line("python -m pipelines.study") == "python -m pipelines.study --steps 3"
    assert command_line("python train_all.py", []) == "python train_all.py"


def test_a_setting_a_record_lacks_reads_as_the_value_older_records_trained_with():
    from diffusion.config import UNetTrainConfig
    from engine.config import UNRECORDED, setting_differences, unrecorded_values

    assert unrecorded_values(UNetTrainConfig) == {"keep_colour_sentence": False, "latent_normalisation": "global",
                                                  "model.qk_norm": False, "model.pooled_context": False,
                                                  "schedule.snr_shift": 1.0}
    asked = {"lr": 1e-3, "latent_normalisation": "global"}
    assert setting_differences(asked, {"lr": 1e-3}) == ["latent_normalisation was None, now 'global'"]
    assert setting_differences(asked, {"lr": 1e-3}, {"latent_normalisation": "global"}) == []
    assert setting_differences({**asked, "latent_normalisation": "per_channel"}, {"lr": 1e-3},
                               {"latent_normalisation": "global"}) == [
        "latent_normalisation was 'global', now 'per_channel'"]

    @dataclass
    class Later:
        kept: int = 1
        added: str = field(default="new", metadata={UNRECORDED: "old"})

    # a record written before `added` existed is rebuilt with what it trained with, not the default
    assert config_from_dict(Later, {"kept": 2}) == Later(kept=2, added="old")
    assert config_from_dict(Later, {"kept": 2, "added": "new"}) == Later(kept=2)


def test_comma_choices_keeps_the_order_given_and_refuses_none_or_an_unknown_item():
    from engine.errors import UserError

    assert comma_choices("seconds,cases,", "--sections", ("cases", "variants", "seconds")) == ["seconds", "cases"]
    for text in ("", ",", "cases,bogus"):
        with pytest.raises(UserError, match=r"--sections '.*' names none or unknown parts; choose from a, b, "):
            comma_choices(text, "--sections", ("a", "b"))
