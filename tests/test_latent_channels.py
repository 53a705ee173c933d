"""benchmarks.latent_channels: its per-channel figures on latents with a known answer, and the command end to end."""

import json
import re

import pytest
import torch

from benchmarks import latent_channels
from benchmarks.latent_channels import channel_statistics, foreground_cells, reconstructed_colours
from diffusion.colour_sentences import body_colours
from engine.stage import StageError
from pipelines.metrics import FAMILY_NAMES
from vae import AutoencoderKL, VAEConfig

RED, BLUE = FAMILY_NAMES.index("red"), FAMILY_NAMES.index("blue")


def test_channel_statistics_of_latents_with_a_known_answer():
    # four images, two channels, 2x2 cells: the top row is foreground, the bottom row the page
    foreground = torch.tensor([[True, True], [False, False]]).repeat(4, 1, 1)
    latents = torch.zeros(4, 2, 2, 2)
    latents[:, 0, 0] = torch.tensor([1.0, 1.2, -1.0, -1.2])[:, None]  # channel 0 tells red from blue
    latents[:, 1, 0] = torch.tensor([0.0, 0.2, 0.0, 0.2])[:, None]  # channel 1 does not
    latents[:, :, 1] = torch.tensor([0.5, -0.25])[:, None]  # the page's value in each channel
    stats = channel_statistics(latents, foreground, [RED, RED, BLUE, BLUE])
    assert stats["page"] == pytest.approx([0.5, -0.25]) and stats["page_cells"] == 8
    assert stats["by_colour"]["red"] == {"images": 2, "body_mean": pytest.approx([1.1, 0.1]),
                                         "body_std": pytest.approx([0.1, 0.1])}
    assert stats["by_colour"]["blue"]["body_mean"] == pytest.approx([-1.1, 0.1])
    # between-colour variance 1.21 over within-colour variance 0.01 in channel 0; none in channel 1
    assert stats["colour_separation"] == pytest.approx([121.0, 0.0])
    every = latents.transpose(0, 1).flatten(1)
    assert stats["mean"] == pytest.approx(every.mean(1).tolist())
    assert stats["std"] == pytest.approx(every.std(1, correction=0).tolist())
    assert stats["colour_spread_global"] == pytest.approx([1.1, 0.0])
    assert stats["colour_spread_per_channel"][0] == pytest.approx(1.1 / stats["std"][0])
    assert stats["neighbour_separation"] == stats["neighbour_separation_pooled"] == {}  # red's are orange and pink
    # the within-colour variance the ratio divides by, 0.01 in both channels; channel 1 has none between the colours
    assert latent_channels.pooled_spread(stats) == pytest.approx([0.1, float("inf")])


def test_neighbour_separation_counts_the_spread_within_each_colour():
    by_colour = {"red": {"body_mean": [1.0, 0.0], "body_std": [0.1, 0.1]},
                 "orange": {"body_mean": [0.0, 0.0], "body_std": [0.1, 0.1]},
                 "pink": {"body_mean": [1.0, 0.3], "body_std": [0.5, 0.5]},
                 "blue": {"body_mean": [-1.0, 0.0], "body_std": [0.1, 0.1]}}
    separation = latent_channels.neighbour_separation(by_colour)
    assert separation.keys() == {"red-orange", "pink-red"}  # blue's neighbours are absent
    assert separation["red-orange"] == pytest.approx(10.0)  # 1.0 apart, spread 0.1 in both
    # 0.3 apart where the two spreads are 0.5 and 0.1: in units of their root-mean-square spread, sqrt(0.13)
    assert separation["pink-red"] == pytest.approx(0.3 / 0.13 ** 0.5)


def test_the_pooled_spread_is_the_colours_mean_within_variance_and_reads_off_an_older_reading():
    torch.manual_seed(0)
    latents = torch.randn(12, 3, 2, 2)
    latents[4:8, 0] += 1.0  # orange apart from red in channel 0
    latents[8:, 1] -= 2.0  # pink apart in channel 1
    foreground = torch.ones(12, 2, 2, dtype=torch.bool)
    family = {name: FAMILY_NAMES.index(name) for name in ("red", "orange", "pink")}
    bodies = [family["red"]] * 4 + [family["orange"]] * 4 + [family["pink"]] * 4
    stats = channel_statistics(latents, foreground, bodies)
    stds = torch.tensor([entry["body_std"] for entry in stats["by_colour"].values()])
    assert latent_channels.pooled_spread(stats) == pytest.approx((stds ** 2).mean(dim=0).sqrt().tolist())
    # with every colour at the pooled spread the two readings agree; a reading without body_std gives the pooled one
    even = {name: {**entry, "body_std": latent_channels.pooled_spread(stats)}
            for name, entry in stats["by_colour"].items()}
    assert latent_channels.neighbour_separation(even) == pytest.approx(stats["neighbour_separation_pooled"])
    assert stats["neighbour_separation_pooled"] != pytest.approx(stats["neighbour_separation"])  # spreads differ
    older = {**stats, "by_colour": {name: {"images": entry["images"], "body_mean": entry["body_mean"]}
                                    for name, entry in stats["by_colour"].items()}}
    assert latent_channels.neighbour_separation(older["by_colour"], latent_channels.pooled_spread(older)) == \
        pytest.approx(stats["neighbour_separation_pooled"])


def test_reread_gives_saved_readings_separations_and_refuses_bad_input(tmp_path, capsys):
    foreground = torch.ones(5, 1, 1, dtype=torch.bool)
    latents = torch.tensor([1.0, 1.2, -1.0, -1.4, 9.0]).reshape(5, 1, 1, 1)
    orange = FAMILY_NAMES.index("orange")
    stats = channel_statistics(latents, foreground, [RED, RED, orange, orange, None])  # no body colour: left out
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    new.write_text(json.dumps({**stats, "fingerprint": "a", "device": "cpu"}))
    stripped = {name: {"images": e["images"], "body_mean": e["body_mean"]} for name, e in stats["by_colour"].items()}
    before_body_std = {k: v for k, v in stats.items() if not k.startswith("neighbour_separation")}
    old.write_text(json.dumps(before_body_std | {"by_colour": stripped}))
    one = tmp_path / "one.json"  # a reading of data with one body colour
    one.write_text(json.dumps({"by_colour": {"red": stats["by_colour"]["red"]}}))
    out = tmp_path / "separation.json"
    result = latent_channels.main(["--reread", str(new), str(old), "--out", str(out)])
    assert json.loads(out.read_text()) == result
    first, second = result["readings"]
    # red 1.1 (spread 0.1), orange -1.2 (spread 0.2): 2.3 apart in the pooled spread sqrt((0.01 + 0.04) / 2)
    assert first["neighbour_separation_pooled"] == second["neighbour_separation_pooled"] == pytest.approx(
        {"red-orange": 2.3 / 0.025 ** 0.5})
    assert first["neighbour_separation"] == stats["neighbour_separation"] and second["neighbour_separation"] is None
    assert "each pair's spread not recorded" in capsys.readouterr().out
    for argv, message in ((["--reread", str(new), "--vae", "x"], "pass it without --vae and --data"),
                          (["--reread", str(tmp_path / "missing.json")], "as a latent_channels reading"),
                          (["--reread", str(new), str(out)], "is no latent_channels reading (it has no by_colour)"),
                          (["--reread", str(one)], "has no colour_separation (fewer than two body colours)"),
                          (["--data", "shapes:40"], "pass --vae (a finished VAE stage) and --data")):
        with pytest.raises(StageError, match=re.escape(message)):
            latent_channels.main(argv)
        assert capsys.readouterr().out == ""  # checked before any reading is read out


def test_foreground_and_page_cells_of_an_image():
    image = torch.full((1, 3, 16, 16), 255, dtype=torch.uint8)
    image[:, :, 2, 3] = 0  # one dark pixel in the top-left 8x8 cell
    foreground = foreground_cells(image, 8)
    page = ~foreground
    assert foreground[0].tolist() == [[True, False], [False, False]]
    assert page[0].tolist() == [[False, True], [True, True]]


def body_on_white(rgb: tuple[int, int, int], count: int) -> torch.Tensor:
    """``count`` white 32 px images (uint8) with one 16 px square of colour ``rgb``."""
    images = torch.full((count, 3, 32, 32), 255, dtype=torch.uint8)
    images[:, :, 8:24, 8:24] = torch.tensor(rgb, dtype=torch.uint8)[:, None, None]
    return images


def test_reconstructed_colours_name_a_shifted_and_a_faded_body():
    red, blue = body_on_white((255, 0, 0), 3), body_on_white((0, 0, 255), 2)
    originals = torch.cat([red, blue, body_on_white((128, 128, 128), 1)])  # a grey body has no body colour
    bodies = body_colours(originals)
    kept = reconstructed_colours(originals, originals.clone(), bodies)
    assert set(kept) == {"red", "blue"}
    assert kept["red"] == {"images": 3, "kept": 1.0, "became": {}, "hue_shift": pytest.approx(0.0, abs=1e-6),
                           "chromatic_share": [1.0, 1.0]}
    # red drawn orange (hue 0 -> 60 * 100 / 255 = 23.5 degrees), blue faded to grey-blue (chroma 0.1 < 0.2)
    back = torch.cat([body_on_white((255, 100, 0), 3), body_on_white((200, 200, 225), 2), originals[-1:]])
    shifted = reconstructed_colours(originals, back, bodies)
    assert shifted["red"]["kept"] == 0.0 and shifted["red"]["became"] == {"orange": 3}
    assert shifted["red"]["hue_shift"] == pytest.approx(60 * 100 / 255, abs=0.5)
    assert shifted["blue"]["became"] == {"none": 2} and shifted["blue"]["hue_shift"] is None
    assert shifted["blue"]["chromatic_share"] == [1.0, 0.0]


def test_reconstructed_hue_shift_is_circular_across_red():
    # hue 360 - 60 * 40 / 255 = 350.6 (red, just below 0) back at 9.4: 18.8 degrees towards orange, not -341
    originals, back = body_on_white((255, 0, 40), 2), body_on_white((255, 40, 0), 2)
    assert reconstructed_colours(originals, back, body_colours(originals))["red"]["hue_shift"] == pytest.approx(
        2 * 60 * 40 / 255, abs=0.5)
    assert reconstructed_colours(back, originals, body_colours(back))["red"]["hue_shift"] == pytest.approx(
        -2 * 60 * 40 / 255, abs=0.5)


def test_the_command_reads_a_vae_stage(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(base_channels=8, channel_mult=(1, 2), norm_groups=4, scaling_factor=0.7))
    vae.save(tmp_path / "vae", trained_on={"data": "shapes"})
    out = tmp_path / "channels.json"
    result = latent_channels.main(["--vae", str(tmp_path / "vae"), "--data", "shapes:40", "--size", "32",
                                   "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["std"] == pytest.approx(result["std"])
    assert result["channels"] == 4 and result["scaling_factor"] == 0.7 and result["images"] > 0
    colours = result["reconstructed_colours"]  # the shapes' body colours, through an untrained decoder
    assert {name: colours[name]["images"] for name in result["by_colour"]} == {
        name: entry["images"] for name, entry in result["by_colour"].items()}
    assert min(entry["kept"] for entry in colours.values()) < 1  # random weights do not give the colours back
    AutoencoderKL(VAEConfig(base_channels=8, channel_mult=(1, 2), norm_groups=4)).save(
        tmp_path / "raw", trained_on={"data": "shapes"})
    with pytest.raises(StageError, match="has no scaling_factor; pass a finished VAE stage"):  # an unfinished stage
        latent_channels.main(["--vae", str(tmp_path / "raw"), "--data", "shapes:40", "--size", "32"])
