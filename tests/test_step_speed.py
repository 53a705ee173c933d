"""benchmarks.step_speed times the steps the way Trainer.fit runs them."""
import pytest
import torch

from benchmarks.step_speed import run_steps, unet_trainer


@pytest.mark.parametrize("setting,read", [("deterministic", torch.are_deterministic_algorithms_enabled),
                                          ("cudnn_attention", torch.backends.cuda.cudnn_sdp_enabled)])
@pytest.mark.parametrize("value", [True, False])
def test_timed_steps_run_under_the_configs_kernel_settings_and_leave_them_as_they_were(tmp_path, setting, read, value):
    trainer, make_batch = unet_trainer({setting: value, "precision": "fp32"}, "tiny", tmp_path, device="cpu")
    seen = []

    def recording_batch(indices, generator):
        seen.append(read())
        return make_batch(indices, generator)

    before = read()
    run_steps(trainer, recording_batch, 2)
    assert seen and set(seen) == {value}
    assert read() == before


def test_regional_compilation_compiles_every_block_and_nothing_else(tmp_path, monkeypatch):
    from benchmarks import step_speed
    from unet.blocks import ResBlock, SpatialTransformer

    trainer, _ = unet_trainer({"precision": "fp32"}, "tiny", tmp_path, device="cpu")
    unet = trainer.module.model
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append((self, kwargs)))
    before = torch._dynamo.config.recompile_limit
    blocks = [m for m in unet.modules() if isinstance(m, (ResBlock, SpatialTransformer))]
    with step_speed.compile_regions(unet):
        assert len(blocks) == len(compiled) and {id(m) for m, _ in compiled} == {id(m) for m in blocks}
        assert all(kwargs == {"dynamic": False} for _, kwargs in compiled)
        assert any(isinstance(m, ResBlock) for m in blocks) and any(isinstance(m, SpatialTransformer) for m in blocks)
        assert torch._dynamo.config.recompile_limit >= len(blocks)  # a graph per block shape, not dynamo's default 8
    assert torch._dynamo.config.recompile_limit == before  # only while the variant runs: the next one is unchanged


def test_each_gpu_keeps_the_batch_one_gpu_runs_and_a_variant_that_cannot_run_is_reported_apart(tmp_path, monkeypatch):
    import json

    from benchmarks import step_speed
    from diffusion.config import PRESETS, UNetTrainConfig

    monkeypatch.setattr(step_speed.distributed, "world_size", lambda: 2)
    preset_batch = step_speed.build_config(UNetTrainConfig, PRESETS, "tiny", {}).train.batch_size
    assert step_speed._per_gpu_batch(UNetTrainConfig, PRESETS, "tiny", {}) == {"batch_size": 2 * preset_batch}
    # a variant's own batch too (it was taken as the global one: half of it per GPU at two)
    assert step_speed._per_gpu_batch(UNetTrainConfig, PRESETS, "tiny", {"batch_size": 256}) == {"batch_size": 512}
    monkeypatch.undo()
    out = tmp_path / "speed.json"  # 128-px crops of the tiny preset's 64-px images: this preset cannot run it
    step_speed.main(["--preset", "tiny", "--stages", "vae", "--variants", "crop128_b64", "--warmup", "1", "--steps",
                     "1", "--out", str(out)])
    record = json.loads(out.read_text())["vae/crop128_b64"]
    assert record["error"].startswith("ConfigError: crop_size=128") and "peak_mem_gb" not in record


def test_an_unknown_variant_or_stage_is_an_error_not_a_silent_skip():
    from benchmarks import step_speed
    from engine.errors import UserError

    with pytest.raises(UserError, match=r"unknown --stages \[\] or --variants \['eager'\]"):
        step_speed.main(["--stages", "unet", "--variants", "default,eager"])
    with pytest.raises(UserError, match=r"unknown --stages \['clip'\]"):
        step_speed.main(["--stages", "clip"])


@pytest.mark.parametrize("argv, message", [(["--preset", "ful"], "unknown preset 'ful'; choose one of"),
                                           (["--steps", "0"], "--warmup and --steps must be at least 1")])
def test_a_misspelt_preset_or_no_steps_is_refused_before_any_variant_runs(argv, message, monkeypatch):
    from benchmarks import step_speed
    from engine.errors import UserError

    never = lambda *a, **k: pytest.fail("timed a variant first")  # noqa: E731
    monkeypatch.setattr(step_speed, "unet_speed", never)
    monkeypatch.setattr(step_speed, "vae_speed", never)
    with pytest.raises(UserError, match=message):
        step_speed.main([*argv, "--stages", "vae,unet"])


@pytest.mark.parametrize("enabled", [True, False])
def test_cudnn_benchmark_holds_while_open_and_the_previous_setting_comes_back(enabled):
    from benchmarks.measure import cudnn_benchmark

    before = torch.backends.cudnn.benchmark
    with cudnn_benchmark(enabled):
        assert torch.backends.cudnn.benchmark is enabled
    assert torch.backends.cudnn.benchmark is before


def test_the_variants_time_under_the_cudnn_setting_asked_for_and_the_record_names_it(tmp_path, monkeypatch):
    import json

    from benchmarks import step_speed

    seen = []
    monkeypatch.setattr(step_speed, "unet_speed", lambda *a: seen.append(torch.backends.cudnn.benchmark) or (1.0, 0.0))
    before = torch.backends.cudnn.benchmark
    for flag in ([], ["--cudnn-benchmark"]):
        out = tmp_path / f"speed{len(flag)}.json"
        step_speed.main(["--preset", "tiny", "--stages", "unet", "--variants", "default,lowres", *flag, "--out",
                         str(out)])
        assert json.loads(out.read_text())["cudnn_benchmark"] is bool(flag)
    assert seen == [False, False, True, True] and torch.backends.cudnn.benchmark is before
