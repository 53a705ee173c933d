"""The fixed prompt lists: the one place the training grid, the final samples, the swap-study pictures and the
benchmarks take their prompts from, so pictures of different runs and tools stay comparable."""

from __future__ import annotations

# The UNet stage's per-epoch sample grid (a few validation captions are appended to them); also the
# benchmarks' prompts.
GRID_PROMPTS = (
    "a cartoon drawing of a red pokemon with wings",
    "a blue water pokemon with big eyes",
    "一只绿色的卡通宝可梦",
    "一只黄色的小老鼠，红色的脸颊",
)

# train_all's final samples and pipelines.compare's default prompts, in both languages.
SHOWCASE_PROMPTS = (
    "a red and white pokemon with big eyes",
    "a blue water pokemon with a round body",
    "a green plant pokemon with leaves",
    "a yellow electric mouse pokemon",
    "一只红色的火焰宝可梦",
    "一只蓝色的鸟宝可梦",
)
SHOWCASE_SEEDS = 4  # seeds 0..3 of every showcase prompt (pipelines.text_to_image.draw_showcase)

# One prompt per colour, sampled from one seed at several guidance scales: does the colour follow the text?
COLOUR_PROMPTS = ("a red pokemon", "a blue pokemon", "a green pokemon", "a yellow pokemon")
