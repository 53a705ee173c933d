"""The attention back-end benchmark: shapes from the UNet config, and a CPU run whose back-ends agree."""

import json

import pytest

from benchmarks.attention_backends import attention_shapes, main
from diffusion.config import PRESETS, UNetTrainConfig
from engine import build_config


def test_shapes_follow_the_unets_levels():
    cfg = build_config(UNetTrainConfig, PRESETS, "full", {})
    shapes = attention_shapes(cfg, batch=64)
    assert [s["tokens"] for s in shapes] == [64 * 64, 32 * 32, 16 * 16, 8 * 8]  # 512 px -> 64x64 latents
    assert [s["heads"] for s in shapes] == [128 // 64, 256 // 64, 384 // 64, 512 // 64]


def test_tiny_cpu_run_times_the_backends_that_run_and_names_why_the_others_dont(tmp_path):
    out = tmp_path / "attention.json"
    main(["--preset", "tiny", "--batch", "2", "--warmup", "1", "--repeats", "1", "--out", str(out), "--device", "cpu"])
    records = json.loads(out.read_text())["records"]
    ran = [r for r in records if "ms" in r]
    assert {r["backend"] for r in ran} >= {"math"} and all(r["ms"] > 0 for r in ran)
    assert all(r["max_abs_diff_from_math"] < 1e-4 for r in ran)  # float32 on a CPU: the back-ends agree
    assert all(r["unsupported"] for r in records if "ms" not in r)


def test_no_repeats_or_batch_is_refused_before_anything_is_timed():
    from engine.errors import UserError

    for flag in ("--warmup", "--repeats", "--batch"):
        with pytest.raises(UserError, match="--warmup, --repeats and --batch must be at least 1"):
            main(["--preset", "tiny", flag, "0", "--device", "cpu"])
