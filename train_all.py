"""Train the whole stack in sequence: VAE, tokenizer + CLIP, a judge CLIP, latent cache + UNet, then evaluate
and report.

    python train_all.py --data ../shared/pokemon --run runs/pokemon            # GPU: full preset
    python train_all.py --data shapes --run runs/shapes --preset tiny          # CPU: minutes
    python train_all.py --data ../shared/pokemon --run runs/B --reuse vae=runs/A/vae --reuse clip=runs/A/clip \\
        --judge runs/A/judge --unet.div_weight=0 --unet.cons_weight=0         # a swap study
    torchrun --nproc-per-node 2 -- train_all.py --data ../shared/pokemon --run runs/ddp  # '--': see README

A stage whose folder is complete is skipped, and one with a checkpoint resumes, when what it records (settings,
data, the stages it was trained on) matches what is asked; otherwise the run stops and says so before anything
trains (``--overwrite`` trains it again from the start). ``--STAGE.key=value`` overrides
one stage's config (``--vae.epochs=3``, ``--unet.lr=2e-4``). Everything lands in ``runs/NAME/``:
``vae/``, ``clip/``, ``judge/`` (a second CLIP stage with its own seed: the evaluation's ruler, never used for
guidance; ``--judge FOLDER`` takes one from elsewhere) and ``unet/`` stage folders (each with its log, loss plot
and sample grids; the UNet's low-resolution phase in ``unet/lowres/``), ``evaluation.json``,
``final_samples.png``, ``nearest_pairs.png``, ``judge_pairs.png``, ``silhouette_pairs.png``, ``report.md`` and
``summary.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from data import load_captions
from diffusion.colour_sentences import derived_inputs
from diffusion.fit import check_fit
from diffusion.train import (TRAIN_IMAGES_KEY, check_init_architecture, latent_normalisation_of, lowres_folder,
                             stage_checkpoints)
from engine import ConfigError, StageError, build_config, is_complete, read_stage
from engine import distributed
from engine.cli import command_line
from engine.config import choose_preset, config_to_dict, parse_overrides, preset_reason
from engine.errors import add_debug_flag, run_cli
from engine.graphed_training import check_cuda_graph
from engine.images import save_grid
from engine.runlog import cudnn_attention_off, epoch_values, loss_spikes, rollbacks, skipped_steps
from engine.stage import (CONFIG_FILE, LOCK_FILE, check_folder_path, folder_lock, record_preset, remove_empty_folders,
                          write_json)
from engine.trainer import checkpoint_path
from pipelines.evaluate import JUDGE_PAIRS, evaluate_to_folder, markdown_table
from pipelines.prompts import COLOUR_PROMPTS
from pipelines.stages import (StageStack, checkpoint_differences, finished_stage_differences, load_stack, stage_kind,
                              stage_resolution, write_stages_record)
from pipelines.text_to_image import GenerationSettings, draw_showcase, generate

# "judge" is a second CLIP stage with its own seed: the evaluation's fixed ruler, which guidance never optimised.
STAGES = ("vae", "clip", "judge", "unet")
# The judge's recipe is the CLIP stage's with its own seed, frozen where the CLIP default moved since every committed
# comparison was judged: a ruler that changed with the CLIP stage's defaults would not compare runs across commits.
JUDGE_OVERRIDES = {"seed": "1", "tokenizer_normalize": "false"}  # the run's own CLIP trains with seed 0
# Share of a full run's time each step takes (estimated from the H200 default run; docs/results/quality): the ETA.
TIME_SHARE = {"vae": 0.19, "clip": 0.02, "judge": 0.02, "unet": 0.73, "evaluate": 0.04}


def _stage_overrides(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """Split ``--vae.lr=1`` style arguments by stage."""
    per_stage: dict[str, dict[str, str]] = {name: {} for name in STAGES}
    for key, value in parse_overrides(list(items)).items():
        stage, _, rest = key.partition(".")
        if stage not in per_stage or not rest:
            raise ConfigError(f"cannot route --{key}: prefix a config key with its stage, e.g. --vae.lr=1e-4, "
                              "--clip.epochs=5, --unet.div_weight=0")
        per_stage[stage][rest] = value
    return per_stage


def _parse_reuse(items: Sequence[str]) -> dict[str, Path]:
    reuse = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in STAGES:
            raise ConfigError(f"--reuse takes STAGE=FOLDER with STAGE one of {STAGES}, got {item!r}")
        reuse[name] = Path(path)
    return reuse


class RunProgress:
    """Prints which stage runs and an ETA for the whole run from the stages' usual time shares."""

    def __init__(self, steps: Sequence[str]) -> None:
        self.steps = list(steps)
        self.started = time.perf_counter()
        self.done_share = 0.0
        self.minutes: dict[str, float] = {}
        self._t = self.started

    def begin(self, step: str, note: str = "") -> None:
        self._t = time.perf_counter()
        elapsed = (self._t - self.started) / 60
        remaining_share = sum(TIME_SHARE[s] for s in self.steps[self.steps.index(step):])
        eta = f", about {elapsed / self.done_share * remaining_share:.1f} min left" if self.done_share > 0 else ""
        if distributed.is_main():
            print(f"\n=== [{self.steps.index(step) + 1}/{len(self.steps)}] {step} {note}"
                  f"(run time {elapsed:.1f} min{eta}) ===", flush=True)

    def end(self, step: str, skipped: bool = False) -> None:
        self.minutes[step] = 0.0 if skipped else (time.perf_counter() - self._t) / 60
        if not skipped:
            self.done_share += TIME_SHARE[step]

    @property
    def total_minutes(self) -> float:
        return (time.perf_counter() - self.started) / 60


def stage_config(name: str, preset: str | None, overrides: dict[str, str]) -> Any:
    """The stage's training config: preset, then ``--STAGE.key=value`` overrides, validated."""
    if name == "vae":
        from vae.config import PRESETS, VAETrainConfig as config_cls
    elif name in ("clip", "judge"):
        from clip.config import PRESETS, CLIPTrainConfig as config_cls
        if name == "judge":
            overrides = {**JUDGE_OVERRIDES, **overrides}
    else:
        from diffusion.config import PRESETS, UNetTrainConfig as config_cls
    return build_config(config_cls, PRESETS, preset, overrides)


def train_stage(name: str, cfg: Any, run: Path, data: str, stage_dirs: dict[str, Path], device: str | None) -> Path:
    """Train (or resume) one stage into ``run/name``."""
    out = run / name
    resume = any(path.is_file() for path in (stage_checkpoints(out) if name == "unet" else [checkpoint_path(out)]))
    if name == "vae":
        from vae.train import train
        return train(cfg, data, out, resume=resume, device=device)
    if name in ("clip", "judge"):
        from clip.train import train
        return train(cfg, data, out, resume=resume, device=device)
    from diffusion.train import train
    return train(cfg, data, stage_dirs["vae"], stage_dirs["clip"], out, resume=resume, device=device)


def check_planned_fit(configs: dict[str, Any], folders: dict[str, Path], where: dict[str, str]) -> None:
    """The shape check of ``load_stack`` on what a run will hold, before anything trains: the configs of the
    stages to be trained, the recorded models of the others (``folders``); ``where`` names each for the error.
    A UNet that starts from another (``--unet.init_from``) must have its architecture, and a VAE the run keeps must
    have recorded what the UNet's latent normalisation needs."""
    models = {name: config_to_dict(configs[name].model) if name in configs else read_stage(folders[name], name).model
              for name in ("vae", "clip")}
    unet_cfg = configs.get("unet")
    unet = config_to_dict(unet_cfg.filled_model(models["clip"]["text_width"])) if unet_cfg is not None else \
        read_stage(folders["unet"], "unet").model
    check_fit(models["vae"], models["clip"], unet, where, unet_cfg.resolution if unet_cfg is not None else None)
    if unet_cfg is not None and unet_cfg.lowres_epochs > 0:
        check_fit(models["vae"], models["clip"], unet, where, unet_cfg.lowres_resolution)
    if unet_cfg is not None and unet_cfg.init_from is not None:  # before the VAE and CLIP train, not after
        check_init_architecture(unet_cfg.init_from, unet)
    if unet_cfg is not None and "vae" not in configs:  # a VAE trained now records what any normalisation needs
        latent_normalisation_of(read_stage(folders["vae"], "vae"), unet_cfg.latent_normalisation)


def check_batches_fit(configs: dict[str, Any], data: str) -> None:
    """Every phase's batch against the training set, before anything trains (the trainer would find a batch too
    large only when its stage starts, after the stages before it trained). The data is read at the smallest
    resolution the run reads it at, so this costs no decoding the run would not do anyway."""
    batches = []  # (the flag that sets it, the batch, the resolution that stage reads the data at)
    for name, cfg in configs.items():
        batches.append((f"--{name}.batch_size", cfg.train.batch_size, stage_resolution(name, cfg)))
        if name == "unet" and cfg.lowres_epochs > 0:
            batches.append(("--unet.lowres_batch_size", cfg.lowres_batch_size, cfg.lowres_resolution))
    if not batches:
        return
    rows = len(load_captions(data, resolution=min(r for _, _, r in batches)).subset("train"))
    for flag, batch, _ in batches:
        if batch > rows:
            raise ConfigError(f"{flag}={batch} is larger than the training set of --data {data} "
                              f"({rows} rows); lower {flag}")


def check_run_stages(run: Path, configs: dict[str, Any], data: str, reuse: dict[str, Path], overwrite: bool) -> None:
    """Stop when what ``run`` holds of a stage differs from what is asked (a finished stage, or an interrupted
    one's checkpoint, which would resume into neither the run that was started nor the one asked for), unless
    ``overwrite``: then that work is set aside so the stage trains again from the start, and so does every stage
    after it that was trained on it. Every rank decides from the same files; the main rank alone removes them,
    once all have read them."""
    will_train: set[str] = set()
    discard: list[Path] = []

    def differs(name: str, folder: Path, differences: list[str]) -> bool:
        if not differences:
            return False
        finished = is_complete(folder)
        held = f"a finished {name} stage that" if finished else f"an interrupted {name} training whose checkpoint"
        listed = f"{'; '.join(differences[:4])}{'; ...' if len(differences) > 4 else ''}"
        if not overwrite:
            fixes = f"take it as it is with --reuse {name}={folder}, " if finished and folder == run / name else ""
            raise StageError(f"{folder} holds {held} differs from what was asked ({listed}). Rerun with its "
                             f"settings, {fixes}train into a new --run folder, or pass --overwrite to train it "
                             "again here")
        if distributed.is_main():
            print(f"--overwrite: {folder} holds {held} differs from what was asked ({differences[0]}); training it "
                  "again from the start", flush=True)
        discard.extend([folder / CONFIG_FILE, checkpoint_path(folder)])
        return True

    for name in STAGES:
        if name in reuse or name not in configs:
            continue
        cfg, folder = configs[name], run / name
        upstream: dict[str, Path | None] = {}
        derived: dict[str, str] = {}  # the UNet's captions as it would train on them, with their colour sentences
        if name == "unet":
            upstream = {s: None if s in will_train else reuse.get(s, run / s) for s in ("vae", "clip")}
            if folder.exists():  # else there is nothing to compare them with
                derived = derived_inputs(cfg, data, upstream)
        if is_complete(folder):
            if differs(name, folder, finished_stage_differences(name, folder, cfg, data, upstream, derived)):
                will_train.add(name)
                # its low-resolution phase trains again too, unless it is what the new stage asks for
                phase = lowres_folder(folder)
                if name == "unet" and cfg.lowres_epochs > 0 and is_complete(phase):
                    differs(name, phase,
                            finished_stage_differences(name, phase, cfg.lowres_phase(), data, upstream, derived))
            continue
        will_train.add(name)
        # the stage a phase starts from (None: one about to be trained again), when it starts from one
        start: dict[str, Path | None] = {"init": Path(cfg.init_from)} if name == "unet" and cfg.init_from else {}
        phases = [(lowres_folder(folder), cfg.lowres_phase())] if name == "unet" and cfg.lowres_epochs > 0 else []
        for phase_folder, phase_cfg in phases + [(folder, cfg)]:
            inputs = {**upstream, **start}
            if is_complete(phase_folder):
                differences = finished_stage_differences(name, phase_folder, phase_cfg, data, inputs, derived)
            elif checkpoint_path(phase_folder).is_file():
                differences = checkpoint_differences(name, phase_folder, phase_cfg, data, inputs, derived)
            else:
                differences = []
            retrained = differs(name, phase_folder, differences) or not is_complete(phase_folder)
            start = {"init": None if retrained else phase_folder}
    distributed.barrier()
    if distributed.is_main():
        for path in discard:
            path.unlink(missing_ok=True)
    distributed.barrier()


def final_samples(run: Path, stack: StageStack) -> None:
    """The showcase prompts x 4 seeds, and one seed of each colour prompt at guidance 1 / 3 / 7, as committed
    pictures."""
    size = stack.image_size
    draw_showcase(stack, GenerationSettings(size=size), run / "final_samples.png")
    colours = list(COLOUR_PROMPTS)
    rows = []
    for scale in (1.0, 3.0, 7.0):
        rows.append(generate(stack, colours, [7] * len(colours), GenerationSettings(size=size, guidance_scale=scale)))
    save_grid(torch.cat(rows), run / "guidance_colours.png", nrow=len(colours), max_side=128)


SpikesByPhase = dict[str, list[dict[str, Any]]]


def training_logs(stage_dirs: dict[str, Path]) -> dict[str, Path]:
    """Each training phase's log, the UNet's low-resolution phase as ``unet/lowres``."""
    phases = dict(stage_dirs)
    if "unet" in stage_dirs:
        phases["unet/lowres"] = lowres_folder(stage_dirs["unet"])
    return {name: folder / "log.jsonl" for name, folder in phases.items()}


def stage_spikes(stage_dirs: dict[str, Path]) -> tuple[SpikesByPhase, SpikesByPhase, SpikesByPhase]:
    """Per phase (only those that have some): the loss spikes left in its training log (by the rule the trainer
    warns with), those its trainer rolled back (``engine.runlog.rollbacks``), and those it trained on from with
    cuDNN's attention turned off (``engine.runlog.cudnn_attention_off``: skipped steps, weights unharmed, so not
    among those left: ``engine.runlog.loss_spikes``)."""
    return (by_phase(stage_dirs, loss_spikes), by_phase(stage_dirs, rollbacks),
            by_phase(stage_dirs, cudnn_attention_off))


def stage_skipped_steps(stage_dirs: dict[str, Path]) -> SpikesByPhase:
    """The log intervals in which each phase's trainer skipped steps of a gradient that was not finite
    (``engine.runlog.skipped_steps``); only phases that have some."""
    return by_phase(stage_dirs, skipped_steps)


def by_phase(stage_dirs: dict[str, Path], read: Callable[[Path], list[dict[str, Any]]]) -> SpikesByPhase:
    """What ``read`` finds in each training phase's log, for the phases where it finds something."""
    return {name: found for name, log in training_logs(stage_dirs).items() if (found := read(log))}


def spike_steps(spikes: list[dict[str, Any]]) -> str:
    """``steps 175-200 (2.8x)``, for each spike of one phase (``no finite gradient`` where none was, ``46 of 50
    steps skipped`` where most were, by cuDNN's attention)."""
    def what(s: dict[str, Any]) -> str:
        if "skipped" in s:
            return f"{s['skipped']} of {s['last_step'] - s['first_step'] + 1} steps skipped"
        return f"{s['ratio']:.1f}x" if math.isfinite(s["ratio"]) else "no finite gradient"

    return ", ".join(f"steps {s['first_step']}-{s['last_step']} ({what(s)})" for s in spikes)


def spike_lines(spikes: SpikesByPhase, rolled_back: SpikesByPhase, skipped: SpikesByPhase, stage_dirs: dict[str, Path],
                data: str, cudnn_off: SpikesByPhase) -> list[str]:
    """The report's section on spikes: steps skipped for a gradient that was not finite, spikes rolled back or
    trained on with cuDNN's attention off, and a warning for those left, with the command that trains the UNet
    again."""
    if not spikes and not rolled_back and not skipped and not cudnn_off:
        return []
    lines = ["## Loss spikes", ""]
    lines += [f"- **{name}**: {s['skipped']} of steps {s['first_step']}-{s['last_step']} skipped: the gradient was "
              "not finite (weights and optimizer state left as they were)." for name, found in skipped.items()
              for s in found]
    lines += [f"- **{name}**: a spike at {spike_steps([r])} was rolled back: training went back to step {r['step']} "
              f"and went on with the learning rate x{r['lr_scale']:.3g}."
              + (f" A replay of its last skipped step's batch: {r['nonfinite']}." if "nonfinite" in r else "")
              + (" cuDNN's attention was off from there." if r.get("cudnn_attention_off") else "")
              for name, found in rolled_back.items() for r in found]
    lines += [f"- **{name}**: a spike at {spike_steps([r])} came from cuDNN's attention (a replay of its last "
              f"skipped step's batch: {r['nonfinite']}). No rollback was left, so it was turned off and training "
              f"went on from step {r['step']}, from the weights the skipped steps left alone."
              for name, found in cudnn_off.items() for r in found]
    lines += [f"- **{name}**: the mean gradient norm jumped at {spike_steps(found)} against its level before."
              for name, found in spikes.items()]
    if not spikes:
        return lines + [""]
    lines += ["", "If `train/loss` stayed up after a spike (the stage's `loss.png`), that stage is damaged and draws "
              "worse than a clean run. GPU kernels are not deterministic, so training it again takes another path."]
    if any(name.startswith("unet") for name in spikes) and {"vae", "clip"} <= stage_dirs.keys():
        reuse = f"--reuse vae={stage_dirs['vae']} --reuse clip={stage_dirs['clip']}"
        if "judge" in stage_dirs:
            reuse += f" --judge {stage_dirs['judge']}"
        lines += ["The UNet alone, on the same VAE and CLIP (add the run's `--unet.*` settings):", "",
                  f"    python train_all.py --data {data} --run NEW_RUN {reuse}"]
    return lines + [""]


def unet_fit(unet_dir: Path) -> dict[str, dict[str, Any]]:
    """Per UNet phase that logged a validation loss (``unet/lowres``, then ``unet``): ``{"val_loss"`` and
    ``"train_images_loss"`` (``{epoch: loss}``, the same ruler on as many training images:
    ``diffusion.train.fit_probe_rows``; none in logs from before it), ``"lowest_epoch", "last_epoch"}``."""
    logs = training_logs({"unet": unet_dir})
    fit = {}
    for name in ("unet/lowres", "unet"):
        if val := epoch_values(logs[name], "val/loss"):
            fit[name] = {"val_loss": val, "train_images_loss": epoch_values(logs[name], TRAIN_IMAGES_KEY),
                         "lowest_epoch": min(val, key=val.get), "last_epoch": max(val)}
    return fit


def fit_summary(fit: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``unet_fit``'s phases in a summary's few numbers: the lowest validation loss and its epoch, the last, and
    the training images' last (None in logs from before that measure)."""
    return {name: {"lowest_epoch": phase["lowest_epoch"], "lowest_val_loss": phase["val_loss"][phase["lowest_epoch"]],
                   "val_loss": phase["val_loss"][phase["last_epoch"]],
                   "train_images_loss": phase["train_images_loss"].get(phase["last_epoch"])}
            for name, phase in fit.items()}


def fit_sentence(phase: dict[str, Any]) -> str:
    """``lowest validation loss 0.1987 at epoch 20; 0.2341 at the end (+17.8 %), training images 0.1203``."""
    val, best, last = phase["val_loss"], phase["lowest_epoch"], phase["last_epoch"]
    rise = f" ({100 * (val[last] / val[best] - 1):+.1f} %)" if last != best else " (its lowest)"
    fitted = phase["train_images_loss"].get(last)
    return (f"lowest validation loss {val[best]:.4f} at epoch {best}; {val[last]:.4f} at the end{rise}"
            + (f", training images {fitted:.4f}" if fitted is not None else ""))


def fit_lines(fit: dict[str, dict[str, Any]]) -> list[str]:
    """The report's section on the UNet's fit (``unet_fit``): each phase's validation loss at every evaluation beside
    the training images', and how far it ended above its lowest."""
    if not fit:
        return []
    lines = ["## The UNet's fit", "",
             "The validation loss (fixed noise and timesteps, EMA weights) beside the same measure on as many "
             "training images. A validation loss that rises while the training images' falls is the model fitting "
             "its training images rather than their distribution.", "",
             "| phase | epoch | validation loss | training images |", "|---|---|---|---|"]
    for name, phase in fit.items():
        fitted = phase["train_images_loss"]
        lines += [f"| {name} | {epoch} | {loss:.4f} | {f'{fitted[epoch]:.4f}' if epoch in fitted else '—'} |"
                  for epoch, loss in phase["val_loss"].items()]
    return lines + [""] + [f"- **{name}**: {fit_sentence(phase)}." for name, phase in fit.items()] + [""]


def write_report(run: Path, stage_dirs: dict[str, Path], results: dict[str, Any] | None, progress: RunProgress,
                 command: str, pictures: dict[str, Path], preset: dict[str, str], sections: list[str]) -> None:
    """``report.md``: what ran, ``sections`` (markdown lines: spikes, the UNet's fit), the metrics table and the
    pictures, with paths relative to the run."""

    def rel(path: Path) -> str:
        try:
            return str(path.resolve().relative_to(run.resolve()))
        except ValueError:
            return str(path)

    lines = [f"# Report: {run.name}", "", f"Command: `{command}`", "",
             f"Preset: **{preset['name']}** ({preset['reason']})", ""]
    if preset["name"] == "tiny":
        lines += ["**This is a smoke run.** The tiny preset trains models of a few hundred thousand parameters for "
                  "minutes on 64-px images: it shows that every stage runs end to end, and its samples are not meant "
                  "to follow the prompts. Train with the full preset on a GPU for real results.", ""]
    lines += ["| stage | folder | minutes |", "|---|---|---|"]
    for step in progress.steps:
        folder = rel(stage_dirs[step]) if step in stage_dirs else "—"
        lines.append(f"| {step} | {folder} | {progress.minutes.get(step, 0.0):.2f} |")
    lines += [f"| **total** | | {progress.total_minutes:.2f} |", ""]
    lines += sections
    if results is not None:
        lines += ["## Metrics", "", markdown_table(results), ""]
    lines += ["## Pictures", ""]
    for title, path in pictures.items():
        lines += [f"### {title}", "", f"![{title}]({rel(path)})", ""]
    if "unet" in stage_dirs:
        for title, folder in (("UNet samples during the low-resolution phase", lowres_folder(stage_dirs["unet"])),
                              ("UNet samples during training", stage_dirs["unet"])):
            unet_samples = sorted((folder / "samples").glob("epoch_*.png"))
            if unet_samples:
                lines += [f"### {title}", ""]
                lines += [f"- epoch {p.stem.split('_')[-1]}: ![{p.stem}]({rel(p)})" for p in unet_samples]
                lines.append("")
    (run / "report.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    description, _, usage_notes = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="train_all.py", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=usage_notes)
    add_debug_flag(parser)
    parser.add_argument("--data", required=True, help="captions folder (e.g. ../shared/pokemon), hub id, or 'shapes'")
    parser.add_argument("--run", type=Path, default=Path("runs/pokemon"), help="run folder (default runs/pokemon)")
    parser.add_argument("--preset", default=None, help="'tiny' (CPU) or 'full' (GPU); default by device")
    parser.add_argument("--reuse", action="append", default=[], help="STAGE=FOLDER: take a finished stage from elsewhere")
    parser.add_argument("--skip-eval", action="store_true", help="no evaluation, final samples or report")
    parser.add_argument("--overwrite", action="store_true",
                        help="train again, from the start, stages of --run (finished or interrupted) whose settings or "
                        "inputs differ from what is asked")
    parser.add_argument("--judge", type=Path,
                        help="CLIP stage used as the evaluation judge (default: train one into RUN/judge)")
    parser.add_argument("--device", default=None)
    args, rest = parser.parse_known_args(argv)
    # Every mistake in what was asked surfaces here, before anything trains.
    check_folder_path(args.run, "--run")
    overrides = _stage_overrides(rest)
    reuse = _parse_reuse(args.reuse)
    if args.judge is not None:
        reuse["judge"] = args.judge
    for name, folder in reuse.items():
        read_stage(folder, stage_kind(name))  # fails when the folder is not a finished stage of this kind
    trained = [name for name in STAGES if name not in reuse and not (name == "judge" and args.skip_eval)]
    configs = {name: stage_config(name, args.preset, overrides[name]) for name in trained}
    check_planned_fit(configs, reuse, {name: f"at {reuse[name]}" if name in reuse else f"(--{name}.*)"
                                       for name in STAGES})
    check_batches_fit(configs, args.data)
    command = command_line("python train_all.py", argv)
    preset = {"name": choose_preset(args.preset), "reason": preset_reason(args.preset)}
    run: Path = args.run
    created = not run.exists()
    env = distributed.setup(args.device)
    try:
        for name, cfg in configs.items():  # the one check that needs the device and the processes
            check_cuda_graph(cfg.train, env.device, env.world_size, replayable=name == "unet")
        with folder_lock(run, command) if env.is_main else contextlib.nullcontext():
            if env.is_main:
                print(f"preset: {preset['name']} ({preset['reason']})", flush=True)
            check_run_stages(run, configs, args.data, reuse, args.overwrite)
            return _train_and_report(args, run, configs, reuse, preset, command, env)
    except BaseException:
        if created and env.is_main:
            (run / LOCK_FILE).unlink(missing_ok=True)
            remove_empty_folders(run)  # an early failure leaves no empty run folder
        raise
    finally:
        distributed.cleanup()


def _train_and_report(args: argparse.Namespace, run: Path, configs: dict[str, Any], reuse: dict[str, Path],
                      preset: dict[str, str], command: str, env: distributed.DistEnv) -> dict[str, Any]:
    device = str(env.device)
    run.mkdir(parents=True, exist_ok=True)
    steps = list(STAGES) + ([] if args.skip_eval else ["evaluate"])
    progress = RunProgress(steps)
    stage_dirs: dict[str, Path] = {}
    for name in STAGES:
        if name not in reuse and name not in configs:
            continue  # the judge, when nothing is evaluated
        if name in reuse:
            stage_dirs[name] = reuse[name]
            progress.begin(name, f"reused from {reuse[name]} ")
            progress.end(name, skipped=True)
            continue
        stage_dirs[name] = run / name
        if is_complete(run / name):
            progress.begin(name, "already complete, skipped ")
            progress.end(name, skipped=True)
            continue
        progress.begin(name)
        train_stage(name, configs[name], run, args.data, stage_dirs, args.device)
        if env.is_main:
            record_preset(run / name, preset["name"], preset["reason"])
        progress.end(name)
    if env.is_main:
        write_stages_record(run, stage_dirs)

    results = None
    pictures: dict[str, Path] = {}
    if not args.skip_eval and env.is_main:
        progress.begin("evaluate")
        stack = load_stack(vae=stage_dirs["vae"], clip=stage_dirs["clip"], unet=stage_dirs["unet"], device=device)
        results = evaluate_to_folder(stack, args.data, run, stage_dirs["judge"])
        final_samples(run, stack)
        del stack
        pictures.update({"Final samples (rows: prompts x 4 seeds)": run / "final_samples.png",
                         "Guidance 1 / 3 / 7 (rows), same seed, colour prompts": run / "guidance_colours.png",
                         "Validation images (top) and samples from their captions (bottom)": run / "eval_samples.png",
                         "Colour-prompt samples (odd rows) and their nearest training images (even rows)":
                             run / "nearest_pairs.png",
                         f"The {JUDGE_PAIRS} samples nearest a training image in the judge's space, nearest first "
                         "(odd rows), and those images (even rows)": run / "judge_pairs.png",
                         f"The {JUDGE_PAIRS} samples nearest a training image's silhouette (foreground mask), nearest "
                         "first (odd rows), and those images (even rows)": run / "silhouette_pairs.png"})
        progress.end("evaluate")
    distributed.barrier()
    if env.is_main:
        for name in stage_dirs:
            if (stage_dirs[name] / "loss.png").is_file():
                pictures[f"{name} loss"] = stage_dirs[name] / "loss.png"
        spikes, rolled_back, cudnn_off = stage_spikes(stage_dirs)
        skipped = stage_skipped_steps(stage_dirs)
        fit = unet_fit(stage_dirs["unet"]) if "unet" in stage_dirs else {}
        write_report(run, stage_dirs, results, progress, command, pictures, preset,
                     spike_lines(spikes, rolled_back, skipped, stage_dirs, args.data, cudnn_off) + fit_lines(fit))
        summary = {"minutes": progress.total_minutes,
                   "stage_minutes": progress.minutes,
                   "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   "world_size": env.world_size,
                   "command": command,
                   "preset": preset,
                   "stages": {k: str(v) for k, v in stage_dirs.items()},
                   "loss_spikes": spikes,
                   "spike_rollbacks": rolled_back,
                   "cudnn_attention_off": cudnn_off,
                   "skipped_steps": skipped,
                   "unet_fit": fit_summary(fit)}
        if results is not None:
            summary["evaluation"] = {k: results[k] for k in ("vae", "clip", "generation")}
        write_json(run / "summary.json", summary)
        if spikes:
            print(f"\nwarning: loss spikes in {', '.join(spikes)}: see the report's 'Loss spikes'", flush=True)
        slowed = [name for name, found in rolled_back.items() if any(not r.get("cudnn_attention_off") for r in found)]
        if slowed:
            print(f"\nnote: loss spikes rolled back in {', '.join(slowed)} (trained on at a lower learning rate): "
                  "see the report's 'Loss spikes'", flush=True)
        if switched := sorted({*cudnn_off, *(name for name, found in rolled_back.items()
                                             if any(r.get("cudnn_attention_off") for r in found))}):
            print(f"\nnote: cuDNN's attention made non-finite gradients in {', '.join(switched)}; it was turned off "
                  "there and training went on at the same learning rate: see the report's 'Loss spikes'", flush=True)
        print(f"\nDone in {progress.total_minutes:.1f} min: {run / 'report.md'}", flush=True)
    return {"minutes": progress.total_minutes, "results": results}


if __name__ == "__main__":
    run_cli(main)
