"""Generate images from a trained stack.

    python -m pipelines.generate --run runs/NAME --prompt "a red dragon" --prompt "一只蓝色的鸟"
    python -m pipelines.generate --run runs/NAME --prompt "a blue version" --init-image in.png --strength 0.6
    python -m pipelines.generate --run runs/B --clip runs/A/clip --prompt "..."   # swap one stage
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from PIL import Image

from engine.images import save_grid, to_pil
from engine.errors import run_cli

from .stages import load_stack
from .text_to_image import GenerationSettings, generate, pil_to_tensor, save_images


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m pipelines.generate", description="text->image / image->image",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--run", type=Path, help="run folder with vae/, clip/, unet/")
    parser.add_argument("--vae", type=Path, help="use this VAE stage folder instead of the run's")
    parser.add_argument("--clip", type=Path, help="use this CLIP stage folder instead of the run's")
    parser.add_argument("--unet", type=Path, help="use this UNet stage folder instead of the run's")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (consecutive seeds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default="dpmpp_2m", choices=["ddim", "ddpm", "dpmpp_2m"])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    parser.add_argument("--size", type=int, help="multiple of 8 (default: the VAE's training resolution)")
    parser.add_argument("--init-image", type=Path, help="image-to-image: start from this picture")
    parser.add_argument("--strength", type=float, default=0.6, help="image-to-image: 0 keeps the init, 1 ignores it")
    parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                        help="run the UNet eagerly instead of replaying a CUDA graph (CUDA only; for debugging)")
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    parser.add_argument("--device")
    args = parser.parse_args(argv)

    stack = load_stack(args.run, vae=args.vae, clip=args.clip, unet=args.unet, device=args.device)
    size = args.size or stack.image_size
    settings = GenerationSettings(guidance_scale=args.guidance, steps=args.steps, sampler=args.sampler, eta=args.eta,
                                  size=size, negative_prompt=args.negative_prompt,
                                  cuda_graph=args.cuda_graph)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    seeds = [args.seed + i for i in range(len(prompts))]
    init, strength = None, 1.0
    if args.init_image is not None:
        if not args.init_image.is_file():
            parser.error(f"--init-image {args.init_image} does not exist")
        init = pil_to_tensor(Image.open(args.init_image), size)[None].expand(len(prompts), -1, -1, -1)
        strength = args.strength
    images = generate(stack, prompts, seeds, settings, init_images=init, strength=strength)
    paths = save_images(to_pil(images), args.out)
    paths.append(save_grid(images, args.out / "grid.png", nrow=max(1, args.num_images)))
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    run_cli(main)
