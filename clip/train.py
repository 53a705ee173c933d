"""Train the CLIP stage: ``python -m clip.train --data DIR --out runs/NAME/clip [--preset tiny|full] [--resume]``.

First the byte-level BPE tokenizer is learned from the training captions (English and Chinese together),
then the text and image encoders contrastively. Retrieval on the validation pairs is measured every epoch
and at the end; the stage folder gets the weights, tokenizer.json and metrics.json.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from clip.config import PRESETS, CLIPTrainConfig
from clip.loss import CLIPTrainingModule
from clip.metrics import retrieval_metrics
from clip.model import TOKENIZER_FILE, CLIPModel
from clip.tokenizer import BPETokenizer, train_tokenizer
from data import CaptionSet, language_mask, load_captions
from data.augment import random_flip, random_resized_crop, to_float
from engine import Trainer, distributed
from engine.cli import run_stage_cli, stage_parser
from engine.config import config_to_dict, validate_config
from engine.errors import run_cli
from engine.trainer import checkpoint_path


def prepare_tokenizer(cfg: CLIPTrainConfig, train_set: CaptionSet, out_dir: Path, resume: bool
                      ) -> tuple[BPETokenizer, bool]:
    """The tokenizer, and whether it is new: a resumed run reuses the one it started with (so it tokenizes
    exactly as the interrupted run did), a fresh one learns it from the training captions. The model's
    vocab_size becomes the tokenizer's actual size."""
    path = out_dir / TOKENIZER_FILE
    if resume and path.is_file() and checkpoint_path(out_dir).is_file():  # else a fresh run: a fresh tokenizer
        tokenizer, new = BPETokenizer.load(path, cfg.model.context_length), False
    else:
        tokenizer, new = train_tokenizer(train_set.en + train_set.zh, cfg.model.vocab_size, cfg.model.context_length,
                                         normalize=cfg.tokenizer_normalize), True
    cfg.model.vocab_size = tokenizer.vocab_size
    return tokenizer, new


class BatchMaker:
    """Training batches from tensors kept on the device.

    Each image is flipped and mildly crop-resized (never colour-jittered: captions name colours) and paired
    with its Chinese caption with probability zh_prob, else its English one. Captions are tokenized once
    up front. An epoch is several passes over the set, so one image can appear twice in a batch across a
    pass boundary; the source row goes along as `image_ids` so that such copies are not negatives.
    """

    def __init__(self, cfg: CLIPTrainConfig, images_uint8: torch.Tensor, tokens_en: torch.Tensor,
                 tokens_zh: torch.Tensor, memory_format: torch.memory_format) -> None:
        self.cfg = cfg
        self.images = images_uint8
        self.tokens_en = tokens_en
        self.tokens_zh = tokens_zh
        self.memory_format = memory_format

    def __call__(self, rows: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        images = random_flip(to_float(self.images[rows]), generator, p=cfg.flip_prob)
        if cfg.crop_min_scale < 1:
            images = random_resized_crop(images, cfg.model.image_size, (cfg.crop_min_scale, 1.0), generator)
        use_zh = language_mask(len(rows), cfg.zh_prob, generator, device=rows.device)
        tokens = torch.where(use_zh[:, None], self.tokens_zh[rows], self.tokens_en[rows])
        return {"images": images.contiguous(memory_format=self.memory_format), "tokens": tokens, "image_ids": rows}


class EpochReport:
    """Per-epoch callback: retrieval on the validation pairs (EMA weights when kept), logged and printed."""

    def __init__(self, cfg: CLIPTrainConfig, model: CLIPModel, val: CaptionSet, device: torch.device) -> None:
        self.cfg = cfg
        self.model = model
        self.images = to_float(val.images.to(device))
        self.captions = {"en": val.en, "zh": val.zh}

    def __call__(self, epoch: int, trainer: Trainer) -> dict[str, Any]:
        with trainer.ema_weights(), trainer.autocast():
            metrics = retrieval_metrics(self.model, self.images, self.captions)
        tqdm.write(f"epoch {epoch}/{self.cfg.train.epochs}: {summary(metrics)}")
        return {f"val/{k}": v for k, v in metrics.items()}


def summary(metrics: dict[str, float]) -> str:
    """One line: recall@1/5/10 in both directions and languages, and the logit scale."""
    parts = []
    for direction in ("t2i", "i2t"):
        for language in ("en", "zh"):
            recalls = "/".join(f"{metrics[f'{direction}_r{k}_{language}']:.3f}" for k in (1, 5, 10))
            parts.append(f"{direction} {language} R@1/5/10 {recalls}")
    return ", ".join(parts) + f", logit scale {metrics['logit_scale']:.1f}"


def train(cfg: CLIPTrainConfig, data_source: str, out_dir: str | Path, resume: bool = False,
          device: str | torch.device | None = None) -> Path:
    """Train (or resume) the CLIP stage into `out_dir` and return it once it holds a complete stage folder."""
    started = time.perf_counter()
    validate_config(cfg)
    out_dir = Path(out_dir)
    data = load_captions(data_source, resolution=cfg.model.image_size)
    train_set, val_set = data.subset("train"), data.subset("val")
    tokenizer, new_tokenizer = prepare_tokenizer(cfg, train_set, out_dir, resume)

    torch.manual_seed(cfg.train.seed)  # the initial weights follow the seed, not the caller's RNG state
    model = CLIPModel(cfg.model, tokenizer)
    module = CLIPTrainingModule(model)
    trainer = Trainer(module, cfg.train, out_dir, num_train_items=len(train_set),
                      ema_of=model, resume=resume, device=device, run_config=config_to_dict(cfg),
                      trained_on={"data": data.fingerprint, "captions": data.captions_fingerprint})
    if new_tokenizer and distributed.is_main():  # written once the trainer has un-finished a replaced stage
        tokenizer.save(out_dir / TOKENIZER_FILE)
    make_batch = BatchMaker(cfg, train_set.images.to(trainer.device),
                            tokenizer.encode(train_set.en).to(trainer.device),
                            tokenizer.encode(train_set.zh).to(trainer.device), trainer.memory_format)
    trainer.fit(make_batch, on_epoch_end=EpochReport(cfg, model, val_set, trainer.device))

    def final_metrics() -> dict[str, Any]:  # the last epoch's retrieval, measured on these same EMA weights
        return {k.removeprefix("val/"): v for k, v in trainer.last_epoch_metrics().items()}

    return trainer.finish_stage(model, cfg, final_metrics, summary, started)


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_parser("python -m clip.train", "Train the BPE tokenizer and the CLIP text/image encoders.", "clip")
    run_stage_cli(parser, argv, CLIPTrainConfig, PRESETS, train)


if __name__ == "__main__":
    run_cli(main)
