"""Train the UNet stage on cached latents:

    python -m diffusion.train --data DIR --vae runs/NAME/vae --clip runs/NAME/clip --out runs/NAME/unet \\
        [--preset tiny|full] [--resume] [--key=value ...]

The VAE and CLIP stages are frozen: every training image (and its mirror) is encoded once to its latent
posterior, every caption once to its text states (``diffusion.latents``). The UNet then trains with the
engine on latents drawn from those posteriors; every ``sample_every_epochs`` the EMA weights are scored on a
fixed validation loss and draw a grid of fixed prompts and seeds into ``out/samples/epoch_XXXX.png``.
The UNet starts from random weights, or from another UNet stage's with ``--init_from=FOLDER``.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from clip.model import CLIPModel
from data import CaptionSet, load_captions
from diffusion.colour_sentences import TrainingCaptions, derived_record, ends_with_colour_sentence, training_captions
from diffusion.config import PRESETS, UNetTrainConfig, trained_latent_normalisation
from diffusion.fit import check_fit
from diffusion.guidance import guided_sample_and_decode
from diffusion.latents import (LatentCache, LatentNormalisation, TextStateCache, build_latent_cache, cache_key,
                               encode_prompts)
from diffusion.losses import DiffusionLossConfig, DiffusionTrainingModule
from diffusion.noise import PerSampleNoise
from diffusion.recolour import RECOLOUR_VERSION, recoloured_images
from diffusion.schedule import NoiseSchedule
from diffusion.twins import silhouette_twins
from engine import StageError, Trainer, distributed, is_complete, read_stage
from engine.cli import run_stage_cli, stage_parser
from engine.config import (ConfigError, config_from_dict, config_to_dict, flatten_config, setting_differences,
                           unrecorded_values, validate_config)
from engine.errors import run_cli
from engine.graphed_training import check_cuda_graph
from engine.images import save_grid
from engine.runlog import read_records
from engine.stage import StageInfo, load_weights
from engine.trainer import checkpoint_path
from pipelines.metrics import twin_weights
from pipelines.prompts import GRID_PROMPTS
from pipelines.stages import LineageWarning, finished_stage_differences
from unet.config import UNetConfig
from unet.model import UNet
from vae.config import VAEConfig
from vae.model import AutoencoderKL

LOWRES_FOLDER = "lowres"
GRID_VAL_CAPTIONS = 2  # English and Chinese captions of this many validation images
GRID_TILE = 128  # px per epoch-grid sample (larger samples are shrunk; benchmarks.grid_measure reads them back)
TRAIN_IMAGES_KEY = "val/loss_train_images"  # the validation loss's ruler on training images (fit_probe_rows)
# UNet config fields a fine-tune may change: they shape how the weights train, not what the weights compute
TRAINING_ONLY_FIELDS = ("dropout", "gradient_checkpointing")


class LatentBatchMaker:
    """A training batch: latents drawn from the cached posteriors, one caption state each (CFG drop applied).

    The engine draws rows among the plain images and mirrors. With probability ``recolour_prob`` a row is swapped
    for one of its image's recoloured copies (``recoloured``: the copies and their mirrors, copy ``k`` of image
    ``i`` at ``k * N + i``), with that copy's caption (``texts`` row ``N + k * N + i``); otherwise, with
    probability ``augment_prob``, for one of its geometrically augmented copies, and the batch carries every
    row's augmentation label (zero for the others).
    """

    def __init__(self, latents: LatentCache, texts: TextStateCache, zh_prob: float, cfg_drop_prob: float,
                 augment_prob: float, memory_format: torch.memory_format, recoloured: LatentCache | None = None,
                 recolour_prob: float = 0.0) -> None:
        self.latents = latents
        self.texts = texts
        self.zh_prob = zh_prob
        self.cfg_drop_prob = cfg_drop_prob
        self.augment_prob = augment_prob  # used only when the cache holds augmented copies
        self.memory_format = memory_format
        self.recoloured = recoloured
        self.recolour_prob = recolour_prob

    def __call__(self, rows: Tensor, generator: torch.Generator) -> dict[str, Any]:
        image_ids = caption_ids = self.latents.image_ids(rows)
        recolour = None  # which rows take a recoloured copy
        if self.recoloured is not None:
            n = self.latents.num_images
            recolour = torch.rand(rows.shape, device=rows.device, generator=generator) < self.recolour_prob
            copy_rows = n * torch.randint(0, self.recoloured.num_images // n, rows.shape, device=rows.device,
                                          generator=generator) + image_ids
            caption_ids = torch.where(recolour, n + copy_rows, image_ids)
            copy_rows = copy_rows + self.recoloured.num_images * (rows >= n)  # a mirror takes its copy's mirror
        batch = {"context": self.texts.contexts(caption_ids, self.zh_prob, self.cfg_drop_prob, generator),
                 "image_ids": image_ids, "generator": generator}
        if self.latents.labels is not None:
            swap = torch.rand(rows.shape, device=rows.device, generator=generator) < self.augment_prob
            if recolour is not None:  # a recoloured row is not also transformed
                swap &= ~recolour
            rows = torch.where(swap, self.latents.augmented_rows(rows, generator), rows)
            batch["augment"] = self.latents.labels[rows]
        latents = self.latents.sample(rows, generator)
        if recolour is not None:
            latents = torch.where(recolour[:, None, None, None], self.recoloured.sample(copy_rows, generator), latents)
        batch["latents"] = latents.contiguous(memory_format=self.memory_format)
        return batch


class ValidationLoss:
    """Unweighted denoising MSE of the validation latents (posterior means, English captions) at fixed
    evenly spaced timesteps and fixed noise, so every evaluation of every run sees the same problem. Built on as
    many training images (``fit_probe_rows``) it is the same ruler held to what the model trains on: the gap
    between the two is how far it fits those images rather than their distribution."""

    def __init__(self, model: UNet, schedule: NoiseSchedule, prediction_type: str, latents: Tensor, context: Tensor,
                 num_timesteps: int, batch_size: int) -> None:
        self.module = DiffusionTrainingModule(model, schedule, prediction_type, DiffusionLossConfig(min_snr_gamma=0.0))
        self.latents = latents
        self.context = context
        self.batch_size = batch_size
        steps = schedule.num_steps
        self.timesteps = [int((k + 0.5) * steps / num_timesteps) for k in range(num_timesteps)]
        g = torch.Generator().manual_seed(0)
        self.noise = torch.randn((num_timesteps, *latents.shape), generator=g).to(latents.device)

    def on(self, latents: Tensor, context: Tensor) -> ValidationLoss:
        """The same ruler (timesteps, and the first rows of the same fixed noise) on other latents, at most as
        many as these: the training images' loss beside the validation loss."""
        if len(latents) > len(self.latents):
            raise ValueError(f"{len(latents)} latents; this ruler's fixed noise covers {len(self.latents)}")
        other = copy.copy(self)
        other.latents, other.context, other.noise = latents, context, self.noise[:, :len(latents)]
        return other

    @torch.no_grad()
    def __call__(self) -> float:
        total = torch.zeros((), device=self.latents.device)
        count = len(self.latents)
        for k, step in enumerate(self.timesteps):
            for start in range(0, count, self.batch_size):
                x0 = self.latents[start:start + self.batch_size]
                t = torch.full((len(x0),), step, device=x0.device, dtype=torch.long)
                mse, _ = self.module.loss_terms(x0, self.noise[k, start:start + len(x0)], t,
                                                self.context[start:start + len(x0)], step=0)
                total += mse * len(x0)
        return (total / (count * len(self.timesteps))).item()


class SampleGrid:
    """Fixed prompts x fixed seeds through the sampler with guidance, decoded by the VAE.

    Row ``s`` holds every prompt sampled from the same seed-``s`` noise, so a row shows what the text changes.
    """

    def __init__(self, cfg: UNetTrainConfig, schedule: NoiseSchedule, prompt_states: Tensor, null_state: Tensor,
                 latent_shape: tuple[int, int, int], normalisation: LatentNormalisation) -> None:
        self.cfg = cfg
        self.schedule = schedule
        self.normalisation = normalisation
        self.num_prompts = len(prompt_states)
        self.cond = prompt_states.repeat(cfg.sample_seeds, 1, 1)
        self.uncond = null_state[None]
        self.seeds = [seed for seed in range(cfg.sample_seeds) for _ in range(self.num_prompts)]
        self.latent_shape = latent_shape

    @torch.no_grad()
    def __call__(self, model: UNet, vae: AutoencoderKL, trainer: Trainer, path: Path) -> None:
        cfg = self.cfg
        noise = PerSampleNoise(self.seeds)  # the same noise every epoch, so the grids compare
        timesteps = self.schedule.sampling_timesteps(cfg.sample_steps)
        decode = lambda latents: vae.decode(self.normalisation.denormalise(latents))  # noqa: E731
        with trainer.autocast():
            images, _ = guided_sample_and_decode(
                model, decode, self.schedule, cfg.prediction_type, self.cond, self.uncond, cfg.guidance_scale,
                noise.initial(self.latent_shape, self.cond.device), timesteps, cfg.sample_sampler, noise,
                decode_batch=cfg.val_batch_size, guidance_rescale=cfg.guidance_rescale)
        trainer.log_image("samples", save_grid(images, path, nrow=self.num_prompts, max_side=GRID_TILE))


class EpochReport:
    """Per-epoch callback: every ``sample_every_epochs`` (and at the end) the EMA weights' validation loss, the
    same loss on training images, and sample grid, and the validation loss of each probe EMA
    (``train.ema_probe_stds``)."""

    def __init__(self, cfg: UNetTrainConfig, model: UNet, vae: AutoencoderKL, validation: ValidationLoss,
                 training_images: ValidationLoss, grid: SampleGrid, out_dir: Path) -> None:
        self.cfg = cfg
        self.model = model
        self.vae = vae
        self.validation = validation
        self.training_images = training_images
        self.grid = grid
        self.samples_dir = out_dir / "samples"

    def __call__(self, epoch: int, trainer: Trainer) -> dict[str, Any]:
        cfg = self.cfg
        if epoch % cfg.sample_every_epochs and epoch != cfg.train.epochs:
            return {}
        started = time.perf_counter()
        with trainer.ema_weights():
            with trainer.autocast():
                val_loss, fit_loss = self.validation(), self.training_images()
            self.grid(self.model, self.vae, trainer, self.samples_dir / f"epoch_{epoch:04d}.png")
        probes = {}
        for std in trainer.ema_probes:
            with trainer.ema_weights(probe=std), trainer.autocast():
                probes[std] = self.validation()
        seconds = time.perf_counter() - started
        tqdm.write(f"epoch {epoch}/{cfg.train.epochs}: val loss {val_loss:.4f}, training images {fit_loss:.4f} "
                   "(EMA weights), "
                   + "".join(f"{std:g}-wide EMA {loss:.4f}, " for std, loss in probes.items())
                   + f"grid + validation {seconds:.1f} s")
        return {"val/loss": val_loss, TRAIN_IMAGES_KEY: fit_loss,
                **{probe_key(std): loss for std, loss in probes.items()}, "sample_seconds": seconds}


def fit_probe_rows(num_train: int, num_val: int) -> Tensor:
    """The training images whose loss is measured beside the validation loss (``ValidationLoss.on``): as many as
    the validation images (so both figures average alike over the same fixed noise), evenly spaced through the
    training set."""
    count = min(num_train, num_val)
    return torch.arange(count) * num_train // count


def probe_key(std: float) -> str:
    """The log key of the validation loss of the probe EMA of width ``std`` (``train.ema_probe_stds``)."""
    return f"val/loss_ema_std_{std:g}"


def grid_prompts(val: CaptionSet) -> list[str]:
    """The fixed prompts plus the English and Chinese captions of the first validation images."""
    prompts = list(GRID_PROMPTS)
    for i in range(min(GRID_VAL_CAPTIONS, len(val))):
        prompts += [val.en[i], val.zh[i]]
    return prompts


def _training_throughput(log_path: Path) -> float | None:
    """Median samples/s over the run's logged training windows (robust to the windows holding a callback)."""
    rates = [r["samples_per_s"] for r in read_records(log_path) if r.get("kind") == "train"]
    return statistics.median(rates) if rates else None


def check_init_architecture(init_from: str, model: Mapping[str, Any]) -> StageInfo:
    """The finished UNet stage ``init_from``, whose architecture must be ``model`` (the UNet config being trained,
    with its text width and augmentation label filled in; dropout aside), else a ``ConfigError`` naming the
    differences."""
    info = read_stage(init_from, "unet")
    asked = {f"model.{k}": v for k, v in flatten_config(model).items() if k not in TRAINING_ONLY_FIELDS}
    differences = setting_differences(asked, {f"model.{k}": v for k, v in flatten_config(info.model).items()},
                                      {f"model.{k}": v for k, v in unrecorded_values(UNetConfig).items()})
    if differences:
        raise ConfigError(f"init_from={init_from}: that UNet has another architecture than the one asked "
                          f"({'; '.join(differences[:4])}); set the same model.* values (--unet.model.* in "
                          "train_all.py) or start from another stage")
    return info


def latent_normalisation_of(vae_info: StageInfo, mode: str) -> LatentNormalisation:
    """The UNet's latent normalisation ``mode`` from the VAE stage's recorded config, or a ``StageError`` that
    names what the stage lacks and the fix."""
    try:
        return LatentNormalisation.of_vae(config_from_dict(VAEConfig, vae_info.model), mode,
                                          where=f"the VAE stage at {vae_info.path}")
    except ValueError as err:
        raise StageError(f"{err}; retrain the VAE stage (a finished one records what is missing), or train the "
                         "UNet with --unet.latent_normalisation=global") from None


def init_stage(init_from: str | Path | None, model: UNetConfig, vae_info: StageInfo, clip_info: StageInfo,
               latent_normalisation: str) -> StageInfo | None:
    """The finished UNet stage ``init_from`` that training starts from, checked before anything loads
    (``check_init_architecture``). One trained on another VAE or CLIP than this run's, or on latents normalised
    otherwise, loads with a ``LineageWarning``: its weights learnt other latents or text states."""
    if init_from is None:
        return None
    info = check_init_architecture(str(init_from), config_to_dict(model))
    for name, upstream in (("vae", vae_info), ("clip", clip_info)):
        if info.trained_on.get(name) != upstream.fingerprint:
            warnings.warn(f"init_from={init_from} was trained on another {name.upper()} stage than "
                          f"{upstream.path}; it starts from weights that learnt other inputs", LineageWarning,
                          stacklevel=2)
    trained_with = trained_latent_normalisation(info.training)
    if trained_with != latent_normalisation:
        warnings.warn(f"init_from={init_from} was trained on latents normalised '{trained_with}', this run "
                      f"normalises them '{latent_normalisation}'; it starts from weights that learnt other inputs",
                      LineageWarning, stacklevel=2)
    return info


def lowres_folder(out_dir: str | Path) -> Path:
    """Where a progressive run keeps its low-resolution phase: a UNet stage folder inside the stage's own."""
    return Path(out_dir) / LOWRES_FOLDER


def stage_checkpoints(out_dir: str | Path) -> list[Path]:
    """The checkpoints a UNet training into ``out_dir`` resumes from: the stage's, then its low-resolution
    phase's (where a run stopped in that phase)."""
    return [checkpoint_path(out_dir), checkpoint_path(lowres_folder(out_dir))]


def train(cfg: UNetTrainConfig, data_source: str, vae_dir: str | Path, clip_dir: str | Path, out_dir: str | Path,
          resume: bool = False, device: str | torch.device | None = None) -> Path:
    """Train (or resume) the UNet stage into ``out_dir`` and return it once it holds a complete stage folder.

    With ``lowres_epochs > 0`` the low-resolution phase trains first into ``out_dir/lowres`` (skipped when that
    folder is finished with the same settings, data, VAE and CLIP, an error when it differs; resumed from its
    checkpoint with ``resume``); the stage then starts from its weights (the phase starts from ``init_from``'s,
    when both are set)."""
    validate_config(cfg)
    env = distributed.setup(device)
    check_cuda_graph(cfg.train, env.device, env.world_size)
    # a missing or unfinished stage, or one without what the latent normalisation needs, before the data loads
    latent_normalisation_of(read_stage(vae_dir, "vae"), cfg.latent_normalisation)
    read_stage(clip_dir, "clip")
    data = load_captions(data_source, resolution=cfg.resolution)
    captions = training_captions(cfg, data.subset("train"), clip_dir)
    twins = silhouette_twins(data) if cfg.balance_twins else None  # once, at the stage's resolution: both phases'
    if twins is not None and env.is_main:
        tqdm.write(f"balance_twins: {sum(map(len, twins))} of {len(data.subset('train'))} training images share a "
                   f"silhouette in {len(twins)} groups (largest {max(map(len, twins), default=0)}); each is drawn "
                   "with weight 1 / its group's size")
    init_from = cfg.init_from
    if cfg.lowres_epochs > 0:
        phase, folder = cfg.lowres_phase(), lowres_folder(out_dir)
        if is_complete(folder):
            _check_finished_phase(folder, phase, data_source, vae_dir, clip_dir, derived_record(captions, twins))
        else:
            _train_phase(phase, load_captions(data_source, resolution=phase.resolution), vae_dir, clip_dir, folder,
                         resume, device, cfg.init_from, captions, twins)
        init_from = folder
    return _train_phase(cfg, data, vae_dir, clip_dir, Path(out_dir), resume, device, init_from, captions, twins)


def _check_finished_phase(folder: Path, phase: UNetTrainConfig, data_source: str, vae_dir: str | Path,
                          clip_dir: str | Path, derived: Mapping[str, str]) -> None:
    """A finished low-resolution phase is reused only when it is what is asked: same settings, data, VAE, CLIP,
    and the same ``derived`` inputs (``derived_inputs``' kind: the training captions' fingerprint with the colour
    sentences, the silhouette twin groups with ``balance_twins``)."""
    differences = finished_stage_differences("unet", folder, phase, data_source,
                                             {"vae": Path(vae_dir), "clip": Path(clip_dir)}, derived)
    if differences:
        raise StageError(f"{folder} holds a finished low-resolution phase that differs from what is asked "
                         f"({'; '.join(differences[:4])}); remove that folder to train the phase again, or ask "
                         "for its settings")


def _train_phase(cfg: UNetTrainConfig, data: CaptionSet, vae_dir: str | Path, clip_dir: str | Path, out_dir: Path,
                 resume: bool, device: str | torch.device | None, init_from: str | Path | None,
                 captions: TrainingCaptions, twins: list[list[int]] | None = None) -> Path:
    """One phase on ``data``'s images (loaded at ``cfg.resolution``) with the stage's ``training_captions``
    (its recoloured copies made again from the phase's images); with ``twins`` (``silhouette_twins``, with
    ``balance_twins``), each image of a group drawn with weight 1 / its size."""
    started = time.perf_counter()
    env = distributed.setup(device)
    vae_info, clip_info = read_stage(vae_dir, "vae"), read_stage(clip_dir, "clip")
    normalisation = latent_normalisation_of(vae_info, cfg.latent_normalisation)
    vae = AutoencoderKL.load(vae_dir, env.device).requires_grad_(False)
    clip = CLIPModel.load(clip_dir, env.device).requires_grad_(False)
    cfg.model = cfg.filled_model(clip.context_dim)
    check_fit(vae_info.model, clip_info.model, config_to_dict(cfg.model),
              {"vae": f"at {vae_dir}", "clip": f"at {clip_dir}", "unet": "being trained"}, cfg.resolution)
    init = init_stage(init_from, cfg.model, vae_info, clip_info, cfg.latent_normalisation)
    train_set, val_set = data.subset("train"), data.subset("val")

    # Text states once (the text encoder is frozen); then CLIP leaves the GPU.
    en, zh = captions.en, captions.zh
    cut = {language: sum(clip.tokenizer.dropped_tokens(text) > 0 for text in texts)
           for language, texts in (("English", en), ("Chinese", zh))}
    if any(cut.values()) and env.is_main:  # a colour sentence is kept: with_colour_sentences trims the caption
        tqdm.write(f"note: {cut['English']} English and {cut['Chinese']} Chinese training captions of {len(en)} are "
                   f"longer than the text encoder's {clip.tokenizer.context_length - 2} tokens; their ends are cut off")
    texts = TextStateCache.build(clip, en, zh, cfg.caption_variants, cfg.clause_keep_prob, seed=cfg.train.seed,
                                 keep_last=ends_with_colour_sentence if cfg.keep_colour_sentence else None)
    val_context = encode_prompts(clip, val_set.en)
    fit_rows = fit_probe_rows(len(train_set), len(val_set))
    fit_context = encode_prompts(clip, [train_set.en[i] for i in fit_rows.tolist()])  # plain, as the validation's
    prompt_states = encode_prompts(clip, grid_prompts(val_set))
    tokenizer_fingerprint = clip.tokenizer.fingerprint
    del clip

    # Latent posteriors once, keyed by the VAE and the data; rank 0 encodes, the other ranks read its file.
    latents_dir = out_dir / "latents"
    augment = cfg.augment if cfg.augment.copies > 0 else None
    augment_key = augment.key() if augment else "plain"
    train_key = cache_key(vae_info.fingerprint, train_set.fingerprint, "mirror", augment_key)
    train_path = latents_dir / f"train-{train_key}.safetensors"
    val_path = latents_dir / f"val-{cache_key(vae_info.fingerprint, val_set.fingerprint)}.safetensors"
    recoloured_path = None
    if len(captions.hue_turns):  # keyed by the turns too: they follow the images' colours and the seed
        recoloured_key = cache_key(vae_info.fingerprint, train_set.fingerprint, "mirror",
                                   f"recolour v{RECOLOUR_VERSION}", repr(captions.hue_turns.tolist()))
        recoloured_path = latents_dir / f"recoloured-{recoloured_key}.safetensors"
    recoloured = None
    if env.is_main:  # the cache it builds (or finds) is the one it trains on: no second read of the file
        train_latents = build_latent_cache(vae, train_set.images, train_path, cfg.encode_batch_size, env.device,
                                           normalisation, augment=augment)
        val_cache = build_latent_cache(vae, val_set.images, val_path, cfg.encode_batch_size, env.device,
                                       normalisation, mirror=False)
        if recoloured_path is not None:  # the copies are turned only when they are not cached yet
            recoloured = (LatentCache.load(recoloured_path, normalisation, env.device) if recoloured_path.is_file()
                          else build_latent_cache(vae, recoloured_images(train_set.images, captions.hue_turns,
                                                                         env.device),
                                                  recoloured_path, cfg.encode_batch_size, env.device, normalisation))
    distributed.barrier()
    if not env.is_main:
        train_latents = LatentCache.load(train_path, normalisation, env.device)
        val_cache = LatentCache.load(val_path, normalisation, env.device)
        recoloured = (LatentCache.load(recoloured_path, normalisation, env.device) if recoloured_path is not None
                      else None)
    val_latents = val_cache.normalised_mean()
    # the plain rows come first in the cache: these are the images themselves, not mirrors or augmented copies
    fit_latents = train_latents.normalised_mean(fit_rows.to(train_latents.mean.device))

    torch.manual_seed(cfg.train.seed)  # the initial weights follow the seed too, not the caller's RNG state
    schedule = NoiseSchedule(cfg.schedule)
    schedule.cache_tables(env.device)
    model = UNet(cfg.model)
    if init is not None:  # before the trainer: its EMA starts from these weights too (a resume overrides both)
        model.load_state_dict(load_weights(init.path))
    module = DiffusionTrainingModule(model, schedule, cfg.prediction_type, cfg.loss)
    trained_on = {"data": data.fingerprint, "captions": data.captions_fingerprint, **derived_record(captions, twins),
                  "vae": vae_info.fingerprint, "clip": clip_info.fingerprint, "tokenizer": tokenizer_fingerprint}
    if init is not None:
        trained_on["init"] = init.fingerprint
    item_weights = None
    if twins is not None:  # a mirror row (image i's at i + N) draws as its image does
        num_images = len(train_set)
        item_weights = twin_weights(twins, num_images).repeat(train_latents.num_plain_rows // num_images)
    trainer = Trainer(module, cfg.train, out_dir, num_train_items=train_latents.num_plain_rows,
                      ema_of=model, cuda_graph_of=model, resume=resume, device=env.device,
                      run_config=cfg, trained_on=trained_on, item_weights=item_weights)
    make_batch = LatentBatchMaker(train_latents, texts, cfg.zh_prob, cfg.cfg_drop_prob, cfg.augment.prob,
                                  trainer.memory_format, recoloured, cfg.recolour.prob)
    validation = ValidationLoss(model, schedule, cfg.prediction_type, val_latents, val_context, cfg.val_timesteps,
                                cfg.val_batch_size)
    training_images = validation.on(fit_latents, fit_context)
    grid = SampleGrid(cfg, schedule, prompt_states, texts.null, tuple(val_latents.shape[1:]), normalisation)
    trainer.fit(make_batch, on_epoch_end=EpochReport(cfg, model, vae, validation, training_images, grid, out_dir))

    def final_metrics() -> dict[str, Any]:
        on_cuda = trainer.device.type == "cuda"
        last = trainer.last_epoch_metrics()
        return {
            "val_loss": last["val/loss"],  # the last epoch always scores the EMA weights
            "train_images_loss": last[TRAIN_IMAGES_KEY],
            **{probe_key(std).replace("/", "_"): last[probe_key(std)] for std in trainer.ema_probes},
            "train_samples_per_s": _training_throughput(out_dir / "log.jsonl"),
            "peak_mem_gb": torch.cuda.max_memory_allocated(trainer.device) / 1e9 if on_cuda else None,
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        }

    return trainer.finish_stage(model, cfg, final_metrics, lambda metrics: f"val loss {metrics['val_loss']:.4f}",
                                started)


def main(argv: Sequence[str] | None = None) -> None:
    upstream = {"vae": "finished VAE stage folder, e.g. runs/NAME/vae",
                "clip": "finished CLIP stage folder, e.g. runs/NAME/clip"}
    parser = stage_parser("python -m diffusion.train", "Train the latent UNet (diffusion) stage.", "unet", upstream)
    run_stage_cli(parser, argv, UNetTrainConfig, PRESETS, train, upstream=list(upstream), checkpoints=stage_checkpoints)


if __name__ == "__main__":
    run_cli(main)
