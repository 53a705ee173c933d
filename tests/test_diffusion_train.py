"""The UNet stage: latent and text-state caches, caption dropout, and a tiny end-to-end training run."""

import json
import shutil

import pytest
import torch

from clip import CLIPConfig, CLIPModel, train_tokenizer
from data import load_captions
from data.augment import AUGMENT_DIM, to_float
from data.captions import clause_prefixes, clause_variants, split_clauses, texts_fingerprint
from diffusion.colour_sentences import (body_colours, colour_sentence, derived_inputs, ends_with_colour_sentence,
                                       training_captions, with_body_colour, with_colour_sentences)
from diffusion.config import PRESETS, UNetTrainConfig
from diffusion.latents import LatentNormalisation, TextStateCache, build_latent_cache
from diffusion.recolour import recoloured_images
from diffusion.losses import DiffusionLossConfig, DiffusionTrainingModule
from diffusion.schedule import NoiseSchedule, ScheduleConfig
from diffusion.train import (TRAIN_IMAGES_KEY, LatentBatchMaker, ValidationLoss, fit_probe_rows, main,
                             stage_checkpoints, train)
from diffusion.twins import silhouette_twins, twins_record
from engine import ConfigError, StageError, Trainer, build_config, is_complete, read_stage
from engine.stage import CONFIG_FILE, WEIGHTS_FILE
from pipelines.metrics import COLOUR_FAMILIES, FAMILY_NAMES, twin_weights
from pipelines.stages import LineageWarning
from unet import UNet, UNetConfig
from vae import AutoencoderKL, VAEConfig

DATA = "shapes:40"


def tiny_vae(scaling_factor: float | None = 0.7, **moments: tuple[float, ...]) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(VAEConfig(base_channels=8, channel_mult=(1, 2, 2), norm_groups=4,
                                   scaling_factor=scaling_factor, **moments)).eval()


def tiny_clip(width: int = 32) -> CLIPModel:
    data = load_captions(DATA, resolution=16)
    tokenizer = train_tokenizer(data.en + data.zh, vocab_size=300)
    config = CLIPConfig(vocab_size=tokenizer.vocab_size, text_width=width, text_layers=1, text_heads=2,
                        image_size=16, image_channels=(8, 16), embed_dim=16)
    torch.manual_seed(0)
    return CLIPModel(config, tokenizer).eval()


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    tiny_vae().save(root / "vae", trained_on={"data": "shapes"})
    tiny_clip().save(root / "clip", trained_on={"data": "shapes"})
    return root


def test_latent_cache_round_trip_and_mirrors(tmp_path):
    vae = tiny_vae()
    images = load_captions(DATA, resolution=32).images[:5]
    path = tmp_path / "latents.safetensors"
    normalisation = LatentNormalisation.of_vae(vae.config)
    cache = build_latent_cache(vae, images, path, batch_size=2, device=torch.device("cpu"),
                               normalisation=normalisation)
    assert len(cache) == 10 and cache.num_images == 5
    assert cache.mean.shape == (10, 4, 8, 8)
    with torch.no_grad():
        posterior = vae.encode(images[3:4].float() / 127.5 - 1)
        mirrored = vae.encode(images[3:4].flip(-1).float() / 127.5 - 1)
    assert torch.allclose(cache.mean[3], posterior.mean[0], atol=1e-5)
    assert torch.allclose(cache.logvar[8], mirrored.logvar[0], atol=1e-5)
    assert cache.image_ids(torch.tensor([3, 8])).tolist() == [3, 3]

    loaded = build_latent_cache(None, images, path, 2, torch.device("cpu"), normalisation)  # no VAE needed
    assert torch.equal(loaded.mean, cache.mean) and torch.equal(loaded.logvar, cache.logvar)
    # the global normalisation is the LDM recipe's factor times the raw latents, to the bit
    assert torch.equal(loaded.normalised_mean(), 0.7 * cache.mean)

    # Samples are normalised draws, here scaling_factor * (mean + std * noise): check mean and spread over many.
    rows = torch.full((4000,), 2)
    z = loaded.sample(rows, torch.Generator().manual_seed(0))
    assert torch.allclose(z.mean(0), 0.7 * cache.mean[2], atol=0.1)
    assert torch.allclose(z.std(0), 0.7 * torch.exp(0.5 * cache.logvar[2]), rtol=0.1)


def test_latent_normalisation_needs_the_measured_moments():
    with pytest.raises(ValueError, match="the VAE stage has no scaling_factor"):
        LatentNormalisation.of_vae(tiny_vae(scaling_factor=None).config)
    with pytest.raises(ValueError, match="the VAE at X has no per-channel latent moments"):  # from before them
        LatentNormalisation.of_vae(tiny_vae().config, "per_channel", where="the VAE at X")
    with pytest.raises(ValueError, match="a latent channel without spread"):
        LatentNormalisation.of_vae(tiny_vae(latents_mean=(0.0,) * 4, latents_std=(1.0, 0.0, 1.0, 1.0)).config,
                                   "per_channel")
    with pytest.raises(ValueError, match="unknown latent normalisation 'channel'"):
        LatentNormalisation.of_vae(tiny_vae().config, "channel")
    with pytest.raises(ConfigError, match="latent_normalisation 'channel' is unknown"):
        build_config(UNetTrainConfig, PRESETS, "tiny", {"latent_normalisation": "channel"})


def test_per_channel_normalisation_centres_and_scales_each_channel_and_round_trips():
    generator = torch.Generator().manual_seed(0)
    offsets, spreads = torch.tensor([3.0, -1.0, 0.5, 0.0]), torch.tensor([0.5, 4.0, 1.0, 2.0])
    raw = torch.randn(64, 4, 8, 8, generator=generator) * spreads[:, None, None] + offsets[:, None, None]
    per_channel = raw.transpose(0, 1).flatten(1)
    vae = tiny_vae(latents_mean=tuple(per_channel.mean(1).tolist()),
                   latents_std=tuple(per_channel.std(1, correction=0).tolist()))
    normalisation = LatentNormalisation.of_vae(vae.config, "per_channel")
    z = normalisation.normalise(raw).transpose(0, 1).flatten(1)
    torch.testing.assert_close(z.mean(1), torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(z.std(1, correction=0), torch.ones(4), rtol=1e-5, atol=0)
    torch.testing.assert_close(normalisation.denormalise(normalisation.normalise(raw)), raw, rtol=1e-5, atol=1e-5)
    glob = LatentNormalisation.of_vae(vae.config)  # one factor: each channel keeps its mean and relative spread
    assert torch.equal(glob.normalise(raw), 0.7 * raw) and torch.equal(glob.denormalise(raw), raw / 0.7)
    with pytest.raises(ValueError, match="4-channel latent normalisation met 3-channel"):
        normalisation.normalise(raw[:, :3])


def test_text_states_language_variant_choice_and_caption_dropout_rate():
    # 3 images x 3 caption variants; feature 0 tells the image apart, feature 2 the variant
    en, zh, null = torch.zeros(3, 3, 2, 4), torch.ones(3, 3, 2, 4), torch.full((2, 4), -1.0)
    en[..., 0] = zh[..., 0] = torch.arange(3.0)[:, None, None]
    en[..., 2] = zh[..., 2] = 10 + torch.arange(3.0)[None, :, None]
    texts = TextStateCache(en, zh, null)
    ids = torch.arange(3).repeat(4000)
    states = texts.contexts(ids, zh_prob=0.25, drop_prob=0.1, generator=torch.Generator().manual_seed(0))
    dropped = (states == -1).all(dim=(1, 2))
    chinese = (states[:, :, 1] == 1).all(dim=1)
    assert abs(dropped.float().mean().item() - 0.1) < 0.015
    assert abs(chinese.float().mean().item() - 0.25 * 0.9) < 0.02
    kept = ~dropped
    assert torch.equal(states[kept][:, 0, 0], ids[kept].float())  # every kept caption belongs to its image
    variant_share = torch.bincount(states[kept][:, 0, 2].long() - 10, minlength=3).float() / kept.sum()
    assert torch.allclose(variant_share, torch.full((3,), 1 / 3), atol=0.02)  # variants drawn uniformly

    none_dropped = texts.contexts(ids, zh_prob=0.0, drop_prob=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(none_dropped[:, 0, 0], en[ids, 0, 0, 0])


def test_null_state_is_the_empty_prompt_through_the_real_encoder():
    clip = tiny_clip()
    texts = TextStateCache.build(clip, ["a red circle"], ["一个红色的圆形"])
    assert torch.equal(texts.null, clip.text_states([""])[0])
    assert texts.en.shape == (1, 1, 77, 32)


def test_caption_variants_drop_clauses_and_keep_the_full_caption_first():
    caption = "a red bird, with blue wings, and a long tail. it flies"
    g = torch.Generator().manual_seed(0)
    variants = clause_variants(caption, 50, 0.5, g)
    clauses = split_clauses(caption)
    assert clauses == ["a red bird", "with blue wings", "and a long tail", "it flies"]
    for v in variants:  # every variant is a non-empty, in-order subset of the clauses
        kept = v.split(", ")
        assert kept and all(c in clauses for c in kept) and kept == sorted(kept, key=clauses.index)
    assert len(set(variants)) > 5
    assert split_clauses("一只红色的鸟，蓝色的翅膀。") == ["一只红色的鸟", "蓝色的翅膀"]
    assert clause_variants("一只红色的鸟，蓝色的翅膀", 3, 1.0, g) == ["一只红色的鸟，蓝色的翅膀"] * 3
    assert clause_prefixes(caption) == ["a red bird, with blue wings, and a long tail.", "a red bird, with blue wings.",
                                        "a red bird."]
    assert clause_prefixes("一只红色的鸟，蓝色的翅膀。") == ["一只红色的鸟。"] and clause_prefixes("a bird") == []

    clip = tiny_clip()
    texts = TextStateCache.build(clip, [caption], ["一只红色的鸟，蓝色的翅膀"], variants=3)
    assert texts.en.shape == (1, 4, 77, 32)
    assert torch.equal(texts.en[0, 0], clip.text_states([caption])[0])  # variant 0 is the full caption


def tiny_config(**overrides) -> UNetTrainConfig:
    overrides = {"resolution": 32, "model.base_channels": 16, "batch_size": 8, "val_batch_size": 16,
                 "sample_steps": 3, **overrides}
    return build_config(UNetTrainConfig, PRESETS, "tiny", overrides)


def test_tiny_end_to_end_run(stages, tmp_path):
    out = tmp_path / "unet"
    # augmentation is off by default; on here, so that its label's path through training is exercised
    result = train(tiny_config(**{"augment.copies": 2, "schedule.snr_shift": 4.0}), DATA, stages / "vae",
                   stages / "clip", out, device="cpu")
    assert result == out
    info = read_stage(out, "unet")
    # the preset trains progressively: a low-resolution phase (a stage folder of its own) that the stage starts from
    lowres = read_stage(out / "lowres", "unet")
    assert lowres.training["resolution"] == 16 and lowres.training["train"]["batch_size"] == 16
    assert lowres.trained_on["data"] == load_captions(DATA, resolution=16).fingerprint
    assert (out / "lowres" / "samples" / "epoch_0001.png").is_file()
    assert info.trained_on.pop("trained_captions")  # its value: test_the_training_captions_are_recorded_...
    assert info.trained_on == {"data": load_captions(DATA, resolution=32).fingerprint,
                               "captions": load_captions(DATA, resolution=32).captions_fingerprint,
                               "vae": read_stage(stages / "vae").fingerprint,
                               "clip": read_stage(stages / "clip").fingerprint,
                               "tokenizer": CLIPModel.load(stages / "clip").tokenizer.fingerprint,
                               "init": lowres.fingerprint,
                               # silhouette twins drawn at 1 / their group's size, by default
                               "twin_groups": twins_record(silhouette_twins(load_captions(DATA, resolution=32)))}
    assert info.training["lowres_epochs"] == 1 and info.training["init_from"] is None
    assert info.training["prediction_type"] == "v_prediction" and info.training["schedule"]["zero_terminal_snr"]
    # the shift is the full-resolution phase's; the low-resolution phase trains on the unshifted schedule
    assert (info.training["schedule"]["snr_shift"], lowres.training["schedule"]["snr_shift"]) == (4.0, 1.0)
    assert info.model["context_dim"] == 32  # taken from the CLIP stage
    assert info.model["augment_dim"] == AUGMENT_DIM  # augmentation labels condition the UNet

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_loss"] > 0 and metrics["peak_mem_gb"] is None and metrics["train_samples_per_s"] > 0
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["epoch_0001.png", "epoch_0002.png"]
    caches = sorted(p.name.split("-")[0] for p in (out / "latents").glob("*.safetensors"))
    # the training cache (with its augmented copies), the validation cache and, by default, the recoloured copies
    assert caches == ["recoloured", "train", "val"], caches
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_keys = {k for r in records if r["kind"] == "train" for k in r}
    assert {"train/loss", "train/mse", "train/diversity", "train/consistency"} <= train_keys
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert epochs and all({"val/loss", TRAIN_IMAGES_KEY} <= set(r) for r in epochs)
    assert metrics["train_images_loss"] == epochs[-1][TRAIN_IMAGES_KEY] > 0

    model = UNet.load(out)
    x, context = torch.randn(1, 4, 4, 4), torch.randn(1, 77, 32)
    assert model(x, torch.tensor([500]), context).abs().sum() > 0  # trained away from the zero init
    label = torch.tensor([[-0.5, 0.1, 0.0, 0.2, -0.02, 0.1]])
    assert not torch.allclose(model(x, torch.tensor([500]), context, label), model(x, torch.tensor([500]), context))


def test_finished_lowres_phase_is_reused_and_one_with_other_settings_is_an_error(stages, tmp_path):
    out = tmp_path / "unet"
    train(tiny_config(epochs=1), DATA, stages / "vae", stages / "clip", out, device="cpu")
    lowres_weights = (out / "lowres" / WEIGHTS_FILE).read_bytes()
    for name in (CONFIG_FILE, WEIGHTS_FILE):  # the second phase did not finish; the first did
        (out / name).unlink()
    train(tiny_config(epochs=1), DATA, stages / "vae", stages / "clip", out, device="cpu")
    assert is_complete(out) and (out / "lowres" / WEIGHTS_FILE).read_bytes() == lowres_weights
    assert read_stage(out).trained_on["init"] == read_stage(out / "lowres").fingerprint

    (out / CONFIG_FILE).unlink()
    other_clip = tiny_clip()
    with torch.no_grad():
        next(other_clip.parameters()).mul_(2.0)  # same shapes, other weights: another CLIP stage
    other_clip.save(tmp_path / "other_clip", trained_on={"data": "shapes"})
    with pytest.raises(StageError, match="lowres holds a finished low-resolution phase .*another CLIP stage"):
        train(tiny_config(epochs=1), DATA, stages / "vae", tmp_path / "other_clip", out, device="cpu")
    with pytest.raises(StageError, match="lowres holds a finished low-resolution phase that differs from what is asked .train.batch_size was 16, now 8"):
        train(tiny_config(epochs=1, lowres_batch_size=8), DATA, stages / "vae", stages / "clip", out, device="cpu")


def test_the_snr_shift_is_the_full_resolution_phases_and_refused_before_anything_trains():
    cfg = tiny_config(**{"schedule.snr_shift": 4.0})
    assert cfg.schedule.snr_shift == 4.0 and cfg.lowres_phase().schedule.snr_shift == 1.0
    assert cfg.lowres_phase().schedule.zero_terminal_snr == cfg.schedule.zero_terminal_snr
    with pytest.raises(ConfigError, match="schedule: snr_shift must be a positive number"):
        tiny_config(**{"schedule.snr_shift": -1.0})


def test_lowres_settings_are_checked_before_anything_trains():
    with pytest.raises(ConfigError, match="lowres_factor=3 must be >= 2 and divide resolution=32"):
        tiny_config(lowres_factor=3)
    with pytest.raises(ConfigError, match="lowres_epochs must be >= 0"):
        tiny_config(lowres_epochs=-1)
    assert tiny_config(lowres_epochs=0, lowres_factor=3).lowres_epochs == 0  # one phase: the factor is unused


def test_a_cuda_graph_asked_off_cuda_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="this run is on cpu; set cuda_graph=false"):  # not "no such stage"
        train(tiny_config(cuda_graph=True), DATA, tmp_path / "no_vae", tmp_path / "no_clip", tmp_path / "g",
              device="cpu")
    assert not (tmp_path / "g").exists()


def test_init_from_starts_from_that_unets_weights_and_records_it(stages, tmp_path):
    first = train(tiny_config(), DATA, stages / "vae", stages / "clip", tmp_path / "first", device="cpu")
    # lr 0: the second run's weights (and their EMA) stay where they started, so they must equal the first's
    second = train(tiny_config(init_from=str(first), lr=0.0, epochs=1), DATA, stages / "vae", stages / "clip",
                   tmp_path / "second", device="cpu")
    before, after = UNet.load(first).state_dict(), UNet.load(second).state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert read_stage(second).trained_on["init"] == read_stage(first).fingerprint
    assert read_stage(second).training["init_from"] == str(first)

    other_clip = tiny_clip()
    with torch.no_grad():
        next(other_clip.parameters()).mul_(2.0)  # same shapes, other weights: another CLIP stage
    other_clip.save(tmp_path / "other_clip", trained_on={"data": "shapes"})
    with pytest.warns(LineageWarning, match="trained on another CLIP stage"):
        train(tiny_config(init_from=str(first), epochs=1), DATA, stages / "vae", tmp_path / "other_clip",
              tmp_path / "third", device="cpu")


def test_init_from_another_architecture_or_stage_kind_is_an_error_before_training(stages, tmp_path):
    first = train(tiny_config(), DATA, stages / "vae", stages / "clip", tmp_path / "first", device="cpu")
    with pytest.raises(ConfigError, match=r"another architecture.*model.base_channels was 16, now 32"):
        train(tiny_config(init_from=str(first), **{"model.base_channels": 32}), DATA, stages / "vae",
              stages / "clip", tmp_path / "wide", device="cpu")
    assert not (tmp_path / "wide").exists()  # nothing was cached or trained
    with pytest.raises(StageError, match="holds a 'vae' stage, but a 'unet' stage was expected"):
        train(tiny_config(init_from=str(stages / "vae")), DATA, stages / "vae", stages / "clip", tmp_path / "v",
              device="cpu")
    # dropout changes how the weights train, not what they compute: a fine-tune may change it
    train(tiny_config(init_from=str(first), epochs=1, **{"model.dropout": 0.3}), DATA, stages / "vae",
          stages / "clip", tmp_path / "dropout", device="cpu")
    # a stage recorded before the architecture options existed was built without them
    old = tmp_path / "old"
    shutil.copytree(first, old)
    config = json.loads((old / "config.json").read_text())
    del config["model"]["qk_norm"], config["model"]["pooled_context"]
    (old / "config.json").write_text(json.dumps(config))
    train(tiny_config(init_from=str(old), epochs=1), DATA, stages / "vae", stages / "clip", tmp_path / "from_old",
          device="cpu")
    with pytest.raises(ConfigError, match="model.pooled_context was False, now True"):
        train(tiny_config(init_from=str(old), **{"model.pooled_context": True}), DATA, stages / "vae",
              stages / "clip", tmp_path / "pooled", device="cpu")


def test_command_line_and_context_mismatch(stages, tmp_path, capsys):
    args = ["--data", DATA, "--vae", str(stages / "vae"), "--clip", str(stages / "clip"), "--out", str(tmp_path / "u"),
            "--preset", "tiny", "--resolution=32", "--base_channels=16", "--batch_size=8", "--device=cpu"]
    with pytest.raises(StageError, match=r"gives 32-wide text states but the UNet being trained cross-attends to 48"):
        main(args + ["--context_dim=48"])
    with pytest.raises(ConfigError, match="unknown config key 'div_wieght'.*Did you mean"):
        main(args + ["--div_wieght=0.1"])


def test_override_that_breaks_the_architecture_fails_at_validation():
    with pytest.raises(ConfigError, match="not divisible by head_dim=12"):
        build_config(UNetTrainConfig, PRESETS, "tiny", {"model.head_dim": "12"})
    with pytest.raises(ConfigError, match="schedule: num_steps"):
        build_config(UNetTrainConfig, PRESETS, "tiny", {"schedule.num_steps": "1"})


def test_schedule_and_prediction_overrides_reach_the_config():
    cfg = build_config(UNetTrainConfig, PRESETS, "tiny", {"kind": "cosine", "zero_terminal_snr": "true",
                                                          "prediction_type": "v_prediction", "div_weight": "0"})
    assert cfg.schedule.kind == "cosine" and cfg.schedule.zero_terminal_snr
    assert cfg.prediction_type == "v_prediction" and cfg.loss.div_weight == 0.0
    with pytest.raises(ConfigError, match="prediction_type"):
        build_config(UNetTrainConfig, PRESETS, "tiny", {"prediction_type": "x0"}).validate()


def test_colour_sentences_name_the_body_colour_measured_from_the_pixels():
    images = torch.full((3, 3, 64, 64), 255, dtype=torch.uint8)  # white pages
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 < 20 ** 2
    for image, rgb in ((images[0], (230, 20, 20)), (images[1], (20, 60, 230))):  # red, blue; the third stays blank
        for channel, value in enumerate(rgb):
            image[channel][disc] = value
    assert body_colours(images) == [FAMILY_NAMES.index("red"), FAMILY_NAMES.index("blue"), None]
    en, zh = with_colour_sentences(images, ["A cat.", "A bird. ", "A page."], ["一只猫。", "一只鸟。", "一页。"])
    assert en == ["A cat. Its body is mostly red.", "A bird. Its body is mostly blue.", "A page."]
    assert zh == ["一只猫。它的身体主要是红色。", "一只鸟。它的身体主要是蓝色。", "一页。"]
    # a caption too long for the text encoder with its sentence loses its last clauses, never the sentence
    en, zh = with_colour_sentences(images[:1], ["A cat, with red ears, and a long tail"], ["一只猫，红耳朵，长尾巴"],
                                   fits=lambda text: len(text) <= 48)
    assert en == ["A cat, with red ears. Its body is mostly red."] and zh == ["一只猫，红耳朵，长尾巴它的身体主要是红色。"]
    en, _ = with_colour_sentences(images[:1], ["A cat with red ears"], ["一只猫"], fits=lambda text: len(text) <= 30)
    assert en == ["A cat with red ears Its body is mostly red."]  # no clause to drop: cut by the encoder instead


def test_a_body_colour_ends_a_prompt_as_the_colour_sentence_ends_a_training_caption():
    assert with_body_colour("a pokemon with wings", "red") == "a pokemon with wings. Its body is mostly red."
    assert with_body_colour("A Pokémon with wings. ", "blue") == "A Pokémon with wings. Its body is mostly blue."
    assert with_body_colour("一只有翅膀的宝可梦", "green") == "一只有翅膀的宝可梦。它的身体主要是绿色。"
    assert with_body_colour("", "pink") == "Its body is mostly pink."
    assert ends_with_colour_sentence(with_body_colour("一只鸟！", "purple"))
    # the same text as a training caption of a red body gets
    images = torch.full((1, 3, 64, 64), 255, dtype=torch.uint8)
    images[:, 0, 16:48, 16:48], images[:, 1:, 16:48, 16:48] = 230, 20
    en, zh = with_colour_sentences(images, ["A cat."], ["一只猫。"])
    assert (en[0], zh[0]) == (with_body_colour("A cat", "red"), with_body_colour("一只猫", "red"))
    # a prompt too long for the text encoder with the sentence loses its last clauses, as a training caption does
    long, fits = "A cat, with red ears, and a long tail", lambda text: len(text) <= 48
    trained = with_colour_sentences(images, [long + "."], ["一只猫。"], fits=fits)[0][0]
    assert with_body_colour(long, "red", fits=fits) == trained == "A cat, with red ears. Its body is mostly red."
    with pytest.raises(ValueError, match="unknown body colour 'teal': use one of red, orange, yellow"):
        with_body_colour("a cat", "teal")


def spy_text_states(monkeypatch) -> list[tuple[list[str], list[str]]]:
    """The (English, Chinese) captions each text-state cache of the UNet stage is built from, in order."""
    seen, build = [], TextStateCache.build

    def spy(clip, en, zh, *args, **kwargs):
        seen.append((list(en), list(zh)))
        return build(clip, en, zh, *args, **kwargs)

    monkeypatch.setattr("diffusion.train.TextStateCache.build", spy)
    return seen


def test_colour_sentences_reach_the_text_states_only_when_asked(stages, tmp_path, monkeypatch):
    seen = spy_text_states(monkeypatch)
    for flag in (False, True):
        # recolouring needs colour sentences, and its copies' captions would reach the spy too
        train(tiny_config(epochs=1, lowres_epochs=0, colour_sentences=flag, **{"recolour.copies": 0}), DATA,
              stages / "vae", stages / "clip", tmp_path / f"unet_{flag}", device="cpu")
    plain, coloured = (en for en, _ in seen)
    assert not any("Its body is mostly" in caption for caption in plain)
    assert sum("Its body is mostly" in caption for caption in coloured) > len(coloured) // 2


def test_both_phases_train_on_colour_sentences_measured_once_at_the_stages_resolution(stages, tmp_path, monkeypatch):
    seen, measured_sizes, measure = spy_text_states(monkeypatch), [], with_colour_sentences

    def spy_measure(images, en, zh, **kwargs):
        measured_sizes.append(images.shape[-1])
        assert kwargs["fits"]("a red circle") and not kwargs["fits"]("circle " * 100)  # the CLIP's context
        return measure(images, en, zh, **kwargs)

    monkeypatch.setattr("diffusion.colour_sentences.with_colour_sentences", spy_measure)
    cfg = tiny_config(epochs=1, lowres_epochs=1, colour_sentences=True)
    train(cfg, DATA, stages / "vae", stages / "clip", tmp_path / "unet", device="cpu")
    assert measured_sizes == [cfg.resolution]  # not once per phase, at each phase's resolution
    lowres_phase, full_phase = seen
    assert lowres_phase == full_phase and any("Its body is mostly" in caption for caption in full_phase[0])


def test_the_training_captions_are_recorded_and_a_change_to_them_is_refused(stages, tmp_path, monkeypatch,
                                                                           request):
    seen = spy_text_states(monkeypatch)
    progressive, one_phase = tmp_path / "progressive", tmp_path / "one_phase"
    configs = {progressive: tiny_config(epochs=1, lowres_epochs=1, colour_sentences=True),
               one_phase: tiny_config(epochs=1, lowres_epochs=0, colour_sentences=True)}
    for out, cfg in configs.items():
        train(cfg, DATA, stages / "vae", stages / "clip", out, device="cpu")
    coloured = texts_fingerprint(*seen[-1])
    assert read_stage(progressive).trained_on["trained_captions"] == read_stage(progressive / "lowres").trained_on[
        "trained_captions"] == read_stage(one_phase).trained_on["trained_captions"] == coloured
    train_set = load_captions(DATA, resolution=32).subset("train")
    assert coloured != texts_fingerprint(train_set.en, train_set.zh)  # the training captions as loaded
    request.getfixturevalue("other_colour_sentences")  # from here on
    for out in configs:  # stopped after the last checkpoint (the low-resolution phase finished)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            (out / name).unlink()
    with pytest.raises(StageError, match="lowres holds a finished low-resolution phase .*other training captions"):
        train(configs[progressive], DATA, stages / "vae", stages / "clip", progressive, resume=True, device="cpu")
    with pytest.raises(ConfigError, match=r"cannot resume .*\(it was trained on other training captions"):
        train(configs[one_phase], DATA, stages / "vae", stages / "clip", one_phase, resume=True, device="cpu")


def test_recoloured_copies_train_with_renamed_captions_and_are_recorded(stages, tmp_path, monkeypatch):
    seen, makers = spy_text_states(monkeypatch), []

    class SpyBatchMaker(LatentBatchMaker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            makers.append(self)

    monkeypatch.setattr("diffusion.train.LatentBatchMaker", SpyBatchMaker)
    cfg = tiny_config(epochs=1, lowres_epochs=1, colour_sentences=True, **{"recolour.copies": 2, "recolour.prob": 0.5})
    out = tmp_path / "unet"
    train(cfg, DATA, stages / "vae", stages / "clip", out, device="cpu")
    train_set = load_captions(DATA, resolution=cfg.resolution).subset("train")
    n = len(train_set)
    assert len(seen) == 2 and seen[0] == seen[1]  # one text-state cache per phase, from the same captions
    en, zh = seen[-1]
    assert len(en) == len(zh) == 3 * n  # the images', then two copies' each
    bodies = body_colours(train_set.images)
    for k in (1, 2):
        for i in range(n):
            colour = train_set.en[i].split()[1]  # "a red circle"
            copy_colour = en[k * n + i].split()[1]
            assert copy_colour != colour and f"Its body is mostly {copy_colour}." in en[k * n + i]
            assert COLOUR_FAMILIES[bodies[i]][1] == colour
    recorded = read_stage(out).trained_on["trained_captions"]
    assert recorded == texts_fingerprint(en, zh)
    assert recorded == derived_inputs(cfg, DATA, {"vae": stages / "vae", "clip": stages / "clip"})["trained_captions"]
    # each phase draws from its own images turned by the stage's hue turns, encoded by the VAE, with their mirrors
    turns = training_captions(cfg, train_set, stages / "clip").hue_turns
    vae = tiny_vae()
    assert len(makers) == 2  # one batch maker per phase
    for maker, (folder, size) in zip(makers, ((out / "lowres", cfg.lowres_resolution), (out, cfg.resolution))):
        assert maker.recolour_prob == 0.5 and maker.recoloured is not None
        phase_images = load_captions(DATA, resolution=size).subset("train").images
        copies = recoloured_images(phase_images, turns)
        with torch.no_grad():
            expected = vae.encode(to_float(torch.cat([copies, copies.flip(-1)]))).mean
        assert torch.allclose(maker.recoloured.mean, expected, atol=1e-5)
        assert len(list((folder / "latents").glob("recoloured-*.safetensors"))) == 1


def test_balance_twins_draws_silhouette_twins_at_one_over_their_group_size_in_both_phases_and_records_them(
        stages, tmp_path, monkeypatch, capsys):
    weights = []

    class SpyTrainer(Trainer):
        def __init__(self, *args, item_weights=None, **kwargs):
            weights.append(item_weights)
            super().__init__(*args, item_weights=item_weights, **kwargs)

    monkeypatch.setattr("diffusion.train.Trainer", SpyTrainer)
    cfg = tiny_config(epochs=1, lowres_epochs=1, balance_twins=True)
    out = tmp_path / "unet"
    train(cfg, DATA, stages / "vae", stages / "clip", out, device="cpu")
    data = load_captions(DATA, resolution=cfg.resolution)  # measured once, at the stage's resolution
    twins = silhouette_twins(data)
    assert twins  # one shape at about one size and place, in another colour, has its silhouette
    recorded = {read_stage(out).trained_on["twin_groups"], read_stage(out / "lowres").trained_on["twin_groups"]}
    assert recorded == {twins_record(twins)}
    assert twins_record(twins).startswith(",".join(str(len(group)) for group in twins) + " (members ")
    assert twins_record([[0, 1], [2, 3]]) != twins_record([[0, 2], [1, 3]])  # same sizes, other members
    expected = twin_weights(twins, len(data.subset("train"))).repeat(2)  # the images' rows, then their mirrors'
    assert len(weights) == 2 and all(torch.equal(phase, expected) for phase in weights)
    assert expected.min() == 1 / max(map(len, twins)) and (expected == 1).any()
    assert f"share a silhouette in {len(twins)} groups" in capsys.readouterr().out
    for name in (CONFIG_FILE, WEIGHTS_FILE):  # stopped after the low-resolution phase
        (out / name).unlink()
    with pytest.raises(StageError, match="lowres holds a finished low-resolution phase .*balance_twins was True, now "
                                         "False"):
        train(tiny_config(epochs=1, lowres_epochs=1, balance_twins=False), DATA, stages / "vae", stages / "clip", out,
              resume=True, device="cpu")
    # the groups are an input the stage derives: train_all's and a study's checks see them, and another grouping
    # of the same data (a rule change) does not reuse the finished phase
    upstream = {"vae": stages / "vae", "clip": stages / "clip"}
    assert derived_inputs(cfg, DATA, upstream)["twin_groups"] == twins_record(twins)
    assert "twin_groups" not in derived_inputs(tiny_config(epochs=1, lowres_epochs=1, balance_twins=False), DATA,
                                               upstream)
    regrouped = [sorted(group[:-1] + [group[-1] + 1]) for group in twins]  # same sizes, other members
    monkeypatch.setattr("diffusion.train.silhouette_twins", lambda data: regrouped)
    with pytest.raises(StageError, match="lowres holds a finished low-resolution phase .*other silhouette twin groups"):
        train(cfg, DATA, stages / "vae", stages / "clip", out, resume=True, device="cpu")


def test_recolouring_and_kept_colour_sentences_need_colour_sentences():
    with pytest.raises(ConfigError, match="recolour.copies > 0 needs colour_sentences=true"):
        tiny_config(colour_sentences=False, **{"recolour.copies": 1})
    with pytest.raises(ConfigError, match="keep_colour_sentence=true .* needs colour_sentences=true"):
        tiny_config(colour_sentences=False, keep_colour_sentence=True, **{"recolour.copies": 0})


def test_a_kept_colour_sentence_is_in_every_caption_variant_and_the_other_clauses_drop_as_before():
    en = "A cat, with red ears, and a long tail. " + colour_sentence(FAMILY_NAMES.index("red"), "en")
    zh = "一只猫，红耳朵，长尾巴。" + colour_sentence(FAMILY_NAMES.index("red"), "zh")
    assert ends_with_colour_sentence(en) and ends_with_colour_sentence(zh) and not ends_with_colour_sentence("A cat.")
    plain = clause_variants(en, 40, 0.5, torch.Generator().manual_seed(0))
    kept = clause_variants(en, 40, 0.5, torch.Generator().manual_seed(0), keep_last=True)
    assert not all(v.endswith("Its body is mostly red") for v in plain)
    assert all(v.endswith("Its body is mostly red") for v in kept)
    clauses = split_clauses(en)
    for v in kept:  # in-order subsets of the clauses, the others still dropped at random
        assert v.split(", ") == sorted(v.split(", "), key=clauses.index) and set(v.split(", ")) <= set(clauses)
    assert len({v.count(", ") for v in kept}) >= 3
    assert all(v.endswith("它的身体主要是红色") for v in
               clause_variants(zh, 20, 0.5, torch.Generator().manual_seed(1), keep_last=True))

    clip = tiny_clip()
    sentence_only = clip.text_states(["Its body is mostly red"])[0]
    kept = TextStateCache.build(clip, [en], [zh], variants=3, clause_keep_prob=0.0, keep_last=ends_with_colour_sentence)
    assert all(torch.equal(kept.en[0, v], sentence_only) for v in range(1, 4))  # every other clause dropped
    plain = TextStateCache.build(clip, [en], [zh], variants=3, clause_keep_prob=0.0)  # one random clause each
    assert not all(torch.equal(plain.en[0, v], sentence_only) for v in range(1, 4))


def test_the_stage_keeps_the_colour_sentence_in_every_variant_only_when_asked(stages, tmp_path, monkeypatch):
    seen, variants = [], clause_variants

    def spy(caption, count, keep_prob, generator, keep_last=False):
        seen.append((caption, keep_last))
        return variants(caption, count, keep_prob, generator, keep_last)

    monkeypatch.setattr("diffusion.latents.clause_variants", spy)
    for flag in (False, True):
        seen.clear()
        train(tiny_config(epochs=1, lowres_epochs=0, keep_colour_sentence=flag, **{"recolour.copies": 0}), DATA,
              stages / "vae", stages / "clip", tmp_path / f"unet_{flag}", device="cpu")
        assert sum(ends_with_colour_sentence(caption) for caption, _ in seen) > len(seen) // 2
        assert all(keep == (flag and ends_with_colour_sentence(caption)) for caption, keep in seen)


def test_probe_emas_are_scored_beside_the_stages_own(stages, tmp_path):
    out = tmp_path / "unet"
    train(tiny_config(lowres_epochs=0, ema_probe_stds=(0.05, 0.25)), DATA, stages / "vae", stages / "clip", out,
          device="cpu")
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all({"val/loss_ema_std_0.05", "val/loss_ema_std_0.25"} <= set(r) for r in epochs)
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [metrics[k] for k in ("val_loss", "val_loss_ema_std_0.05", "val_loss_ema_std_0.25")]
    assert losses == [epochs[-1][k] for k in ("val/loss", "val/loss_ema_std_0.05", "val/loss_ema_std_0.25")]
    assert len(set(losses)) == 3  # three different averages of the same run's weights


def test_the_unet_command_takes_an_interrupted_low_resolution_phase_for_interrupted_training(tmp_path):
    out = tmp_path / "unet"
    stage, phase = stage_checkpoints(out)
    phase.parent.mkdir(parents=True)
    phase.write_text("the low-resolution phase's state")
    with pytest.raises(StageError, match=r"interrupted training's checkpoint \(.*lowres.*\); continue it with --resume"):
        main(["--data", "shapes", "--vae", str(tmp_path / "vae"), "--clip", str(tmp_path / "clip"), "--out", str(out),
              "--preset", "tiny", "--device", "cpu"])  # it would start the phase over and write over its state
    assert phase.read_text() == "the low-resolution phase's state" and not stage.exists()


def test_the_training_images_ruler_is_the_validation_one_and_tells_fitted_images_from_unseen_ones():
    # as many training images as validation ones, evenly spaced; all of them when there are fewer
    rows = fit_probe_rows(750, 83)
    assert len(rows) == 83 and rows.unique().numel() == 83 and rows[0] == 0 and rows[-1] == 82 * 750 // 83
    assert fit_probe_rows(5, 83).tolist() == [0, 1, 2, 3, 4]
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, head_dim=8, context_dim=12,
                            norm_groups=8))
    schedule = NoiseSchedule(ScheduleConfig())
    g = torch.Generator().manual_seed(1)
    fitted, unseen = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    context = torch.randn(4, 5, 12, generator=g)
    unseen_ruler = ValidationLoss(model, schedule, "epsilon", unseen, context, num_timesteps=4, batch_size=4)
    ruler = {"fitted": unseen_ruler.on(fitted, context), "unseen": unseen_ruler}
    assert torch.equal(ruler["fitted"].noise, ruler["unseen"].noise)  # one fixed noise: only the images differ
    assert ruler["fitted"].timesteps == unseen_ruler.timesteps and ruler["fitted"].latents is fitted
    assert unseen_ruler.on(fitted[:2], context[:2]).noise.shape[1] == 2  # fewer images: the first noise rows
    with pytest.raises(ValueError, match="fixed noise covers 4"):
        unseen_ruler.on(torch.cat([fitted, fitted]), torch.cat([context, context]))
    untrained = {name: measure() for name, measure in ruler.items()}
    module = DiffusionTrainingModule(model, schedule, "epsilon", DiffusionLossConfig(min_snr_gamma=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(150):  # the four "fitted" images, with fresh noise and timesteps each step
        loss, _ = module({"latents": fitted, "context": context, "generator": g}, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = {name: measure() for name, measure in ruler.items()}
    assert trained["fitted"] < 0.8 * untrained["fitted"]
    assert trained["fitted"] < 0.8 * trained["unseen"]  # the gap the report shows
