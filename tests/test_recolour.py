"""Recoloured training copies: the hue turn, the captions' renamed colours, the copies' draw, and batches."""

import pytest
import torch

from data.augment import rotate_hue
from diffusion.latents import LatentCache, LatentNormalisation, TextStateCache
from diffusion.colour_sentences import body_colours, body_hues, recoloured_copies
from diffusion.recolour import (FAMILY_CENTRES, FAMILY_HALF_WIDTHS, TARGET_SPREAD, RecolourAugment, family_map,
                                hue_family, hue_turns, recoloured_images, recolourable, rename_colours)
from diffusion.train import LatentBatchMaker
from engine.config import ConfigError, validate_config
from pipelines.metrics import FAMILY_NAMES, hue_family_shares

RED, ORANGE, BLUE = (FAMILY_NAMES.index(name) for name in ("red", "orange", "blue"))


def pixels(*rgb: tuple[int, int, int]) -> torch.Tensor:
    """One uint8 image [1, 3, 1, len(rgb)] of the given pixels."""
    return torch.tensor(rgb, dtype=torch.uint8).T.reshape(1, 3, 1, len(rgb))


def test_rotate_hue_closed_forms():
    primaries = pixels((255, 0, 0), (0, 255, 0), (0, 0, 255))
    assert torch.equal(rotate_hue(primaries, torch.tensor([120.0])), pixels((0, 255, 0), (0, 0, 255), (255, 0, 0)))
    assert torch.equal(rotate_hue(primaries, torch.tensor([-120.0])), pixels((0, 0, 255), (255, 0, 0), (0, 255, 0)))
    # a mixed colour keeps its value (max) and chroma (max - min): (250, 120, 30) turned by 120 is (30, 250, 120)
    assert torch.equal(rotate_hue(pixels((250, 120, 30)), torch.tensor([120.0])), pixels((30, 250, 120)))
    achromatic = pixels((255, 255, 255), (0, 0, 0), (128, 128, 128), (17, 17, 17))
    assert torch.equal(rotate_hue(achromatic, torch.tensor([77.0])), achromatic)  # page and outlines stay


def test_rotate_hue_identity_and_inverse_on_random_images():
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rotate_hue(images, torch.zeros(4)), images)
    assert torch.equal(rotate_hue(images, torch.full((4,), 360.0)), images)
    back = rotate_hue(rotate_hue(images, torch.tensor([10.0, 77.0, 200.0, -45.0])),
                      torch.tensor([-10.0, -77.0, -200.0, 45.0]))
    assert (back.int() - images.int()).abs().max() <= 1  # two roundings to uint8


def test_rotate_hue_refuses_bad_input():
    with pytest.raises(ValueError, match="uint8 RGB"):
        rotate_hue(torch.zeros(1, 3, 4, 4), torch.zeros(1))
    with pytest.raises(ValueError, match="one angle per image"):
        rotate_hue(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(1))


def test_a_body_turned_from_its_measured_hue_lands_in_the_target_family():
    assert [hue_family(centre) for centre in FAMILY_CENTRES] == list(range(len(FAMILY_NAMES)))
    assert hue_family(-10.0) == hue_family(350.0) == RED and hue_family(360.0 + 30.0) == ORANGE
    # a blue body far from its family's centre (hue 227, centre 210): turned from the centre to orange it would
    # land in yellow; turned from its measured hue it lands in orange
    body = pixels(*[(30, 70, 220)] * 8, (255, 255, 255))
    bodies = body_colours(body)
    (hue,) = body_hues(body, bodies)
    assert bodies == [BLUE] and abs(hue - 227.37) < 0.01
    for target in range(len(FAMILY_NAMES)):
        turned = rotate_hue(body, torch.tensor([FAMILY_CENTRES[target] - hue]))
        assert hue_family_shares(turned.float() / 127.5 - 1, size=9)[0, target] == 1.0
    assert body_hues(pixels((255, 255, 255)), [None]) == [None]


def test_captions_rename_every_colour_word_by_the_same_turn():
    families = family_map(FAMILY_CENTRES[BLUE] - 0.0, RED, 0.0)  # 210 degrees: yellow (55) lands at 265, purple
    en, zh = rename_colours("Red bird with yellow eyes, a red crest and white wings.",
                            "红色的鸟，黄色眼睛，粉红色的脸，白色翅膀。", families)
    assert en == "Blue bird with purple eyes, a blue crest and white wings."  # capitals kept, white stays
    assert zh == "蓝色的鸟，紫色眼睛，蓝色的脸，白色翅膀。"  # 粉红 (pink, 317.5) is one word: +210 is blue
    assert rename_colours("A redwood, greenery.", "一棵树。", families) == ("A redwood, greenery.", "一棵树。")
    orange_to_red = family_map(-27.5, ORANGE, 27.5)
    assert rename_colours("An orange fox and a red hen.", "", orange_to_red)[0] == "A red fox and a pink hen."
    assert rename_colours("A red fox, a hen.", "", family_map(27.5, RED, 0.0))[0] == "An orange fox, a hen."


def test_the_body_word_follows_the_measured_hue_and_detail_words_their_centres():
    # a blue body at hue 227 turned by -172 lands at 55 (yellow); blue's centre (210) would land at 38 (orange)
    families = family_map(-172.0, BLUE, 227.0)
    assert FAMILY_NAMES[families[BLUE]] == "yellow" and FAMILY_NAMES[families[RED]] == hue_family_name(-172.0)
    assert rename_colours("A blue fish with red fins.", "蓝色的鱼。", families) == (
        "A yellow fish with blue fins.", "黄色的鱼。")  # red: 0 - 172 = 188


def hue_family_name(hue: float) -> str:
    return FAMILY_NAMES[hue_family(hue)]


def test_which_images_are_recoloured():
    assert recolourable("A red bird with blue eyes.", "红色的鸟。", RED)
    assert recolourable("A jellyfish, stylish.", "一只青蛙和一条金鱼，很多粉丝。", RED)  # no colour word at all
    assert not recolourable("A red bird.", "红色的鸟。", None)  # no dominant body colour: nothing to turn
    for en, zh in (("A brown fox.", "狐狸。"), ("A reddish fox.", "狐狸。"), ("A fox.", "一只棕色的狐狸。"),
                   ("A golden fox.", "狐狸。"), ("A cream fox.", "狐狸。"), ("A fox.", "一只金色的狐狸。")):
        assert not recolourable(en, zh, RED)  # a colour no family word can stand for
    # a neighbouring family of the body's is named: which word names the body is unknown
    assert not recolourable("A pink Chansey.", "粉色的吉利蛋。", RED)
    assert not recolourable("A pink Chansey with red cheeks.", "吉利蛋。", RED)
    assert not recolourable("A fox.", "一只蓝粉相间的狐狸。", RED)  # 粉 after a colour is pink too
    assert recolourable("A blue fish with yellow fins.", "蓝色的鱼。", RED)  # blue and yellow are no neighbours


def test_chinese_colour_characters_are_renamed_only_as_colours():
    to_blue = family_map(FAMILY_CENTRES[BLUE], RED, 0.0)
    assert rename_colours("", "粉丝们喜欢花粉和粉白相间的红鼻子。", to_blue)[1] == "粉丝们喜欢花粉和蓝白相间的蓝鼻子。"
    assert rename_colours("", "黄粉相间", to_blue)[1] == "紫蓝相间"  # yellow 55 + 210 is purple, pink 317.5 blue
    assert rename_colours("", "蓝粉两色", to_blue)[1] == "黄蓝两色"  # 粉 after a colour; blue 210 + 210 is yellow


def test_hue_turns_take_distinct_other_families_and_skip_what_cannot_be_recoloured():
    bodies = [RED, BLUE, None, RED, BLUE] * 20
    hues = [5.0, 230.0, None, 350.0, 180.0] * 20
    can = [True, True, True, False, True] * 20
    turns = hue_turns(bodies, hues, can, copies=3, seed=0)
    assert turns.shape == (3, 100)
    assert bool((turns[:, 2::5] == 0).all()) and bool((turns[:, 3::5] == 0).all())
    for i in range(100):
        if bodies[i] is None or not can[i]:
            continue
        landed = [hues[i] + turn for turn in turns[:, i].tolist()]
        targets = [hue_family(hue) for hue in landed]
        assert len(set(targets)) == 3 and bodies[i] not in targets
        for hue, target in zip(landed, targets):  # within the middle half of the target family
            off_centre = (hue - FAMILY_CENTRES[target] + 180) % 360 - 180
            assert abs(off_centre) <= TARGET_SPREAD * FAMILY_HALF_WIDTHS[target] + 1e-4
    landed = [5.0 + turn for turn in turns[:, 0::5].flatten().tolist()]  # the red bodies at hue 5
    spread = [(hue - FAMILY_CENTRES[hue_family(hue)] + 180) % 360 - 180 for hue in landed]
    assert len(set(round(x, 3) for x in spread)) > 10  # not all on the centres
    targets = {hue_family(5.0 + turn) for turn in turns[:, 0::5].flatten().tolist()}
    assert targets == set(range(len(FAMILY_NAMES))) - {RED}  # every other family is drawn
    assert torch.equal(turns, hue_turns(bodies, hues, can, copies=3, seed=0))
    assert not torch.equal(turns, hue_turns(bodies, hues, can, copies=3, seed=1))
    # one image's eligibility does not move the others' draws
    assert torch.equal(hue_turns(bodies, hues, [True] * 100, 3, 0)[:, 0::5], turns[:, 0::5])


def test_a_copy_whose_body_would_not_land_in_its_target_family_keeps_its_colours():
    red = torch.tensor([230, 23, 23], dtype=torch.uint8).reshape(1, 3, 1, 1)

    def body(hues: list[float]) -> torch.Tensor:  # one column of 8 pixels per hue
        columns = [rotate_hue(red, torch.tensor([hue])).expand(1, 3, 8, 8) for hue in hues]
        return torch.cat(columns, dim=-1)

    # one green body at hue 117; one green body split between its family's two ends (72 and 163): turned as a
    # whole, its halves land in two families for most targets
    images = torch.cat([body([117.0, 117.0]), body([72.0, 163.0])])
    en, zh = ["A creature.", "A creature."], ["一只生物。", "一只生物。"]
    copies, copies_en, copies_zh, turns = recoloured_copies(images, en, zh, RecolourAugment(copies=6))
    assert bool((turns[:, 0] != 0).all())  # the plain body lands in every other family
    kept = turns[:, 1] == 0
    assert 0 < int(kept.sum()) < 6  # the split one lands in some, not all
    landed = body_colours(copies)
    hues = body_hues(images, body_colours(images))
    for k in range(6):
        for i in range(2):
            if turns[k, i]:
                assert landed[2 * k + i] == hue_family(hues[i] + float(turns[k, i]))
            else:  # the image as it is, with its own caption
                assert torch.equal(copies[2 * k + i], images[i]) and copies_en[2 * k + i] == en[i]


def test_recoloured_images_layout():
    images = torch.cat([pixels((230, 20, 20)), pixels((20, 20, 230))])
    turns = torch.tensor([[120.0, 0.0], [0.0, -120.0]])
    copies = recoloured_images(images, turns, batch_size=3)
    assert copies.shape == (4, 3, 1, 1)
    expected = [rotate_hue(images[0:1], turns[0, :1]), images[1:2], images[0:1], rotate_hue(images[1:2], turns[1, 1:])]
    assert torch.equal(copies, torch.cat(expected))  # copy k of image i at row k * N + i
    with pytest.raises(ValueError, match=r"turns must be \[copies, 2\]"):
        recoloured_images(images, torch.zeros(3))


def test_recolour_settings_are_checked():
    validate_config(RecolourAugment(copies=6, prob=1.0))
    for bad in (RecolourAugment(copies=7), RecolourAugment(copies=-1), RecolourAugment(prob=1.5)):
        with pytest.raises(ConfigError, match=r"recolour\.(copies|prob)"):
            validate_config(bad)


def marked_cache(rows: int, num_images: int, offset: float) -> LatentCache:
    """A cache whose every sample is its row's index + ``offset`` (no posterior noise)."""
    mean = (torch.arange(rows, dtype=torch.float32) + offset)[:, None, None, None].expand(rows, 1, 2, 2).clone()
    return LatentCache(mean, torch.full_like(mean, -200.0), num_images, LatentNormalisation((1.0,)))


def test_batches_swap_in_recoloured_copies_with_their_captions_and_mirrors():
    n, copies = 4, 2
    plain = marked_cache(2 * n, n, 0.0)  # images then mirrors
    recoloured = marked_cache(2 * copies * n, copies * n, 1000.0)  # copies (k * n + i) then their mirrors
    caption_rows = n * (1 + copies)
    states = torch.arange(caption_rows, dtype=torch.float32)[:, None, None, None].expand(caption_rows, 1, 1, 1)
    texts = TextStateCache(states, states, torch.full((1, 1), -1.0))
    rows = torch.arange(2 * n).repeat(300)
    for prob in (0.0, 0.4, 1.0):
        maker = LatentBatchMaker(plain, texts, 0.0, 0.0, 0.0, torch.contiguous_format, recoloured, prob)
        batch = maker(rows, torch.Generator().manual_seed(0))
        latent, caption = batch["latents"][:, 0, 0, 0].round(), batch["context"][:, 0, 0]  # noise ~e-44
        swapped = latent >= 1000
        assert abs(swapped.float().mean().item() - prob) < 0.05
        assert torch.equal(latent[~swapped], rows[~swapped].float())
        assert torch.equal(caption[~swapped], (rows[~swapped] % n).float())
        copy_row = latent[swapped].long() - 1000
        mirrored = copy_row >= copies * n
        assert torch.equal(mirrored, rows[swapped] >= n)  # a mirror takes its copy's mirror
        assert torch.equal(copy_row % n, rows[swapped] % n)  # a copy of the row's own image
        assert torch.equal(caption[swapped].long(), n + copy_row % (copies * n))  # with that copy's caption
        assert torch.equal(batch["image_ids"], rows % n)  # the diversity term still sees the source image
        if prob == 0.4:
            assert len(set(copy_row.tolist())) == 2 * copies * n  # every copy and mirror is drawn
