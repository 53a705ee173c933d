"""Screen UNet levers at equal steps: retrain only the UNet per variant on a finished run's VAE and CLIP, all
variants at once on one GPU, then judge every variant with the same judge, prompts, seeds and ruler.

    python -m benchmarks.quality_ablation --base runs/pokemon --data ../shared/pokemon --out runs/ablation \\
        --resolution 256 --epochs 4 \\
        --variant "old_default=--prediction_type=epsilon --zero_terminal_snr=false --augment.copies=0" \\
        --variant "new_default="

Each variant is ``NAME=OVERRIDES`` (``diffusion.train`` ``--key=value`` overrides on top of the full preset,
space-separated; empty for the preset as it is). Every variant gets the same resolution, epochs and seed, so
equal steps are equal minutes up to the few percent the augmentation label costs. Training runs eager (no
compile: several compiles at once would spend the budget on the CPU). Each variant samples with the guidance
scale and rescale of its own UNet config (``guidance_scale``, ``guidance_rescale``). Writes ``OUT/ablation.json``,
``OUT/ablation.md`` (one row per variant, the real images' values in the last row) and ``OUT/compare.png``
(the colour prompts, one seed, one row per variant).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from clip.model import CLIPModel
from data import load_captions
from engine.images import save_grid
from engine.stage import is_complete, write_json
from pipelines.evaluate import QUALITY_ROWS, generation_metrics
from pipelines.metrics import colour_prompts
from pipelines.stages import LineageWarning, load_stack
from pipelines.text_to_image import GenerationSettings, generate

TABLE_KEYS = ("fg_share", "border_fg", "frame_filling_share", "parts_mean", "near_copy_share_pixel",
              "near_copy_share_judge", "colour_adherence", "fd_en", "fd_zh", "clip_score_en", "diversity_feature")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name.isidentifier():
        raise SystemExit(f"--variant takes NAME=OVERRIDES with NAME a plain word, got {text!r}")
    return name, overrides.split()


def train_variants(variants: dict[str, list[str]], base: Path, data: str, out: Path, resolution: int,
                   epochs: int, preset: str) -> dict[str, float]:
    """Train every unfinished variant's UNet at once (one process each); return each variant's minutes."""
    procs, started, minutes = {}, {}, {}
    for name, overrides in variants.items():
        folder = out / name / "unet"
        if is_complete(folder):
            continue
        folder.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "diffusion.train", "--data", data, "--vae", str(base / "vae"),
                   "--clip", str(base / "clip"), "--out", str(folder), "--preset", preset, f"--resolution={resolution}",
                   f"--epochs={epochs}", f"--sample_every_epochs={epochs}", "--compile=false", *overrides]
        log = open(out / name / "train.log", "w")
        procs[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        started[name] = time.perf_counter()
        print(f"started {name}: {' '.join(overrides) or '(preset)'}", flush=True)
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"variant {name} failed: see {out / name / 'train.log'}")
        minutes[name] = (time.perf_counter() - started[name]) / 60
        print(f"{name} trained in {minutes[name]:.1f} min", flush=True)
    return minutes


def markdown(rows: dict[str, dict[str, Any]], real: dict[str, Any]) -> str:
    described = {key: text for key, text, _ in QUALITY_ROWS}
    lines = ["| variant | " + " | ".join(TABLE_KEYS) + " | val loss |", "|---|" + "---|" * (len(TABLE_KEYS) + 1)]
    for name, row in rows.items():
        cells = [f"{row['generation'].get(k, float('nan')):.3f}" for k in TABLE_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['val_loss']:.4f} |")
    cells = [f"{real[k]:.3f}" if k in real else "—" for k in TABLE_KEYS]
    lines.append("| real images | " + " | ".join(cells) + " | — |")
    lines += ["", "Columns: " + "; ".join(f"`{k}` {described[k]}" for k in TABLE_KEYS if k in described) + "."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality_ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="finished run whose vae/, clip/ and judge/ are used")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", action="append", required=True, help="NAME=OVERRIDES (repeatable)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--preset", default="full", help="the UNet preset the overrides apply to")
    args = parser.parse_args(argv)
    variants = dict(parse_variant(v) for v in args.variant)
    args.out.mkdir(parents=True, exist_ok=True)
    train_minutes = train_variants(variants, args.base, args.data, args.out, args.resolution, args.epochs,
                                   args.preset)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    judge = CLIPModel.load(args.base / "judge", device=device).eval()
    data = load_captions(args.data, resolution=args.resolution)
    rows: dict[str, dict[str, Any]] = {}
    pictures = []
    texts, seeds, _ = colour_prompts(1)
    for name, overrides in variants.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LineageWarning)
            stack = load_stack(vae=args.base / "vae", clip=args.base / "clip", unet=args.out / name / "unet",
                               device=device)
        training = stack.infos["unet"].training
        settings = GenerationSettings(size=args.resolution, guidance_scale=training["guidance_scale"],
                                      guidance_rescale=training["guidance_rescale"])
        generation = generation_metrics(stack, judge, data.subset("train"), data.subset("val"), settings)
        metrics = json.loads((args.out / name / "unet" / "metrics.json").read_text())
        rows[name] = {"overrides": overrides, "generation": generation, "val_loss": metrics["val_loss"],
                      "steps": metrics["steps"], "train_minutes": train_minutes.get(name)}
        pictures.append(generate(stack, texts, seeds, settings).cpu())
        print(f"{name}: " + ", ".join(f"{k} {generation[k]:.3f}" for k in TABLE_KEYS), flush=True)
        del stack
    real = {k[:-5]: v for k, v in next(iter(rows.values()))["generation"].items() if k.endswith("_real")}
    real["near_copy_share_pixel"] = real["near_copy_share_judge"] = 0.05  # by construction
    write_json(args.out / "ablation.json", {"resolution": args.resolution, "epochs": args.epochs,
                                            "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                            "command": "python -m benchmarks.quality_ablation " + " ".join(
                                                sys.argv[1:] if argv is None else argv),
                                            "variants": rows, "real": real})
    (args.out / "ablation.md").write_text(markdown(rows, real), encoding="utf-8")
    save_grid(torch.cat(pictures), args.out / "compare.png", nrow=len(texts), max_side=96)


if __name__ == "__main__":
    main()
