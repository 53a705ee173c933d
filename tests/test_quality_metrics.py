"""The picture-quality ruler on synthetic images with known answers: composition, parts, colour, near-copies."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from engine.stage import StageError
from pipelines.evaluate import (colour_zero_shot, judge_copies_by_source, mcnemar_p, over_seed_sets,
                                paired_differences, paired_table, quality_table)
from pipelines.metrics import (COLOUR_FAMILIES, colour_hits, colour_prompts, colours_named, composition, count_parts,
                               foreground_mask, frechet_distance, held_out_copies, hue_family_shares,
                               kernel_distance, near_copies, share_by_colour, sharpness, thumbnails)

SIZE = 128


def canvas(count: int = 1) -> torch.Tensor:
    return torch.ones(count, 3, SIZE, SIZE)  # white, in [-1, 1]


def paint_disc(images: torch.Tensor, cx: float, cy: float, radius: float, rgb=(-1.0, -1.0, -1.0)) -> torch.Tensor:
    """Paint a disc (centre and radius in [0, 1] image units) in ``rgb`` ([-1, 1]) into every image."""
    coords = (torch.arange(SIZE) + 0.5) / SIZE
    inside = (coords[None, :] - cx) ** 2 + (coords[:, None] - cy) ** 2 < radius ** 2
    for c, value in enumerate(rgb):
        images[:, c][:, inside] = value
    return images


def test_one_disc_on_white():
    images = paint_disc(canvas(), 0.5, 0.5, 0.3)
    result = composition(images)
    assert result["fg_share"] == pytest.approx(math.pi * 0.3 ** 2, abs=0.01)
    assert result["border_fg"] == 0 and result["frame_filling_share"] == 0 and result["parts_mean"] == 1
    assert result["chromatic_share"] == 0  # black: no hue
    red = composition(paint_disc(canvas(), 0.5, 0.5, 0.3, rgb=(0.9, -0.9, -0.9)))
    assert red["chromatic_share"] == pytest.approx(1, abs=0.02) and red["fg_share"] == result["fg_share"]
    dark_red = composition(paint_disc(canvas(), 0.5, 0.5, 0.3, rgb=(-0.55, -1.0, -1.0)))  # a hue, too dark to read
    pastel = composition(paint_disc(canvas(), 0.5, 0.5, 0.3, rgb=(1.0, 0.7, 0.7)))  # pale pink: chroma 0.15
    assert dark_red["chromatic_share"] == pastel["chromatic_share"] == 0 and pastel["fg_share"] > 0.2


def test_a_frame_filling_image_and_a_blank_page():
    full = -torch.ones(1, 3, SIZE, SIZE)
    result = composition(full)
    assert result["fg_share"] == 1 and result["border_fg"] == 1 and result["frame_filling_share"] == 1
    blank = composition(canvas())
    assert blank["fg_share"] == 0 and blank["parts_mean"] == 0 and blank["chromatic_share"] == 0


def test_parts_count_regions_and_ignore_specks():
    images = paint_disc(canvas(), 0.3, 0.3, 0.12)
    paint_disc(images, 0.72, 0.7, 0.12)
    paint_disc(images, 0.9, 0.15, 0.02)  # ~0.13 % of the image: a speck, not a part
    assert count_parts(foreground_mask(images)).tolist() == [2]
    touching = paint_disc(canvas(), 0.4, 0.5, 0.15)
    paint_disc(touching, 0.6, 0.5, 0.15)  # overlapping discs are one region
    diagonal = canvas()  # two squares meeting at a corner are 8-connected: one region
    diagonal[:, :, 20:40, 20:40] = -1
    diagonal[:, :, 40:60, 40:60] = -1
    assert count_parts(foreground_mask(torch.cat([touching, diagonal]))).tolist() == [1, 1]


def test_near_white_jpeg_noise_is_background():
    noisy = canvas() - 0.1 * torch.rand(1, 3, SIZE, SIZE)  # >= 0.95 in [0, 1] units
    assert composition(noisy)["fg_share"] == 0


def test_colour_families_and_adherence():
    red = paint_disc(canvas(), 0.5, 0.5, 0.3, rgb=(0.9, -0.9, -0.9))
    blue = paint_disc(canvas(), 0.5, 0.5, 0.3, rgb=(-0.9, -0.6, 0.9))
    outlined = paint_disc(canvas(), 0.5, 0.5, 0.35)  # a black outline ...
    paint_disc(outlined, 0.5, 0.5, 0.3, rgb=(-0.9, 0.8, -0.9))  # ... around a green body: black has no hue
    images = torch.cat([red, blue, outlined])
    shares = hue_family_shares(images)
    assert shares.sum(1).tolist() == pytest.approx([1, 1, 1])
    assert colour_hits(images, ["red", "blue", "green"]).tolist() == [True, True, True]
    assert colour_hits(images, ["blue", "red", "red"]).tolist() == [False, False, False]
    two = paint_disc(canvas(), 0.3, 0.5, 0.2, rgb=(0.9, -0.9, -0.9))
    paint_disc(two, 0.7, 0.5, 0.15, rgb=(0.9, 0.8, -0.9))  # red and yellow: both among the top two
    assert colour_hits(two.repeat(2, 1, 1, 1), ["red", "yellow"]).tolist() == [True, True]
    assert not colour_hits(canvas(), ["red"]).item()  # a blank page names no colour
    # a grey body with a red eye: red is its only hue, but a trace of the foreground, not a dominant hue
    eyed = paint_disc(canvas(), 0.5, 0.5, 0.3, rgb=(0.0, 0.0, 0.0))
    paint_disc(eyed, 0.5, 0.4, 0.05, rgb=(0.9, -0.9, -0.9))
    patched = paint_disc(canvas(), 0.5, 0.5, 0.3, rgb=(0.0, 0.0, 0.0))  # ... and one with a red patch
    paint_disc(patched, 0.5, 0.4, 0.12, rgb=(0.9, -0.9, -0.9))
    assert colour_hits(torch.cat([eyed, patched]), ["red", "red"]).tolist() == [False, True]
    hits = colour_hits(torch.cat([red, blue, red]), ["red", "red", "blue"])
    assert share_by_colour(hits, ["red", "red", "blue"]) == {"red": 0.5, "blue": 0.0}


class HueClip(torch.nn.Module):
    """A stand-in CLIP stage: an image's embedding is its hue-family shares, a prompt's the one-hot family of the
    colour it names, moved ``en_shift`` or ``zh_shift`` families on (0: the language's colour words grounded, 1:
    every one wrong)."""

    def __init__(self, en_shift: int, zh_shift: int) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where the caller finds the device
        self.config = SimpleNamespace(image_size=SIZE)
        self.tokenizer = SimpleNamespace(encode=lambda texts: torch.tensor(  # [N, 2]: (family named, Chinese?)
            [next((i, zh in text) for i, (_, en, zh, _) in enumerate(COLOUR_FAMILIES) if en in text or zh in text)
             for text in texts]))
        self.shifts = torch.tensor([en_shift, zh_shift])

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return hue_family_shares(images)

    def encode_text(self, tokens: torch.Tensor) -> tuple[None, torch.Tensor]:
        family = (tokens[:, 0] + self.shifts[tokens[:, 1]]) % len(COLOUR_FAMILIES)
        return None, F.one_hot(family, len(COLOUR_FAMILIES)).float()


def test_colour_zero_shot_classifies_the_prompt_coloured_bodies_by_the_colour_prompts():
    bodies = {"red": (0.9, -0.9, -0.9), "blue": (-0.9, -0.6, 0.9), "green": (-0.9, 0.8, -0.9),
              "yellow": (0.9, 0.8, -0.9), "purple": (0.0, -1.0, 1.0), "pink": (1.0, -1.0, 1 / 3),
              "orange": (1.0, 0.0, -1.0), "grey": (0.0, 0.0, 0.0)}  # no orange prompt; grey has no body colour
    images = torch.cat([paint_disc(canvas(), 0.5, 0.5, 0.3, rgb=rgb) for rgb in bodies.values()])
    images = ((images + 1) * 127.5).round().to(torch.uint8)
    english_only = HueClip(en_shift=0, zh_shift=1).train()
    per_colour = {f"colour_zero_shot_{colour}": 0.5 for colour in ("red", "blue", "green", "yellow", "purple", "pink")}
    assert colour_zero_shot(english_only, images, batch_size=3) == {
        "colour_zero_shot_images": 6, "colour_zero_shot_en": 1.0, "colour_zero_shot_zh": 0.0, **per_colour}
    assert english_only.training  # its mode restored
    assert colour_zero_shot(HueClip(en_shift=1, zh_shift=0), images) == {
        "colour_zero_shot_images": 6, "colour_zero_shot_en": 0.0, "colour_zero_shot_zh": 1.0, **per_colour}
    # a body colour is scored over its own images only: two red bodies and a blue one, both languages grounded
    assert colour_zero_shot(HueClip(en_shift=0, zh_shift=0), images[[0, 0, 1]]) == {
        "colour_zero_shot_images": 3, "colour_zero_shot_en": 1.0, "colour_zero_shot_zh": 1.0,
        "colour_zero_shot_red": 1.0, "colour_zero_shot_blue": 1.0}
    assert colour_zero_shot(english_only, images[-2:]) == {"colour_zero_shot_images": 0}  # orange and grey only


def test_clip_colours_writes_each_split_s_shares_and_confusion_matrices(tmp_path):
    from benchmarks.clip_colours import main
    from clip.model import CLIPConfig, CLIPModel
    from clip.tokenizer import train_tokenizer
    from data import load_captions

    data = load_captions("shapes:40", resolution=32)
    tokenizer = train_tokenizer(data.en + data.zh, vocab_size=300)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(vocab_size=tokenizer.vocab_size, text_width=32, text_layers=1, text_heads=2, image_size=16,
                         image_channels=(8, 16), embed_dim=16), tokenizer).save(tmp_path / "clip",
                                                                                trained_on={"data": "shapes"})
    out = tmp_path / "colours.json"
    result = main(["--clip", str(tmp_path / "clip"), "--data", "shapes:40", "--size", "32", "--device", "cpu",
                   "--out", str(out)])
    assert json.loads(out.read_text()) == result and result["command"].startswith("python -m benchmarks.clip_colours")
    for split in ("train", "val"):
        shares = result[split]
        assert shares["colour_zero_shot_images"] > 0  # the shapes come in the prompt colours (and orange)
        for language in ("en", "zh"):
            counts = torch.tensor(shares["confusion"][language])
            assert counts.sum() == shares["colour_zero_shot_images"]
            assert shares[f"colour_zero_shot_{language}"] == pytest.approx((counts.trace() / counts.sum()).item())
    with pytest.raises(StageError, match="nothing does not exist; train that stage first"):  # before any image loads
        main(["--clip", str(tmp_path / "nothing"), "--data", "shapes:40"])


def test_colour_prompts_and_named_colours():
    prompts, seeds, named = colour_prompts(seeds=2)
    assert len(prompts) == len(seeds) == len(named) == 6 * 2 * 2
    assert ("a red pokemon", 1, "red") in zip(prompts, seeds, named)
    assert ("一只蓝色的宝可梦", 0, "blue") in zip(prompts, seeds, named)
    assert colours_named("A Red bird with blue wings") == ["red", "blue"]
    assert colours_named("a blue pokemon with red eyes") == ["blue", "red"]  # the order the caption names them
    assert colours_named("一只绿色的小鸟") == ["green"]
    assert colours_named("一只粉红色的宝可梦") == colours_named("一只粉色的宝可梦") == ["pink"]  # not red
    assert colours_named("红色和粉红色") == ["red", "pink"]
    assert colours_named("a reddish, bluey thing") == []


def test_judge_copies_are_counted_per_source_under_one_threshold():
    g = torch.Generator().manual_seed(5)
    bank, val = torch.randn(30, 16, generator=g), torch.randn(20, 16, generator=g)
    copies, fresh = 3 * bank[:4], torch.randn(6, 16, generator=g)  # scaled copies: cosine distance 0
    judged = near_copies(torch.cat([fresh, copies, fresh[:2]]), bank, val, cosine=True)
    shares = judge_copies_by_source(judged["copied"], {"captions_en": 6, "captions_zh": 4, "colour_prompts": 2})
    whole = judged["share"]
    assert shares["near_copy_share_judge_captions_zh"] == 1
    assert shares["near_copy_share_judge_captions_en"] == shares["near_copy_share_judge_colour_prompts"] == 0
    assert whole == 4 / 12  # the blocks' shares weigh up to the whole set's
    with pytest.raises(ValueError, match="sources cover 11 rows but there are 12 samples"):
        judge_copies_by_source(judged["copied"], {"a": 6, "b": 5})


def test_seed_sets_average_each_figure_and_add_up_the_sample_counts():
    draws = [{"near_copy_share_judge": 0.04, "parts_mean": 1.1, "samples": 262, "colour_samples": 96,
              "colour_samples_zh": 48},
             {"near_copy_share_judge": 0.08, "parts_mean": 1.2, "samples": 262, "colour_samples": 96,
              "colour_samples_zh": 48}]
    summary = over_seed_sets(draws)
    assert summary["mean"]["near_copy_share_judge"] == pytest.approx(0.06)
    assert summary["mean"]["parts_mean"] == pytest.approx(1.15)
    assert summary["mean"]["samples"] == 524 and summary["mean"]["colour_samples"] == 192  # the error bar's n
    assert summary["mean"]["colour_samples_zh"] == 96
    assert summary["sd"]["near_copy_share_judge"] == pytest.approx(0.04 / 2 ** 0.5)  # sample sd of two draws
    assert "sd" not in over_seed_sets(draws[:1]) and over_seed_sets(draws[:1])["mean"] == draws[0]


def test_copies_and_mirrored_copies_are_near_copies():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(40, 3, 64, 64, generator=g) * 2 - 1
    val = torch.rand(20, 3, 64, 64, generator=g) * 2 - 1
    bank = torch.cat([train, train.flip(-1)])
    copies = torch.cat([train[:5], train[5:10].flip(-1)])
    fresh = torch.rand(10, 3, 64, 64, generator=g) * 2 - 1
    assert near_copies(thumbnails(copies), thumbnails(bank), thumbnails(val))["share"] == 1
    # images from the validation images' distribution land below the 5 % quantile about 5 % of the time
    assert near_copies(thumbnails(fresh), thumbnails(bank), thumbnails(val))["share"] <= 0.2
    features = torch.randn(40, 16, generator=g)
    scaled_copies = 3 * features[:3]  # the cosine ignores the feature norm
    judged = near_copies(scaled_copies, features, torch.randn(20, 16, generator=g), cosine=True)
    assert judged["share"] == 1 and judged["sample_nn"] == pytest.approx(0, abs=1e-9)


def test_held_out_training_images_score_what_unseen_images_score():
    # training, validation and fresh items from one distribution: held out of the bank, a training item is unseen
    g = torch.Generator().manual_seed(0)
    train, fresh = torch.randn(1500, 4, generator=g), torch.randn(20_000, 4, generator=g)
    bank = torch.cat([train, -train])  # "mirrors": other points, which a held-out item must not see either
    measured, unseen = [], []
    for _ in range(4):  # each validation draw sets another threshold
        val = torch.randn(23, 4, generator=g)
        measured.append(held_out_copies(bank, val)["share"])
        unseen.append(near_copies(fresh, bank, val)["share"])  # the share unseen items score, closely
    assert measured == pytest.approx(unseen, abs=0.025)  # 1,500 items at ~6 %: standard error ~0.006
    assert max(unseen) - min(unseen) > 0.03  # a quantile of 23 distances: not 5 % of unseen items, nor one share
    assert near_copies(train, bank, val)["share"] == 1  # without leaving itself out, every item is its own copy
    twins = torch.cat([train[:1], train[:1499]])  # item 0 twice: held out, each still finds its twin
    assert held_out_copies(torch.cat([twins, -twins]), val)["copied"][:2].all()
    scaled = torch.cat([train, train * 3])  # mirrors at another norm: the cosine's copies unless left out
    assert held_out_copies(scaled, val, cosine=True)["share"] == pytest.approx(
        near_copies(fresh, scaled, val, cosine=True)["share"], abs=0.025)
    with pytest.raises(ValueError, match="expected the training features, then as many mirrors"):
        held_out_copies(bank[:-1], val)


def test_a_recoloured_copy_is_a_near_copy_only_without_the_hue():
    from data.augment import rotate_hue, to_float
    from pipelines.metrics import hue_blind_thumbnails

    g = torch.Generator().manual_seed(0)
    # creatures: one saturated disc each, in its own colour, place and size, on white
    def creatures(count: int) -> torch.Tensor:
        images = canvas(count)
        for i in range(count):
            centre, radius = torch.rand(2, generator=g) * 0.3 + 0.35, 0.15 + 0.1 * torch.rand((), generator=g)
            red = torch.tensor([230, 30, 30], dtype=torch.uint8).reshape(1, 3, 1, 1)
            rgb = to_float(rotate_hue(red, torch.rand(1, generator=g) * 360)).flatten().tolist()
            paint_disc(images[i:i + 1], *centre.tolist(), radius.item(), rgb=rgb)
        return images

    train, val = creatures(40), creatures(20)
    bank = torch.cat([train, train.flip(-1)])
    uint8 = ((train[:8] + 1) * 127.5).round().to(torch.uint8)
    recoloured = to_float(rotate_hue(uint8, torch.full((8,), 150.0)))  # the same drawings, other colours
    assert near_copies(thumbnails(recoloured), thumbnails(bank), thumbnails(val))["share"] <= 0.25  # RGB: most pass
    blind = near_copies(hue_blind_thumbnails(recoloured), hue_blind_thumbnails(bank), hue_blind_thumbnails(val))
    assert blind["share"] == 1 and blind["sample_nn"] < 0.01
    fresh = creatures(10)
    assert near_copies(hue_blind_thumbnails(fresh), hue_blind_thumbnails(bank), hue_blind_thumbnails(val))[
        "share"] <= 0.3


def test_a_body_plan_redrawn_in_other_colours_and_patterns_is_a_silhouette_copy_only():
    from pipelines.metrics import silhouette_thumbnails

    g = torch.Generator().manual_seed(0)

    def creatures(count: int) -> torch.Tensor:  # one dark-red body each: a disc with a smaller disc on it
        images = canvas(count)
        for i in range(count):
            (cx, cy) = (torch.rand(2, generator=g) * 0.3 + 0.35).tolist()
            radius = 0.12 + 0.1 * float(torch.rand(1, generator=g))
            paint_disc(images[i:i + 1], cx, cy, radius, rgb=(0.6, -0.8, -0.8))
            paint_disc(images[i:i + 1], cx + radius, cy - radius, radius / 2, rgb=(0.6, -0.8, -0.8))
        return images

    train, val = creatures(40), creatures(20)
    bank = torch.cat([train, train.flip(-1)])
    redrawn = train[:8].clone()  # the same outlines, blue, with pale stripes across the body
    body = redrawn.amin(dim=1) < 0.9
    stripes = ((torch.arange(SIZE) // 4) % 2 == 0)[:, None].expand(SIZE, SIZE)
    for c, (dark, pale) in enumerate(((-0.8, 0.3), (-0.4, 0.5), (0.7, 0.8))):
        redrawn[:, c][body] = torch.where(stripes, torch.tensor(pale), torch.tensor(dark)).expand_as(body)[body]
    assert silhouette_thumbnails(train[:1]).shape == (1, 64 * 64)
    assert near_copies(thumbnails(redrawn), thumbnails(bank), thumbnails(val))["share"] == 0  # pixels: all pass
    outline = near_copies(silhouette_thumbnails(redrawn), silhouette_thumbnails(bank), silhouette_thumbnails(val))
    assert outline["share"] == 1 and outline["sample_nn"] < 0.01
    fresh = creatures(10)
    assert near_copies(silhouette_thumbnails(fresh), silhouette_thumbnails(bank), silhouette_thumbnails(val))[
        "share"] <= 0.3


def pale_drawings(cells: range) -> torch.Tensor:
    """White pages, each with one light-grey 8x8 square in its own cell of an 8x8 grid (no two overlap)."""
    images = torch.ones(len(cells), 3, 64, 64)
    for i, cell in enumerate(cells):
        row, col = divmod(cell, 8)
        images[i, :, 8 * row:8 * row + 8, 8 * col:8 * col + 8] = 0.6
    return images


def test_the_relative_rule_counts_copies_but_not_a_plain_page_near_many_pale_drawings():
    g = torch.Generator().manual_seed(0)
    colourful = torch.rand(20, 3, 64, 64, generator=g) * 2 - 1
    train = torch.cat([pale_drawings(range(20)), colourful])
    # rows 5-6: no unseen drawing is a training drawing's mirror
    val = torch.cat([pale_drawings(range(40, 50)), torch.rand(10, 3, 64, 64, generator=g) * 2 - 1])
    bank = thumbnails(torch.cat([train, train.flip(-1)]))
    blank = torch.ones(1, 3, 64, 64)  # one square away from each of the 20 pale drawings, alike
    copies = torch.cat([train[:3], train[20:23].flip(-1)])
    blank_rules = near_copies(thumbnails(blank), bank, thumbnails(val), relative_to=10)
    assert blank_rules["share"] == 1  # closer to a pale drawing than any unseen real image is to its nearest
    assert blank_rules["share_relative"] == 0  # but no closer to one drawing than to the others
    assert blank_rules["share"] == near_copies(thumbnails(blank), bank, thumbnails(val))["share"]
    copy_rules = near_copies(thumbnails(copies), bank, thumbnails(val), relative_to=10)
    assert copy_rules["share"] == 1 and copy_rules["share_relative"] == 1
    with pytest.raises(ValueError, match="pixel distances only"):
        near_copies(torch.randn(2, 4), torch.randn(5, 4), torch.randn(3, 4), cosine=True, relative_to=3)


def test_quality_table_shows_the_real_value_beside_each_figure():
    table = quality_table({"fg_share": 0.5, "fg_share_real": 0.4, "near_copy_share_pixel": 0.1,
                           "near_copy_share_pixel_real": 0.08, "near_copy_share_judge": 0.1, "fd_en": 0.05,
                           "fd_real": 0.04})
    assert "| 0.500 | 0.400 | real ± 0.06 |" in table
    assert "| 0.100 | 0.080 | ≤ 0.05 |" in table  # what unseen real images score, measured
    assert "| 0.100 | — | ≤ 0.05 |" in table  # not measured: no assumed 0.05
    assert "| 0.050 | 0.040 | (context) |" in table  # FD's floor serves both languages
    assert "standard error" not in table  # no sample count given: no error bar


def test_real_colour_adherence_is_read_at_the_colour_prompts_mix():
    from pipelines.metrics import at_prompt_mix
    by_colour = {"blue": 0.9, "purple": 0.3, "red": 0.5}
    assert at_prompt_mix(by_colour, ["blue", "purple", "red", "red"]) == pytest.approx((0.9 + 0.3 + 1.0) / 4)
    assert at_prompt_mix(by_colour, ["blue", "pink"]) is None  # no real pink creature: no such reading
    assert at_prompt_mix(by_colour, []) is None
    # beside the samples' adherence the table puts this reading, not the captions' own mix (mostly blue here)
    table = quality_table({"colour_adherence": 0.7, "colour_adherence_real": 0.85,
                           "colour_adherence_real_prompt_mix": 0.6})
    assert "| 0.700 | 0.600 | ≥ 0.75 |" in table


def test_quality_table_gives_each_share_its_binomial_standard_error():
    table = quality_table({"fg_share": 0.5, "near_copy_share_judge": 0.1, "colour_adherence": 0.8, "samples": 100,
                           "colour_samples": 25, "near_copy_share_judge_real": 0.07})
    # Agresti-Coull: q = (p n + 2) / (n + 4), sqrt(q (1 - q) / (n + 4))
    assert "| 0.100 ± 0.031 | 0.070 | ≤ 0.05 |" in table  # q = 12 / 104
    assert "| 0.800 ± 0.079 | — | ≥ 0.75 |" in table  # over the colour prompts' 25: q = 22 / 29
    assert "| 0.500 | — |" in table  # a mean, not a share: no binomial error
    assert "one binomial standard error" in table
    none_of = quality_table({"near_copy_share_judge": 0.0, "samples": 262})  # no copy in 262: not an exact 0
    assert "| 0.000 ± 0.005 |" in none_of  # q = 2 / 266


def test_sharpness_drops_when_an_image_is_blurred():
    sharp = paint_disc(canvas(), 0.5, 0.5, 0.3)
    blurred = torch.nn.functional.avg_pool2d(sharp, 9, stride=1, padding=4, count_include_pad=False)
    assert sharpness(canvas()) == 0  # a blank page has no edges
    assert sharpness(sharp) > 2 * sharpness(blurred) > 0


def test_copy_rule_check_counts_every_exact_copy_under_both_rules(tmp_path):
    from benchmarks.copy_rule_check import main as copy_rule_check
    out = tmp_path / "copy_rules.json"
    result = copy_rule_check(["--data", "shapes:60", "--out", str(out)])
    rows = result["rows"]
    assert set(rows) == {"unseen images", "exact copies", "washed-out copies", "shifted copies", "blends of 5 drawings"}
    assert rows["exact copies"]["absolute"] == 1 and rows["exact copies"]["relative"] == 1
    assert out.is_file() and result["command"].startswith("python -m benchmarks.copy_rule_check")


def test_silhouette_check_flags_training_outlines_in_a_grid_and_not_blank_pages(tmp_path):
    from benchmarks.silhouette_check import main as silhouette_check
    from pipelines.metrics import shrunk
    from data import load_captions
    from engine.images import save_grid

    train = load_captions("shapes:60").subset("train")  # at 512 px, shrunk as the evaluation does
    tiles = torch.cat([shrunk(train.images[:4]), torch.ones(4, 3, 128, 128)])  # 2 prompts x 4 seeds
    grid = save_grid(tiles, tmp_path / "final_samples.png", nrow=4)
    result = silhouette_check(["--data", "shapes:60", "--grid", str(grid), "--out", str(tmp_path / "rule.json"),
                               "--pairs", str(tmp_path / "pairs.png")])
    found = result["grids"][str(grid)]
    assert [f["tile"] for f in found["flagged"]] == [0, 1, 2, 3] and found["silhouette_share"] == 0.5
    assert all(f["distance_rms"] < 0.01 and f["prompt_row"] == 0 for f in found["flagged"])
    assert 0 <= result["real_held_out_share"] <= 1 and (tmp_path / "rule.json").is_file()
    from pipelines.metrics import twin_groups
    outlines = torch.cat([torch.eye(6).repeat_interleave(4, 1)] * 2)  # six images, then their mirrors
    outlines[1] = outlines[0]
    outlines[2] = outlines[1] + 0.01  # 0, 1 and 2 chain into one plan
    outlines[6 + 4] = outlines[5]  # the mirror of 4 is 5's silhouette
    assert twin_groups(outlines, threshold=0.05) == [[0, 1, 2], [4, 5]]
    from PIL import Image
    assert Image.open(tmp_path / "pairs.png").size == (4 * 96 + 5 * 2, 2 * 96 + 3 * 2)  # 4 tiles over 4 partners


def test_twin_weights_draw_a_repeated_silhouette_as_one_image_under_the_near_copy_threshold():
    from pipelines.metrics import copy_threshold, twin_groups, twin_weights
    plans = torch.eye(3).repeat_interleave(4, 1)  # three body plans, 12 px each
    outlines = plans[[0, 0, 0, 1, 1, 2]]  # 3 identical + 2 identical + 1 unique
    outlines = torch.cat([outlines, outlines])  # then their mirrors: symmetric bodies
    unseen = plans[[0, 1, 2]] + 0.1  # every unseen image lies 0.1 from a plan: the threshold
    threshold = copy_threshold(outlines, unseen)
    assert threshold == pytest.approx(0.1)
    found = near_copies(plans + torch.tensor([[0.05], [0.2], [0.3]]), outlines, unseen)  # near_copies' own rule
    assert found["copied"].tolist() == (found["distance"] < threshold).tolist() == [True, False, False]
    groups = twin_groups(outlines, threshold)
    assert groups == [[0, 1, 2], [3, 4]]
    assert torch.allclose(twin_weights(groups, 6), torch.tensor([1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2, 1.0],
                                                                dtype=torch.float64))
    assert twin_weights([], 2).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="outlines has 5 rows: expected the images' silhouettes, then as many"):
        twin_groups(outlines[:5], threshold)


def test_pair_pictures_keep_each_sample_over_its_partner_in_a_short_last_row(tmp_path):
    from engine.images import read_grid
    from pipelines.evaluate import save_pairs

    samples = torch.linspace(-0.9, 0.5, 14)[:, None, None, None].expand(14, 3, 96, 96).clone()  # one grey each
    save_pairs(samples, -samples, tmp_path / "pairs.png")
    tiles = read_grid(tmp_path / "pairs.png", 96)[..., 40, 40].mean(-1)  # [rows, columns] grey levels
    assert tiles.shape == (4, 12)
    assert torch.allclose(tiles[2, :2], samples[12:, 0, 0, 0], atol=0.01)  # the last two, over their partners
    assert torch.allclose(tiles[3, :2], -samples[12:, 0, 0, 0], atol=0.01)
    assert torch.all(tiles[2:, 2:] == 1)  # the rest of the short rows blank
    save_pairs(samples[:3], -samples[:3], tmp_path / "three.png")
    assert read_grid(tmp_path / "three.png", 96).shape[:2] == (2, 3)


def test_colour_breakdown_reads_the_samples_back_from_a_nearest_pairs_picture(tmp_path):
    from benchmarks.colour_breakdown import pair_samples
    from engine.errors import UserError
    from pipelines.evaluate import save_pairs

    rgb = {"red": (0.9, -0.9, -0.9), "blue": (-0.9, -0.6, 0.9), "green": (-0.9, 0.8, -0.9),
           "yellow": (0.9, 0.8, -0.9), "purple": (0.2, -0.9, 0.9), "pink": (0.9, -0.9, 0.2)}
    _, _, named = colour_prompts(seeds=8)
    drawn = ["blue" if colour == "red" else colour for colour in named]  # every red prompt drew a blue body
    samples = torch.cat([paint_disc(canvas(), 0.5, 0.5, 0.3, rgb=rgb[colour]) for colour in drawn])
    path = tmp_path / "nearest_pairs.png"
    save_pairs(samples, -samples, path)  # the partner rows (inverted colours) must not be read as samples
    tiles = pair_samples(path, len(named))
    assert tiles.shape == (96, 3, 96, 96)
    assert share_by_colour(colour_hits(tiles, named), named) == {
        "red": 0.0, "blue": 1.0, "green": 1.0, "yellow": 1.0, "purple": 1.0, "pink": 1.0}
    from benchmarks.colour_breakdown import summary

    assert summary(tiles, named)["chromatic_share"] == pytest.approx(1.0, abs=0.02)  # saturated discs on white
    grey = paint_disc(canvas(2), 0.5, 0.5, 0.3, rgb=(0.0, 0.0, 0.0))
    half = paint_disc(grey.clone(), 0.5, 0.5, 0.3 / 2 ** 0.5, rgb=rgb["blue"])  # a blue disc of half the area
    assert summary(grey, ["blue", "blue"])["chromatic_share"] == 0  # a grey body has no hue
    assert summary(half, ["blue", "blue"])["chromatic_share"] == pytest.approx(0.5, abs=0.03)  # half its area
    with pytest.raises(UserError, match="too small for 200 samples"):
        pair_samples(path, 200)
    with pytest.raises(UserError, match="no picture at .*nearest_pairs.png an evaluation wrote"):
        pair_samples(tmp_path / "missing.png", 96)
    # a second evaluation of the same prompts and seeds that drew its red bodies red, sample for sample
    from benchmarks.colour_breakdown import main as colour_breakdown

    fixed = torch.cat([paint_disc(canvas(), 0.5, 0.5, 0.3, rgb=rgb[colour]) for colour in named])
    save_pairs(fixed, -fixed, tmp_path / "fixed.png")
    result = colour_breakdown(["--pairs", str(path), "--paired-with", str(tmp_path / "fixed.png"), "--data",
                               "shapes:60", "--size", "64"])
    paired = result["paired_with"]["paired"]
    assert paired["pairs"] == 96 and "copied_judge" not in paired  # a picture holds no copy threshold
    assert (paired["colour_hit"]["only_before"], paired["colour_hit"]["only_after"]) == (0, named.count("red"))
    assert paired["parts"]["difference"] == 0  # one disc each, either way
    assert paired["fg_share"]["difference"] == pytest.approx(0, abs=1e-6)  # the same disc, recoloured


def test_colour_breakdown_counts_the_bodies_recoloured_copies_add(tmp_path):
    from benchmarks.colour_breakdown import main as colour_breakdown
    from engine.config import ConfigError
    from pipelines.evaluate import save_pairs

    _, _, named = colour_prompts(seeds=8)
    samples = torch.cat([paint_disc(canvas(), 0.5, 0.5, 0.3, rgb=(0.9, -0.9, -0.9)) for _ in named])
    save_pairs(samples, samples, tmp_path / "nearest_pairs.png")
    args = ["--pairs", str(tmp_path / "nearest_pairs.png"), "--data", "shapes:60", "--size", "32"]
    result = colour_breakdown(args + ["--recolour-copies", "2"])
    train_images = result["training_images"]
    copies = result["recoloured_copies"]  # one flat colour per shape, named in its caption: every copy recoloured
    assert copies["recoloured"] == 2 * train_images and copies["kept_as_they_are"] == 0
    assert sum(copies["bodies"].values()) == 2 * train_images and copies["bodies"]["pink"] > 0  # no pink shapes
    assert result["training_bodies"]["pink"] == 0 and "recoloured_copies" not in colour_breakdown(args)
    assert result["real"]["at_prompt_mix"] is None  # no pink shape: no reading at the prompts' six colours
    with pytest.raises(ConfigError, match=r"recolour\.copies must be in \[0, 6\]"):
        colour_breakdown(args + ["--recolour-copies", "7"])


def test_colour_word_use_tells_details_from_bodies():
    from benchmarks.colour_breakdown import colour_word_use

    use = colour_word_use(["A cat with red eyes and a red-and-white body.", "A Red nose.", "A blue bird.",
                           "A blue dragon with blue scales."])
    assert use["red"] == {"mentions": 3, "detail_share": 2 / 3, "body_share": 1 / 3}  # eyes, body, nose
    assert use["blue"] == {"mentions": 3, "detail_share": 0.0, "body_share": 1.0}  # bird, dragon, scales
    assert use["green"] == {"mentions": 0, "detail_share": 0.0, "body_share": 0.0}


def test_grid_measure_reads_an_epoch_grid_back_and_counts_its_copies(tmp_path):
    from benchmarks.grid_measure import main as grid_measure
    from data import load_captions
    from data.augment import to_float
    from engine.errors import UserError
    from engine.images import read_grid, save_grid

    train = to_float(load_captions("shapes:60", resolution=SIZE).subset("train").images)
    noise = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 1.6 - 1  # fills the frame
    tiles = torch.cat([train[:2], train[2:4].flip(-1), noise])  # two copies, two mirrored copies, four non-copies
    path = save_grid(tiles, tmp_path / "epoch_0001.png", nrow=4, max_side=SIZE)
    assert (read_grid(path, SIZE).flatten(0, 1) - tiles).abs().max() <= 1 / 127.5 + 1e-6  # exact up to uint8
    result = grid_measure([str(path), "--data", "shapes:60", "--out", str(tmp_path / "grids.json")])
    figures = result["grids"][str(path)]
    assert figures["samples"] == 8 and figures["near_copy_share_pixel"] == 0.5
    assert figures["frame_filling_share"] == 0.5
    with pytest.raises(UserError, match="not a grid of 128-px tiles"):
        read_grid(save_grid(tiles[:2], tmp_path / "small.png", nrow=2, max_side=96), SIZE)
    with pytest.raises(UserError, match="no picture at"):
        read_grid(tmp_path / "missing.png", SIZE)


def test_frechet_distance_closed_forms():
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2, 3, 1, 1, 0.5])
    shift = torch.tensor([1.0, -2, 0, 0, 3, 0])
    cov_trace = torch.cov(x.T.double()).trace().item()
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(x, x + shift) == pytest.approx(shift.square().sum().item(), rel=1e-6)  # means only
    # 2x: mean 2 mu, covariance 4 S, so ||mu||^2 + Tr S + 4 Tr S - 2 Tr (2 S)
    assert frechet_distance(x, 2 * x) == pytest.approx(x.double().mean(0).square().sum().item() + cov_trace,
                                                       rel=1e-6)


def test_kernel_distance_is_the_unbiased_mmd_and_sees_the_spread_of_unit_features():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 4, generator=g).double(), torch.randn(9, 4, generator=g).double()

    def k(x, y):
        return (x @ y / 4 + 1) ** 3

    reference = (sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / 42
                 + sum(k(b[i], b[j]) for i in range(9) for j in range(9) if i != j) / 72
                 - 2 * sum(k(a[i], b[j]) for i in range(7) for j in range(9)) / 63)
    assert kernel_distance(a, b) == pytest.approx(reference.item(), rel=1e-9)
    # unit vectors of mean zero, on four axes or all around: at 1 / d the kernel is nearly linear and compares the
    # means only, so it cannot tell them apart; at gamma 1 (the evaluation's, for the judge's unit features) it can
    axes = torch.cat([torch.eye(64)[:4].repeat(50, 1), -torch.eye(64)[:4].repeat(50, 1)])

    def all_around():
        x = F.normalize(torch.randn(200, 64, generator=g), dim=-1)
        return torch.cat([x, -x])

    around, again = all_around(), all_around()
    noise = abs(kernel_distance(around, again, gamma=1.0))
    assert kernel_distance(axes, around, gamma=1.0) > 50 * noise
    assert abs(kernel_distance(axes, around)) < noise


def test_real_reference_measures_the_real_images_column_without_a_run(tmp_path):
    from benchmarks.real_reference import main as real_reference
    from benchmarks.untrained_run import main as untrained_run
    from engine.errors import UserError

    judge = untrained_run(["--out", str(tmp_path / "untrained"), "--preset", "tiny"]) / "clip"
    result = real_reference(["--data", "shapes:40", "--judge", str(judge), "--size", "64",
                             "--out", str(tmp_path / "real.json")])
    figures = result["figures"]
    for rule in ("pixel", "pixel_relative", "pixel_hue_blind", "silhouette", "judge"):
        # what unseen images score: 36 held-out training images, each a multiple of 1/36
        share = figures[f"near_copy_share_{rule}_real"]
        assert 0 <= share <= 1 and round(share * 36, 6) == round(share * 36)
    assert figures["fd_real"] >= 0 and 0 <= figures["fg_share_real"] <= 1
    assert result["train_images"] == 36 and (tmp_path / "real.json").is_file()
    with pytest.raises(UserError, match="validation split"):
        real_reference(["--data", "shapes:10", "--judge", str(judge), "--size", "64"])


def test_mcnemar_p_is_the_exact_binomial_tail():
    assert mcnemar_p(0, 6) == 2 / 2 ** 6  # all six discordant pairs one way: 2 x (1/2)^6
    assert mcnemar_p(1, 9) == pytest.approx(2 * (1 + 10) / 2 ** 10)
    assert mcnemar_p(4, 4) == 1 and mcnemar_p(0, 0) == 1  # balanced, or nothing discordant: no evidence


def record(source, prompt, seed, parts, copied_judge, colour_hit=None):
    return {"source": source, "prompt": prompt, "seed": seed, "parts": parts, "frame_filling": False,
            "copied_pixel": False, "copied_judge": copied_judge, "colour_hit": colour_hit}


def test_paired_differences_pair_samples_by_prompt_and_seed():
    before = [record("colour_prompts", "a red pokemon", seed, parts=1 + seed % 3, copied_judge=seed < 8,
                     colour_hit=seed % 2 == 0) for seed in range(40)]
    # after: the same samples, a different order, two fewer copies, one part fewer on every third sample, and a
    # sample before did not draw (another seed), which is left out
    after = [record("colour_prompts", "a red pokemon", seed, parts=1 + seed % 3 - (seed % 3 == 2),
                    copied_judge=2 <= seed < 8, colour_hit=seed % 2 == 0) for seed in reversed(range(40))]
    after.append(record("colour_prompts", "a red pokemon", 99, parts=9, copied_judge=True))
    paired = paired_differences(before, after)
    assert paired["pairs"] == 40
    judge = paired["copied_judge"]
    assert (judge["before"], judge["after"], judge["only_before"], judge["only_after"]) == (0.2, 0.15, 2, 0)
    assert judge["difference"] == pytest.approx(-0.05) and judge["p_value"] == mcnemar_p(2, 0) == 0.5
    # sqrt(b + c - (c - b)^2 / n) / n against sqrt(p1 q1 / n + p2 q2 / n)
    assert judge["error_paired"] == pytest.approx((2 - 4 / 40) ** 0.5 / 40)
    assert judge["error_unpaired"] == pytest.approx(((0.2 * 0.8 + 0.15 * 0.85) / 40) ** 0.5)
    assert paired["colour_hit"]["only_before"] == paired["colour_hit"]["only_after"] == 0
    parts = paired["parts"]
    assert parts["difference"] == pytest.approx(-13 / 40)  # seeds 2, 5, ..., 38 lost a part
    # the same samples under both: most of their spread is shared, so the paired error is far the smaller
    assert parts["error_paired"] < parts["error_unpaired"] / 2
    table = paired_table({"B against A": paired})
    assert "| near-copies, judge space | 0.200 → 0.150 (-0.050; 2 / 0 pairs only before / after, p 0.5) |" in table
    with pytest.raises(ValueError, match="only 0 sample"):
        paired_differences(before, [record("captions_en", "a red pokemon", 0, 1, False)])  # another source
    # caption samples are named by their validation row (no caption text): they pair by row and seed
    by_row = [{**record("captions_en", None, row, 1, row == 9), "row": row} for row in (9, 19, 29)]
    for sample in by_row:
        del sample["prompt"]
    assert paired_differences(by_row, by_row[::-1])["pairs"] == 3
    with pytest.raises(ValueError, match="only 0 sample"):
        paired_differences(by_row, [{**sample, "row": sample["row"] + 1} for sample in by_row])  # other rows
    # records that carry each sample's foreground share pair it as a mean too; older records (none) leave it out
    assert "fg_share" not in paired and "| foreground share | — |" in table
    assert "| share of the foreground with a hue | — |" in table
    grown = paired_differences([{**r, "fg_share": 0.3 + r["seed"] / 100} for r in before],
                               [{**r, "fg_share": 0.35 + r["seed"] / 100} for r in after])["fg_share"]
    assert grown["difference"] == pytest.approx(0.05) and grown["error_paired"] == pytest.approx(0, abs=1e-12)
    assert grown["pairs"] == 40 and grown["error_unpaired"] > 0.01  # the seeds' spread, shared by both sides
    assert "| foreground share | 0.495 → 0.545 (+0.050 ± 0.000 paired, ± 0.026 unpaired) |" in paired_table(
        {"B against A": {"pairs": 40, "fg_share": grown}})


def test_paired_reads_runs_evaluations_and_sweep_settings_and_pairs_judge_copies_under_one_judge(tmp_path, capsys):
    from engine.errors import UserError
    from pipelines.paired import main, paired_sides

    before = [record("colour_prompts", "a red pokemon", seed, 1, copied_judge=seed < 6, colour_hit=seed < 20)
              for seed in range(40)]
    after = [{**sample, "copied_judge": sample["seed"] < 2, "colour_hit": sample["seed"] < 25} for sample in before]
    judge = "runs/A/judge (0123456789abcdef)"
    run = tmp_path / "A"
    run.mkdir()
    (run / "evaluation.json").write_text(json.dumps({"judge": judge, "generation": {}, "samples": before}))
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"judge": judge, "records": [
        {"samples": after}, {"same_samples_as": 0}, {"samples": before}]}))
    other_judge = tmp_path / "other.json"
    other_judge.write_text(json.dumps({"judge": "runs/B/judge (fedcba9876543210)", "generation": {}, "samples": after}))

    result = main([str(run), f"{sweep}:1", str(other_judge), "--out", str(tmp_path / "paired.json")])
    paired = result["paired"][f"{sweep}:1"]  # setting 1 drew nothing of its own: setting 0's samples
    assert paired["pairs"] == 40
    assert (paired["copied_judge"]["only_before"], paired["copied_judge"]["only_after"]) == (4, 0)
    assert (paired["colour_hit"]["only_before"], paired["colour_hit"]["only_after"]) == (0, 5)
    assert "copied_judge" not in result["paired"][str(other_judge)]  # another judge: its copies are not paired
    assert result["paired"][str(other_judge)]["colour_hit"] == paired["colour_hit"]  # the rest still pairs
    assert result["judge_copies_not_paired"] == [str(other_judge)]
    assert json.loads((tmp_path / "paired.json").read_text())["paired"][f"{sweep}:1"]["pairs"] == 40
    printed = capsys.readouterr().out
    assert "| near-copies, judge space | 0.150 → 0.050 (-0.100; 4 / 0 pairs only before / after" in printed
    assert f"{other_judge}: judge-space copies not paired" in printed
    # a setting with its own samples pairs as drawn: setting 2 is the evaluation's samples again
    assert paired_sides([str(run), f"{sweep}:2"])["paired"][f"{sweep}:2"]["copied_judge"]["only_before"] == 0

    old = tmp_path / "old.json"  # a sweep written before sweeps kept their samples
    old.write_text(json.dumps({"records": [{"metrics": {}}]}))
    not_json = tmp_path / "notes.json"
    not_json.write_text("fd 0.04")
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"generation": {}, "samples": [{**sample, "seed": sample["seed"] + 100}
                                                                   for sample in before]}))
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"minutes": 17.4}))
    for sides, message in (([str(run)], "at least two sides"),
                           ([str(run), str(tmp_path / "missing.json")], "missing.json not found"),
                           ([str(run), str(tmp_path)], f"{tmp_path.name}/evaluation.json not found"),
                           ([str(run), f"{sweep}:3"], "settings 0-2, not 3"),
                           ([str(run), f"{other_judge}:1"], "one setting: drop ':1'"),
                           ([str(run), str(old)], "records no samples"),
                           ([str(run), str(not_json)], "is not JSON"),
                           ([str(run), str(summary)], "neither an evaluation.json nor a sampling sweep"),
                           ([str(run), str(elsewhere)], "no side shares two samples"),
                           ([str(run), f"{sweep}:1", f"{sweep}:1"], "are one measurement; name each side once"),
                           ([str(run), str(sweep), f"{sweep}:0"], "are one measurement"),  # setting 0 either way
                           ([str(run), f"{sweep}:1", f"{run}/"], f"{run}/ and {run} are one measurement")):
        with pytest.raises(UserError, match=message):
            paired_sides(sides)


def test_copy_recurrence_counts_samples_copied_again_against_independence(tmp_path, capsys):
    from benchmarks.copy_recurrence import main, poisson_binomial
    from engine.errors import UserError

    assert poisson_binomial([0.5, 0.5]) == pytest.approx([0.25, 0.5, 0.25])
    law = poisson_binomial([0.1, 0.2, 0.3])
    assert sum(law) == pytest.approx(1) and sum(k * p for k, p in enumerate(law)) == pytest.approx(0.6)
    assert law[3] == pytest.approx(0.1 * 0.2 * 0.3) and law[0] == pytest.approx(0.9 * 0.8 * 0.7)

    judge = "runs/A/judge (0123456789abcdef)"
    # three runs of 20 samples: seed 0 copied by all three, seed 1 by two, seeds 2-4 by one run each
    copied = {"A": {0, 1, 2}, "B": {0, 1, 3}, "C": {0, 4}}
    sides = []
    for name, seeds in copied.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"judge": judge, "generation": {}, "samples": [
            record("colour_prompts", "a red pokemon", seed, 1, copied_judge=seed in seeds) for seed in range(20)]}))
        sides.append(str(path))
    result = main([*sides, "--recurring", "2", "--out", str(tmp_path / "recurrence.json")])
    assert result["samples"] == 20 and result["rates"][sides[2]] == 0.1
    assert {n: row["observed"] for n, row in result["samples_flagged_by"].items()} == {"0": 15, "1": 3, "2": 1, "3": 1}
    expected = poisson_binomial([0.15, 0.15, 0.1])
    assert result["samples_flagged_by"]["3"]["expected_if_independent"] == pytest.approx(20 * expected[3])
    assert [(s["seed"], s["sides"]) for s in result["recurring_samples"]] == [(0, 3), (1, 2)]
    assert result["share_of_flags_on_recurring_samples"] == pytest.approx(5 / 8)
    assert set(json.loads((tmp_path / "recurrence.json").read_text())["judges"].values()) == {"0123456789abcdef"}
    assert "2 samples flagged by at least 2" in capsys.readouterr().out

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"judge": "runs/B/judge (fedcba9876543210)", "generation": {},
                                 "samples": [record("colour_prompts", "a red pokemon", 0, 1, True)] * 2}))
    with pytest.raises(UserError, match="only under one named judge"):
        main([sides[0], str(other)])
    with pytest.raises(UserError, match="share 1 sample"):  # pixel copies compare across judges; one seed in common
        main([sides[0], str(other), "--flag", "copied_pixel"])
    with pytest.raises(UserError, match="--recurring between 1 and their number"):
        main([*sides, "--recurring", "4"])
    with pytest.raises(UserError, match="are one measurement"):  # it would count as one run's flags
        main([sides[0], sides[1], sides[0]])


def test_colour_trajectory_finds_the_step_each_sample_settles_at():
    from benchmarks.colour_trajectory import dominant_families, settled_steps

    families = torch.tensor([[0, 0, 3],    # step 0
                             [1, 0, 3],    # step 1
                             [1, 2, 3],    # step 2
                             [1, 2, 3]])   # step 3 (the last)
    assert settled_steps(families).tolist() == [1, 2, 0]  # from step 1, from step 2, from the start
    assert settled_steps(torch.tensor([[5, 1], [4, 1], [5, 2]])).tolist() == [2, 2]  # back to the final is not settled
    counts = torch.tensor([[0.0, 3.0, 1.0], [0.0, 0.0, 0.0], [2.0, 2.0, 0.0]])
    assert dominant_families(counts).tolist() == [1, -1, 0]  # no chromatic pixel: no family; a tie: the first


def test_colour_trajectory_reads_every_step_and_ends_on_the_evaluations_verdict(tmp_path):
    from benchmarks.colour_trajectory import main as colour_trajectory
    from benchmarks.colour_trajectory import trace
    from benchmarks.untrained_run import main as untrained_run
    from engine.errors import UserError
    from pipelines.metrics import hue_family_counts
    from pipelines.stages import load_stack
    from pipelines.text_to_image import GenerationSettings, generate

    run = untrained_run(["--out", str(tmp_path / "untrained"), "--preset", "tiny"])
    stack = load_stack(run, device="cpu")
    settings = GenerationSettings(steps=5, size=stack.image_size, batch_size=3)  # two batches: 3 and 2 prompts
    prompts, seeds, _ = colour_prompts(seeds=1)
    prompts, seeds = prompts[:5], seeds[:5]
    traced = trace(stack, prompts, seeds, settings, strip_rows=[0, 4])
    assert traced["counts"].shape == (5, 5, len(COLOUR_FAMILIES)) and traced["foreground"].shape == (5, 5)
    assert traced["strip"].shape == (2, 5, 3, 64, 64)
    # the last step's x0 prediction is the sample: its colour counts are the generated images' own
    final_counts, final_foreground = hue_family_counts(generate(stack, prompts, seeds, settings))
    assert torch.equal(traced["counts"][-1], final_counts) and torch.equal(traced["foreground"][-1], final_foreground)

    out = tmp_path / "trajectory.json"
    result = colour_trajectory(["--run", str(run), "--out", str(out), "--seeds", "1", "--steps", "4",
                                "--plot", str(tmp_path / "t.png"), "--strip", str(tmp_path / "strip.png")])
    steps, samples, summary = result["steps"], result["samples"], result["summary"]
    assert len(steps) == 4 and len(samples) == 12 == summary["samples"]
    assert steps[0]["sigma"] is None and all(a["sigma"] > b["sigma"] for a, b in zip(steps[1:], steps[2:]))
    assert summary["final_hit_share"] == steps[-1]["hit_share"]
    assert summary["final_hit_share"] == pytest.approx(sum(s["final_hit"] for s in samples) / 12)
    assert all(0 <= s["settled_step"] < 4 for s in samples) and steps[-1]["settled_share"] == 1.0
    assert (tmp_path / "t.png").is_file() and (tmp_path / "strip.png").is_file() and out.is_file()
    with pytest.raises(UserError, match="trajectory.json exists"):  # an earlier result is kept unless told
        colour_trajectory(["--run", str(run), "--out", str(out), "--seeds", "1", "--steps", "4"])
    with pytest.raises(UserError, match="--seeds"):
        colour_trajectory(["--run", str(run), "--out", str(out), "--seeds", "0", "--overwrite"])
