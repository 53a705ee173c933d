"""Config of the UNet (diffusion) stage and its named presets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from data.augment import AUGMENT_DIM
from diffusion.latents import LATENT_NORMALISATIONS, GeometryAugment
from diffusion.losses import DiffusionLossConfig
from diffusion.recolour import RecolourAugment
from diffusion.samplers import SAMPLERS
from diffusion.schedule import ScheduleConfig, check_prediction_type
from engine.config import UNRECORDED, ConfigError, TrainConfig, require_positive, unrecorded_values
from unet.config import UNetConfig

# Recorded config values that training fills in from its inputs (``UNetTrainConfig.filled_model``): not asked for.
FILLED_BY_TRAINING = ("model.context_dim", "model.augment_dim")


@dataclass
class UNetTrainConfig:
    """One UNet training run on cached VAE latents and frozen CLIP text states.

    The defaults are the ``full`` preset (one H100/H200, 512-px images -> 4x64x64 latents). Budget estimate:
    the UNet (base 128, channel_mult (1, 2, 3, 4), 2 res blocks, a transformer at every level; 137 M
    parameters with 256-wide text states) costs 147 GFLOP per 64x64 forward (torch's FLOP counter; ~30 %
    of it is the 4096-token self-attention of the top level), ~465 GFLOP per training sample with the
    backward, ~85 at 256 px. An epoch walks the 1,500 cached latents (750 training images and their mirrors; a
    draw takes one of the image's two recoloured encodings with ``recolour.prob``, and with ``augment.copies`` > 0
    one of its augmented encodings with ``augment.prob``) ``passes_per_epoch`` = 10 times: 15 k samples. The
    stage trains ``lowres_epochs`` = 36 at 256 px in batches of 256 (2,088 steps), then 6 at 512 px in batches
    of 64 (1,404 steps). Both phases run eager: compiling costs minutes per resolution, about what it saves in
    phases this short (docs/BENCHMARKS.md; ``train.compile`` for longer runs; ``train.cuda_graph`` replays the
    eager step from CUDA graphs, opt-in).
    Latent caching takes seconds per phase; a sample grid plus the validation loss ~3 s each.
    Activations are ~0.35 GiB per sample at 512 px in bf16, so batch 64 (or 256 at 256 px) needs ~25 GiB with
    the weights, EMA and AdamW state, and ~4.4 GiB more for the two snapshots a spike rolls back to.
    """

    # Learning rate 4e-4 without dropout or augmentation: at the default's 2.5 k steps it learns faster than 2e-4
    # with dropout 0.1 and augmentation, and at the generation default's guidance its near-copies stay within the
    # bars (docs/results/quality). Norms in bf16 (engine.precision): ~10 % more samples/s, same validation loss.
    model: UNetConfig = field(default_factory=UNetConfig)
    # A spike rolls back (engine.trainer): two of six runs of this recipe spiked at the 256-px warm-up's end and
    # drew visibly worse after (docs/results/quality/snr_shift_run/).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=6, passes_per_epoch=10, batch_size=64, lr=4e-4, warmup_steps=200, weight_decay=0.01, ema_decay=0.999,
        log_every=50, checkpoint_every_epochs=4, compile=False, low_precision_norms=True, spike_rollbacks=2))
    # v-prediction on a zero-terminal-SNR schedule: with epsilon on scaled-linear the last step still holds
    # signal, so sampling from pure noise never learns the white page and fills the frame (issue 13)
    # (schedule.snr_shift is the full-resolution phase's; the low-resolution phase trains unshifted)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(zero_terminal_snr=True))
    prediction_type: str = "v_prediction"  # or "epsilon" (then drop schedule.zero_terminal_snr)
    loss: DiffusionLossConfig = field(default_factory=lambda: DiffusionLossConfig(
        div_weight=0.05, cons_weight=0.1, cons_warmup_steps=500))
    # pixel-space geometric augmentation with its label as UNet conditioning (EDM's recipe): off by default
    # (it did not pay at this run length; docs/results/quality); --unet.augment.copies=N turns it on
    augment: GeometryAugment = field(default_factory=GeometryAugment)
    # two recoloured copies of each image whose captions name the new colours (diffusion.recolour), a draw taking
    # one with recolour.prob: on by default since a full-length run paired with one without them
    # (docs/results/quality/recolour_run); --unet.recolour.copies=0 turns them off
    recolour: RecolourAugment = field(default_factory=lambda: RecolourAugment(copies=2))
    # draw each image of a group sharing one silhouette (diffusion.twins; on the Pokémon set the largest group is
    # 17 winged creatures) with weight 1 / (group size), since samples repeated that butterfly layout in the
    # prompts' colours; a repeated body plan then counts as one image. Every item is then drawn with replacement.
    # On by default since a run paired with one without it (docs/results/quality/balance_twins_run)
    balance_twins: bool = True
    resolution: int = 512  # images are encoded at this size; latents are resolution / 8
    # the UNet's latents from the VAE's (diffusion.latents.LatentNormalisation): "global", the LDM recipe's one
    # factor, or "per_channel", EDM2's zero mean and unit variance for each channel (the VAE's measured moments).
    # "global" stays the default: a per_channel run paired with a global one drew paler pictures and missed the
    # prompt's colour more often (docs/results/quality/per_channel_run)
    latent_normalisation: str = field(default="global", metadata={UNRECORDED: "global"})
    # Progressive resolution: the stage first trains lowres_epochs at resolution / lowres_factor (into out/lowres/,
    # a UNet stage folder of its own), then continues from those weights at `resolution` for train.epochs. At a
    # quarter of the pixels a sample trains ~4x as fast, so most samples learn layout and text there (as in SD's
    # 256 -> 512 schedule). 36 epochs rather than 20 drew fewer loose fragments for ~3.5 more minutes, though the
    # 256-px validation loss turns up after ~22 (docs/results/quality). lowres_epochs=0: one phase at `resolution`.
    lowres_epochs: int = 36
    lowres_factor: int = 2
    lowres_batch_size: int = 256  # at a quarter of the pixels, 4x the batch fills the GPU as 64 does at 512
    lowres_sample_every_epochs: int = 4  # a low-resolution epoch is ~15 s: a grid every few
    # a finished UNet stage folder whose weights this run starts from (fine-tuning; with lowres_epochs > 0 the
    # low-resolution phase starts there); None: random initial weights
    init_from: str | None = None
    cfg_drop_prob: float = 0.2  # a caption is replaced by the empty prompt's states with this probability
    zh_prob: float = 0.5  # a sample takes its Chinese caption with this probability
    caption_variants: int = 4  # clause-dropped variants per caption besides the full one (0: full captions only)
    clause_keep_prob: float = 0.6
    # append "Its body is mostly <colour>." (measured from the pixels) to a caption when one hue family dominates
    # the image: in these captions colour words mostly name details ("red eyes"); docs/results/quality measures it
    colour_sentences: bool = True
    # every clause-dropped variant keeps the colour sentence (else it drops like any clause, with probability
    # 1 - clause_keep_prob, and a recoloured copy's draw may name no colour at all); off until a run measures it
    keep_colour_sentence: bool = field(default=False, metadata={UNRECORDED: False})  # older stages: as off
    encode_batch_size: int = 32  # VAE encoding batch for the latent cache
    val_timesteps: int = 10  # the validation loss averages over this many fixed, evenly spaced timesteps
    val_batch_size: int = 64
    sample_every_epochs: int = 1  # and always after the last epoch
    sample_steps: int = 25
    sample_sampler: str = "dpmpp_2m"
    guidance_scale: float = 5.0  # the epoch grids', at every noise level: strong, to show what the text does
    guidance_rescale: float = 0.7  # Lin et al. 2024: pulls the guided prediction's spread back to the conditional one
    sample_seeds: int = 2  # each grid prompt is sampled from this many fixed seeds

    def filled_model(self, text_width: int) -> UNetConfig:
        """The UNet's config as training completes it: the text states' width from the CLIP stage (unless set)
        and, when the run augments, the width of the augmentation label that conditions the UNet."""
        return replace(self.model, context_dim=self.model.context_dim or text_width,
                       augment_dim=AUGMENT_DIM if self.augment.copies > 0 else self.model.augment_dim)

    @property
    def lowres_resolution(self) -> int:
        return self.resolution // self.lowres_factor

    def lowres_phase(self) -> "UNetTrainConfig":
        """The config of the low-resolution phase: this one at ``lowres_resolution`` with the phase's epochs, batch
        and grid interval, no phase of its own, and the schedule without ``snr_shift`` (the shift is what the
        higher resolution needs to see each step's layout as the lower one saw it)."""
        return replace(self, resolution=self.lowres_resolution, sample_every_epochs=self.lowres_sample_every_epochs,
                       train=replace(self.train, epochs=self.lowres_epochs, batch_size=self.lowres_batch_size),
                       schedule=replace(self.schedule, snr_shift=1.0), lowres_epochs=0)

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field and the fix, before anything is loaded."""
        try:
            check_prediction_type(self.prediction_type)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.loss.min_snr_plus_one and (self.prediction_type != "v_prediction" or self.loss.min_snr_gamma <= 0):
            raise ConfigError("loss.min_snr_plus_one caps the v-loss's Min-SNR weight: it needs "
                              "prediction_type=v_prediction and loss.min_snr_gamma > 0; set it to false")
        if self.latent_normalisation not in LATENT_NORMALISATIONS:
            raise ConfigError(f"latent_normalisation '{self.latent_normalisation}' is unknown; choose one of "
                              f"{list(LATENT_NORMALISATIONS)}")
        if self.sample_sampler not in SAMPLERS:
            raise ConfigError(f"sample_sampler '{self.sample_sampler}' is unknown; choose one of {sorted(SAMPLERS)}")
        for name in ("cfg_drop_prob", "zh_prob", "clause_keep_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ConfigError(f"guidance_rescale must be in [0, 1] (0: off), got {self.guidance_rescale}")
        if self.recolour.copies and not self.colour_sentences:
            raise ConfigError("recolour.copies > 0 needs colour_sentences=true: a recoloured copy whose caption names "
                              "no colour would train on its original caption; set colour_sentences=true or "
                              "recolour.copies=0")
        if self.keep_colour_sentence and not self.colour_sentences:
            raise ConfigError("keep_colour_sentence=true keeps the colour sentence in every caption variant: it needs "
                              "colour_sentences=true; set it, or keep_colour_sentence=false")
        if self.caption_variants < 0:
            raise ConfigError(f"caption_variants must be >= 0, got {self.caption_variants}")
        require_positive(self, "encode_batch_size", "val_timesteps", "val_batch_size", "sample_every_epochs",
                         "sample_steps", "sample_seeds")
        if self.train.cuda_graph and self.model.gradient_checkpointing:
            raise ConfigError("train.cuda_graph=true does not replay gradient checkpointing's recomputation: set "
                              "model.gradient_checkpointing=false or train.cuda_graph=false")
        if self.lowres_epochs < 0:
            raise ConfigError(f"lowres_epochs must be >= 0 (0: no low-resolution phase), got {self.lowres_epochs}")
        if self.lowres_epochs > 0:
            if self.lowres_factor < 2 or self.resolution % self.lowres_factor:
                raise ConfigError(f"lowres_factor={self.lowres_factor} must be >= 2 and divide resolution="
                                  f"{self.resolution}; change it, or set lowres_epochs=0 for one phase")
            require_positive(self, "lowres_batch_size", "lowres_sample_every_epochs")
        if self.sample_steps > self.schedule.num_steps:
            raise ConfigError(f"sample_steps={self.sample_steps} exceeds the schedule's "
                              f"{self.schedule.num_steps} steps; lower sample_steps")


def trained_latent_normalisation(training: Mapping[str, Any]) -> str:
    """The latent normalisation a UNet stage trained with, from its recorded config (``StageInfo.training``)."""
    return training.get("latent_normalisation", unrecorded_values(UNetTrainConfig)["latent_normalisation"])


PRESETS: dict[str, dict[str, object]] = {
    # CPU smoke run: 64-px images (16x16 latents with an f=4 VAE, 8x8 with f=8), a ~1 M parameter UNet, ~10 s.
    "tiny": {
        "resolution": 64, "model.base_channels": 32, "model.channel_mult": (1, 2), "model.num_res_blocks": 1,
        "model.head_dim": 16, "model.norm_groups": 8, "model.dropout": 0.0, "epochs": 2, "batch_size": 16,
        "passes_per_epoch": 1, "lr": 1e-3, "warmup_steps": 5, "ema_decay": 0.99, "log_every": 5,
        "checkpoint_every_epochs": 1, "cons_warmup_steps": 5, "encode_batch_size": 64, "sample_every_epochs": 1,
        "sample_steps": 5, "sample_seeds": 1, "val_timesteps": 4, "compile": False,
        "caption_variants": 2, "lowres_epochs": 1, "lowres_batch_size": 16,
        "lowres_sample_every_epochs": 1,
    },
    "full": {},  # the defaults above
}
