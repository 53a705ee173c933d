"""Export a trained run to the diffusers format:

    python -m pipelines.export --run runs/NAME --format diffusers --out exported/NAME

writes a ``StableDiffusionPipeline`` folder that diffusers' ``from_pretrained`` loads offline:

- ``vae/``: ``AutoencoderKL`` (config with our measured ``scaling_factor``, fp32 safetensors);
- ``unet/``: ``UNet2DConditionModel``;
- ``scheduler/``: ``DDIMScheduler`` on our noise schedule (kind, betas, zero terminal SNR, prediction type,
  trailing timesteps); with eta 0 and the same timesteps its update is ours (``diffusion.samplers.sample_ddim``).
  The timesteps are the same only when the step count divides the schedule's length (25 or 50 of 1,000): diffusers
  rounds the trailing levels where we floor, and its DDIM steps by a fixed stride; our default sampler
  (DPM-Solver++(2M) with interval guidance, step noise and condition noise) has no diffusers twin;
- ``model_index.json`` with no text encoder and no tokenizer: our bilingual CLIP and BPE tokenizer have no
  diffusers twin. Their folder is copied to ``scratch_clip/``; :mod:`pipelines.prompt_embeds` turns prompts
  into the ``prompt_embeds`` / ``negative_prompt_embeds`` the pipeline takes.

The weights are renamed and reshaped only (ours fuses q/k/v; diffusers keeps them apart), never retrained, so
the exported models compute what ours compute: ``benchmarks/export_check.py`` measures it. Two exceptions,
both reported when they apply:

- the UNet's augmentation-label embedding (``augment_dim > 0``) is folded into the timestep embedding's bias
  at the zero label, which is what sampling uses: diffusers' pipelines never pass ``class_labels``, so a
  ``class_embedding`` would make every standard pipeline fail. :func:`unet_to_diffusers` still maps it one to
  one (``class_embed_type="projection"``) for callers that pass the labels themselves;
- a VAE with ``downsample_padding="symmetric"`` (every VAE trained before that field existed) has an
  encoder diffusers cannot express: its ``AutoencoderKL`` always pads the stride-2 convs one row and column
  after the image. Decoding, and so text-to-image, is still exact; encoding (image-to-image) is not.

Writing the export needs no diffusers; only loading it does (``pip install -e ".[diffusers]"``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from clip.model import TOKENIZER_FILE
from diffusion.schedule import NoiseSchedule, ScheduleConfig
from engine.errors import UserError, add_debug_flag, run_cli
from engine.stage import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, write_json
from unet.config import UNetConfig
from vae.config import VAEConfig

from .stages import StageStack, add_stage_arguments, load_stack

# Written as "_diffusers_version" into every config: the oldest diffusers this format was checked against
# (diffusers only compares it to its own version to warn).
DIFFUSERS_FORMAT_VERSION = "0.30.0"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
SCRATCH_CLIP_DIR = "scratch_clip"
EXPORT_RECORD = "scratch_export.json"  # what was exported: marks a folder --overwrite may replace

# our schedule kind -> diffusers' beta_schedule (its "squaredcos_cap_v2" is the same s=0.008, 0.999-capped cosine)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


class ExportError(UserError):
    """A model that the diffusers format cannot express (a stage the user chose to export: one line, no
    traceback, at the command line)."""


# ---------------------------------------------------------------------------------------------- configs
def diffusers_vae_config(config: VAEConfig, sample_size: int) -> dict[str, Any]:
    """``AutoencoderKL`` arguments for our VAE: no 1x1 quant convs (ours has none), our scaling factor."""
    widths = [config.base_channels * mult for mult in config.channel_mult]
    return {
        "in_channels": config.in_channels,
        "out_channels": config.in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "block_out_channels": widths,
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": config.scaling_factor,
        "shift_factor": None,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,  # trained in bf16, never checked in fp16: fp16 pipelines decode it in fp32
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


# UNetConfig options that UNet2DConditionModel (or the pipelines that call it) cannot express, and why
UNEXPRESSIBLE_OPTIONS = {
    "qk_norm": "it normalises its attention queries and keys, which UNet2DConditionModel has no place for",
    "pooled_context": "it adds its text states' mean to the timestep embedding, which no diffusers pipeline "
                      "computes or passes to UNet2DConditionModel",
}


def diffusers_unet_config(config: UNetConfig, sample_size: int, augment_as_class_embedding: bool = False
                          ) -> dict[str, Any]:
    """``UNet2DConditionModel`` arguments for our UNet: a cross-attention transformer at every level and in the
    middle, linear transformer projections, GroupNorm eps 1e-6, dropout in the ResNet blocks only, cos-first
    sinusoidal timestep features with no frequency shift (``unet.blocks.timestep_embedding``)."""
    if config.channel_mult[0] != 1:
        raise ExportError(f"UNet channel_mult starts with {config.channel_mult[0]}: diffusers sizes the timestep "
                          "features by the first level's width, ours by base_channels; only channel_mult[0] = 1 "
                          "exports (retrain with channel_mult starting at 1)")
    for option, why in UNEXPRESSIBLE_OPTIONS.items():
        if getattr(config, option):
            raise ExportError(f"the UNet was trained with {option}=true: {why}; only a UNet trained with "
                              f"{option}=false exports")
    widths = [config.base_channels * mult for mult in config.channel_mult]
    augment = augment_as_class_embedding and config.augment_dim > 0
    return {
        "sample_size": sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D"] * len(widths),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D"] * len(widths),
        "block_out_channels": widths,
        "layers_per_block": config.num_res_blocks,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": config.dropout,
        "act_fn": "silu",
        "norm_num_groups": config.norm_groups,
        "norm_eps": 1e-6,
        "cross_attention_dim": config.context_dim,
        "transformer_layers_per_block": config.transformer_depth,
        # Historically misnamed: UNet2DConditionModel reads attention_head_dim as the number of heads per level
        # (SD 2 passes (5, 10, 20, 20) for widths (320, 640, 1280, 1280): 64-dim heads).
        "attention_head_dim": [width // config.head_dim for width in widths],
        "use_linear_projection": True,
        "upcast_attention": False,
        "only_cross_attention": False,
        "resnet_time_scale_shift": "default",
        "time_embedding_type": "positional",
        "class_embed_type": "projection" if augment else None,
        "projection_class_embeddings_input_dim": config.augment_dim if augment else None,
    }


def diffusers_scheduler_config(schedule: ScheduleConfig, prediction_type: str) -> dict[str, Any]:
    """``DDIMScheduler`` arguments for our schedule: trailing timesteps (``NoiseSchedule.sampling_timesteps``),
    the last step to alpha_bar = 1 as our samplers end, no clipping of x0. diffusers has no SNR shift, so a
    shifted schedule goes as its own betas (already rescaled; diffusers then keeps a zero-SNR end at exactly 0)."""
    shifted = schedule.snr_shift != 1
    return {
        "num_train_timesteps": schedule.num_steps,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "beta_schedule": BETA_SCHEDULES[schedule.kind],
        "trained_betas": NoiseSchedule(schedule).betas.tolist() if shifted else None,
        "clip_sample": False,
        "set_alpha_to_one": True,
        # trailing spacing ignores it; StableDiffusionPipeline rewrites anything but 1 to 1, with a warning
        "steps_offset": 1,
        "prediction_type": prediction_type,
        "thresholding": False,
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": schedule.zero_terminal_snr and not shifted,
    }


def pipeline_index() -> dict[str, Any]:
    """``model_index.json`` of a ``StableDiffusionPipeline`` whose text encoder and tokenizer stay ours."""
    return {
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": [None, None],
        "tokenizer": [None, None],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }


# ---------------------------------------------------------------------------------------------- weights
def _split_rows(weight: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    return dict(zip(names, weight.chunk(len(names), dim=0)))


def vae_to_diffusers(state: Mapping[str, Tensor], config: VAEConfig) -> dict[str, Tensor]:
    """Our VAE state dict with ``AutoencoderKL``'s names: our flat ``down``/``up`` sequences become per-level
    blocks, the 1x1-conv attention projections become linear layers."""
    levels = len(config.channel_mult)
    prefixes: dict[str, str] = {}  # our module path -> theirs
    index = 0
    for level in range(levels):
        for block in range(config.num_res_blocks):
            prefixes[f"encoder.down.{index}"] = f"encoder.down_blocks.{level}.resnets.{block}"
            index += 1
        if level < levels - 1:
            prefixes[f"encoder.down.{index}"] = f"encoder.down_blocks.{level}.downsamplers.0"
            index += 1
    index = 0
    for up_block in range(levels):  # up_blocks[0] is the lowest resolution, as our decoder starts
        for block in range(config.num_res_blocks + 1):
            prefixes[f"decoder.up.{index}"] = f"decoder.up_blocks.{up_block}.resnets.{block}"
            index += 1
        if up_block < levels - 1:
            prefixes[f"decoder.up.{index}"] = f"decoder.up_blocks.{up_block}.upsamplers.0"
            index += 1
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid.res1"] = f"{part}.mid_block.resnets.0"
        prefixes[f"{part}.mid.res2"] = f"{part}.mid_block.resnets.1"
        prefixes[f"{part}.norm_out"] = f"{part}.conv_norm_out"
        prefixes[f"{part}.conv_in"] = f"{part}.conv_in"
        prefixes[f"{part}.conv_out"] = f"{part}.conv_out"

    out: dict[str, Tensor] = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        attention = re.fullmatch(r"(encoder|decoder)\.mid\.attn(\.\w+)?", module)
        if attention:
            theirs = f"{attention.group(1)}.mid_block.attentions.0"
            sub = attention.group(2)
            if sub == ".norm":
                out[f"{theirs}.group_norm.{param}"] = value
            elif sub == ".qkv":  # 1x1 conv [3C, C, 1, 1] -> three linear layers
                rows = value.flatten(1) if param == "weight" else value
                for name, part in _split_rows(rows, ("to_q", "to_k", "to_v")).items():
                    out[f"{theirs}.{name}.{param}"] = part
            elif sub == ".proj":
                out[f"{theirs}.to_out.0.{param}"] = value.flatten(1) if param == "weight" else value
            else:
                raise ExportError(f"no diffusers name for VAE weight {key}")
            continue
        head = next((p for p in prefixes if module == p or module.startswith(p + ".")), None)
        if head is None:
            raise ExportError(f"no diffusers name for VAE weight {key}")
        rest = module[len(head):].replace(".skip", ".conv_shortcut")
        out[f"{prefixes[head]}{rest}.{param}"] = value
    return out


# (pattern, replacement) applied in order to every UNet key; q/k/v and k/v are split afterwards
_UNET_RENAMES = [
    (r"^time_embed\.mlp\.0\.", "time_embedding.linear_1."),
    (r"^time_embed\.mlp\.2\.", "time_embedding.linear_2."),
    (r"^augment_embed\.0\.", "class_embedding.linear_1."),
    (r"^augment_embed\.2\.", "class_embedding.linear_2."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"^(down|up)\.(\d+)\.layers\.(\d+)\.res\.", r"\1_blocks.\2.resnets.\3."),
    (r"^(down|up)\.(\d+)\.layers\.(\d+)\.transformer\.", r"\1_blocks.\2.attentions.\3."),
    (r"^down\.(\d+)\.resample\.", r"down_blocks.\1.downsamplers.0."),
    (r"^up\.(\d+)\.resample\.", r"up_blocks.\1.upsamplers.0."),
    (r"^middle\.layer\.res\.", "mid_block.resnets.0."),
    (r"^middle\.layer\.transformer\.", "mid_block.attentions.0."),
    (r"^middle\.res\.", "mid_block.resnets.1."),
    (r"\.time_proj\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"\.blocks\.(\d+)\.", r".transformer_blocks.\1."),
    (r"\.self_attn\.out\.", ".attn1.to_out.0."),
    (r"\.self_attn\.qkv\.", ".attn1.qkv."),
    (r"\.cross_attn\.out\.", ".attn2.to_out.0."),
    (r"\.cross_attn\.q\.", ".attn2.to_q."),
    (r"\.cross_attn\.kv\.", ".attn2.kv."),
    (r"\.ff\.proj_in\.", ".ff.net.0.proj."),
    (r"\.ff\.proj_out\.", ".ff.net.2."),
]


def unet_to_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our UNet state dict with ``UNet2DConditionModel``'s names; fused projections split into q, k, v. The
    augmentation-label embedding, when present, becomes ``class_embedding`` (``class_embed_type="projection"``)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key
        for pattern, replacement in _UNET_RENAMES:
            name = re.sub(pattern, replacement, name)
        if name.endswith(".attn1.qkv.weight"):
            for part, rows in _split_rows(value, ("to_q", "to_k", "to_v")).items():
                out[name.replace(".qkv.", f".{part}.")] = rows
        elif name.endswith(".attn2.kv.weight"):
            for part, rows in _split_rows(value, ("to_k", "to_v")).items():
                out[name.replace(".kv.", f".{part}.")] = rows
        else:
            out[name] = value
    return out


def fold_zero_augment(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Fold ``class_embedding`` at the zero label into the timestep embedding's output bias.

    The label embedding of zeros is the constant ``linear_2(silu(linear_1.bias))``, added to every timestep
    embedding; adding it to ``time_embedding.linear_2.bias`` instead gives the same UNet for sampling, with no
    ``class_labels`` to pass.
    """
    out = {k: v for k, v in state.items() if not k.startswith("class_embedding.")}
    if "class_embedding.linear_1.bias" not in state:
        return out
    hidden = F.silu(state["class_embedding.linear_1.bias"].double())
    constant = state["class_embedding.linear_2.weight"].double() @ hidden + state["class_embedding.linear_2.bias"].double()
    bias = state["time_embedding.linear_2.bias"]
    out["time_embedding.linear_2.bias"] = (bias.double() + constant).to(bias.dtype)
    return out


# ---------------------------------------------------------------------------------------------- export
def _write_component(folder: Path, class_name: str, config: Mapping[str, Any],
                     weights: Mapping[str, Tensor] | None = None, config_file: str = "config.json") -> None:
    write_json(folder / config_file, {"_class_name": class_name, "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
                                      **config})
    if weights is not None:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
        save_file(tensors, str(folder / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})


def check_export_folder(out: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that holds something, unless ``overwrite`` and it holds an earlier export
    (anything else there is never replaced)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} is a file; choose a folder")
    if not any(out.iterdir()):
        return
    if not (out / EXPORT_RECORD).is_file():
        raise ExportError(f"--out {out} holds files that are not an export (no {EXPORT_RECORD}); choose another "
                          "--out")
    if not overwrite:
        raise ExportError(f"--out {out} holds an earlier export; pass --overwrite to replace it, or choose another "
                          "--out")


def export_diffusers(run: str | Path | None, out: str | Path, *, vae: str | Path | None = None,
                     clip: str | Path | None = None, unet: str | Path | None = None,
                     overwrite: bool = False) -> list[str]:
    """Write the run's stages (or the folders given) to ``out`` as a diffusers ``StableDiffusionPipeline``
    folder; returns notes on what is not exact (empty when everything is).

    ``out`` must be new or empty, or (with ``overwrite``) hold an earlier export. The export is written beside
    it and moved into place whole, so a failed export leaves ``out`` as it was."""
    out = Path(out)
    check_export_folder(out, overwrite)
    stack = load_stack(run, vae=vae, clip=clip, unet=unet, device="cpu")
    target = out.resolve()  # '.' has no name to put beside it
    staging, replaced = (target.with_name(f".{target.name}.{what}-{os.getpid()}") for what in ("partial", "replaced"))
    shutil.rmtree(staging, ignore_errors=True)  # what a killed export of this process id left
    staging.mkdir(parents=True)
    try:
        notes = _write_export(stack, staging)
        if not target.exists():
            staging.rename(target)
            return notes
        target.rename(replaced)  # an earlier export (or an empty folder): removed once the new one is in place
        try:
            staging.rename(target)
        except BaseException:
            replaced.rename(target)
            raise
        shutil.rmtree(replaced)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return notes


def _write_export(stack: StageStack, out: Path) -> list[str]:
    """The export's files in ``out``; returns the notes."""
    notes = []
    vae_config, unet_config = stack.vae.config, stack.unet.config
    if vae_config.scaling_factor is None:
        raise ExportError(f"the VAE at {stack.infos['vae'].path} has no scaling_factor; export a finished VAE stage")
    if stack.latent_normalisation.shift is not None:
        raise ExportError(f"the UNet at {stack.infos['unet'].path} was trained on latents normalised per channel "
                          "(latent_normalisation=per_channel), which diffusers' StableDiffusionPipeline does not undo "
                          "(it divides by one scaling_factor); export a UNet trained with "
                          "--unet.latent_normalisation=global")
    if vae_config.downsample_padding != "bottom_right":
        notes.append("VAE encoder: diffusers' AutoencoderKL pads its stride-2 convs one row and column after the "
                     f"image, this VAE's padding is {vae_config.downsample_padding!r}: decode (text-to-image) is "
                     "exact, encode (image-to-image) is not; train the VAE with "
                     "--model.downsample_padding=bottom_right for an exact encoder")
    if unet_config.augment_dim:
        notes.append(f"UNet: the {unet_config.augment_dim}-wide augmentation label is folded in at zero (the "
                     "sampling setting)")
    latent_size = stack.image_size // stack.vae.downsample_factor
    _write_component(out / "vae", "AutoencoderKL", diffusers_vae_config(vae_config, stack.image_size),
                     vae_to_diffusers(stack.vae.state_dict(), vae_config))
    _write_component(out / "unet", "UNet2DConditionModel", diffusers_unet_config(unet_config, latent_size),
                     fold_zero_augment(unet_to_diffusers(stack.unet.state_dict())))
    _write_component(out / "scheduler", "DDIMScheduler",
                     diffusers_scheduler_config(stack.schedule.config, stack.prediction_type),
                     config_file="scheduler_config.json")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
             **pipeline_index()}
    write_json(out / "model_index.json", index)
    clip_dir = out / SCRATCH_CLIP_DIR
    clip_dir.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE, TOKENIZER_FILE):
        if (stack.infos["clip"].path / name).is_file():
            shutil.copy2(stack.infos["clip"].path / name, clip_dir / name)
    write_json(out / EXPORT_RECORD, {
        "stages": {name: str(info.path) for name, info in stack.infos.items()},
        "fingerprints": {name: info.fingerprint for name, info in stack.infos.items()},
        "schedule": asdict(stack.schedule.config), "prediction_type": stack.prediction_type,
        "image_size": stack.image_size, "notes": notes})
    return notes


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m pipelines.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_debug_flag(parser)
    add_stage_arguments(parser)
    parser.add_argument("--format", choices=["diffusers"], default="diffusers")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write, e.g. exported/NAME")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    args = parser.parse_args(argv)
    notes = export_diffusers(args.run, args.out, vae=args.vae, clip=args.clip, unet=args.unet,
                             overwrite=args.overwrite)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {args.out}: load it with StableDiffusionPipeline.from_pretrained('{args.out}', text_encoder=None, "
          "tokenizer=None) and condition it on pipelines.prompt_embeds")
    return args.out


if __name__ == "__main__":
    run_cli(main)
