"""Generate images from a trained stack.

    python -m pipelines.generate --run runs/NAME --prompt "a red dragon" --prompt "一只蓝色的鸟"
    python -m pipelines.generate --run runs/NAME --prompt "a blue version" --init-image in.png --strength 0.6
    python -m pipelines.generate --run runs/NAME --prompt "a pokemon with wings" --body-colour red
    python -m pipelines.generate --run runs/B --clip runs/A/clip --prompt "..."   # swap one stage
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from clip.tokenizer import BPETokenizer
from data.captions import to_rgb
from diffusion.colour_sentences import with_body_colour
from engine.cli import check_counts
from engine.errors import UserError, add_debug_flag, run_cli
from engine.images import save_grid, to_pil

from .metrics import FAMILY_NAMES
from .stages import add_stage_arguments, generation_size, load_stack, sampling_size, stack_infos
from .text_to_image import (SIZE_HELP, add_sampling_arguments, generate, pil_to_tensor, sampling_settings,
                            save_images, saved_images)

DEFAULT_STRENGTH = 0.6
GRID_FILE = "grid.png"


def read_init_image(path: Path | None, strength: float | None) -> Image.Image | None:
    """The ``--init-image`` picture, decoded as the training images are (``to_rgb``); ``--strength`` must go with
    it and lie in (0, 1]."""
    if strength is not None and not 0.0 < strength <= 1.0:
        raise UserError(f"--strength must be in (0, 1] (near 0 keeps the init image, 1 ignores it), got {strength}")
    if path is None:
        if strength is not None:
            raise UserError("--strength applies to image-to-image only; add --init-image PICTURE or drop --strength")
        return None
    if path.is_dir():
        raise UserError(f"--init-image {path} is a folder; pass one picture file (png, jpg, ...)")
    if not path.is_file():
        raise UserError(f"--init-image {path} does not exist; pass the path of a picture file")
    try:
        image = Image.open(path)
        image.load()
        return to_rgb(image)  # upright, 16-bit scaled, transparency on white: as the training images
    except Image.DecompressionBombError as err:  # PIL refuses to decode it at all; no traceback for that
        raise UserError(f"--init-image {path} is too large to decode safely ({err}); pass a downscaled copy "
                        "(it is resized to the sampling size anyway)") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"--init-image {path} is not a readable picture ({err}); pass a png, jpg or webp file") from None


def earlier_outputs(out: Path) -> list[Path]:
    """The images and grid an earlier generate left in ``out``: this one replaces them all, so that new images
    never sit beside stale ones of another prompt or count as if one set. Nothing else in ``out`` is touched;
    an ``out`` that is a file is refused."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder to write the images into (created if missing)")
    return saved_images(out) + [path for path in [out / GRID_FILE] if path.is_file()]


def check_prompts(prompts: Sequence[str], tokenizer: BPETokenizer, negative_prompt: str) -> None:
    """Say what happens to an empty prompt and to one longer than the text encoder's context."""
    for prompt in prompts:
        if not prompt.strip():
            print("note: an empty --prompt samples unconditionally (no text guides the image)"
                  if not negative_prompt.strip() else
                  "note: an empty --prompt is guided only away from the --negative-prompt", flush=True)
            continue
        dropped = tokenizer.dropped_tokens(prompt)
        if dropped:
            warnings.warn(f"the prompt {prompt[:40]!r}... is longer than the text encoder's context of "
                          f"{tokenizer.context_length - 2} tokens: its last {dropped} tokens are dropped", stacklevel=2)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m pipelines.generate", description="text->image / image->image",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_debug_flag(parser)
    add_stage_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--body-colour", choices=FAMILY_NAMES,
                        help="end every prompt with the sentence naming its body's colour, as the UNet's training "
                             "captions end (\"Its body is mostly red.\" / \"它的身体主要是红色。\"), in the prompt's "
                             "language; a prompt too long for the text encoder with it loses its last clauses")
    parser.add_argument("--num-images", type=int, default=1,
                        help="images per prompt; the images take seeds --seed, --seed + 1, ... in order, across "
                             "the prompts")
    parser.add_argument("--seed", type=int, default=0)
    add_sampling_arguments(parser)
    parser.add_argument("--size", type=int, help=f"{SIZE_HELP} (default: the UNet's training resolution)")
    parser.add_argument("--init-image", type=Path, help="image-to-image: start from this picture")
    parser.add_argument("--strength", type=float, help="image-to-image, in (0, 1]: near 0 keeps the init, 1 ignores it "
                        f"(default {DEFAULT_STRENGTH})")
    parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                        help="run the UNet eagerly instead of replaying a CUDA graph (CUDA only; for debugging)")
    parser.add_argument("--compile", dest="compile_unet", action="store_true",
                        help="torch.compile the UNet: ~1.5x the images/s after about a minute of compiling per batch "
                             "shape (pays for thousands of images, not for a few)")
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    parser.add_argument("--device")
    args = parser.parse_args(argv)
    check_counts(args, "--num-images")
    init_image = read_init_image(args.init_image, args.strength)
    earlier = earlier_outputs(args.out)

    infos = stack_infos(args.run, vae=args.vae, clip=args.clip, unet=args.unet)  # config files: checked before weights
    size = sampling_size(args.size, infos["vae"].model, infos["unet"].model, generation_size(infos))
    settings = sampling_settings(args, size=size, negative_prompt=args.negative_prompt,
                                 cuda_graph=args.cuda_graph, compile_unet=args.compile_unet)
    stack = load_stack(args.run, vae=args.vae, clip=args.clip, unet=args.unet, device=args.device)
    tokenizer = stack.clip.tokenizer
    asked = [with_body_colour(p, args.body_colour, fits=tokenizer.fits) if args.body_colour else p
             for p in args.prompt]
    check_prompts(asked, tokenizer, args.negative_prompt)
    prompts = [p for p in asked for _ in range(args.num_images)]
    seeds = [args.seed + i for i in range(len(prompts))]
    init, strength = None, 1.0
    if init_image is not None:
        init = pil_to_tensor(init_image, size)[None].expand(len(prompts), -1, -1, -1)
        strength = DEFAULT_STRENGTH if args.strength is None else args.strength
    images = generate(stack, prompts, seeds, settings, init_images=init, strength=strength)
    if earlier:  # only once the new images exist: a failed run leaves the old ones
        print(f"replacing the {len(earlier)} files an earlier generate wrote into {args.out}")
        for path in earlier:
            path.unlink(missing_ok=True)
    paths = save_images(to_pil(images), args.out)
    paths.append(save_grid(images, args.out / GRID_FILE, nrow=args.num_images))
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    run_cli(main)
