"""The diffusers benchmark end to end at toy sizes on the CPU (skipped without the optional diffusers)."""

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

from benchmarks.bench_vs_diffusers import main  # noqa: E402
from clip import CLIPConfig, CLIPModel, train_tokenizer  # noqa: E402
from data import load_captions  # noqa: E402
from diffusion.config import PRESETS, UNetTrainConfig  # noqa: E402
from engine import build_config  # noqa: E402
from engine.config import config_to_dict  # noqa: E402
from engine.precision import set_low_precision_norms  # noqa: E402
from unet import UNet  # noqa: E402
from vae import AutoencoderKL, VAEConfig  # noqa: E402


def tiny_run(root):
    """A random-init three-stage run folder that load_stack accepts (64-px images -> 16x16 latents)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(base_channels=8, channel_mult=(1, 2, 2), norm_groups=4, scaling_factor=0.7))
    data = load_captions("shapes:20", resolution=16)
    tokenizer = train_tokenizer(data.en + data.zh, vocab_size=300)
    clip = CLIPModel(CLIPConfig(vocab_size=tokenizer.vocab_size, text_width=32, text_layers=1, text_heads=2,
                                image_size=16, image_channels=(8, 16), embed_dim=16), tokenizer)
    cfg = build_config(UNetTrainConfig, PRESETS, "tiny", {"model.context_dim": 32})
    unet = UNet(cfg.model)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # a zero output layer would make every sampler agree
    fingerprints = {"vae": vae.save(root / "vae", trained_on={"data": "shapes"}),
                    "clip": clip.save(root / "clip", trained_on={"data": "shapes"})}
    unet.save(root / "unet", training=config_to_dict(cfg),
              trained_on={"data": "shapes", **fingerprints, "tokenizer": tokenizer.fingerprint})
    return root


def test_tiny_benchmark_writes_every_comparison(tmp_path, monkeypatch):
    from benchmarks import sampling, training

    switched = []  # (section module, model class, norms on?, how many norms) for every case that sets them

    def recording(where):
        def switch(module, enabled):
            switched.append((where, type(module).__name__, enabled, set_low_precision_norms(module, enabled)))
            return switched[-1][-1]
        return switch

    monkeypatch.setattr(training, "set_low_precision_norms", recording("training"))
    monkeypatch.setattr(sampling, "set_low_precision_norms", recording("sampling"))
    run = tiny_run(tmp_path / "run")
    out = tmp_path / "bench" / "summary.json"
    main(["--tiny", "--out", str(out), "--run", str(run), "--judge", str(run / "clip"),
          "--quality-images", "4"])
    summary = json.loads(out.read_text())

    # the twins have the same size, as the comparison requires
    for counts in summary["params"].values():
        assert counts["ours"] == counts["diffusers"] > 0
    # every case ran, and both implementations were measured in every section
    for section in ("unet_train", "vae_train", "sample"):
        rows = summary[section]["cases"]
        assert [r for r in rows if "error" in r] == []
        assert {r["impl"] for r in rows} == {"ours", "diffusers"}
        assert all(r["images_per_s"] > 0 and r["ms_per_iter"] > 0 for r in rows)
        # ours is timed with its norms in bf16 too (as its stages train and generate); diffusers' stay as shipped
        assert any(r["low_precision_norms"] for r in rows if r["impl"] == "ours")
        assert not any(r["low_precision_norms"] for r in rows if r["impl"] == "diffusers")
    assert any(r["low_precision_norms"] for r in summary["sample"]["vae_decode"] if r["impl"] == "ours")
    assert {entry[:3] for entry in switched if entry[3]} == {
        (where, model, enabled) for where in ("training", "sampling") for model in ("UNet", "AutoencoderKL")
        for enabled in (False, True)}
    for key in ("unet_train_speedup", "vae_train_speedup", "sample_speedup", "fast_sample_speedup",
                "unet_train_speedup_equal_treatment", "vae_train_speedup_equal_treatment",
                "sample_speedup_equal_treatment"):
        assert math.isfinite(summary[key]) and summary[key] > 0
    assert summary["unet_train"]["flops_per_step"]["ours"] > 0
    # equal treatment pairs only settings both sides have: ours' bf16 norms have no diffusers twin
    for section in ("unet_train", "vae_train", "sample"):
        for kind in ("best", "eager"):
            ratio = summary[section]["ratios"][kind]
            assert ratio is None or "bf16 norms" not in ratio["ours_setting"]
    assert set(summary["targets_met"]) == {"unet_train", "vae_train", "sample"}
    assert all(met == (summary[f"{k}_speedup_equal_treatment"] >= summary["targets"][k])
               for k, met in summary["targets_met"].items())
    # the FLOP counts agree, so the twins do the same work
    flops = summary["unet_train"]["flops_per_step"]
    assert flops["diffusers"] == pytest.approx(flops["ours"], rel=0.02)
    # our sampling loop and the diffusers one compute the same latents from the same epsilon model
    check = summary["sample"]["ddim_loop_check"]
    assert check["max_abs_diff"] <= 1e-5 * check["output_scale"]
    # the fast sampler differs from the 50-step reference, and the judge scores the difference
    quality = summary["quality"]["vs_reference"]
    assert set(quality) == {"dpmpp_2m-2", "ddim-2"}
    for row in quality.values():
        assert row["latent_rms_diff"] > 0 and math.isfinite(row["judge_fd"])
    assert "| UNet training, best |" in out.with_suffix(".md").read_text()


def test_an_earlier_summary_is_kept_unless_told(tmp_path):
    from engine.errors import UserError

    out = tmp_path / "summary.json"
    out.write_text("{}")  # e.g. the committed docs/results/bench/summary.json
    with pytest.raises(UserError, match=r"summary.json exists \(an earlier result\); pass another --out, or "
                                         r"--overwrite"):
        main(["--tiny", "--out", str(out)])
    assert out.read_text() == "{}"
    out.unlink()
    out.with_suffix(".md").write_text("| an earlier table |")  # the table beside it is kept too
    with pytest.raises(UserError, match=r"summary.md exists \(an earlier result\)"):
        main(["--tiny", "--out", str(out)])
