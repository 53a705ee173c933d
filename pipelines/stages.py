"""Loading the three stages into one stack, with shape checks and lineage warnings.

Any stage folder can be swapped in. Shapes that cannot work together (latent channels, text width)
are an error; a stage that fits but is not the one the UNet was trained with loads with a loud
warning, because that is exactly what a swap study does.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from clip.model import TOKENIZER_FILE, CLIPModel
from data import load_captions
from diffusion.config import FILLED_BY_TRAINING as UNET_FILLED_BY_TRAINING
from diffusion.config import trained_latent_normalisation
from diffusion.cuda_graph import CudaGraphCall
from diffusion.fit import check_fit, downsample_factor
from diffusion.latents import LatentNormalisation
from diffusion.schedule import NoiseSchedule, ScheduleConfig
from engine.config import config_from_dict, flatten_config, setting_differences, unrecorded_values
from engine.distributed import resolve_device
from engine.errors import UserError
from engine.precision import LOW_PRECISION_NORMS, inference_autocast, set_low_precision_norms
from engine.stage import StageError, StageInfo, file_fingerprint, lineage_differences, read_stage, write_json
from engine.trainer import checkpoint_path, read_checkpoint, resume_differences
from unet.model import UNet
from vae.config import VAEConfig
from vae.model import AutoencoderKL


# Config values a stage sets while it trains (measured or taken from its inputs): not part of what was asked.
FILLED_BY_TRAINING = {"vae": {"model.scaling_factor", "model.latents_mean", "model.latents_std"},
                      "clip": {"model.vocab_size"}, "judge": {"model.vocab_size"}, "unet": set(UNET_FILLED_BY_TRAINING)}


class LineageWarning(UserWarning):
    """A stage fits the UNet's shapes but is not the one the UNet was trained with."""


def stage_kind(name: str) -> str:
    """The kind of stage folder a run's stage is (the judge is a CLIP stage)."""
    return "clip" if name == "judge" else name


def stage_resolution(name: str, cfg: Any) -> int:
    """The resolution a run's stage reads its data at (CLIP's image tower has its own)."""
    return cfg.model.image_size if stage_kind(name) == "clip" else cfg.resolution


def stage_settings(name: str, training: Any) -> dict[str, Any]:
    """A stage's training config (a config object, or the dict its folder records) as ``{"dotted.key": value}``
    in the recorded JSON form, without what training fills in."""
    return {key: value for key, value in flatten_config(training).items() if key not in FILLED_BY_TRAINING[name]}


def finished_stage_differences(name: str, folder: Path, cfg: Any, data: str, upstream: Mapping[str, Path | None],
                               derived: Mapping[str, str]) -> list[str]:
    """How a finished stage differs from what is asked now: config values, data, (for the UNet) the VAE and CLIP
    stages it was trained on, and the ``derived`` inputs: fingerprints of what the stage would build from those
    (the UNet's ``trained_captions``: ``diffusion.colour_sentences.derived_inputs``; ``{}`` for the others).
    ``upstream[stage]`` is ``None`` when that stage is about to be trained."""
    info = read_stage(folder, stage_kind(name))
    return (setting_differences(stage_settings(name, cfg), stage_settings(name, info.training),
                                unrecorded_values(cfg))
            + lineage_differences(info.trained_on, asked_inputs(name, cfg, data, upstream, derived)))


def checkpoint_differences(name: str, folder: Path, cfg: Any, data: str, upstream: Mapping[str, Path | None],
                           derived: Mapping[str, str]) -> list[str]:
    """How the checkpoint of an interrupted stage in ``folder`` differs from what is asked now (settings and
    inputs, as ``finished_stage_differences`` compares a finished one): resuming it would learn something else."""
    state = read_checkpoint(checkpoint_path(folder), mmap=True)
    return resume_differences(state, stage_settings(name, cfg), asked_inputs(name, cfg, data, upstream, derived),
                              unrecorded_values(cfg))


def asked_inputs(name: str, cfg: Any, data: str, upstream: Mapping[str, Path | None], derived: Mapping[str, str]
                 ) -> dict[str, tuple[str | None, str]]:
    """What a stage trained now with ``cfg`` on ``data``, the ``upstream`` stages (``None``: about to be
    trained again) and the ``derived`` inputs would be trained on, as ``lineage_differences`` takes it."""
    loaded = load_captions(data, resolution=stage_resolution(name, cfg))
    inputs: dict[str, tuple[str | None, str]] = {"data": (loaded.fingerprint, f"--data {data}")}
    if name != "vae":  # the stages that learn from the text
        inputs["captions"] = (loaded.captions_fingerprint, f"--data {data}")
    for stage, folder in upstream.items():  # "init": the UNet stage a phase starts from
        kind = "unet" if stage == "init" else stage
        inputs[stage] = (None, "") if folder is None else (read_stage(folder, kind).fingerprint, str(folder))
    inputs.update({input_name: (fingerprint, "") for input_name, fingerprint in derived.items()})
    return inputs


@dataclass
class StageStack:
    """A VAE, a CLIP text/image encoder and a UNet that fit together, plus how to sample the UNet."""

    vae: AutoencoderKL
    clip: CLIPModel
    unet: UNet
    schedule: NoiseSchedule
    prediction_type: str
    latent_normalisation: LatentNormalisation  # the UNet's latents from the VAE's, as the UNet was trained
    infos: dict[str, StageInfo]
    device: torch.device
    # the UNet's CUDA-graph call and what it was captured from (see unet_call)
    _graphed_unet: tuple[tuple, CudaGraphCall] | None = field(default=None, init=False, repr=False)
    _compiled_unet: tuple[UNet, Callable[..., torch.Tensor]] | None = field(default=None, init=False, repr=False)
    # autoguidance's weaker UNet, the folder it came from, and its CUDA-graph call (see guide_call)
    _guide: tuple[Path, UNet] | None = field(default=None, init=False, repr=False)
    _graphed_guide: tuple[tuple, CudaGraphCall] | None = field(default=None, init=False, repr=False)

    def unet_call(self, cuda_graph: bool = True, compile_unet: bool = False
                  ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The UNet as ``model(x_t, t, context) -> float32 prediction`` for sampling, under the stack's autocast.

        On CUDA with ``cuda_graph`` its calls are replayed from CUDA graphs (one per batch shape, kept across
        calls). The graphs are captured again when the UNet is replaced, its weights move (``.to(...)``) or its
        norms' precision is switched (``engine.precision``), since a graph replays what it captured.
        ``compile_unet`` runs it through ``torch.compile`` (kept for the stack's UNet; compiled on the first
        call of each batch shape, before any graph capture).
        """
        unet = self.unet
        forward: Callable[..., torch.Tensor] = unet
        if compile_unet:
            if self._compiled_unet is None or self._compiled_unet[0] is not unet:
                self._compiled_unet = (unet, torch.compile(unet))
            forward = self._compiled_unet[1]
        return self._sampling_call(unet, forward, "_graphed_unet", cuda_graph, compile_unet)

    def guide_call(self, folder: str | Path, cuda_graph: bool = True
                   ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """Autoguidance's weaker UNet (:func:`check_guide`: a UNet stage trained on this stack's VAE and CLIP with
        its noise schedule and resolution) as ``model(x_t, t, context)``, like :meth:`unet_call`
        (eager or CUDA graphs, never compiled); loaded once per folder and kept."""
        folder = Path(folder)
        if self._guide is None or self._guide[0] != folder:
            info = check_guide(folder, self.infos["unet"])
            guide = UNet.load(folder, device=self.device).eval()
            norms_as_trained(guide, info)
            self._guide, self._graphed_guide = (folder, guide), None
        guide = self._guide[1]
        return self._sampling_call(guide, guide, "_graphed_guide", cuda_graph, False)

    def _sampling_call(self, unet: UNet, forward: Callable[..., torch.Tensor], graph_slot: str, cuda_graph: bool,
                       compiled: bool) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """``forward`` (``unet`` or its compiled form) as a float32 sampling call: replayed from CUDA graphs kept
        in the attribute ``graph_slot`` on CUDA with ``cuda_graph``, else eager under the stack's autocast."""
        if cuda_graph and self.device.type == "cuda":
            key = (compiled, tuple(p.data_ptr() for p in unet.parameters()),
                   tuple(m.low_precision for m in unet.modules() if isinstance(m, LOW_PRECISION_NORMS)))
            graphed = getattr(self, graph_slot)
            if graphed is None or graphed[0] != key:
                graphed = (key, CudaGraphCall(lambda x_t, t, context: forward(x_t, t, context).float(),
                                              bf16_autocast=True))
                setattr(self, graph_slot, graphed)
            return graphed[1]

        def eager(x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            with inference_autocast(self.device):
                return forward(x_t, t, context).float()

        return eager

    @property
    def image_size(self) -> int:
        """The default size to generate (see ``generation_size``)."""
        return generation_size(self.infos)


def generation_size(infos: Mapping[str, StageInfo]) -> int:
    """The size a stack draws at by default: the resolution of the images the UNet's latents were encoded from
    (a UNet trained on 256-px latents tiles tangles across a 512-px canvas), else the VAE's training resolution."""
    for stage in ("unet", "vae"):
        if stage in infos and "resolution" in infos[stage].training:
            return int(infos[stage].training["resolution"])
    return 512


def sampling_size(size: int | None, vae: Mapping[str, Any], unet: Mapping[str, Any], default: int,
                  option: str = "--size") -> int:
    """The size to draw at: ``size`` (``option``), or ``default`` when it is None (a stack's ``generation_size``),
    checked against the architectures (``StageInfo.model`` dicts) of the VAE and the UNet: a positive multiple of
    the VAE's downsampling times the UNet's, since every UNet level halves the latent and must divide it evenly.
    The one size check of every command that samples, before anything is sampled or trained."""
    chosen = default if size is None else size
    vae_factor, unet_factor = downsample_factor(vae), downsample_factor(unet)
    step = vae_factor * unet_factor
    if chosen > 0 and chosen % step == 0:
        return chosen
    below = chosen // step * step
    nearest = [s for s in (below, below + step) if s > 0] or [step]
    what, fix = (f"{option} {chosen}", f"(default: {default})") if size is not None else \
        (f"the default size {chosen}", f"with {option}")  # a swapped stage can misfit the default itself
    raise UserError(f"{what} does not fit the stages: a size must be a positive multiple of {step} (the VAE "
                    f"downsamples by {vae_factor}, the UNet by {unet_factor} more); try "
                    f"{' or '.join(map(str, nearest))} {fix}")


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """``--run`` and the ``--vae``/``--clip``/``--unet`` folders that replace its stages (:func:`stage_paths`)."""
    parser.add_argument("--run", type=Path, help="run folder with vae/, clip/, unet/")
    for name, title in (("vae", "VAE"), ("clip", "CLIP"), ("unet", "UNet")):
        parser.add_argument(f"--{name}", type=Path, help=f"use this {title} stage folder instead of the run's")


def stage_paths(run: str | Path | None, vae: str | Path | None = None, clip: str | Path | None = None,
                unet: str | Path | None = None) -> dict[str, Path]:
    """Stage folders of a run, unless a folder is given for that stage.

    A run's stages are ``run/{vae,clip,unet}``, or where ``run/stages.json`` (written by train_all when a
    stage was reused from another run) says they are (:func:`recorded_stage`).
    """
    given = {"vae": vae, "clip": clip, "unet": unet}
    paths = {}
    for name, path in given.items():
        if path is None:
            if run is None:
                raise StageError(f"no {name} stage: pass --run RUN_DIR or --{name} STAGE_DIR")
            path = recorded_stage(run, name) or Path(run) / name
        paths[name] = Path(path)
    return paths


STAGES_FILE = "stages.json"


def write_stages_record(run: str | Path, stages: Mapping[str, str | Path]) -> None:
    """Write ``run/stages.json``: each stage folder relative to ``run`` (``vae``, ``../A/vae``), so a run that is
    copied or moved with the runs it took stages from reads its own folders wherever it is and whatever the
    current folder is. Taken between the folders' real paths: ``..`` after a symlinked folder leads where the
    link points, not back along the link."""
    def relative(path: str | Path) -> str:
        try:
            return os.path.relpath(os.path.realpath(path), os.path.realpath(run))
        except ValueError:  # another Windows drive: no relative path exists
            return str(Path(path).absolute())

    write_json(Path(run) / STAGES_FILE, {name: relative(path) for name, path in stages.items()})


def recorded_stage(run: str | Path, name: str) -> Path | None:
    """Where ``run/stages.json`` puts the run's ``name`` stage (None: no file, or no entry for it).

    An entry is relative to the run folder. Files written before that hold paths relative to the folder the
    command ran in, or absolute ones: such an entry that is not under the run folder names the run's own stage
    when the run has a folder of the entry's last component (a copied or moved run must not load its
    original's stages), else an absolute one is taken as it is; anything else is a ``StageError`` saying how to
    fix the entry, never a path read against the current folder.
    """
    run = Path(run)
    path = run / STAGES_FILE
    entry = json.loads(path.read_text(encoding="utf-8")).get(name) if path.is_file() else None
    if entry is None:
        return None
    recorded = Path(entry)
    if not recorded.is_absolute() and (run / recorded).exists():
        # shown without its '..', unless a symlinked folder on the way makes that another folder
        lexical = Path(os.path.normpath(run / recorded))
        return lexical if lexical.exists() and os.path.samefile(lexical, run / recorded) else \
            Path(os.path.realpath(run / recorded))
    if (run / recorded.name).exists():
        return run / recorded.name
    if recorded.is_absolute() and recorded.exists():
        return recorded
    hint = f" (from the current folder that is {recorded.absolute()}, relative to the run " \
           f"'{os.path.relpath(recorded, run)}')" if not recorded.is_absolute() and recorded.exists() else ""
    raise StageError(f"{path} puts the {name} stage at '{entry}', which is neither under {run} nor an existing "
                     f"absolute path; write that stage's folder there relative to {run} or as an absolute "
                     f"path{hint}, or pass --{name} FOLDER")


def judge_path(run: str | Path) -> Path:
    """A run's judge: where its ``stages.json`` says (a judge taken with ``train_all --judge``), else ``run/judge``."""
    return recorded_stage(run, "judge") or Path(run) / "judge"


def tokenizer_fingerprint(clip_info: StageInfo) -> str | None:
    path = clip_info.path / TOKENIZER_FILE
    return file_fingerprint(path) if path.is_file() else None


def lineage_mismatches(vae_info: StageInfo, clip_info: StageInfo, unet_info: StageInfo) -> list[str]:
    """The stages (and the tokenizer) the UNet was not trained with."""
    expected_tokenizer = unet_info.trained_on.get("tokenizer")
    actual_tokenizer = tokenizer_fingerprint(clip_info)
    mismatched = []
    if unet_info.trained_on.get("vae") != vae_info.fingerprint:
        mismatched.append("vae")
    if unet_info.trained_on.get("clip") != clip_info.fingerprint:
        mismatched.append("clip")
    if expected_tokenizer and actual_tokenizer and expected_tokenizer != actual_tokenizer:
        mismatched.append("tokenizer")
    return mismatched


def check_guide(folder: str | Path, unet_info: StageInfo) -> StageInfo:
    """The stage info of an autoguidance UNet at ``folder``, after checking that it can guide the UNet of
    ``unet_info``: a UNet stage trained on the same VAE and CLIP (the same latents and text states, normalised
    alike), with the same noise schedule and prediction type (its prediction at a timestep means what the UNet's
    does), at the same resolution. A guide of another resolution is not a weaker version of the UNet at its size:
    the run's 256-px phase guiding its 512-px UNet drew one picture per seed whatever the prompt
    (docs/results/quality)."""
    info = read_stage(folder, "unet")
    problems = [f"it was trained on another {stage.upper()}" for stage in ("vae", "clip")
                if info.trained_on.get(stage) != unet_info.trained_on.get(stage)]
    # as configs, not as recorded: a record from before a schedule setting existed trained with its older value
    if config_from_dict(ScheduleConfig, info.training["schedule"]) != config_from_dict(
            ScheduleConfig, unet_info.training["schedule"]):
        problems.append("its schedule differs")
    if info.training.get("prediction_type") != unet_info.training.get("prediction_type"):
        problems.append("its prediction type differs")
    if trained_latent_normalisation(info.training) != trained_latent_normalisation(unet_info.training):
        problems.append("its latent normalisation differs")
    guide_px, unet_px = info.training.get("resolution"), unet_info.training.get("resolution")
    if guide_px != unet_px:
        problems.append(f"it was trained at {guide_px} px, the UNet at {unet_px} px")
    if problems:
        raise StageError(f"the UNet at {folder} cannot guide the UNet at {unet_info.path}: {'; '.join(problems)}; "
                         "guide with a shorter-trained or smaller UNet on the same VAE and CLIP at the UNet's "
                         "resolution (pipelines.study trains one: --variant \"guide: --unet.lowres_epochs=8 "
                         "--unet.epochs=1\")")
    return info


def norms_as_trained(model: torch.nn.Module, info: StageInfo) -> None:
    """Run the model's norms in the precision its stage trained them in (``train.low_precision_norms``; see
    engine.precision): the numbers its weights were fitted to, and on CUDA fewer memory passes per call."""
    set_low_precision_norms(model, bool(info.training.get("train", {}).get("low_precision_norms")))


def stack_infos(run: str | Path | None = None, *, vae: str | Path | None = None, clip: str | Path | None = None,
                unet: str | Path | None = None) -> dict[str, StageInfo]:
    """What the config files of the three stages ``load_stack`` would load say, without loading any weights."""
    return {name: read_stage(path, name) for name, path in stage_paths(run, vae, clip, unet).items()}


def load_stack(run: str | Path | None = None, *, vae: str | Path | None = None, clip: str | Path | None = None,
               unet: str | Path | None = None, device: str | torch.device | None = None) -> StageStack:
    """Load the three stages (``run/{vae,clip,unet}`` or the folders given) onto ``device``."""
    device = resolve_device(device)
    infos = stack_infos(run, vae=vae, clip=clip, unet=unet)
    paths = {name: info.path for name, info in infos.items()}
    check_fit(infos["vae"].model, infos["clip"].model, infos["unet"].model,
              {name: f"at {path}" for name, path in paths.items()})
    for name in lineage_mismatches(infos["vae"], infos["clip"], infos["unet"]):
        where = paths["clip"] / TOKENIZER_FILE if name == "tokenizer" else paths[name]
        actual = tokenizer_fingerprint(infos["clip"]) if name == "tokenizer" else infos[name].fingerprint
        warnings.warn(
            f"LINEAGE MISMATCH: the UNet at {paths['unet']} was not trained with the {name} at {where} (it was "
            f"trained with {name} {infos['unet'].trained_on.get(name)}, this one is {actual}). Shapes fit, so it "
            "loads, but expect different images.", LineageWarning, stacklevel=2)
    training = infos["unet"].training
    schedule = NoiseSchedule(config_from_dict(ScheduleConfig, training["schedule"]))
    mode = trained_latent_normalisation(training)
    try:  # before any weights load
        normalisation = LatentNormalisation.of_vae(config_from_dict(VAEConfig, infos["vae"].model), mode,
                                                   where=f"the VAE stage at {paths['vae']}")
    except ValueError as err:
        raise StageError(f"{err}, which the UNet at {paths['unet']} needs (it trained on '{mode}' normalised "
                         "latents); pass the VAE stage the UNet was trained on") from None
    models = {"vae": AutoencoderKL.load(paths["vae"], device=device).eval(),
              "clip": CLIPModel.load(paths["clip"], device=device).eval(),
              "unet": UNet.load(paths["unet"], device=device).eval()}
    for name, model in models.items():
        norms_as_trained(model, infos[name])
    return StageStack(
        **models,
        schedule=schedule,
        prediction_type=training["prediction_type"],
        latent_normalisation=normalisation,
        infos=infos,
        device=device,
    )
