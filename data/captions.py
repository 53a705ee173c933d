"""Loading the captions set: a local ``imagefolder``, the hub dataset, or the built-in shapes.

Images are decoded once into a uint8 tensor ``[N, 3, R, R]`` and cached on disk, keyed by the source,
the resolution and the files' contents, so later runs and epochs never touch JPEG decoding again.

The split is fixed: row ``i`` is validation when ``i % 10 == 9`` (83 of the 833 Pokémon rows), every
other row trains. Every stage and every metric uses it through ``CaptionSet.subset``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from engine.errors import UserError

from .shapes import make_shapes

HUB_DATASET = "svjack/pokemon-blip-captions-en-zh"
CACHE_VERSION = "1"  # part of every data fingerprint: bumping it would orphan every trained stage's data check
DECODE_VERSION = "2"  # in the cache file name only: bump when decoding changes, so stale caches are rebuilt
MIN_ROWS = 10  # the fixed split's first validation row is row 9


class DataError(UserError):
    """A data source that cannot be used as it is: names the file or row and the fix."""


def texts_fingerprint(en: list[str], zh: list[str]) -> str:
    """Identifies a list of English and Chinese captions, in order."""
    digest = hashlib.sha256()
    for text in (*en, *zh):
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SCRATCH_DIFFUSION_CACHE", Path.home() / ".cache" / "scratch-diffusion"))


def split_indices(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, validation rows): validation is every row with ``index % 10 == 9``."""
    rows = torch.arange(count)
    return rows[rows % 10 != 9], rows[rows % 10 == 9]


@dataclass
class CaptionSet:
    """Images with one English and one Chinese caption each."""

    images: torch.Tensor  # uint8 [N, 3, R, R]
    en: list[str]
    zh: list[str]
    rows: torch.Tensor  # row numbers in the full source (the split is defined on them)
    source: str
    fingerprint: str  # identifies the images + resolution (the captions: captions_fingerprint)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def captions_fingerprint(self) -> str:
        """Identifies the captions (``fingerprint`` is the images' and the resolution's): what a stage that learns
        from the text was trained on, beside the images."""
        return texts_fingerprint(self.en, self.zh)

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    def subset(self, split: str) -> "CaptionSet":
        """``"train"``, ``"val"`` or ``"all"`` rows of the fixed split."""
        if split == "all":
            return self
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got '{split}'")
        keep = (self.rows % 10 == 9) if split == "val" else (self.rows % 10 != 9)
        picked = keep.nonzero().flatten()
        if len(picked) == 0:
            raise DataError(f"the {split} split of {self.source} is empty ({len(self)} rows); "
                            f"the split needs at least {MIN_ROWS} rows")
        index = picked.tolist()
        return CaptionSet(self.images[picked], [self.en[i] for i in index], [self.zh[i] for i in index],
                          self.rows[picked], self.source, f"{self.fingerprint}:{split}")


def load_captions(source: str | os.PathLike, resolution: int = 512, cache_dir: str | Path | None = None) -> CaptionSet:
    """Load ``source``: a local folder with ``metadata.jsonl``, ``"shapes"`` / ``"shapes:N"``, or a hub id.

    A local folder follows the Hugging Face ``imagefolder`` layout (``metadata.jsonl`` lines with
    ``file_name``, ``en_text``, ``zh_text``), which is how ``../shared/pokemon`` is stored.
    """
    if resolution < 8 or resolution % 8:
        raise DataError(f"resolution must be a positive multiple of 8, got {resolution}")
    source = str(source)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if source == "shapes" or source.startswith("shapes:"):
        text = source.split(":", 1)[1] if ":" in source else "200"
        if not re.fullmatch(r"[0-9]+", text) or int(text) < MIN_ROWS:
            raise DataError(f"--data shapes:N takes a whole number N >= {MIN_ROWS} (the split needs {MIN_ROWS} rows), "
                            f"got '{text}'; e.g. --data shapes:200")
        count = int(text)
        images, en, zh = make_shapes(count, resolution)
        return CaptionSet(images, en, zh, torch.arange(count), source, f"shapes-{count}-{resolution}")
    path = Path(source).expanduser()
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return _load_local(path, resolution, cache_dir)
    return _load_hub(source, resolution, cache_dir)


def _check_captions(en: list, zh: list, where: list[str]) -> None:
    for i, (e, z) in enumerate(zip(en, zh)):
        for name, text in (("en_text", e), ("zh_text", z)):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where[i]}: empty or missing {name}; every image needs an English and a "
                                "Chinese caption (fix the row or remove it)")
    if not en:
        raise DataError("the data source has no rows; point --data at a folder with images and metadata.jsonl")


def _load_local(folder: Path, resolution: int, cache_dir: Path) -> CaptionSet:
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist; pass --data with a folder holding metadata.jsonl "
                        f"and its images (e.g. ../shared/pokemon), the hub id {HUB_DATASET}, or 'shapes'")
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(f"{folder} has no metadata.jsonl; an imagefolder needs one JSON line per image with "
                        "file_name, en_text and zh_text")
    rows = []
    for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{meta}:{number}: not valid JSON ({err.msg}); fix or remove that line") from None
        if "file_name" not in row:
            raise DataError(f"{meta}:{number}: no file_name; each line names its image")
        rows.append(row)
    where = [f"{meta.name} row {i} ({r['file_name']})" for i, r in enumerate(rows)]
    en = [r.get("en_text") for r in rows]
    zh = [r.get("zh_text") for r in rows]
    _check_captions(en, zh, where)
    files = [folder / r["file_name"] for r in rows]
    for file, place in zip(files, where):
        if not file.is_file():
            raise DataError(f"{place}: image file {file} is missing; restore it or remove its metadata line")

    digest = hashlib.sha256(f"{CACHE_VERSION}:local:{resolution}".encode())
    for file in files:
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    key = digest.hexdigest()[:20]
    images = _cached(cache_dir, key, lambda: _decode_all([lambda f=f: Image.open(f) for f in files], where, resolution))
    return CaptionSet(images, en, zh, torch.arange(len(rows)), str(folder), key)


def _load_hub(hub_id: str, resolution: int, cache_dir: Path) -> CaptionSet:
    try:
        import datasets
        table = datasets.load_dataset(hub_id, split="train")
    except Exception as err:  # offline, unknown id, no access: all need the same advice
        raise DataError(f"there is no local folder '{hub_id}', and loading it as a hub dataset failed "
                        f"({type(err).__name__}: {err}). Without network access pass a local folder instead, "
                        "e.g. --data ../shared/pokemon") from None
    missing = {"image", "en_text", "zh_text"} - set(table.column_names)
    if missing:
        raise DataError(f"hub dataset '{hub_id}' lacks columns {sorted(missing)}; it needs image, en_text, zh_text")
    en, zh = list(table["en_text"]), list(table["zh_text"])
    where = [f"{hub_id} row {i}" for i in range(len(en))]
    _check_captions(en, zh, where)
    key = hashlib.sha256(f"{CACHE_VERSION}:hub:{hub_id}:{table._fingerprint}:{resolution}".encode()).hexdigest()[:20]
    images = _cached(cache_dir, key, lambda: _decode_all([lambda i=i: table[i]["image"] for i in range(len(en))],
                                                         where, resolution))
    return CaptionSet(images, en, zh, torch.arange(len(en)), hub_id, key)


def _cached(cache_dir: Path, key: str, decode) -> torch.Tensor:
    """Load the decoded tensor for ``key`` from the cache, or decode and store it (atomically)."""
    path = cache_dir / f"images-{key}-d{DECODE_VERSION}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["images"]
        except Exception:  # a corrupt cache file is rebuilt, never trusted
            path.unlink(missing_ok=True)
    images = decode()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({"images": images}, str(tmp))
    os.replace(tmp, path)
    return images


def _decode_all(openers: list, where: list[str], resolution: int) -> torch.Tensor:
    """Decode every image (threads: PIL releases the GIL while decoding) to uint8 [N, 3, R, R]."""
    def decode(i: int) -> torch.Tensor:
        try:
            image = openers[i]()
            image.load()
            image = to_rgb(image)
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataError(f"{where[i]}: cannot decode the image ({err}); replace the file or remove its row") from None
        return square_resize(image, resolution)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return torch.stack(list(pool.map(decode, range(len(openers)))))


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as upright 8-bit RGB: EXIF orientation applied, 16-bit scaled, transparency composited on white."""
    image = ImageOps.exif_transpose(image)  # phone photos store pixels sideways plus an Orientation tag
    if image.mode.startswith("I"):  # 16/32-bit grey: convert() clips to 255 instead of scaling, so 50 % came out white
        image = image.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
    if image.has_transparency_data:  # convert() drops alpha and keeps the (usually black) colour beneath it
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")  # a plain RGB image (every Pokémon JPEG) passes through unchanged


def square_resize(image: Image.Image, resolution: int) -> torch.Tensor:
    """Centre-crop to a square, resize (Lanczos) to ``resolution``, return uint8 [3, R, R]."""
    w, h = image.size
    side = min(w, h)
    if w != h:
        image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.LANCZOS)
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3).permute(2, 0, 1).contiguous()


def language_mask(count: int, zh_prob: float, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [count]: True where a sample takes its Chinese caption (probability ``zh_prob``)."""
    return torch.rand(count, device=device, generator=generator) < zh_prob


# Clause boundaries: English commas/semicolons/sentence ends, Chinese full-width commas, enumeration and
# sentence marks. A clause keeps its own punctuation-free text; variants are re-joined with the language's comma.
_CLAUSE_SPLIT = re.compile(r"\s*[,;.!]\s+|\s*[，；。！、]\s*")


def split_clauses(caption: str) -> list[str]:
    """The caption's clauses, in order, without their separators (empty pieces dropped)."""
    return [c.strip(" .。") for c in _CLAUSE_SPLIT.split(caption.strip()) if c.strip(" .。")]


def is_chinese(text: str) -> bool:
    """Whether ``text`` has a CJK ideograph: the captions' Chinese side (an English one may have "é")."""
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def clause_prefixes(caption: str) -> list[str]:
    """The caption cut short at each clause boundary, longest first, each ended as a sentence ("." or "。").
    A boundary is also a comma between adjectives, so a prefix may end on one ("its large.")."""
    stop = "。" if is_chinese(caption) else "."
    cuts = [m.start() for m in _CLAUSE_SPLIT.finditer(caption)
            if caption[:m.start()].strip(" .。") and caption[m.end():].strip(" .。")]  # a clause on each side
    return [caption[:cut].rstrip() + stop for cut in reversed(cuts)]


def clause_variants(caption: str, count: int, keep_prob: float, generator: torch.Generator,
                    keep_last: bool = False) -> list[str]:
    """``count`` shortened variants of a caption: each keeps every clause with probability ``keep_prob`` (at
    least one), in the original order; with ``keep_last``, the last clause is in every variant (a sentence the
    stage appended, such as the colour sentence of ``diffusion.colour_sentences``).

    The long captions name the Pokémon and many details, so each is nearly unique to its image: a unique
    caption acts like a class label for one picture, which is what a small set gets memorised by. Dropping
    clauses makes several images share shorter descriptions and ties words, not whole captions, to pictures.
    """
    clauses = split_clauses(caption)
    joiner = "，" if is_chinese(caption) else ", "
    variants = []
    for _ in range(count):
        keep = torch.rand(len(clauses), generator=generator) < keep_prob
        if keep_last and len(clauses):
            keep[-1] = True
        if len(clauses) and not bool(keep.any()):
            keep[int(torch.randint(len(clauses), (1,), generator=generator))] = True
        variants.append(joiner.join(c for c, k in zip(clauses, keep.tolist()) if k) or caption)
    return variants
