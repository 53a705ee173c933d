"""Evaluate a run: VAE reconstruction, CLIP retrieval, and generation quality against real images.

``python -m pipelines.evaluate --run runs/NAME --data DIR [--judge runs/REF/clip] [--vae/--clip/--unet DIR]``
writes ``evaluation.json`` and ``evaluation.md`` into the run (or ``--out``).

Generation is judged on the validation captions (English and Chinese, one fixed seed per row) by a
fixed judge: the image/text towers of one CLIP stage (``--judge``; default: the run's own). Give every
run of a swap study the same judge, so swapping the CLIP stage does not change the ruler.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from clip.metrics import retrieval_metrics
from clip.model import CLIPModel
from data import CaptionSet, load_captions
from data.augment import to_float
from engine.errors import UserError, run_cli
from engine.images import save_grid
from engine.stage import file_fingerprint, write_json
from vae.metrics import evaluate_reconstruction

from .metrics import frechet_distance, kernel_distance, memorisation, seed_diversity
from .stages import StageStack, load_stack, stage_paths
from .text_to_image import GenerationSettings, generate


@torch.no_grad()
def judge_features(judge: CLIPModel, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Normalised judge image embeddings of [-1, 1] images."""
    device = next(judge.parameters()).device
    feats = [judge.encode_image(chunk.to(device).float()).float() for chunk in images.split(batch_size)]
    return F.normalize(torch.cat(feats), dim=-1).cpu()


@torch.no_grad()
def clip_score(judge: CLIPModel, features: torch.Tensor, prompts: Sequence[str]) -> float:
    """100 x mean cosine between each image's judge embedding and its prompt's judge text embedding."""
    device = next(judge.parameters()).device
    _, text = judge.encode_text(judge.tokenizer.encode(list(prompts)).to(device))
    text = F.normalize(text.float(), dim=-1).cpu()
    return float(100 * (features * text).sum(-1).mean())


def generation_metrics(stack: StageStack, judge: CLIPModel, train: CaptionSet, val: CaptionSet,
                       settings: GenerationSettings, diversity_prompts: int = 8, diversity_seeds: int = 4,
                       grid_path: Path | None = None) -> dict[str, float]:
    """FD / KID / CLIP score per language, memorisation and seed diversity (see pipelines/metrics.py)."""
    size = settings.size
    real = to_float(val.images)
    if real.shape[-1] != size:
        real = F.interpolate(real, size=(size, size), mode="area")
    real_feats = judge_features(judge, real)
    seeds = [int(r) for r in val.rows]  # one fixed seed per validation row
    out: dict[str, float] = {}
    samples_en = None
    for language, prompts in (("en", val.en), ("zh", val.zh)):
        samples = generate(stack, prompts, seeds, settings).cpu()
        feats = judge_features(judge, samples)
        out[f"fd_{language}"] = frechet_distance(real_feats, feats)
        out[f"kid_{language}"] = kernel_distance(real_feats, feats)
        out[f"clip_score_{language}"] = clip_score(judge, feats, prompts)
        if language == "en":
            samples_en = samples
    out["clip_score_real_en"] = clip_score(judge, real_feats, val.en)  # the ceiling for this judge
    out.update(memorisation(samples_en, to_float(train.images), real))

    count = min(diversity_prompts, len(val))
    prompts = [p for p in val.en[:count] for _ in range(diversity_seeds)]
    div_seeds = [1000 + i for i in range(len(prompts))]
    div_samples = generate(stack, prompts, div_seeds, settings).cpu()
    out.update(seed_diversity(div_samples, judge_features(judge, div_samples), count, diversity_seeds))
    if grid_path is not None:
        shown = min(8, len(val))
        save_grid(torch.cat([real[:shown], samples_en[:shown]]), grid_path, nrow=shown, max_side=128)
    return out


def evaluate_run(stack: StageStack, data: CaptionSet, judge: CLIPModel, settings: GenerationSettings | None = None,
                 out_dir: Path | None = None, judge_name: str = "") -> dict[str, Any]:
    """All metrics of one stack on the validation split of ``data`` (at the stack's image size)."""
    settings = settings or GenerationSettings()
    started = time.perf_counter()
    train, val = data.subset("train"), data.subset("val")
    device = stack.device
    results: dict[str, Any] = {"settings": vars(settings), "judge": judge_name,
                               "stages": {k: str(v.path) for k, v in stack.infos.items()}}
    recon = evaluate_reconstruction(stack.vae, val.images, batch_size=8, device=device)
    results["vae"] = {"val_psnr": recon["psnr"], "val_ssim": recon["ssim"]}
    clip_size = stack.clip.config.image_size
    val_small = F.interpolate(to_float(val.images), size=(clip_size, clip_size), mode="area").to(device)
    results["clip"] = retrieval_metrics(stack.clip, val_small, {"en": val.en, "zh": val.zh})
    grid = out_dir / "eval_samples.png" if out_dir is not None else None
    results["generation"] = generation_metrics(stack, judge, train, val, settings, grid_path=grid)
    results["minutes"] = (time.perf_counter() - started) / 60
    return results


METRIC_SECTIONS = ("vae", "clip", "generation")


def metrics_table(columns: dict[str, dict[str, Any]]) -> str:
    """Markdown table of evaluations: one column per named ``evaluation.json`` dict, one row per metric found
    in any of them ("—" where a column lacks it)."""
    keys: list[tuple[str, str]] = []
    for results in columns.values():
        keys += [(section, k) for section in METRIC_SECTIONS for k in results.get(section, {})
                 if (section, k) not in keys]
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for section, key in keys:
        cells = []
        for results in columns.values():
            value = results.get(section, {}).get(key)
            cells.append(f"{value:.4g}" if isinstance(value, float) else ("—" if value is None else str(value)))
        lines.append(f"| {section}/{key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(results: dict[str, Any]) -> str:
    """The metrics of one evaluation as a two-column markdown table."""
    return metrics_table({"value": results})


def evaluate_to_folder(stack: StageStack, data_source: str, out_dir: Path, judge_dir: Path | None = None,
                       settings: GenerationSettings | None = None) -> dict[str, Any]:
    """Evaluate ``stack`` on ``data_source`` and write ``evaluation.json`` and ``evaluation.md`` into ``out_dir``.

    The judge is the CLIP stage at ``judge_dir`` (default: the stack's own).
    """
    settings = settings or GenerationSettings(size=stack.image_size)
    judge_dir = Path(judge_dir or stack.infos["clip"].path)
    judge = CLIPModel.load(judge_dir, device=stack.device).eval()
    data = load_captions(data_source, resolution=settings.size)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = evaluate_run(stack, data, judge, settings, out_dir=out_dir,
                           judge_name=f"{judge_dir} ({file_fingerprint(judge_dir / 'model.safetensors')})")
    write_json(out_dir / "evaluation.json", results)
    (out_dir / "evaluation.md").write_text(markdown_table(results), encoding="utf-8")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run folder with vae/, clip/, unet/")
    parser.add_argument("--data", required=True, help="captions source (folder, hub id or 'shapes')")
    parser.add_argument("--vae", type=Path)
    parser.add_argument("--clip", type=Path)
    parser.add_argument("--unet", type=Path)
    parser.add_argument("--judge", type=Path, help="CLIP stage folder used as the fixed judge (default: the run's)")
    parser.add_argument("--out", type=Path, help="where evaluation.json/.md go (default: the run folder)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the evaluation already in the run folder (default: refuse; or pass --out)")
    parser.add_argument("--size", type=int, help="image size (default: the VAE's training resolution)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--device")
    args = parser.parse_args(argv)
    default_out = args.run or stage_paths(args.run, args.vae, args.clip, args.unet)["unet"]
    if args.out is None and (default_out / "evaluation.json").is_file() and not args.overwrite:
        raise UserError(f"{default_out / 'evaluation.json'} exists (the run's own evaluation); write this one "
                        "elsewhere with --out DIR, or pass --overwrite to replace it")
    stack = load_stack(args.run, vae=args.vae, clip=args.clip, unet=args.unet, device=args.device)
    settings = GenerationSettings(guidance_scale=args.guidance, steps=args.steps, sampler=args.sampler,
                                  size=args.size or stack.image_size)
    results = evaluate_to_folder(stack, args.data, args.out or default_out, args.judge, settings)
    print(json.dumps({k: results[k] for k in ("vae", "clip", "generation")}, indent=2))
    return results


if __name__ == "__main__":
    run_cli(main)
