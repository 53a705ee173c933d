import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from data import DataError, language_mask, load_captions, split_indices
from data.augment import random_crop, random_flip, random_resized_crop, to_float
from data.captions import square_resize

SHARED_POKEMON = Path(__file__).resolve().parents[2] / "shared" / "pokemon"


def make_imagefolder(root: Path, count: int = 12, size: int = 40) -> Path:
    (root / "images").mkdir(parents=True)
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as fh:
        for i in range(count):
            Image.new("RGB", (size, size + 8 * (i % 2)), (20 * i, 100, 200)).save(root / "images" / f"{i:04d}.jpg")
            fh.write(json.dumps({"file_name": f"images/{i:04d}.jpg", "en_text": f"thing {i}",
                                 "zh_text": f"东西 {i}"}, ensure_ascii=False) + "\n")
    return root


def test_local_imagefolder_loads_squares_with_both_captions(tmp_path):
    ds = load_captions(make_imagefolder(tmp_path / "set"), resolution=16)
    assert ds.images.shape == (12, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert ds.en[3] == "thing 3" and ds.zh[3] == "东西 3"
    assert abs(int(ds.images[5, 0].float().mean()) - 100) <= 3  # red channel of image 5 is 20 * 5


def test_the_captions_have_a_fingerprint_of_their_own_and_a_stage_that_learnt_others_differs(tmp_path):
    from clip.config import PRESETS, CLIPTrainConfig
    from engine import build_config
    from engine.stage import lineage_differences
    from pipelines.stages import asked_inputs

    folder = make_imagefolder(tmp_path / "set")
    cfg = build_config(CLIPTrainConfig, PRESETS, "tiny", {})
    before = load_captions(folder, resolution=16)
    recorded = {name: fingerprint for name, (fingerprint, _) in asked_inputs("clip", cfg, str(folder), {}, {}).items()}
    assert set(recorded) == {"data", "captions"}  # a stage that learns from the text records it
    lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    (folder / "metadata.jsonl").write_text("\n".join([lines[0].replace("thing 0", "a thing")] + lines[1:]) + "\n",
                                           encoding="utf-8")  # a caption fixed, the images as they were
    after = load_captions(folder, resolution=16)
    assert after.fingerprint == before.fingerprint  # the same images: the decoded cache and latents still fit
    assert after.captions_fingerprint != before.captions_fingerprint
    # the text alone: the same at every resolution
    assert after.captions_fingerprint == load_captions(folder, resolution=8).captions_fingerprint
    assert lineage_differences(recorded, asked_inputs("clip", cfg, str(folder), {}, {})) == [
        f"it was trained on other captions than --data {folder}"]


def test_split_is_index_mod_10():
    train, val = split_indices(833)
    assert len(val) == 83 and len(train) == 750
    assert (val % 10 == 9).all() and not (train % 10 == 9).any()


def test_subsets_follow_the_split(tmp_path):
    ds = load_captions(make_imagefolder(tmp_path / "set", count=25), resolution=8)
    val = ds.subset("val")
    assert val.en == ["thing 9", "thing 19"] and len(ds.subset("train")) == 23
    assert val.fingerprint != ds.subset("train").fingerprint


def test_cache_skips_decoding_and_tracks_file_contents(tmp_path, monkeypatch):
    folder = make_imagefolder(tmp_path / "set")
    first = load_captions(folder, 16, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    import data.captions as captions
    monkeypatch.setattr(captions, "_decode_all", lambda *a: pytest.fail("decoded again despite the cache"))
    again = load_captions(folder, 16, cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, again.images) and first.fingerprint == again.fingerprint
    monkeypatch.undo()
    Image.new("RGB", (40, 40), (0, 0, 0)).save(folder / "images" / "0000.jpg")  # contents change -> new key
    changed = load_captions(folder, 16, cache_dir=tmp_path / "cache")
    assert changed.fingerprint != first.fingerprint and changed.images[0].float().mean() < 10


def test_shapes_are_deterministic_and_bilingual():
    a, b = load_captions("shapes:12", 32), load_captions("shapes:12", 32)
    assert torch.equal(a.images, b.images)
    assert a.en[0] == "a red circle" and a.zh[0] == "一个红色的圆形" and a.en[6] == "a red square"
    assert a.en[5] == "an orange circle"
    red = a.images[0].float()
    assert (red[0] > 200).any() and (red[1] < 60).any() and (red == 255).all(0).any()  # red shape on white


def load_one(folder: Path, image: Image.Image, name: str, resolution: int, **save) -> torch.Tensor:
    """Save ``image`` as the only row of an imagefolder and return what the loader makes of it: uint8 [3, R, R]."""
    folder.mkdir(parents=True)
    image.save(folder / name, **save)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": name, "en_text": "x", "zh_text": "x"}))
    return load_captions(folder, resolution, cache_dir=folder / "cache").images[0]


def transparent_square(mode: str) -> Image.Image:
    """16x16 picture: an opaque square in the middle on a fully transparent black background."""
    if mode == "P":  # palette entry 0 is the transparent black, entry 1 the red
        image = Image.new("P", (16, 16), 0)
        image.putpalette([0, 0, 0, 220, 30, 30])
        image.paste(1, (4, 4, 12, 12))
        image.info["transparency"] = 0
        return image
    image = Image.new(mode, (16, 16), (0,) * len(mode))
    image.paste((220, 30, 30, 255) if mode == "RGBA" else (128, 255), (4, 4, 12, 12))
    return image


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_background_loads_as_white(tmp_path, mode):
    pixels = load_one(tmp_path / "set", transparent_square(mode), "a.png", 16)
    assert pixels[:, 0, 0].tolist() == [255, 255, 255] and pixels[:, 15, 15].tolist() == [255, 255, 255]
    assert pixels[:, 8, 8].tolist() == ([128] * 3 if mode == "LA" else [220, 30, 30])  # opaque pixels kept


def test_hub_rows_decode_like_local_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")  # the hub path only; the GPU machine has no datasets
    rows = {"image": [transparent_square("RGBA")], "en_text": ["x"], "zh_text": ["x"]}
    features = datasets.Features({"image": datasets.Image(), "en_text": datasets.Value("string"),
                                  "zh_text": datasets.Value("string")})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(rows, features=features))
    pixels = load_captions("nobody-here/offline-set", 16, cache_dir=tmp_path).images[0]
    assert pixels[:, 0, 0].tolist() == [255, 255, 255] and pixels[:, 8, 8].tolist() == [220, 30, 30]


def test_16_bit_grey_is_scaled_to_8_bit(tmp_path):
    pixels = load_one(tmp_path / "set", Image.new("I;16", (16, 16), 32768), "grey.png", 16)  # half of 65535
    assert (pixels.int() - 128).abs().max() <= 1


def test_exif_rotated_jpeg_loads_upright(tmp_path):
    stored = Image.new("RGB", (32, 32), (255, 255, 255))
    stored.paste((220, 30, 30), (0, 0, 16, 32))  # red left half, stored sideways
    exif = stored.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view, which puts the left half on top
    pixels = load_one(tmp_path / "set", stored, "photo.jpg", 32, exif=exif, quality=95).int()
    assert pixels[0, 4, 24] > 180 and pixels[1, 4, 24] < 80  # top right is red
    assert (pixels[:, 27, 4] > 200).all()  # bottom left is white


def test_rgb_jpeg_decodes_exactly_as_plain_convert(tmp_path):
    noise = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image = Image.frombytes("RGB", (48, 40), bytes(noise.flatten().tolist()))  # noise: any change to the pixels shows
    pixels = load_one(tmp_path / "set", image, "plain.jpg", 16, quality=90)
    assert torch.equal(pixels, square_resize(Image.open(tmp_path / "set" / "plain.jpg").convert("RGB"), 16))


@pytest.mark.parametrize("source", ["shapes:abc", "shapes:0", "shapes:-5", "shapes:9", "shapes:"])
def test_bad_shapes_count_names_the_fix(source):
    with pytest.raises(DataError, match=rf"shapes:N takes a whole number N >= 10 .*got '{source[7:]}'"):
        load_captions(source, 16)


@pytest.mark.parametrize("breakage, message", [
    ("missing_folder", "does not exist"),
    ("no_metadata", "no metadata.jsonl"),
    ("missing_image", "0003.jpg is missing"),
    ("corrupt_image", "row 2 .*cannot decode"),
    ("empty_caption", "row 4 .*empty or missing zh_text"),
    ("bad_json", "metadata.jsonl:2: not valid JSON"),
    ("empty", "no rows"),
])
def test_bad_input_names_the_problem(tmp_path, breakage, message):
    folder = make_imagefolder(tmp_path / "set", count=6)
    if breakage == "missing_folder":
        folder = tmp_path / "nowhere"
    elif breakage == "no_metadata":
        (folder / "metadata.jsonl").unlink()
    elif breakage == "missing_image":
        (folder / "images" / "0003.jpg").unlink()
    elif breakage == "corrupt_image":
        (folder / "images" / "0002.jpg").write_bytes(b"not a jpeg at all")
    else:
        lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
        if breakage == "empty_caption":
            row = json.loads(lines[4])
            row["zh_text"] = " "
            lines[4] = json.dumps(row)
        elif breakage == "bad_json":
            lines[1] = "{oops"
        else:
            lines = []
        (folder / "metadata.jsonl").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_captions(folder, 16)


def test_offline_hub_id_says_to_pass_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The libraries read those variables once, on import: a suite that imported them already would otherwise try
    # the network, five retries and 24 s on a machine without one, before the same error.
    for module, name in (("datasets.config", "HF_DATASETS_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                         ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        if module in sys.modules:
            monkeypatch.setattr(sys.modules[module], name, True, raising=False)
    with pytest.raises(DataError, match="pass a local folder"):
        load_captions("nobody-here/no-such-dataset-xyz", 16)


def test_gpu_style_augmentations_keep_content():
    g = torch.Generator().manual_seed(0)
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    flipped = random_flip(images, g, p=1.0)
    assert torch.equal(flipped, images.flip(-1))
    crops = random_crop(images, 4, g)
    assert crops.shape == (2, 3, 4, 4)
    for b in range(2):  # every crop is a contiguous window of its own image
        top = int((crops[b, 0, 0, 0] - images[b, 0, 0, 0]) // 8)
        left = int((crops[b, 0, 0, 0] - images[b, 0, 0, 0]) % 8)
        assert torch.equal(crops[b], images[b, :, top:top + 4, left:left + 4])
    full = random_resized_crop(to_float(torch.full((2, 3, 16, 16), 255, dtype=torch.uint8)), 8, (0.5, 1.0), g)
    assert full.shape == (2, 3, 8, 8) and torch.allclose(full, torch.ones_like(full))
    assert language_mask(10_000, 0.3, torch.Generator().manual_seed(0)).float().mean().item() == pytest.approx(0.3, abs=0.02)


@pytest.mark.skipif(not SHARED_POKEMON.is_dir(), reason="needs ../shared/pokemon")
def test_shared_pokemon_folder_reads(tmp_path):
    ds = load_captions(SHARED_POKEMON, resolution=16, cache_dir=tmp_path)
    assert len(ds) == 833 and len(ds.subset("val")) == 83
    assert ds.en[0].startswith("A cheerful Bulbasaur") and ds.zh[0]
