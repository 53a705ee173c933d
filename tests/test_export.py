"""Export to diffusers: the renamed weights compute what ours compute (tiny configs, random weights, CPU)."""

import json
import os
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from clip.config import CLIPConfig
from clip.model import CLIPModel
from clip.tokenizer import MIN_VOCAB_SIZE, train_tokenizer
from diffusion.schedule import ScheduleConfig
from pipelines.export import (diffusers_unet_config, diffusers_vae_config, export_diffusers, fold_zero_augment,
                              unet_to_diffusers, vae_to_diffusers)
from pipelines.stages import LineageWarning, load_stack
from pipelines.text_to_image import GenerationSettings
from unet.config import UNetConfig
from unet.model import UNet
from vae.config import VAEConfig
from vae.model import AutoencoderKL

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusers]'")

TOLERANCE = 1e-5  # fp32: only the order of additions differs


def randomized(model):
    """Every weight random: our zero-initialised layers would otherwise hide a wrongly mapped weight."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def tiny_vae(padding: str) -> AutoencoderKL:
    return randomized(AutoencoderKL(VAEConfig(base_channels=16, channel_mult=(1, 2, 2), norm_groups=8,
                                              scaling_factor=0.7, downsample_padding=padding)))


def tiny_unet(augment_dim: int = 0) -> UNet:
    return randomized(UNet(UNetConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, head_dim=16,
                                      norm_groups=8, context_dim=24, augment_dim=augment_dim)))


@pytest.mark.parametrize("padding", ["bottom_right", "symmetric"])
def test_exported_vae_decodes_as_ours_and_encodes_as_ours_with_bottom_right_padding(padding):
    from benchmarks.export_check import vae_differences

    ours = tiny_vae(padding)
    theirs = diffusers.AutoencoderKL(**diffusers_vae_config(ours.config, 32)).eval()
    theirs.load_state_dict(vae_to_diffusers(ours.state_dict(), ours.config), strict=True)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    diff = vae_differences(ours, theirs, images)
    assert diff["decode"] < TOLERANCE
    if padding == "bottom_right":
        assert diff["encode"] < TOLERANCE
    else:  # what the export's note warns about: diffusers' encoder cannot pad symmetrically
        assert diff["encode"] > 1e-2


def test_exported_unet_matches_ours_with_its_augmentation_label_and_folded_at_zero():
    from benchmarks.export_check import unet_difference

    ours = tiny_unet(augment_dim=6)
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 24, generator=g)
    t, augment = torch.tensor([3, 900]), torch.randn(2, 6, generator=g)
    mapped = unet_to_diffusers(ours.state_dict())

    labelled = diffusers.UNet2DConditionModel(**diffusers_unet_config(ours.config, 8, augment_as_class_embedding=True))
    labelled.load_state_dict(mapped, strict=True)
    with torch.no_grad():
        diff = (ours(x, t, context, augment) - labelled(x, t, encoder_hidden_states=context, class_labels=augment).sample)
    assert diff.abs().max() < TOLERANCE

    folded = diffusers.UNet2DConditionModel(**diffusers_unet_config(ours.config, 8)).eval()
    folded.load_state_dict(fold_zero_augment(mapped), strict=True)
    assert unet_difference(ours, folded, x, t, context) < TOLERANCE
    # the fold matters: without it the zero label's constant is missing
    plain = {k: v for k, v in mapped.items() if not k.startswith("class_embedding.")}
    folded.load_state_dict(plain, strict=True)
    assert unet_difference(ours, folded, x, t, context) > 1e-3


def test_unet_whose_first_level_is_wider_than_base_is_refused():
    with pytest.raises(ValueError, match="channel_mult"):
        diffusers_unet_config(UNetConfig(base_channels=32, channel_mult=(2, 2), head_dim=16, norm_groups=8,
                                         context_dim=8), 8)


@pytest.mark.parametrize("option", ["qk_norm", "pooled_context"])
def test_unet_with_an_option_diffusers_cannot_express_is_refused_by_name(option):
    with pytest.raises(ValueError, match=f"{option}=true"):
        diffusers_unet_config(UNetConfig(base_channels=16, channel_mult=(1, 2), head_dim=8, norm_groups=8,
                                         context_dim=8, **{option: True}), 8)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder of random-weight stages: v-prediction on a zero-terminal-SNR cosine schedule."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    tiny_vae("bottom_right").save(run / "vae", training={"resolution": 32})
    tokenizer = train_tokenizer(["a red dragon", "一只蓝色的鸟", "a green leaf"], MIN_VOCAB_SIZE + 20, context_length=8)
    clip = CLIPModel(CLIPConfig(vocab_size=tokenizer.vocab_size, context_length=8, text_width=24, text_layers=1,
                                text_heads=2, image_size=16, image_channels=(8,), embed_dim=8), tokenizer)
    randomized(clip).save(run / "clip")
    schedule = ScheduleConfig(kind="cosine", zero_terminal_snr=True)
    unet = tiny_unet(augment_dim=3)
    unet.config.context_dim = 24
    unet.save(run / "unet", training={"schedule": asdict(schedule), "prediction_type": "v_prediction"})
    return run


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_a_shifted_schedule_exports_as_its_own_betas(zero_terminal_snr):
    from diffusion.schedule import NoiseSchedule
    from pipelines.export import diffusers_scheduler_config

    schedule = ScheduleConfig(zero_terminal_snr=zero_terminal_snr, snr_shift=4.0)
    ddim = diffusers.DDIMScheduler(**diffusers_scheduler_config(schedule, "v_prediction"))
    ours = NoiseSchedule(schedule).alphas_cumprod
    assert torch.allclose(ddim.alphas_cumprod.double(), ours, atol=1e-6)
    assert (ddim.alphas_cumprod[-1].item() == 0.0) == zero_terminal_snr  # not clipped to 2^-24


def test_the_export_check_refuses_steps_diffusers_would_round_before_exporting(tiny_run, tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="the export check needs transformers: pip install -e '.[diffusers]'")
    from benchmarks import export_check
    from engine.errors import UserError

    monkeypatch.setattr(export_check, "check", lambda *a, **k: pytest.fail("exported first"))
    base = ["--run", str(tiny_run), "--out", str(tmp_path / "check.json")]
    with pytest.raises(UserError, match=r"--steps 30 must divide the schedule's 1000 steps .*, e.g. --steps 25"):
        export_check.main(base + ["--steps", "30"])
    with pytest.raises(UserError, match="guidance scale must be a finite number >= 0"):
        export_check.main(base + ["--guidance", "-1"])
    assert not (tmp_path / "check.json").exists()


def test_export_loads_offline_and_the_pipeline_draws_what_generate_draws(tiny_run, tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="StableDiffusionPipeline needs transformers: "
                                               "pip install -e '.[diffusers]'")
    from benchmarks.export_check import pipeline_difference

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "export"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LineageWarning)  # random stages: no lineage to match
        notes = export_diffusers(tiny_run, out)
        stack = load_stack(tiny_run, device="cpu")
    assert notes == ["UNet: the 3-wide augmentation label is folded in at zero (the sampling setting)"]
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_schedule"], scheduler["prediction_type"], scheduler["rescale_betas_zero_snr"],
            scheduler["timestep_spacing"]) == ("squaredcos_cap_v2", "v_prediction", True, "trailing")
    vae = diffusers.AutoencoderKL.from_pretrained(out / "vae", local_files_only=True)
    assert vae.config.scaling_factor == pytest.approx(0.7)
    # the diffusers scheduler's noise levels are ours
    ddim = diffusers.DDIMScheduler.from_pretrained(out / "scheduler", local_files_only=True)
    assert torch.allclose(ddim.alphas_cumprod.double(), stack.schedule.alphas_cumprod, atol=1e-6)

    settings = GenerationSettings(guidance_scale=4.0, steps=4, sampler="ddim", eta=0.0, size=32,
                                  negative_prompt="a leaf", guidance_interval=None, condition_noise=None)
    assert pipeline_difference(stack, out, ["a red dragon", "一只蓝色的鸟"], seed=3, settings=settings) < 1e-4


def test_export_writes_a_new_folder_or_replaces_an_earlier_export_whole_and_nothing_else(tiny_run, tmp_path,
                                                                                        monkeypatch):
    from pipelines import export
    from pipelines.export import DIFFUSERS_WEIGHTS, ExportError

    out = tmp_path / "export"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LineageWarning)  # random stages: no lineage to match
        export_diffusers(tiny_run, out)
        weights = (out / "unet" / DIFFUSERS_WEIGHTS).read_bytes()
        (out / "stale.txt").write_text("left by an earlier export")
        with pytest.raises(ExportError, match="holds an earlier export; pass --overwrite"):
            export_diffusers(tiny_run, out)

        def fails(stack, folder):
            (folder / "half.txt").write_text("written before the failure")
            raise RuntimeError("disk full")

        with monkeypatch.context() as patch:
            patch.setattr(export, "_write_export", fails)
            with pytest.raises(RuntimeError, match="disk full"):
                export_diffusers(tiny_run, out, overwrite=True)
        assert (out / "stale.txt").is_file() and not (out / "half.txt").exists()  # as it was
        assert (out / "unet" / DIFFUSERS_WEIGHTS).read_bytes() == weights
        export_diffusers(tiny_run, out, overwrite=True)
        assert not (out / "stale.txt").exists() and (out / "unet" / DIFFUSERS_WEIGHTS).read_bytes() == weights
        assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staged or set-aside folder is left
        mine = tmp_path / "mine"
        mine.mkdir()
        (mine / "notes.txt").write_text("keep")
        with pytest.raises(ExportError, match="holds files that are not an export"):
            export_diffusers(tiny_run, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"
    monkeypatch.chdir(out)  # run from inside the export it replaces
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LineageWarning)
        export_diffusers(tiny_run, ".", overwrite=True)
    assert (out / "unet" / DIFFUSERS_WEIGHTS).read_bytes() == weights


def test_the_export_command_reports_a_user_error_in_one_line(tmp_path):
    from engine.errors import UserError
    from pipelines.export import ExportError

    assert issubclass(ExportError, UserError)  # a model the format cannot express is the user's choice of stage
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("SCRATCH_DIFFUSION_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "pipelines.export", "--run", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "exported")], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: stage folder {tmp_path / 'nope' / 'vae'} does not exist; "
                                                "train that stage first or pass the right path"]
    assert not (tmp_path / "exported").exists()
