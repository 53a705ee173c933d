"""The whole stack end to end on the tiny preset: train_all, skip/resume, --reuse, lineage, img2img."""

import argparse
import importlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train_all
from benchmarks import spike_screen
from data import DataError, load_captions
from diffusion.config import PRESETS as UNET_PRESETS
from diffusion.config import UNetTrainConfig
from engine import ConfigError, StageError, build_config, read_stage
from engine.errors import UserError
from engine.precision import LOW_PRECISION_NORMS, set_low_precision_norms
from engine.stage import file_fingerprint, folder_lock, load_weights
from engine.trainer import checkpoint_path
from pipelines.evaluate import share_error
from pipelines.export import ExportError, export_diffusers
from pipelines.metrics import PROMPT_COLOURS
from pipelines.stages import (LineageWarning, judge_path, load_stack, recorded_stage, stage_paths,
                              write_stages_record)
from pipelines.text_to_image import (DEFAULT_CONDITION_NOISE, DEFAULT_STEP_NOISE, GenerationSettings,
                                     add_sampling_arguments, generate, sampling_settings)

DATA = "shapes:60"


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "A"
    train_all.main(["--data", DATA, "--run", str(run), "--preset", "tiny", "--device", "cpu"])
    return run


@pytest.fixture(scope="module")
def guide_a(run_a, tmp_path_factory):
    """An autoguidance guide for run A's UNet: one epoch of a single phase at the UNet's resolution, on its VAE
    and CLIP."""
    from diffusion.train import train

    config = train_all.stage_config("unet", "tiny", {"lowres_epochs": "0", "epochs": "1"})
    return train(config, DATA, run_a / "vae", run_a / "clip", tmp_path_factory.mktemp("guide") / "unet", device="cpu")


def test_train_all_writes_every_stage_and_a_report(run_a):
    for stage in ("vae", "clip", "unet"):
        assert (run_a / stage / "config.json").is_file() and (run_a / stage / "loss.png").is_file()
    assert list((run_a / "unet" / "samples").glob("epoch_*.png"))
    assert (run_a / "clip" / "tokenizer.json").is_file()
    report = (run_a / "report.md").read_text(encoding="utf-8")
    assert "## Metrics" in report and "generation/fd_en" in report and "final_samples.png" in report
    summary = json.loads((run_a / "summary.json").read_text())
    assert set(summary["stage_minutes"]) == {"vae", "clip", "judge", "unet", "evaluate"}
    generation = summary["evaluation"]["generation"]
    assert 0 <= generation["near_copy_share_pixel"] <= 1 and generation["fd_en"] >= 0
    # FD's and KID's real-image floor, beside them in the evaluation's table
    assert generation["fd_real"] >= 0 and "kid_real" in generation
    assert f"| {generation['fd_real']:.3f} |" in (run_a / "evaluation.md").read_text(encoding="utf-8")
    for key in ("fg_share", "border_fg", "frame_filling_share", "parts_mean", "near_copy_share_pixel",
                "near_copy_share_judge", "near_copy_share_pixel_relative", "near_copy_share_pixel_hue_blind",
                "near_copy_share_silhouette", "colour_adherence", "chromatic_share"):
        assert key in generation and f"{key}_real" in generation  # each beside what the real images score
    for key in ("near_copy_share_judge_captions_en", "near_copy_share_judge_captions_zh",
                "near_copy_share_judge_colour_prompts"):
        assert key in generation
    # the colour prompts again with the body's colour sentence: overall, and per colour averaging to it
    sentenced = [generation[f"colour_adherence_body_sentence_{colour}"] for colour in PROMPT_COLOURS]
    assert statistics.fmean(sentenced) == pytest.approx(generation["colour_adherence_body_sentence"])
    assert share_error(generation, "colour_adherence_body_sentence") is not None  # over the colour samples
    # one record per sample, whose flags add up to the figures (for comparisons sample for sample)
    records = json.loads((run_a / "evaluation.json").read_text())["samples"]
    assert len(records) == generation["samples"]
    share = lambda flag: statistics.fmean(r[flag] for r in records if r[flag] is not None)  # noqa: E731
    assert share("copied_pixel") == pytest.approx(generation["near_copy_share_pixel"])
    assert share("copied_judge") == pytest.approx(generation["near_copy_share_judge"])
    assert share("copied_silhouette") == pytest.approx(generation["near_copy_share_silhouette"])
    assert share("colour_hit") == pytest.approx(generation["colour_adherence"])
    assert share("frame_filling") == pytest.approx(generation["frame_filling_share"])
    assert share("parts") == pytest.approx(generation["parts_mean"])
    assert share("fg_share") == pytest.approx(generation["fg_share"], abs=1e-4)  # kept to 4 decimals
    assert share("chromatic_share") == pytest.approx(generation["chromatic_share"], abs=1e-4)
    assert all((r["colour_hit"] is None) == (r["source"] != "colour_prompts") for r in records)
    # a caption sample names its validation row, so the file can be shared without the data's captions
    val = load_captions(DATA, resolution=64).subset("val")
    caption_records = [r for r in records if r["source"] != "colour_prompts"]
    assert [r["row"] for r in caption_records] == [int(row) for row in val.rows] * 2
    assert all("prompt" not in r for r in caption_records)
    evaluation_text = (run_a / "evaluation.json").read_text(encoding="utf-8")
    assert not any(caption in evaluation_text or json.dumps(caption)[1:-1] in evaluation_text  # raw or escaped
                   for caption in val.en + val.zh)
    for source in ("captions_en", "captions_zh", "colour_prompts"):  # each record is the sample it names
        assert statistics.fmean(r["copied_judge"] for r in records if r["source"] == source) == pytest.approx(
            generation[f"near_copy_share_judge_{source}"])
    # the colour prompts' judge-space copies per colour (each colour has the same number of samples)
    per_colour = [generation[f"near_copy_share_judge_{colour}_prompts"] for colour in PROMPT_COLOURS]
    assert sum(per_colour) / len(per_colour) == pytest.approx(generation["near_copy_share_judge_colour_prompts"])
    assert "foreground share" in report and "nearest_pairs.png" in report and "judge_pairs.png" in report
    assert (run_a / "judge_pairs.png").is_file() and (run_a / "silhouette_pairs.png").is_file()
    assert "silhouette_pairs.png" in report
    evaluation_md = (run_a / "evaluation.md").read_text(encoding="utf-8")
    sampled = GenerationSettings(size=64).describe()  # the tiny preset's size, at the generation defaults
    assert evaluation_md.startswith(f"Sampled with {sampled}; judged by {run_a / 'judge'} (")
    assert {f"colour_adherence_{c}" for c in ("red", "blue", "green", "yellow", "purple", "pink")} <= set(generation)
    assert "low-resolution phase" in report and "unet/lowres/samples/epoch_0001.png" in report
    # the judge is a CLIP stage of its own seed, not the run's CLIP, with its recipe frozen where the CLIP's moved
    judge = json.loads((run_a / "judge" / "config.json").read_text())
    assert judge["kind"] == "clip" and judge["training"]["train"]["seed"] == 1
    clip = json.loads((run_a / "clip" / "config.json").read_text())
    assert clip["training"]["tokenizer_normalize"] and not judge["training"]["tokenizer_normalize"]
    assert summary["evaluation"]["generation"] and "judge" in json.loads((run_a / "evaluation.json").read_text())
    assert str(run_a / "judge") in json.loads((run_a / "evaluation.json").read_text())["judge"]
    unet = json.loads((run_a / "unet" / "config.json").read_text())
    assert unet["trained_on"]["vae"] == file_fingerprint(run_a / "vae" / "model.safetensors")
    assert unet["trained_on"]["clip"] == file_fingerprint(run_a / "clip" / "model.safetensors")
    captions = load_captions(DATA, resolution=32).captions_fingerprint  # the text, whatever the resolution
    assert unet["trained_on"]["captions"] == clip["trained_on"]["captions"] == captions
    assert "captions" not in json.loads((run_a / "vae" / "config.json").read_text())["trained_on"]


def test_complete_stages_are_skipped_and_a_partial_one_resumes(run_a, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(run_a, run)
    before = load_weights(run / "unet")
    (run / "unet" / "config.json").unlink()  # unet now partial: only its checkpoint is left
    (run / "unet" / "model.safetensors").unlink()
    vae_mtime = (run / "vae" / "model.safetensors").stat().st_mtime_ns
    train_all.main(["--data", DATA, "--run", str(run), "--preset", "tiny", "--device", "cpu", "--skip-eval"])
    out = capsys.readouterr().out
    assert "vae already complete, skipped" in out and "clip already complete, skipped" in out
    assert (run / "vae" / "model.safetensors").stat().st_mtime_ns == vae_mtime
    after = load_weights(run / "unet")  # resumed from its final checkpoint: the same weights again
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_run_stopped_in_the_low_resolution_phase_resumes_it(run_a, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(run_a, run)
    lowres, unet = run / "unet" / "lowres", run / "unet"
    before, log = load_weights(lowres), (lowres / "log.jsonl").read_text()
    # stopped after the low-resolution phase's last checkpoint, before it was saved as a stage
    for folder in (lowres, unet):
        (folder / "config.json").unlink()
        (folder / "model.safetensors").unlink()
    shutil.rmtree(unet / "checkpoints")
    train_all.main(["--data", DATA, "--run", str(run), "--preset", "tiny", "--device", "cpu", "--skip-eval"])
    after = load_weights(lowres)  # resumed from its final checkpoint: the same weights, not a fresh start
    assert (lowres / "log.jsonl").read_text() == log  # nothing left to train: no step ran again
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert read_stage(unet).trained_on["init"] == read_stage(lowres).fingerprint


def test_rerun_with_other_settings_or_data_stops_then_overwrite_retrains(run_a, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(run_a, run)
    report = (run / "report.md").read_text(encoding="utf-8")
    base = ["--run", str(run), "--preset", "tiny", "--device", "cpu", "--skip-eval"]
    with pytest.raises(StageError, match=r"finished vae stage .*train.epochs was 2, now 3.*--reuse vae=.*--run.*--overwrite"):
        train_all.main(["--data", DATA, *base, "--vae.epochs=3"])
    with pytest.raises(StageError, match=r"finished vae stage .*other data than --data shapes:50"):
        train_all.main(["--data", "shapes:50", *base])
    with pytest.raises(StageError, match=r"finished unet stage .*loss.div_weight"):
        train_all.main(["--data", DATA, *base, "--unet.div_weight=0.5"])
    assert (run / "report.md").read_text(encoding="utf-8") == report  # nothing rewritten
    # how training runs (compiled or not, how often it logs) is not what it learnt: the finished stage stands
    unet_weights = (run / "unet" / "model.safetensors").read_bytes()
    train_all.main(["--data", DATA, *base, "--unet.compile=true", "--unet.log_every=3"])
    assert (run / "unet" / "model.safetensors").read_bytes() == unet_weights
    clip_weights = (run / "clip" / "model.safetensors").read_bytes()
    train_all.main(["--data", DATA, *base, "--unet.div_weight=0.5", "--overwrite"])
    assert read_stage(run / "unet", "unet").training["loss"]["div_weight"] == 0.5
    # the low-resolution phase is part of the UNet stage that was asked: it trained again with the new setting
    assert read_stage(run / "unet" / "lowres", "unet").training["loss"]["div_weight"] == 0.5
    assert read_stage(run / "unet", "unet").trained_on["init"] == read_stage(run / "unet" / "lowres").fingerprint
    # a change of the 512-px phase alone keeps the finished low-resolution phase that the new stage asks for
    lowres_log = (run / "unet" / "lowres" / "log.jsonl").read_text()  # its timings would differ if it ran again
    train_all.main(["--data", DATA, *base, "--unet.div_weight=0.5", "--unet.epochs=3", "--overwrite"])
    assert read_stage(run / "unet", "unet").training["train"]["epochs"] == 3
    assert (run / "unet" / "lowres" / "log.jsonl").read_text() == lowres_log
    assert (run / "clip" / "model.safetensors").read_bytes() == clip_weights  # only the differing stage


def test_a_unet_trained_on_other_colour_sentences_stops_the_run_or_trains_again(run_a, tmp_path, request):
    run = tmp_path / "copy"
    shutil.copytree(run_a, run)
    before = read_stage(run / "unet").trained_on["trained_captions"]
    request.getfixturevalue("other_colour_sentences")  # from here on
    base = ["--data", DATA, "--run", str(run), "--preset", "tiny", "--device", "cpu", "--skip-eval"]
    with pytest.raises(StageError, match=r"unet holds a finished unet stage that differs from what was asked \(it "
                                         r"was trained on other training captions .*--overwrite"):
        train_all.main(base)
    for name in ("config.json", "model.safetensors"):  # stopped after the UNet's last checkpoint
        (run / "unet" / name).unlink()
    with pytest.raises(StageError, match=r"lowres holds a finished unet stage that differs from what was asked \(it "
                                         r"was trained on other training captions .*--overwrite"):
        train_all.main(base)  # the 512-px phase would start from a 256-px phase trained on the old captions
    for name in ("config.json", "model.safetensors"):  # stopped after the 256-px phase's last checkpoint
        (run / "unet" / "lowres" / name).unlink()
    with pytest.raises(StageError, match=r"lowres holds an interrupted unet training whose checkpoint differs from "
                                         r"what was asked \(it was trained on other training captions .*--overwrite"):
        train_all.main(base)  # it would resume onto the new captions
    train_all.main([*base, "--overwrite"])
    after = {read_stage(folder).trained_on["trained_captions"] for folder in (run / "unet", run / "unet" / "lowres")}
    assert len(after) == 1 and before not in after  # both phases trained again, on the new captions


def test_an_interrupted_stage_that_would_resume_into_something_else_stops_the_run_or_starts_again(run_a,
                                                                                                  tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(run_a, run)
    for name in ("config.json", "model.safetensors"):  # stopped after the UNet's last checkpoint
        (run / "unet" / name).unlink()
    base = ["--data", DATA, "--run", str(run), "--preset", "tiny", "--device", "cpu", "--skip-eval"]
    with pytest.raises(StageError, match=r"unet holds an interrupted unet training whose checkpoint differs from what "
                                         r"was asked \(train.epochs was 2, now 3\).*--overwrite"):
        train_all.main([*base, "--unet.epochs=3"])
    assert checkpoint_path(run / "unet").is_file()  # nothing set aside without --overwrite
    record = json.loads((run / "unet" / "lowres" / "config.json").read_text())
    (run / "unet" / "lowres" / "config.json").write_text(json.dumps({**record, "fingerprint": "0" * 16}))
    with pytest.raises(StageError, match=r"interrupted unet training whose checkpoint differs from what was asked "
                                         r"\(it was trained on other starting weights than .*lowres\)"):
        train_all.main(base)  # the phase it started from is not the one there now
    (run / "unet" / "lowres" / "config.json").write_text(json.dumps(record))
    # the VAE trains again: the checkpoint learnt the old VAE's latents, so the UNet starts again instead of
    # resuming (resumed, it would have nothing left to train and keep its old weights)
    before = load_weights(run_a / "unet")
    train_all.main([*base, "--vae.epochs=3", "--overwrite"])
    after = load_weights(run / "unet")
    assert not all(torch.equal(before[k], after[k]) for k in before)
    assert read_stage(run / "unet").trained_on["vae"] == read_stage(run / "vae").fingerprint


def test_single_stage_training_refuses_to_replace_a_finished_stage(run_a, tmp_path):
    from vae.train import main as train_vae

    folder = tmp_path / "vae"
    shutil.copytree(run_a / "vae", folder)
    weights = (folder / "model.safetensors").read_bytes()
    with pytest.raises(StageError, match="already holds a finished stage.*--resume.*--overwrite"):
        train_vae(["--data", DATA, "--out", str(folder), "--preset", "tiny", "--device", "cpu"])
    assert (folder / "model.safetensors").read_bytes() == weights


def test_an_overwrite_refused_before_training_leaves_the_finished_clip_stage_with_its_tokenizer(run_a, tmp_path):
    from clip.train import main as train_clip

    folder = tmp_path / "clip"
    shutil.copytree(run_a / "clip", folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="larger than the training set"):  # found once the data is read
        train_clip(["--data", "shapes:20", "--out", str(folder), "--preset", "tiny", "--device", "cpu",
                    "--overwrite"])
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_a_batch_larger_than_the_training_set_stops_the_run_before_anything_trains(tmp_path):
    with pytest.raises(ConfigError, match=r"--clip.batch_size=500 is larger than the training set of --data "
                                          r"shapes:\d+ \(\d+ rows\); lower --clip.batch_size"):
        train_all.main(["--data", DATA, "--run", str(tmp_path / "r"), "--preset", "tiny", "--device", "cpu",
                        "--clip.batch_size=500"])
    assert not (tmp_path / "r").exists()  # the VAE before it did not train


def test_failure_before_training_leaves_no_run_folder(tmp_path):
    with pytest.raises(DataError):
        train_all.main(["--data", str(tmp_path / "missing"), "--run", str(tmp_path / "r"), "--preset", "tiny",
                        "--device", "cpu"])
    assert not (tmp_path / "r").exists()


def test_a_run_or_stage_folder_that_is_a_file_is_refused_before_anything(tmp_path):
    from vae import train as vae_train

    afile = tmp_path / "afile"
    afile.write_text("notes")
    with pytest.raises(StageError, match=r"--run .*afile is a file, not a folder; pass another --run"):
        train_all.main(["--data", DATA, "--run", str(afile), "--preset", "tiny", "--device", "cpu"])
    with pytest.raises(StageError, match=r"--out .*afile/vae cannot be written: .*afile is a file, not a folder"):
        vae_train.main(["--data", DATA, "--out", str(afile / "vae"), "--preset", "tiny", "--device", "cpu"])
    assert afile.read_text() == "notes"


def test_preset_is_printed_and_recorded(run_a):
    report = (run_a / "report.md").read_text(encoding="utf-8")
    assert "Preset: **tiny** (named with --preset)" in report and "This is a smoke run" in report
    assert json.loads((run_a / "summary.json").read_text())["preset"] == {"name": "tiny", "reason": "named with --preset"}
    for stage in ("vae", "clip", "unet"):
        assert json.loads((run_a / stage / "config.json").read_text())["preset"]["name"] == "tiny"


def test_evaluate_keeps_the_runs_own_evaluation_unless_told(run_a, tmp_path):
    from pipelines.evaluate import main as evaluate

    before = (run_a / "evaluation.json").read_bytes()
    for out in ([], ["--out", str(run_a)], ["--out", str(run_a / ".." / run_a.name)]):  # the run folder, however named
        with pytest.raises(UserError, match=r"evaluation.json exists \(the run's own evaluation\).*--out.*--overwrite"):
            evaluate(["--run", str(run_a), "--data", DATA, "--device", "cpu", *out])
    assert (run_a / "evaluation.json").read_bytes() == before
    elsewhere = tmp_path / "other_run"  # another run's evaluation, which paired and study read, is kept too
    elsewhere.mkdir()
    (elsewhere / "evaluation.json").write_bytes(before)
    with pytest.raises(UserError, match=r"evaluation.json exists \(an earlier evaluation\).*--overwrite"):
        evaluate(["--run", str(run_a), "--data", DATA, "--device", "cpu", "--out", str(elsewhere)])
    (tmp_path / "notes.txt").write_text("not a folder")
    with pytest.raises(UserError, match="notes.txt is a file; pass a folder"):
        evaluate(["--run", str(run_a), "--data", DATA, "--device", "cpu", "--out", str(tmp_path / "notes.txt")])
    with pytest.raises(UserError, match="cannot be written: .*notes.txt is a file, not a folder; pass another --out"):
        evaluate(["--run", str(run_a), "--data", DATA, "--device", "cpu", "--out", str(tmp_path / "notes.txt" / "e")])
    assert (elsewhere / "evaluation.json").read_bytes() == before


def test_generate_checks_its_inputs(run_a, tmp_path, capsys):
    from pipelines.generate import main as generate_cli

    base = ["--run", str(run_a), "--device", "cpu", "--steps", "1", "--size", "32", "--out", str(tmp_path / "o")]
    (tmp_path / "notes.txt").write_text("not a picture")
    cases = [(["--init-image", str(tmp_path)], "is a folder; pass one picture file"),
             (["--init-image", str(tmp_path / "notes.txt")], "is not a readable picture"),
             (["--init-image", str(tmp_path / "notes.txt"), "--strength", "1.5"], r"--strength must be in \(0, 1\]"),
             (["--strength", "0.5"], "--strength applies to image-to-image only"),
             (["--guidance-interval", "5", "0.3"], "sigma_lo < sigma_hi")]
    for extra, message in cases:
        with pytest.raises(UserError, match=message):
            generate_cli([*base, "--prompt", "a red circle", *extra])
    with pytest.warns(UserWarning, match=r"longer than the text encoder's context of 75 tokens: its last \d+ tokens"):
        generate_cli([*base, "--prompt", "a red circle " * 60])
    generate_cli([*base, "--prompt", "", "--out", str(tmp_path / "empty")])
    assert "empty --prompt samples unconditionally" in capsys.readouterr().out
    generate_cli([*base, "--prompt", "", "--negative-prompt", "a blue square", "--out", str(tmp_path / "away")])
    assert "empty --prompt is guided only away from the --negative-prompt" in capsys.readouterr().out


def test_generate_ends_every_prompt_with_the_body_colour_asked(run_a, tmp_path, monkeypatch, capsys):
    from pipelines import generate as generate_module

    asked, real_generate = [], generate_module.generate

    def spy(stack, prompts, *args, **kwargs):
        asked.extend(prompts)
        return real_generate(stack, prompts, *args, **kwargs)

    monkeypatch.setattr(generate_module, "generate", spy)
    generate_module.main(["--run", str(run_a), "--device", "cpu", "--steps", "1", "--size", "32", "--num-images", "2",
                          "--prompt", "a circle", "--prompt", "一个圆", "--body-colour", "red",
                          "--out", str(tmp_path / "o")])
    assert asked == ["a circle. Its body is mostly red."] * 2 + ["一个圆。它的身体主要是红色。"] * 2
    with pytest.raises(SystemExit):
        generate_module.main(["--run", str(run_a), "--prompt", "a circle", "--body-colour", "teal"])
    assert "invalid choice: 'teal'" in capsys.readouterr().err


@pytest.mark.parametrize("count", ["0", "-2"])
def test_generate_refuses_no_images_before_loading_anything(run_a, tmp_path, monkeypatch, count):
    from pipelines import generate as generate_module

    monkeypatch.setattr(generate_module, "load_stack", lambda *a, **k: pytest.fail("loaded the stages first"))
    with pytest.raises(UserError, match=f"--num-images must be at least 1, got {count}"):
        generate_module.main(["--run", str(run_a), "--prompt", "a red circle", "--num-images", count,
                              "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [(["--steps", "0"], "steps must be at least 1, got 0"),
                                            (["--guidance", "-1"], "guidance scale must be a finite number >= 0"),
                                            (["--guidance-rescale", "1.5"], r"guidance rescale must be in \[0, 1\]"),
                                            (["--size", "30"], "--size 30 does not fit the stages")])
def test_generate_and_evaluate_refuse_bad_sampling_options_before_loading_weights(run_a, tmp_path, monkeypatch,
                                                                                   extra, message):
    from pipelines import evaluate, generate as generate_module

    for module in (generate_module, evaluate):
        monkeypatch.setattr(module, "load_stack", lambda *a, **k: pytest.fail("loaded the weights first"))
    with pytest.raises(UserError, match=message):
        generate_module.main(["--run", str(run_a), "--prompt", "a red circle", "--out", str(tmp_path / "o"), *extra])
    with pytest.raises(UserError, match=message):
        evaluate.main(["--run", str(run_a), "--data", DATA, "--out", str(tmp_path / "e"), *extra])


@pytest.mark.parametrize("size, nearest", [("0", "try 16"), ("-16", "try 16"), ("8", "try 16"),
                                           ("72", "try 64 or 80")])
def test_every_sampling_command_refuses_a_size_the_stages_cannot_draw_before_sampling(run_a, tmp_path, monkeypatch,
                                                                                     size, nearest):
    from pipelines import compare, evaluate, generate as generate_module

    never = lambda *a, **k: pytest.fail("sampled before checking --size")  # noqa: E731
    for module, name in ((generate_module, "generate"), (compare, "generate"), (evaluate, "evaluate_to_folder")):
        monkeypatch.setattr(module, name, never)
    # the tiny stages: a VAE of 3 halvings and a UNet of 1 (channel_mult (1, 2)), so sizes step by 16
    message = (f"--size {size} does not fit the stages: a size must be a positive multiple of 16 \\(the VAE "
               f"downsamples by 8, the UNet by 2 more\\); {nearest} \\(default: 64\\)")
    out = ["--out", str(tmp_path / "o"), "--size", size, "--device", "cpu"]
    with pytest.raises(UserError, match=message):
        generate_module.main(["--run", str(run_a), "--prompt", "a red circle", *out])
    with pytest.raises(UserError, match=message):
        evaluate.main(["--run", str(run_a), "--data", DATA, *out])
    with pytest.raises(UserError, match=f"run {run_a}: {message}"):  # every run is checked before any samples
        compare.main([str(run_a), *out])
    assert not (tmp_path / "o").exists()


def test_compare_refuses_a_tile_of_no_pixels_before_sampling(run_a, tmp_path, monkeypatch):
    from pipelines import compare

    monkeypatch.setattr(compare, "generate", lambda *a, **k: pytest.fail("sampled before checking --tile"))
    with pytest.raises(UserError, match="--tile must be a positive number of pixels, got 0"):
        compare.main([str(run_a), "--out", str(tmp_path / "o"), "--tile", "0", "--device", "cpu"])
    assert not (tmp_path / "o").exists()


def test_generate_replaces_all_earlier_images_in_out_and_nothing_else(run_a, tmp_path, capsys):
    from PIL import Image

    from pipelines.generate import main as generate_cli
    from pipelines.text_to_image import save_images

    out = tmp_path / "o"
    base = ["--run", str(run_a), "--device", "cpu", "--steps", "1", "--size", "32", "--prompt", "a red circle",
            "--out", str(out)]
    generate_cli([*base, "--num-images", "3"])
    (out / "notes.txt").write_text("mine")  # not generate's: never touched
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["grid.png", "image_00.png", "image_01.png", "image_02.png", "notes.txt"]
    generate_cli([*base, "--num-images", "1", "--seed", "5"])  # fewer images: none of the 3 may stay beside it
    assert f"replacing the 4 files an earlier generate wrote into {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "image_00.png", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "image_00.png").read_bytes() != first["image_00.png"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="--out .*a_file is a file; pass a folder"):
        generate_cli([*base[:-1], str(tmp_path / "a_file")])
    # names sort in the order drawn whatever the count
    paths = save_images([Image.new("RGB", (1, 1))] * 101, tmp_path / "many")
    assert [p.name for p in paths][:2] == ["image_000.png", "image_001.png"] and paths[-1].name == "image_100.png"
    assert sorted(paths) == paths


def test_an_init_image_is_decoded_as_the_training_images_are(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from pipelines.generate import read_init_image
    from pipelines.text_to_image import pil_to_tensor

    def encoded(path):  # [0, 255] pixels of what generate encodes, at 16 px
        return (pil_to_tensor(read_init_image(path, None), 16) + 1) * 127.5

    clear = np.zeros((16, 16, 4), np.uint8)
    clear[4:12, 4:12] = [255, 0, 0, 255]  # a red square on a transparent (black beneath) ground
    Image.fromarray(clear).save(tmp_path / "rgba.png")
    assert encoded(tmp_path / "rgba.png")[:, 0, 0].tolist() == [255, 255, 255]  # white, as the data's backgrounds
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / "grey16.png")  # 50 % grey, 16 bits
    assert abs(encoded(tmp_path / "grey16.png")[:, 8, 8] - 127.5).max() < 2
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:, :8], pixels[:, 8:] = [255, 0, 0], [0, 0, 255]  # stored red left, blue right; shown rotated
    sideways = Image.fromarray(pixels)
    exif = sideways.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to show (a phone's portrait photo)
    sideways.save(tmp_path / "portrait.png", exif=exif.tobytes())
    shown = encoded(tmp_path / "portrait.png")
    assert shown[0, 1, 8] > 200 and shown[2, 14, 8] > 200  # red on top, blue below, as every viewer shows it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 256 pixels is more than twice that: PIL refuses it
    with pytest.raises(UserError, match="rgba.png is too large to decode safely .*pass a downscaled copy"):
        read_init_image(tmp_path / "rgba.png", None)


def test_a_copied_run_reads_its_own_stages_from_any_folder(run_a, tmp_path, monkeypatch):
    assert json.loads((run_a / "stages.json").read_text()) == {name: name for name in ("vae", "clip", "judge", "unet")}
    copy = tmp_path / "copy"
    shutil.copytree(run_a, copy)
    own = {"vae": copy / "vae", "clip": copy / "clip", "unet": copy / "unet"}
    monkeypatch.chdir(tmp_path)
    assert stage_paths("copy") == {name: Path("copy") / name for name in own} and judge_path("copy") == Path(
        "copy/judge")
    assert {name: info.path for name, info in load_stack(copy, device="cpu").infos.items()} == own
    # files written before: paths relative to the folder train_all ran in, or absolute, naming the original run;
    # read from that folder, where they still lead to the original, the copy takes its own folders
    monkeypatch.chdir(run_a.parent)
    for old in ({name: f"{run_a.name}/{name}" for name in (*own, "judge")},
                {name: str(run_a / name) for name in (*own, "judge")}):
        (copy / "stages.json").write_text(json.dumps(old))
        assert stage_paths(copy) == own and judge_path(copy) == copy / "judge"
    # an older record of a stage taken from elsewhere, read from a folder where it leads nowhere: one clear error
    shutil.rmtree(copy / "vae")
    (copy / "stages.json").write_text(json.dumps({"vae": "runs/A/vae"}))
    with pytest.raises(StageError, match=r"stages.json puts the vae stage at 'runs/A/vae', which is neither under "
                                         r".*copy nor an existing absolute path; .* or pass --vae FOLDER"):
        stage_paths(copy)


def test_a_stages_record_leads_to_the_same_folders_through_a_symlinked_run_folder(tmp_path):
    real, link = tmp_path / "runs", tmp_path / "links"
    for folder in (real / "A" / "vae", real / "B", link / "A" / "vae"):  # links/A/vae: another folder of that name
        folder.mkdir(parents=True)
    (link / "B").symlink_to(real / "B")
    write_stages_record(real / "B", {"vae": real / "A" / "vae"})  # "../A/vae"
    assert recorded_stage(link / "B", "vae").samefile(real / "A" / "vae")
    write_stages_record(link / "B", {"vae": real / "A" / "vae"})  # written through the link
    assert json.loads((real / "B" / "stages.json").read_text()) == {"vae": "../A/vae"}
    assert recorded_stage(link / "B", "vae").samefile(real / "A" / "vae")
    assert recorded_stage(real / "B", "vae") == real / "A" / "vae"  # no link on the way: shown without '..'


def test_evaluate_refuses_a_validation_split_too_small_for_fd_before_sampling(run_a, tmp_path, monkeypatch):
    from pipelines import evaluate

    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("sampled before checking the data"))
    with pytest.raises(UserError, match=r"the validation split of shapes:12 has 1 row\(s\) .* FD and KID need at "
                                        r"least 2 real images: evaluate on a data set of at least 20 rows"):
        evaluate.main(["--run", str(run_a), "--data", "shapes:12", "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert not (tmp_path / "o").exists()


def test_truncated_stage_weights_are_reported_by_name(run_a, tmp_path):
    vae = tmp_path / "vae"
    shutil.copytree(run_a / "vae", vae)
    weights = vae / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(StageError, match=f"weights file {weights} is truncated or corrupt"):
        load_stack(run_a, vae=vae, device="cpu")


def test_reuse_trains_only_the_missing_stage(run_a, tmp_path):
    run = tmp_path / "B"
    train_all.main(["--data", DATA, "--run", str(run), "--preset", "tiny", "--device", "cpu", "--skip-eval",
                    "--reuse", f"vae={run_a / 'vae'}", "--reuse", f"clip={run_a / 'clip'}",
                    "--unet.div_weight=0", "--unet.cons_weight=0"])
    assert not (run / "vae").exists() and not (run / "clip").exists()
    stages = json.loads((run / "stages.json").read_text())
    assert stages["unet"] == "unet" and Path(os.path.normpath(run / stages["vae"])) == run_a / "vae"
    assert stage_paths(run) == {"vae": run_a / "vae", "clip": run_a / "clip", "unet": run / "unet"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", LineageWarning)  # reused stages are the UNet's own lineage
        stack = load_stack(run, device="cpu")
    assert stack.infos["unet"].training["loss"]["div_weight"] == 0


def test_a_unet_on_per_channel_latents_samples_through_its_own_normalisation(run_a, tmp_path):
    run = tmp_path / "C"
    common = ["--data", DATA, "--preset", "tiny", "--device", "cpu", "--skip-eval",
              "--unet.latent_normalisation=per_channel", "--unet.lowres_epochs=0"]
    # a VAE stage from before the per-channel moments were recorded: refused before anything trains
    old_vae = tmp_path / "old_vae"
    shutil.copytree(run_a / "vae", old_vae)
    config = json.loads((old_vae / "config.json").read_text())
    del config["model"]["latents_mean"], config["model"]["latents_std"]
    (old_vae / "config.json").write_text(json.dumps(config))
    with pytest.raises(StageError, match="VAE stage at .* has no per-channel latent moments.*retrain the VAE stage"
                                         ".*latent_normalisation=global"):
        train_all.main(common + ["--run", str(tmp_path / "D"), "--reuse", f"vae={old_vae}"])
    assert not (tmp_path / "D").exists()  # the CLIP did not train either

    train_all.main(common + ["--run", str(run), "--reuse", f"vae={run_a / 'vae'}", "--reuse", f"clip={run_a / 'clip'}"])
    # at generation, a VAE without the moments is named with the fix before any weights load
    with pytest.raises(StageError, match="has no per-channel latent moments .*, which the UNet at .* needs .*; pass "
                                         "the VAE stage the UNet was trained on"):
        load_stack(run, vae=old_vae, device="cpu")
    stack = load_stack(run, device="cpu")
    vae_config = stack.vae.config
    assert stack.latent_normalisation.shift == vae_config.latents_mean
    assert stack.latent_normalisation.scale == tuple(1 / std for std in vae_config.latents_std)
    # image-to-image at a vanishing strength hands back the VAE's reconstruction: the UNet's latents are mapped
    # to the VAE's and back as it trained
    init = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        recon = stack.vae.decode(stack.vae.encode(init).mode()).clamp(-1, 1)
    kept = generate(stack, ["a red circle", "a blue square"], [0, 1], GenerationSettings(size=64, steps=10),
                    init_images=init, strength=0.001)
    assert (kept - recon).abs().mean() < 0.02
    with pytest.raises(ExportError, match="normalised per channel.*latent_normalisation=global"):
        export_diffusers(run, tmp_path / "export")


def test_stages_recorded_before_a_setting_existed_are_what_its_old_value_asks(run_a, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(run_a, run)
    for folder in (run / "unet", run / "unet" / "lowres"):  # as written before these settings existed
        config = json.loads((folder / "config.json").read_text())
        del config["training"]["latent_normalisation"], config["training"]["keep_colour_sentence"]
        del config["model"]["qk_norm"], config["model"]["pooled_context"], config["training"]["schedule"]["snr_shift"]
        (folder / "config.json").write_text(json.dumps(config))
    fingerprint = read_stage(run / "unet").fingerprint
    train_all.main(["--data", DATA, "--run", str(run), "--preset", "tiny", "--device", "cpu", "--skip-eval"])
    assert read_stage(run / "unet").fingerprint == fingerprint  # every stage kept, nothing trained again
    stack = load_stack(run, device="cpu")
    assert stack.latent_normalisation.shift is None and stack.schedule.config.snr_shift == 1.0
    with pytest.raises(StageError, match="latent_normalisation was 'global', now 'per_channel'"):
        train_all.main(["--data", DATA, "--run", str(run), "--preset", "tiny", "--device", "cpu", "--skip-eval",
                        "--unet.latent_normalisation=per_channel"])


def test_swapped_stage_warns_and_misfit_is_an_error(run_a, tmp_path):
    other_clip = tmp_path / "clip"
    train_all.train_stage("clip", train_all.stage_config("clip", "tiny", {"seed": "5"}), tmp_path, "shapes:40", {}, "cpu")
    with pytest.warns(LineageWarning) as record:  # one warning for the CLIP, one for its tokenizer
        load_stack(run_a, clip=other_clip, device="cpu")
    messages = [str(w.message) for w in record]
    assert any("not trained with the clip at" in m for m in messages)
    assert any("not trained with the tokenizer at" in m for m in messages)
    narrow = tmp_path / "narrow"
    narrow_cfg = train_all.stage_config("clip", "tiny", {"text_width": "32", "text_heads": "2"})
    train_all.train_stage("clip", narrow_cfg, tmp_path / "n", "shapes:40", {}, "cpu")
    shutil.move(tmp_path / "n" / "clip", narrow)
    with pytest.raises(StageError, match="32-wide text states but the UNet .* cross-attends to 64"):
        load_stack(run_a, clip=narrow, device="cpu")


def test_unknown_stage_override_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="prefix a config key with its stage"):
        train_all.main(["--data", DATA, "--run", str(tmp_path / "r"), "--lr=1"])
    with pytest.raises(ConfigError, match="--reuse takes STAGE=FOLDER"):
        train_all.main(["--data", DATA, "--run", str(tmp_path / "r"), "--reuse", "vea=x"])


@pytest.mark.parametrize("bad", ["--unet.foo=1", "--unet.model.head_dim=12", "--clip.zh_prob=2",
                                 "--unet.model.context_dim=48", "--unet.model.in_channels=3",
                                 "--unet.augment.prob=1.5", "--unet.cuda_graph=true",
                                 "--clip.cuda_graph=true"])
def test_bad_stage_config_fails_before_anything_trains(tmp_path, bad):
    started = time.perf_counter()
    with pytest.raises((ConfigError, StageError)):
        train_all.main(["--data", DATA, "--run", str(tmp_path / "r"), "--preset", "tiny", "--device", "cpu", bad])
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "r").exists()  # nothing trained, and no empty run folder left behind


def test_a_run_folder_another_command_trains_into_is_refused_before_anything_trains(tmp_path):
    with folder_lock(tmp_path / "r", "train_all.py --run r (the first)"):
        with pytest.raises(StageError, match=r"r is in use by another command \(train_all.py --run r \(the first\)"):
            train_all.main(["--data", DATA, "--run", str(tmp_path / "r"), "--preset", "tiny", "--device", "cpu"])
        assert [p.name for p in (tmp_path / "r").iterdir()] == [".lock"]


def test_unet_init_from_is_checked_before_anything_trains(run_a, tmp_path):
    base = ["--data", DATA, "--run", str(tmp_path / "r"), "--preset", "tiny", "--device", "cpu"]
    with pytest.raises(StageError, match="holds a 'vae' stage, but a 'unet' stage was expected"):
        train_all.main(base + [f"--unet.init_from={run_a / 'vae'}"])
    with pytest.raises(ConfigError, match="another architecture.*model.base_channels was 32, now 48"):
        train_all.main(base + [f"--unet.init_from={run_a / 'unet'}", "--unet.model.base_channels=48"])
    assert not (tmp_path / "r").exists()  # the VAE and CLIP did not train first


def test_user_error_at_the_command_line_is_one_line_without_traceback(tmp_path):
    command = [sys.executable, "train_all.py", "--data", DATA, "--run", str(tmp_path / "r"), "--preset", "tiny",
               "--unet.model.head_dim=12"]  # the tiny preset's widths on a GPU machine too
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("SCRATCH_DIFFUSION_DEBUG", None)
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: UNet level width 32 is not divisible by head_dim=12; pick base_channels/channel_mult/head_dim that "
        "divide"]
    debug = subprocess.run(command + ["--debug"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "head_dim=12" in debug.stderr


def test_a_flag_the_parser_refuses_is_one_line_too():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("SCRATCH_DIFFUSION_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "pipelines.generate", "--run", "r", "--prompt", "a", "--steps", "abc"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: argument --steps: invalid int value: 'abc' (see python -m pipelines.generate --help)"]


def test_a_file_that_cannot_be_written_is_one_line_too(capsys, monkeypatch):
    from engine.errors import run_cli

    def fails():
        raise FileNotFoundError(2, "No such file or directory", "/proc/x")

    monkeypatch.delenv("SCRATCH_DIFFUSION_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["command"])
    with pytest.raises(SystemExit) as stopped:
        run_cli(fails)
    assert stopped.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: [Errno 2] No such file or directory: '/proc/x'; check the paths given and the disk (--debug shows "
        "where)"]
    monkeypatch.setattr(sys, "argv", ["command", "--debug"])
    with pytest.raises(FileNotFoundError):
        run_cli(fails)
    with pytest.raises(OSError):  # one about no file is a bug's: its traceback stays
        run_cli(lambda: (_ for _ in ()).throw(OSError("device busy")))


def test_help_prints_the_description_once(capsys):
    with pytest.raises(SystemExit):
        train_all.main(["--help"])
    assert capsys.readouterr().out.count("Train the whole stack in sequence") == 1


ROOT = Path(__file__).resolve().parents[1]
# the project's modules that run a command through run_cli: top-level scripts and the package folders' modules
# (not the tests, nor a hidden virtual environment)
PACKAGES = [folder for folder in ROOT.iterdir() if folder.is_dir() and not folder.name.startswith(".")
            and folder.name != "tests" and any(folder.glob("*.py"))]
COMMANDS = sorted(".".join(path.relative_to(ROOT).with_suffix("").parts)
                  for path in [*ROOT.glob("*.py"), *(p for folder in PACKAGES for p in folder.glob("**/*.py"))]
                  if "run_cli(main)" in path.read_text(encoding="utf-8"))


def test_the_commands_are_found():
    assert {"train_all", "vae.train", "clip.train", "diffusion.train", "pipelines.generate",
            "benchmarks.sampling_sweep"} <= set(COMMANDS)


def test_every_module_run_as_a_command_goes_through_run_cli():
    # one that calls main() itself would print a user error (a wrong stage folder, a bad option) as a traceback
    import ast

    def main_block(path: Path) -> str | None:  # what the module runs as a command, as source
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
                return "\n".join(ast.unparse(statement) for statement in node.body)
        return None

    blocks = {".".join(path.relative_to(ROOT).with_suffix("").parts): main_block(path)
              for path in [*ROOT.glob("*.py"), *(p for folder in PACKAGES for p in folder.glob("**/*.py"))]}
    runnable = {module: block for module, block in blocks.items() if block is not None}
    assert {"train_all", "benchmarks.sampling_sweep"} <= set(runnable)
    assert {module: block for module, block in runnable.items() if block != "run_cli(main)"} == {}


# each measuring command with its required arguments, none of which exists (or one bad count where it needs none):
# the refusal comes before any of them is read
RESULT_COMMANDS = {
    "benchmarks.attention_backends": ["--warmup", "0"], "benchmarks.step_breakdown": ["--warmup", "0"],
    "benchmarks.step_speed": ["--stages", "none"],
    "benchmarks.generate_speed": ["--run", "missing"], "benchmarks.export_check": ["--run", "missing"],
    "benchmarks.colour_trajectory": ["--run", "missing"], "benchmarks.clip_colours": ["--clip", "missing", "--data",
                                                                                      "missing"],
    "benchmarks.colour_breakdown": ["--pairs", "missing.png", "--data", "missing"],
    "benchmarks.copy_rule_check": ["--data", "missing"], "benchmarks.silhouette_check": ["--data", "missing"],
    "benchmarks.grid_measure": ["missing.png", "--data", "missing"],
    "benchmarks.real_reference": ["--data", "missing", "--judge", "missing"],
    "benchmarks.latent_channels": ["--vae", "missing", "--data", "missing"],
    "benchmarks.copy_recurrence": ["a.json", "b.json"], "pipelines.paired": ["a.json", "b.json"],
}


@pytest.mark.parametrize("module", sorted(RESULT_COMMANDS))
def test_a_measuring_command_keeps_an_earlier_result_unless_told(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = importlib.import_module(module)
    Path("result.json").write_text("{}")
    with pytest.raises(UserError, match=r"result.json exists \(an earlier result\); pass another --out, or "
                                        r"--overwrite"):
        command.main([*RESULT_COMMANDS[module], "--out", "result.json"])
    assert Path("result.json").read_text() == "{}"
    with pytest.raises(UserError, match="is a folder; pass a file path"):
        command.main([*RESULT_COMMANDS[module], "--out", "."])
    with pytest.raises(UserError) as past_the_check:  # now the missing inputs (or the bad count) stop it
        command.main([*RESULT_COMMANDS[module], "--out", "result.json", "--overwrite"])
    assert "an earlier result" not in str(past_the_check.value)


def test_every_command_that_writes_files_is_checked_for_earlier_results():
    # the commands with refusals of their own, each tested beside it; a new command must join one of the lists
    own_refusal = {"benchmarks.sampling_sweep", "benchmarks.bench_vs_diffusers", "benchmarks.spike_screen",
                   "benchmarks.untrained_run", "pipelines.compare", "pipelines.evaluate", "pipelines.export",
                   "pipelines.study", "pipelines.generate"}  # the stage trainers' --out comes from engine.cli

    def source(module: str) -> str:
        return (ROOT / Path(*module.split("."))).with_suffix(".py").read_text(encoding="utf-8")

    writes = {module for module in COMMANDS if '"--out"' in source(module) or "add_result_flags(" in source(module)}
    assert own_refusal <= writes and writes - own_refusal == set(RESULT_COMMANDS)


def test_one_file_is_not_two_results(tmp_path):
    from benchmarks import colour_trajectory

    with pytest.raises(UserError, match=r"--out and --plot are both .*same.png; pass a different file to each"):
        colour_trajectory.main(["--run", "missing", "--out", str(tmp_path / "same.png"), "--plot",
                                str(tmp_path / "same.png")])
    (tmp_path / "strip.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"strip.png exists \(an earlier result\); pass another --strip"):
        colour_trajectory.main(["--run", "missing", "--out", str(tmp_path / "a.json"), "--strip",
                                str(tmp_path / "strip.png")])
    from benchmarks import silhouette_check

    with pytest.raises(UserError, match=r"strip.png exists \(an earlier result\); pass another --pairs"):
        silhouette_check.main(["--data", "missing", "--pairs", str(tmp_path / "strip.png")])


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_lists_debug_in_its_help(module, capsys):
    # run_cli takes --debug out before main parses it, so only the parser's listing tells a user it exists
    try:
        command = importlib.import_module(module)
    except SystemExit as missing:  # a command that needs an optional dependency (diffusers) says so on import
        if "pip install" not in str(missing):
            raise
        pytest.skip(str(missing))
    with pytest.raises(SystemExit):
        command.main(["--help"])
    assert "--debug" in capsys.readouterr().out


def test_img2img_with_tiny_strength_returns_the_input(run_a):
    stack = load_stack(run_a, device="cpu")
    settings = GenerationSettings(size=64, steps=10)
    init = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        recon = stack.vae.decode(stack.vae.encode(init).mode()).clamp(-1, 1)
    kept = generate(stack, ["a red circle", "a blue square"], [0, 1], settings, init_images=init, strength=0.001)
    redrawn = generate(stack, ["a red circle", "a blue square"], [0, 1], settings, init_images=init, strength=1.0)
    near = (kept - recon).abs().mean()
    assert near < 0.02  # at strength -> 0 the output is the autoencoder's reconstruction of the input
    assert (redrawn - recon).abs().mean() > 10 * near
    with pytest.raises(ValueError, match="strength"):
        generate(stack, ["x"], [0], settings, init_images=init[:1], strength=0.0)
    with pytest.raises(ValueError, match="got 1 init images for 2 prompts; give one per prompt"):
        generate(stack, ["a red circle", "a blue square"], [0, 1], settings, init_images=init[:1], strength=0.5)


@pytest.mark.parametrize("sampler, eta", [("dpmpp_2m", 0.0), ("dpmpp_2m", 0.5), ("ddim", 0.0), ("ddim", 1.0),
                                          ("ddpm", 0.0)])
def test_generation_is_deterministic_per_seed(run_a, sampler, eta):
    stack = load_stack(run_a, device="cpu")
    settings = GenerationSettings(size=64, steps=4, sampler=sampler, eta=eta)
    a = generate(stack, ["a red circle", "a green square"], [3, 4], settings)
    b = generate(stack, ["a green square"], [4], settings)  # the same seed gives the same image in any batch
    assert a.shape == (2, 3, 64, 64) and torch.allclose(a[1], b[0], atol=1e-5)
    with pytest.raises(UserError, match="size must be a positive number of pixels, got 0"):
        GenerationSettings(size=0)
    with pytest.raises(UserError, match=r"size 56 does not fit the stages: a size must be a positive multiple of 16 "
                                        r"\(the VAE downsamples by 8, the UNet by 2 more\); try 48 or 64"):
        generate(stack, ["a red circle"], [0], GenerationSettings(size=56, steps=1))  # what the CLIs check up front
    for scale in (-1.0, float("nan"), float("inf")):  # NaN and inf drew black pictures without a word
        with pytest.raises(ValueError, match="guidance scale must be a finite number >= 0"):
            GenerationSettings(guidance_scale=scale)
        with pytest.raises(ValueError, match="autoguidance scale must be a finite number >= 0"):
            GenerationSettings(autoguidance_scale=scale)
    with pytest.raises(ValueError, match="condition noise must be"):
        GenerationSettings(condition_noise=(float("inf"), 0.5, 5.0))
    for bad, message in (({"eta": 0.5, "sampler": "ddpm"}, "eta=0.5 applies to the ddim and dpmpp_2m samplers only"),
                         ({"eta": 1.5}, "eta must be in \\[0, 1\\]"),
                         ({"eta": -0.1, "sampler": "ddim"}, "eta must be in \\[0, 1\\]")):
        with pytest.raises(UserError, match=message):  # refused as settings, before any model is loaded
            GenerationSettings(**bad)


def test_guidance_interval_reaches_generation(run_a):  # which levels it guides: tests/test_guidance.py
    stack = load_stack(run_a, device="cpu")
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]

    def images(**settings):
        return generate(stack, prompts, seeds, GenerationSettings(**{"size": 64, "steps": 4, "guidance_scale": 4.0,
                                                                     **settings}))

    guided_everywhere, unguided = images(guidance_interval=None), images(guidance_scale=1.0)
    assert not torch.allclose(guided_everywhere, unguided, atol=1e-3)
    # every level lies in (0, inf] (the first, pure-noise one too); none lies in (1e6, 1e7]
    assert torch.allclose(images(guidance_interval=[0.0, float("inf")]), guided_everywhere, atol=1e-5)
    assert torch.allclose(images(guidance_interval=(1e6, 1e7)), unguided, atol=1e-5)


def test_step_noise_limit_reaches_generation(run_a):  # which steps it makes stochastic: tests/test_samplers.py
    stack = load_stack(run_a, device="cpu")

    def images(**settings):
        return generate(stack, ["a red circle", "a blue square"], [0, 1],
                        GenerationSettings(**{"size": 64, "steps": 4, **settings}))

    deterministic, stochastic = images(eta=0.0), images(eta=1.0)
    assert not torch.allclose(deterministic, stochastic, atol=1e-3)
    assert torch.equal(images(eta=1.0, eta_sigma_max=1e-6), deterministic)  # no level is below it
    windowed = images(eta=1.0, eta_sigma_max=1e6)  # every level but the pure-noise start
    assert not torch.allclose(windowed, deterministic, atol=1e-3)
    assert torch.equal(images(), images(eta=DEFAULT_STEP_NOISE[0], eta_sigma_max=DEFAULT_STEP_NOISE[1]))


def test_condition_noise_reaches_generation(run_a):  # which levels it anneals: tests/test_guidance.py
    stack = load_stack(run_a, device="cpu")

    def images(**settings):
        return generate(stack, ["a red circle", "a blue square"], [0, 1],
                        GenerationSettings(**{"size": 64, "steps": 4, "eta": 0.0, **settings}))

    plain, annealed = images(condition_noise=None), images(condition_noise=(0.5, 0.5, 50.0))
    assert not torch.allclose(annealed, plain, atol=1e-3)
    assert torch.equal(annealed, images(condition_noise=[0.5, 0.5, 50.0]))  # its noise comes from the seeds
    default = images()  # the generation default anneals too
    assert torch.equal(default, images(condition_noise=DEFAULT_CONDITION_NOISE))
    assert not torch.allclose(default, plain, atol=1e-3)


def test_autoguidance_reaches_generation_and_a_guide_that_cannot_guide_is_refused(run_a, guide_a, tmp_path):
    stack = load_stack(run_a, device="cpu")  # which branch it replaces: tests/test_guidance.py

    def images(**settings):
        return generate(stack, ["a red circle", "a blue square"], [0, 1], GenerationSettings(
            **{"size": 64, "steps": 4, "eta": 0.0, "guidance_scale": 4.0, "guidance_interval": None, **settings}))

    guide = str(guide_a)  # one epoch at the UNet's resolution: a weaker model on the same VAE and CLIP
    autoguided, classifier_free, unguided = images(guide_unet=guide), images(), images(guidance_scale=1.0)
    alone = images(guide_unet=guide, guidance_scale=1.0, autoguidance_scale=3.0)
    for other in (classifier_free, unguided, alone):
        assert not torch.allclose(autoguided, other, atol=1e-3)
    assert not torch.allclose(alone, unguided, atol=1e-3)
    assert torch.equal(autoguided, images(guide_unet=guide))
    # the UNet as its own guide adds nothing to classifier-free guidance, nor to its conditional prediction
    torch.testing.assert_close(images(guide_unet=str(run_a / "unet")), classifier_free, atol=1e-5, rtol=0)
    torch.testing.assert_close(images(guide_unet=str(run_a / "unet"), guidance_scale=1.0), unguided, atol=1e-5,
                               rtol=0)
    assert f"guidance 4 and autoguidance 1.5 away from the UNet at {guide} at every level" in GenerationSettings(
        guide_unet=guide, guidance_interval=None).describe()

    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    asked = sampling_settings(parser.parse_args(["--guide-unet", guide, "--autoguidance", "3"]))
    assert (asked.guide_unet, asked.autoguidance_scale) == (guide, 3.0)
    assert sampling_settings(parser.parse_args([])).guide_unet is None  # classifier-free unless asked
    with pytest.raises(UserError, match="--autoguidance sets the push away from --guide-unet's UNet; add"):
        sampling_settings(parser.parse_args(["--autoguidance", "3"]))  # no guide: it would change nothing
    with pytest.raises(UserError, match="autoguidance scale must be a finite number >= 0"):
        GenerationSettings(autoguidance_scale=-1.0)
    with pytest.raises(StageError, match="does not exist"):  # refused before any model loads
        GenerationSettings(guide_unet=str(tmp_path / "missing"))
    with pytest.raises(StageError, match="vae"):
        GenerationSettings(guide_unet=str(run_a / "vae"))
    other = tmp_path / "other_lineage"  # a UNet trained on another VAE: its latents mean something else
    shutil.copytree(guide_a, other)
    config = json.loads((other / "config.json").read_text())
    config["trained_on"]["vae"] = "0" * 16
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(StageError, match="cannot guide the UNet at .*: it was trained on another VAE; guide with"):
        images(guide_unet=str(other))
    config["trained_on"]["vae"] = read_stage(guide_a).trained_on["vae"]
    config["training"]["latent_normalisation"] = "per_channel"  # the same VAE's latents, mapped otherwise
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(StageError, match="cannot guide the UNet at .*: its latent normalisation differs; guide"):
        images(guide_unet=str(other))
    config["training"]["latent_normalisation"] = read_stage(guide_a).training["latent_normalisation"]
    config["training"]["schedule"]["snr_shift"] = 4.0  # the same latents, noised on another schedule
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(StageError, match="cannot guide the UNet at .*: its schedule differs; guide"):
        images(guide_unet=str(other))
    del config["training"]["schedule"]["snr_shift"]  # recorded before the setting existed: it trained unshifted
    (other / "config.json").write_text(json.dumps(config))
    assert torch.equal(images(guide_unet=str(other)), autoguided)
    # the run's low-resolution phase: same VAE, CLIP and schedule, but its predictions are for 32-px images
    with pytest.raises(StageError, match="cannot guide the UNet at .*: it was trained at 32 px, the UNet at 64 px; "
                                         "guide with .* at the UNet's resolution"):
        images(guide_unet=str(run_a / "unet" / "lowres"))


def test_evaluate_and_the_sweep_refuse_a_guide_that_cannot_guide_before_loading_the_stages(run_a, tmp_path,
                                                                                           monkeypatch):
    from benchmarks import sampling_sweep
    from pipelines import evaluate

    for module in (evaluate, sampling_sweep):
        monkeypatch.setattr(module, "load_stack", lambda *a, **k: pytest.fail("loaded the stages first"))
    guide = ["--guide-unet", str(run_a / "unet" / "lowres")]  # 32-px predictions for a 64-px UNet
    message = "cannot guide the UNet at .*: it was trained at 32 px, the UNet at 64 px"
    with pytest.raises(StageError, match=message):
        evaluate.main(["--run", str(run_a), "--data", DATA, "--out", str(tmp_path / "e"), *guide])
    with pytest.raises(StageError, match=message):
        sampling_sweep.main(["--run", str(run_a), "--data", DATA, "--out", str(tmp_path / "sweep.json"),
                             "--guidance", "1", "--interval", "none", *guide])


@pytest.mark.parametrize("flag", ["--batch", "--repeats", "--fast-steps"])
def test_generate_speed_refuses_nothing_to_time_before_loading_the_stages(run_a, monkeypatch, flag):
    from benchmarks import generate_speed

    monkeypatch.setattr(generate_speed, "load_stack", lambda *a, **k: pytest.fail("loaded the stages first"))
    with pytest.raises(UserError, match="--batch, --repeats and --fast-steps must be at least 1"):
        generate_speed.main(["--run", str(run_a), flag, "0"])


@pytest.mark.parametrize("sections", ["", "cases,bogus"])
def test_generate_speed_refuses_unknown_sections_before_loading_the_stages(run_a, monkeypatch, sections):
    from benchmarks import generate_speed

    monkeypatch.setattr(generate_speed, "load_stack", lambda *a, **k: pytest.fail("loaded the stages first"))
    with pytest.raises(UserError, match="names none or unknown parts; choose from cases, variants, seconds"):
        generate_speed.main(["--run", str(run_a), "--sections", sections])


@pytest.mark.parametrize("flag", [[], ["--cudnn-benchmark"]])
def test_generate_speed_times_only_the_sections_asked_for_under_the_cudnn_setting_asked_for(run_a, tmp_path,
                                                                                             monkeypatch, flag):
    from benchmarks import generate_speed

    seen = []
    monkeypatch.setattr(generate_speed, "where_the_seconds_go",
                        lambda *a: seen.append(torch.backends.cudnn.benchmark) or {"total_s": 1.0})
    for part in ("generate_speed", "default_case_variants"):
        monkeypatch.setattr(generate_speed, part, lambda *a, part=part: pytest.fail(f"timed {part}, not asked for"))
    before = torch.backends.cudnn.benchmark
    result = generate_speed.main(["--run", str(run_a), "--sections", "seconds", *flag, "--device", "cpu",
                                  "--out", str(tmp_path / "speed.json")])
    assert seen == [bool(flag)] and torch.backends.cudnn.benchmark is before
    assert result["cases"] == [] and result["default_case_variants"] == []
    assert json.loads((tmp_path / "speed.json").read_text())["cudnn_benchmark"] is bool(flag)


def test_generate_speed_times_each_interval_case_on_both_unet_paths(run_a):
    from benchmarks.generate_speed import generate_speed

    stack = load_stack(run_a, device="cpu")
    rows = generate_speed(stack, batch=2, repeats=1, guidance_scale=4.0,
                          cases=[("dpmpp_2m", 3, (0.5, 5.0), None), ("dpmpp_2m", 3, None, 0.0)])
    assert [(r["guidance_interval"], r["cuda_graph"]) for r in rows] == [((0.5, 5.0), False), ((0.5, 5.0), True),
                                                                         (None, False), (None, True)]
    assert [(r["eta"], r["eta_sigma_max"]) for r in rows[::2]] == [DEFAULT_STEP_NOISE, (0.0, None)]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert rows[1]["max_abs_diff_vs_eager"] == 0.0  # on the CPU both paths are eager: the same images


def _norm_precisions(model: torch.nn.Module) -> set[bool]:
    return {m.low_precision for m in model.modules() if isinstance(m, LOW_PRECISION_NORMS)}


def test_a_loaded_stack_runs_each_models_norms_in_the_precision_it_trained_them_in(run_a, tmp_path):
    stack = load_stack(run_a, device="cpu")  # the tiny preset trains the VAE and UNet with bf16 norms, CLIP without
    assert (_norm_precisions(stack.vae), _norm_precisions(stack.unet), _norm_precisions(stack.clip)) == \
        ({True}, {True}, {False})
    unet = tmp_path / "unet"
    shutil.copytree(run_a / "unet", unet)
    config = json.loads((unet / "config.json").read_text())
    config["training"]["train"]["low_precision_norms"] = False
    (unet / "config.json").write_text(json.dumps(config))
    assert _norm_precisions(load_stack(run_a, unet=unet, device="cpu").unet) == {False}


def test_compile_unet_compiles_the_stacks_unet_once_and_samples_through_it(run_a, monkeypatch):
    compiled, calls = [], []

    def compile_spy(module):  # torch.compile itself takes minutes on the CPU; what matters is that it is used
        compiled.append(module)
        return lambda *args: calls.append(1) or module(*args)

    monkeypatch.setattr(torch, "compile", compile_spy)
    stack = load_stack(run_a, device="cpu")
    settings = dict(size=64, steps=3, eta=0.0)
    plain = generate(stack, ["a red circle"], [5], GenerationSettings(**settings))
    assert compiled == [] and calls == []
    first = generate(stack, ["a red circle"], [5], GenerationSettings(**settings, compile_unet=True))
    again = generate(stack, ["a red circle"], [5], GenerationSettings(**settings, compile_unet=True))
    assert compiled == [stack.unet] and len(calls) > 0  # compiled once for the stack, then reused
    assert torch.equal(first, plain) and torch.equal(again, plain)


def test_generate_speed_times_the_default_case_three_ways_and_leaves_the_norms_as_loaded(run_a, monkeypatch):
    from benchmarks.generate_speed import default_case_variants, where_the_seconds_go

    monkeypatch.setattr(torch, "compile", lambda module: module)
    stack = load_stack(run_a, device="cpu")
    rows = default_case_variants(stack, batch=2, repeats=1, guidance_scale=4.0)
    assert [r["variant"] for r in rows] == ["as loaded", "compiled", "fp32 norms"]
    assert all(r["images_per_s"] > 0 and r["max_abs_diff_vs_as_loaded"] == 0.0 for r in rows)  # CPU: no autocast
    assert _norm_precisions(stack.unet) == _norm_precisions(stack.vae) == {True}
    split = where_the_seconds_go(stack, batch=2, repeats=1, guidance_scale=4.0)
    assert split["total_s"] == pytest.approx(split["text_encoding_s"] + split["vae_decode_s"] + split["sampling_s"])
    assert min(split.values()) > 0


def test_an_untrained_run_loads_as_a_stack_of_the_presets_sizes_and_generates(tmp_path):
    from benchmarks.untrained_run import main as untrained_run

    run = untrained_run(["--out", str(tmp_path / "untrained"), "--preset", "tiny"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its stages fit and name each other: no lineage warning
        stack = load_stack(run, device="cpu")
    tiny = build_config(UNetTrainConfig, UNET_PRESETS, "tiny")
    assert stack.image_size == tiny.resolution and stack.unet.config.base_channels == tiny.model.base_channels
    assert stack.unet.config.context_dim == stack.clip.context_dim
    # no weight left at its zero init: the untrained UNet predicts something, so image comparisons can differ
    assert all(p.any() for model in (stack.vae, stack.clip, stack.unet) for p in model.parameters() if p.ndim > 1)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    assert stack.unet(x, t, stack.clip.text_states(["a red pokemon"])).abs().min() > 0
    images = generate(stack, ["a red pokemon", "一只红色的宝可梦"], [0, 1], GenerationSettings(size=64, steps=3))
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    with pytest.raises(StageError, match="already holds a stage"):  # never writes over stages
        untrained_run(["--out", str(run), "--preset", "tiny"])


def test_sampling_options_choose_the_guidance_interval():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    assert sampling_settings(parser.parse_args([])).guidance_interval == GenerationSettings().guidance_interval
    assert GenerationSettings().guidance_interval is not None  # the default guides an interval
    assert sampling_settings(parser.parse_args(["--guide-every-level"])).guidance_interval is None
    assert sampling_settings(parser.parse_args(["--guidance-interval", "1", "2"])).guidance_interval == (1.0, 2.0)

    def noise(*options):
        settings = sampling_settings(parser.parse_args(list(options)))
        return settings.eta, settings.eta_sigma_max

    assert noise() == DEFAULT_STEP_NOISE and DEFAULT_STEP_NOISE[0] > 0  # the default: some noise, below a level
    assert noise("--eta", "0.3") == (0.3, None)  # a given eta: at every step unless limited
    assert noise("--eta", "0") == (0.0, None)
    assert noise("--eta-sigma-max", "2.5") == (DEFAULT_STEP_NOISE[0], 2.5)
    assert noise("--eta", "0.5", "--eta-sigma-max", "2.5") == (0.5, 2.5)
    assert noise("--sampler", "ddpm") == (0.0, None)  # ancestral already: no step noise to add
    ddpm = sampling_settings(parser.parse_args(["--sampler", "ddpm"])).describe()
    assert "ancestral step noise" in ddpm and "no step noise" not in ddpm  # as the pictures' captions say it
    with pytest.raises(UserError, match="eta is 0"):  # a limit on no step noise is refused, not ignored
        noise("--eta", "0", "--eta-sigma-max", "2.5")
    with pytest.raises(UserError, match="eta_sigma_max=2.5 applies to the ddim and dpmpp_2m samplers only"):
        noise("--sampler", "ddpm", "--eta-sigma-max", "2.5")
    with pytest.raises(SystemExit):
        parser.parse_args(["--guide-every-level", "--guidance-interval", "1", "2"])

    assert sampling_settings(parser.parse_args([])).condition_noise == DEFAULT_CONDITION_NOISE  # on by default
    assert GenerationSettings().condition_noise == DEFAULT_CONDITION_NOISE == (0.25, 2.6, 18.0)
    assert "condition noise 0.25 from sigma 2.6 (all noise from 18)" in GenerationSettings().describe()
    plain = sampling_settings(parser.parse_args(["--no-condition-noise"]))
    assert plain.condition_noise is None and "condition noise" not in plain.describe()
    annealed = sampling_settings(parser.parse_args(["--condition-noise", "0.25", "3", "15"]))
    assert annealed.condition_noise == (0.25, 3.0, 15.0)
    assert "condition noise 0.25 from sigma 3 (all noise from 15)" in annealed.describe()
    with pytest.raises(SystemExit):  # one or the other
        parser.parse_args(["--no-condition-noise", "--condition-noise", "0.25", "3", "15"])
    with pytest.raises(UserError, match="condition noise must be \\(scale, sigma_lo, sigma_hi\\)"):
        sampling_settings(parser.parse_args(["--condition-noise", "0.25", "15", "3"]))


def test_the_report_sets_each_unet_phase_s_validation_loss_beside_the_training_images(run_a, tmp_path):
    report = (run_a / "report.md").read_text(encoding="utf-8")
    assert "## The UNet's fit" in report and "- **unet/lowres**: lowest validation loss" in report
    assert "- **unet**: lowest validation loss" in report
    fit = json.loads((run_a / "summary.json").read_text())["unet_fit"]
    for phase, folder in (("unet/lowres", run_a / "unet" / "lowres"), ("unet", run_a / "unet")):
        last = json.loads((folder / "metrics.json").read_text())
        assert (fit[phase]["val_loss"], fit[phase]["train_images_loss"]) == (last["val_loss"], last["train_images_loss"])
        assert fit[phase]["lowest_val_loss"] <= fit[phase]["val_loss"]
    # closed form on a log of our own: lowest at epoch 2, the end 20 % above it, an epoch without the probe
    lowres = tmp_path / "unet" / "lowres"
    lowres.mkdir(parents=True)
    (lowres / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "epoch", "step": 10, "epoch": 1, "val/loss": 0.3, "val/loss_train_images": 0.28},
        {"kind": "train", "step": 15, "train/loss": 0.1},
        {"kind": "epoch", "step": 20, "epoch": 2, "val/loss": 0.25, "val/loss_train_images": 0.2},
        {"kind": "epoch", "step": 30, "epoch": 3, "val/loss": 0.3}]))
    lines = train_all.fit_lines(train_all.unet_fit(tmp_path / "unet"))
    assert "| unet/lowres | 2 | 0.2500 | 0.2000 |" in lines and "| unet/lowres | 3 | 0.3000 | — |" in lines
    assert "- **unet/lowres**: lowest validation loss 0.2500 at epoch 2; 0.3000 at the end (+20.0 %)." in lines
    assert not any("| unet |" in line or "**unet**" in line for line in lines)  # that phase has no log yet
    phase = train_all.unet_fit(tmp_path / "unet")["unet/lowres"]
    assert (phase["lowest_epoch"], phase["last_epoch"]) == (2, 3)
    phase["train_images_loss"][3] = 0.15
    assert train_all.fit_sentence(phase).endswith("0.3000 at the end (+20.0 %), training images 0.1500")
    assert train_all.fit_lines(train_all.unet_fit(tmp_path / "vae")) == []  # no UNet log there


def test_a_spiked_unet_phase_is_named_in_the_report_with_the_command_that_trains_it_again(run_a, tmp_path):
    summary = json.loads((run_a / "summary.json").read_text())
    assert (summary["loss_spikes"] == {} == summary["spike_rollbacks"] == summary["skipped_steps"]
            == summary["cudnn_attention_off"])  # a smooth run
    assert "## Loss spikes" not in (run_a / "report.md").read_text(encoding="utf-8")
    stage_dirs = {name: tmp_path / name for name in ("vae", "clip", "judge", "unet")}
    lowres = tmp_path / "unet" / "lowres"
    lowres.mkdir(parents=True)
    norms = [0.2, 0.18, 0.17, 0.16, 0.6, 0.15]  # the fifth interval (steps 41-50): 0.6 / 0.18 (the median) = 3.3x
    (lowres / "log.jsonl").write_text("".join(
        json.dumps({"kind": "train", "step": 10 * (i + 1), "train/grad_norm": g}) + "\n" for i, g in enumerate(norms)))
    spikes, rolled_back, cudnn_off = train_all.stage_spikes(stage_dirs)
    assert rolled_back == {}
    assert list(spikes) == ["unet/lowres"]
    [spike] = spikes["unet/lowres"]
    assert (spike["first_step"], spike["last_step"]) == (41, 50) and spike["ratio"] == pytest.approx(0.6 / 0.18)
    report = "\n".join(train_all.spike_lines(spikes, {}, {}, stage_dirs, "data/pokemon", {}))
    assert "**unet/lowres**" in report and "steps 41-50 (3.3x)" in report
    assert (f"python train_all.py --data data/pokemon --run NEW_RUN --reuse vae={stage_dirs['vae']} "
            f"--reuse clip={stage_dirs['clip']} --judge {stage_dirs['judge']}") in report
    assert train_all.spike_lines({}, {}, {}, stage_dirs, "data/pokemon", {}) == []
    # a spike the trainer rolled back (its log keeps the record, not the spiked steps) is reported, not warned of
    (lowres / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "train", "step": 10, "train/grad_norm": 0.2},
        {"kind": "rollback", "step": 10, "first_step": 21, "last_step": 30, "grad_norm": 0.6, "ratio": 3.0,
         "lr_scale": 0.7}]))
    spikes, rolled_back, cudnn_off = train_all.stage_spikes(stage_dirs)
    assert spikes == {}
    assert [r["step"] for r in rolled_back["unet/lowres"]] == [10]
    report = "\n".join(train_all.spike_lines({}, rolled_back, {}, stage_dirs, "data/pokemon", {}))
    assert ("- **unet/lowres**: a spike at steps 21-30 (3.0x) was rolled back: training went back to step 10 and went "
            "on with the learning rate x0.7.") in report
    assert "NEW_RUN" not in report and "damaged" not in report
    # steps skipped for a gradient that was not finite, and an interval with none finite rolled back
    (stage_dirs["unet"] / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "train", "step": 50, "train/grad_norm": 0.2, "train/skipped_steps": 0},
        {"kind": "train", "step": 100, "train/grad_norm": 0.2, "train/skipped_steps": 1},
        {"kind": "rollback", "step": 100, "first_step": 151, "last_step": 200, "grad_norm": float("nan"),
         "ratio": float("inf"), "lr_scale": 1.0, "cudnn_attention_off": True,
         "nonfinite": "first non-finite gradients in the backward, at or just after model.mid (...); finite with "
                      "cuDNN's attention kernels off"}]))
    spikes, rolled_back, cudnn_off = train_all.stage_spikes(stage_dirs)
    skipped = train_all.stage_skipped_steps(stage_dirs)
    assert skipped == {"unet": [{"first_step": 51, "last_step": 100, "skipped": 1}]}
    report = "\n".join(train_all.spike_lines(spikes, rolled_back, skipped, stage_dirs, "data/pokemon", {}))
    assert ("- **unet**: 1 of steps 51-100 skipped: the gradient was not finite (weights and optimizer state left as "
            "they were).") in report
    assert "- **unet**: a spike at steps 151-200 (no finite gradient) was rolled back" in report
    assert ("x1. A replay of its last skipped step's batch: first non-finite gradients in the backward, at or just "
            "after model.mid (...); finite with cuDNN's attention kernels off. cuDNN's attention was off from "
            "there.") in report
    assert train_all.spike_lines({}, {}, skipped, stage_dirs, "data/pokemon", {})[:2] == ["## Loss spikes", ""]
    assert train_all.spike_steps([{"first_step": 25, "last_step": 28, "ratio": None, "skipped": 3}, {
        "first_step": 41, "last_step": 50, "ratio": 3.04}]) == "steps 25-28 (3 of 4 steps skipped), steps 41-50 (3.0x)"
    # with no rollback left, the trainer turned cuDNN's attention off and trained on: reported, not warned of
    (stage_dirs["unet"] / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "train", "step": 50, "train/grad_norm": 0.2, "train/skipped_steps": 0},
        {"kind": "train", "step": 100, "train/grad_norm": float("nan"), "train/skipped_steps": 50},
        {"kind": "cudnn_attention_off", "step": 100, "first_step": 51, "last_step": 100, "grad_norm": float("nan"),
         "ratio": float("inf"), "cudnn_attention_off": True, "nonfinite": "first non-finite gradients in the "
         "backward, at or just after model.mid (...); finite with cuDNN's attention kernels off"},
        {"kind": "train", "step": 150, "train/grad_norm": 0.2, "train/skipped_steps": 0}]))
    spikes, rolled_back, cudnn_off = train_all.stage_spikes(stage_dirs)
    assert "unet" not in spikes and [r["first_step"] for r in cudnn_off["unet"]] == [51]
    report = "\n".join(train_all.spike_lines(spikes, rolled_back, {}, stage_dirs, "data/pokemon", cudnn_off))
    assert ("- **unet**: a spike at steps 51-100 (no finite gradient) came from cuDNN's attention (a replay of its "
            "last skipped step's batch: first non-finite gradients") in report
    assert ("No rollback was left, so it was turned off and training went on from step 100, from the weights the "
            "skipped steps left alone.") in report and "damaged" not in report


def test_spike_screen_stops_each_probe_at_its_step_and_tabulates_every_setting(run_a, tmp_path):
    out = tmp_path / "screen"
    # 12 low-resolution epochs: a phase of ~70 steps, so a probe is stopped long before it would end
    result = spike_screen.main(["--data", DATA, "--vae", str(run_a / "vae"), "--clip", str(run_a / "clip"),
                                "--out", str(out), "--steps", "10", "--seeds", "1", "--concurrent", "2",
                                "--preset", "tiny", "--common=--lr=6e-4 --lowres_epochs=12", "--setting", "plain:",
                                "--setting", "adam_099: --beta2=0.99"])
    plain, adam_099 = result["records"]
    assert (plain["setting"], adam_099["setting"]) == ("plain", "adam_099")
    assert adam_099["overrides"] == ["--train.spike_rollbacks=0", "--lr=6e-4", "--lowres_epochs=12", "--beta2=0.99",
                                     "--train.seed=1"]
    for record in (plain, adam_099):
        assert record["steps"] == 10 and record["spikes"] == record["rollbacks"] == [] and record["grad_norm_max"] > 0
        folder = train_all.lowres_folder(out / f"{record['setting']}_s1")
        assert not (folder / "model.safetensors").exists()  # stopped, not finished
        assert spike_screen.last_step(out / f"{record['setting']}_s1") < 60
    assert plain["train_loss_tail"] != adam_099["train_loss_tail"]  # the setting reaches the stage
    assert json.loads((out / "screen.json").read_text())["records"] == result["records"]


def test_spike_screen_refuses_steps_off_the_probes_log_grid(run_a, tmp_path):
    # the probe stops at the first logged step past --steps: a table of steps 6 read no record and showed nan
    with pytest.raises(UserError, match="--steps must be a multiple of the probes' log interval, 10, got 6"):
        spike_screen.main(["--data", DATA, "--vae", str(run_a / "vae"), "--clip", str(run_a / "clip"),
                           "--out", str(tmp_path / "screen"), "--steps", "6", "--preset", "tiny", "--setting", "a:"])
    assert not (tmp_path / "screen").exists()


def test_spike_screen_refuses_a_seed_given_twice(run_a, tmp_path):
    with pytest.raises(UserError, match=r"--seeds has a seed twice \(1 2 1\); give each seed once"):
        spike_screen.main(["--data", DATA, "--vae", str(run_a / "vae"), "--clip", str(run_a / "clip"),
                           "--out", str(tmp_path / "screen"), "--seeds", "1", "2", "1", "--preset", "tiny",
                           "--setting", "a:"])
    assert not (tmp_path / "screen").exists()


def test_spike_screen_refuses_missing_data_before_any_probe(run_a, tmp_path):
    with pytest.raises(DataError, match="no_data does not exist"):
        spike_screen.main(["--data", str(tmp_path / "no_data"), "--vae", str(run_a / "vae"), "--clip",
                           str(run_a / "clip"), "--out", str(tmp_path / "screen"), "--steps", "10", "--seeds", "1",
                           "--preset", "tiny", "--setting", "plain:"])
    assert not (tmp_path / "screen").exists()


def test_spike_screen_names_the_log_of_a_probe_that_failed(run_a, tmp_path, monkeypatch):
    monkeypatch.setattr(spike_screen, "load_captions", lambda *args, **kwargs: None)  # let the probe meet the data
    with pytest.raises(RuntimeError, match=r"probe plain_s1 failed \(exit 2\) before step 10; see .*plain_s1.log"):
        spike_screen.main(["--data", str(tmp_path / "no_data"), "--vae", str(run_a / "vae"), "--clip",
                           str(run_a / "clip"), "--out", str(tmp_path / "screen"), "--steps", "10", "--seeds", "1",
                           "--preset", "tiny", "--setting", "plain:"])
    assert "does not exist" in (tmp_path / "screen" / "plain_s1.log").read_text()


@pytest.mark.parametrize("setting, error, message", [
    ("plain: --seed=1", ConfigError, "ambiguous"),
    ("two words: --beta2=0.99", UserError, "NAME a plain word"),
    ("no_lowres: --lowres_epochs=0", UserError, "no low-resolution phase"),
])
def test_spike_screen_refuses_a_bad_setting_before_anything_runs(run_a, tmp_path, setting, error, message):
    with pytest.raises(error, match=message):
        spike_screen.main(["--data", DATA, "--vae", str(run_a / "vae"), "--clip", str(run_a / "clip"),
                           "--out", str(tmp_path / "screen"), "--preset", "tiny", "--setting", setting])
    assert not (tmp_path / "screen").exists()


def test_cuda_graph_setting_falls_back_to_eager_off_cuda(run_a):
    stack = load_stack(run_a, device="cpu")
    settings = dict(size=64, steps=3)
    graphed = generate(stack, ["a red circle"], [5], GenerationSettings(**settings, cuda_graph=True))
    eager = generate(stack, ["a red circle"], [5], GenerationSettings(**settings, cuda_graph=False))
    assert torch.equal(graphed, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_generation_matches_eager_and_recaptures_after_a_move(run_a):
    stack = load_stack(run_a, device="cuda")
    prompts, seeds = ["a red circle", "a blue square", "a green circle"], [0, 1, 2]
    # prompt batches of 2 and 1; a step inside the guidance interval runs its batch doubled ([uncond; cond]), one
    # outside runs it alone: UNet batches of 4, 2 and 1, one graph each
    settings = dict(size=64, steps=6, batch_size=2)
    graphed = generate(stack, prompts, seeds, GenerationSettings(**settings, cuda_graph=True))
    eager = generate(stack, prompts, seeds, GenerationSettings(**settings, cuda_graph=False))
    assert (graphed - eager).abs().max() < 0.05  # bf16 kernels may differ slightly between capture and eager
    assert sorted(key[0][0][0] for key in stack.unet_call(True).graphs) == [1, 2, 4]
    stack.unet.to(torch.float64).to(torch.float32)  # new parameter storage: the old graphs would read freed memory
    assert len(stack.unet_call(True).graphs) == 0
    again = generate(stack, prompts, seeds, GenerationSettings(**settings, cuda_graph=True))
    assert (again - eager).abs().max() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_autoguided_generation_under_cuda_graphs_matches_eager(run_a, guide_a):
    stack = load_stack(run_a, device="cuda")
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    settings = dict(size=64, steps=6, guide_unet=str(guide_a))
    graphed = generate(stack, prompts, seeds, GenerationSettings(**settings, cuda_graph=True))
    eager = generate(stack, prompts, seeds, GenerationSettings(**settings, cuda_graph=False))
    assert (graphed - eager).abs().max() < 0.05  # bf16 kernels may differ slightly between capture and eager
    # the guide has graphs of its own (the prompt batch: never doubled), apart from the UNet's
    guide_graphs = stack.guide_call(settings["guide_unet"]).graphs
    assert sorted(key[0][0][0] for key in guide_graphs) == [2] and guide_graphs is not stack.unet_call(True).graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled UNet under a CUDA graph needs a GPU")
def test_compiled_generation_under_the_cuda_graph_matches_eager(run_a):
    stack = load_stack(run_a, device="cuda")
    prompts, seeds, settings = ["a red circle", "a blue square"], [0, 1], dict(size=64, steps=6)
    eager = generate(stack, prompts, seeds, GenerationSettings(**settings, cuda_graph=False))
    compiled = generate(stack, prompts, seeds, GenerationSettings(**settings, compile_unet=True))
    assert (compiled - eager).abs().max() < 0.05  # bf16 kernels of another shape: close, not equal
    assert stack._compiled_unet is not None and stack._graphed_unet[0][0] is True  # graphs of the compiled UNet
    set_low_precision_norms(stack.unet, False)  # a graph replays what it captured: switched norms capture anew
    assert len(stack.unet_call(True, compile_unet=True).graphs) == 0


def test_compare_draws_every_run_with_the_same_sampling_and_says_which(run_a, tmp_path):
    from pipelines import compare

    from PIL import Image

    prompts = ["--prompt", "a red circle", "--prompt", "a blue square", "--prompt", "a green star"]
    grid = compare.main([str(run_a), str(run_a), "--out", str(tmp_path), *prompts, "--steps", "2", "--size", "32",
                         "--eta-sigma-max", "2", "--tile", "32"])
    assert grid == tmp_path / "compare.png"
    with Image.open(grid) as picture:  # rows: the two runs, columns: the three prompts
        assert abs(picture.size[0] / picture.size[1] - 1.5) < 0.1
    report = (tmp_path / "compare.md").read_text(encoding="utf-8")
    assert "2 steps" in report and "step noise eta 1 below sigma 2" in report and "32 px" in report
    with pytest.raises(UserError, match="eta is 0"):  # a bad sampling option stops it before any run loads
        compare.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--eta", "0", "--eta-sigma-max", "2"])
    with pytest.raises(UserError, match=r"compare.png exists \(an earlier result\); pass another --out, or "
                                        r"--overwrite"):
        compare.main([str(tmp_path / "missing"), "--out", str(tmp_path)])  # before the missing run is read


def test_compare_pairs_two_evaluations_of_the_same_samples(run_a, tmp_path):
    from pipelines.compare import compare_table
    from pipelines.evaluate import judge_fingerprint

    evaluation = json.loads((run_a / "evaluation.json").read_text())
    other = json.loads(json.dumps(evaluation))
    for record in other["samples"][:3]:  # three samples became judge-space copies
        record["copied_judge"] = True
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    (tmp_path / "A" / "evaluation.json").write_text(json.dumps(evaluation))
    (tmp_path / "B" / "evaluation.json").write_text(json.dumps(other))
    table = compare_table([tmp_path / "A", tmp_path / "B"])
    flipped = sum(not r["copied_judge"] for r in evaluation["samples"][:3])
    assert f"{tmp_path / 'B'} against {tmp_path / 'A'}" in table
    assert f"0 / {flipped} pairs only before / after" in table and "different judges" not in table
    # the judge an evaluation names is read back from it, and B judged by another judge is said to be so
    judge = file_fingerprint(run_a / "judge" / "model.safetensors")
    assert judge_fingerprint(evaluation) == judge and judge_fingerprint({}) is None
    other["judge"] = f"elsewhere/judge ({'0' * 16})"
    (tmp_path / "B" / "evaluation.json").write_text(json.dumps(other))
    table = compare_table([tmp_path / "A", tmp_path / "B"])
    assert table.startswith(f"**Judged by different judges** ({tmp_path / 'A'}: {judge}, {tmp_path / 'B'}: {'0' * 16})")
    assert "| near-copies, judge space | — |" in table  # judge-space flags of two rulers are not paired
    assert f"0 / {flipped} pairs only before / after" not in table
    assert "| near-copies, pixel space | 0" in table  # the pixel rule is no judge's: still paired
    del other["samples"]  # an evaluation from before the records: the metrics alone
    (tmp_path / "B" / "evaluation.json").write_text(json.dumps(other))
    assert "sample for sample" not in compare_table([tmp_path / "A", tmp_path / "B"])


def test_sampling_sweep_draws_each_setting_as_a_run_draws_its_final_samples(run_a, tmp_path):
    import numpy as np
    from PIL import Image

    from benchmarks import sampling_sweep
    from pipelines.text_to_image import draw_showcase

    out, showcase = tmp_path / "sweep.json", tmp_path / "showcase"
    sampling_sweep.main(["--run", str(run_a), "--data", DATA, "--out", str(out), "--steps", "2", "--eta", "0",
                         "--condition-noise", "none", "0.25,2.6,18", "--guidance", "4", "--rescale", "0.7",
                         "--interval", "0.28,7.5", "--showcase", str(showcase)])
    drawn = [np.asarray(Image.open(record["showcase"])) for record in json.loads(out.read_text())["records"]]
    stack = load_stack(run_a)
    for condition_noise, picture in zip((None, (0.25, 2.6, 18)), drawn):  # what train_all draws at that setting
        settings = GenerationSettings(size=64, steps=2, eta=0, condition_noise=condition_noise)
        assert np.array_equal(picture, np.asarray(Image.open(draw_showcase(stack, settings, tmp_path / "own.png"))))
    assert not np.array_equal(*drawn)
    records = json.loads(out.read_text())["records"]
    assert "paired_with_first" not in records[0]  # the second setting against the first, sample for sample
    assert records[1]["paired_with_first"]["pairs"] == records[1]["metrics"]["samples"]
    # every sample's verdicts are kept, so the file pairs with itself and with the run's evaluation, without drawing
    from pipelines.paired import paired_sides

    assert [len(record["samples"]) for record in records] == [record["metrics"]["samples"] for record in records]
    from_file = paired_sides([f"{out}:0", f"{out}:1"])
    assert from_file["paired"][f"{out}:1"] == records[1]["paired_with_first"]
    evaluated = json.loads((run_a / "evaluation.json").read_text())["samples"]
    against_run = paired_sides([str(run_a), f"{out}:0"])  # the evaluation's prompts and seeds are seed set 0's
    assert against_run["paired"][f"{out}:0"]["pairs"] == len(evaluated)
    assert against_run["judge_copies_not_paired"] == [] and "copied_judge" in against_run["paired"][f"{out}:0"]
    index = (showcase / "showcase.md").read_text(encoding="utf-8")
    annealed = GenerationSettings(size=64, steps=2, eta=0, condition_noise=(0.25, 2.6, 18))
    assert f"## setting 01: {annealed.describe()}" in index and "(setting_01.png)" in index


def test_sampling_sweep_keeps_each_measured_setting_when_cut_short(run_a, tmp_path, monkeypatch):
    from benchmarks import sampling_sweep

    measure, calls = sampling_sweep.generation_metrics, []

    def taken_back_after_one(*args, **kwargs):  # the machine goes away during the second setting
        calls.append(args[4])
        if len(calls) > 1:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(sampling_sweep, "generation_metrics", taken_back_after_one)
    out = tmp_path / "sweep.json"
    with pytest.raises(KeyboardInterrupt):
        sampling_sweep.main(["--run", str(run_a), "--data", DATA, "--out", str(out), "--steps", "8", "--eta", "0",
                             "--guidance", "4", "--rescale", "0", "--interval", "0.28,7.5",
                             "--first-order-at-guidance-edges", "off", "on"])
    written = json.loads(out.read_text())
    assert written["settings"] == 2 and [r["first_order_at_guidance_edges"] for r in written["records"]] == [False]
    assert [settings.first_order_at_guidance_edges for settings in calls] == [False, True]


def test_sampling_sweep_draws_a_setting_once_when_its_bounds_select_the_same_steps(run_a, tmp_path, monkeypatch,
                                                                                   capsys):
    from benchmarks import sampling_sweep

    measure, calls = sampling_sweep.generation_metrics, []

    def counted(*args, **kwargs):
        calls.append(args[4])
        return measure(*args, **kwargs)

    monkeypatch.setattr(sampling_sweep, "generation_metrics", counted)
    out = tmp_path / "sweep.json"
    # (0, inf] guides every step as 'none' does; (0.28, 7.5] leaves the first, pure-noise step unguided
    sampling_sweep.main(["--run", str(run_a), "--data", DATA, "--out", str(out), "--steps", "2", "--eta", "0",
                         "--guidance", "4", "--rescale", "0", "--interval", "none", "0,inf", "0.28,7.5"])
    records = json.loads(out.read_text())["records"]
    assert [record["guidance_interval"] for record in records] == [None, [0.0, math.inf], [0.28, 7.5]]
    assert [settings.guidance_interval for settings in calls] == [None, (0.28, 7.5)]
    assert records[1]["same_samples_as"] == 0 and records[1]["metrics"] == records[0]["metrics"]
    from pipelines.paired import read_side

    assert "samples" not in records[1] and read_side(f"{out}:1")[0] == records[0]["samples"]  # kept once
    assert "same_samples_as" not in records[2] and records[2]["metrics"] != records[0]["metrics"]
    printed = capsys.readouterr().out
    assert "2 steps (trailing) start at sigma inf, " in printed and "same samples as setting 00" in printed


def test_sampling_sweep_draws_the_scale_above_the_interval_only_under_a_finite_top(run_a, tmp_path):
    import numpy as np
    from PIL import Image

    from benchmarks import sampling_sweep
    from pipelines.text_to_image import draw_showcase

    out, showcase = tmp_path / "sweep.json", tmp_path / "showcase"
    sampling_sweep.main(["--run", str(run_a), "--data", DATA, "--out", str(out), "--steps", "2", "--eta", "0",
                         "--condition-noise", "none", "--guidance", "4", "--rescale", "0.7",
                         "--interval", "none", "0.28,7.5", "--guidance-above", "1", "2", "--showcase", str(showcase)])
    records = json.loads(out.read_text())["records"]
    # nothing lies above 'none': three settings, not four
    assert [(r["guidance_interval"], r["guidance_scale_above"]) for r in records] == [
        (None, 1.0), ([0.28, 7.5], 1.0), ([0.28, 7.5], 2.0)]
    assert "same_samples_as" not in records[2] and records[2]["metrics"] != records[1]["metrics"]
    stack = load_stack(run_a)  # the picture is what generation draws at that setting
    settings = GenerationSettings(size=64, steps=2, eta=0, condition_noise=None, guidance_scale_above=2.0)
    assert np.array_equal(np.asarray(Image.open(records[2]["showcase"])),
                          np.asarray(Image.open(draw_showcase(stack, settings, tmp_path / "own.png"))))


def test_first_order_at_guidance_edges_reaches_the_sampler(run_a):
    stack = load_stack(run_a)  # the same seed draws another picture
    drawn = [generate(stack, ["a red pokemon"], [0], GenerationSettings(
        size=64, steps=8, eta=0, guidance_rescale=0, first_order_at_guidance_edges=edges)) for edges in (False, True)]
    assert not torch.allclose(*drawn)


def test_sampling_sweep_crosses_each_guide_with_each_autoguidance_scale(run_a, guide_a, tmp_path):
    from benchmarks import sampling_sweep

    out = tmp_path / "sweep.json"
    sampling_sweep.main(["--run", str(run_a), "--data", DATA, "--out", str(out), "--steps", "1", "--eta", "0",
                         "--guidance", "1", "--rescale", "0", "--interval", "none",
                         "--guide-unet", "none", str(guide_a), "--autoguidance", "1.5", "3"])
    records = json.loads(out.read_text())["records"]
    # no guide: one setting, without a scale; the guide: one per scale
    assert [(r["guide_unet"], r["autoguidance_scale"]) for r in records] == [
        (None, None), (str(guide_a), 1.5), (str(guide_a), 3.0)]
    assert records[1]["metrics"] != records[2]["metrics"]


def test_karras_spacing_reaches_generation_from_the_command_line(run_a, monkeypatch):
    import pipelines.text_to_image as text_to_image

    stack = load_stack(run_a, device="cpu")
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    trailing = sampling_settings(parser.parse_args(["--steps", "5", "--eta", "0"]))
    karras = sampling_settings(parser.parse_args(["--steps", "5", "--eta", "0", "--timestep-spacing", "karras"]))
    assert trailing.timestep_spacing == "trailing" and "spacing" not in trailing.describe()
    assert "5 steps (karras spacing)" in karras.describe()
    sampled = []
    real_sampler = text_to_image.guided_sample_and_decode
    monkeypatch.setattr(text_to_image, "guided_sample_and_decode",
                        lambda *args, **kwargs: sampled.append(args[8].tolist()) or real_sampler(*args, **kwargs))
    images = {settings.timestep_spacing: generate(stack, ["a red circle"], [0], replace(settings, size=64))
              for settings in (trailing, karras)}
    assert sampled == [stack.schedule.sampling_timesteps(5).tolist(),
                       stack.schedule.sampling_timesteps(5, spacing="karras").tolist()]
    assert sampled[1][-1] == 0 and not torch.allclose(images["trailing"], images["karras"], atol=1e-3)
    with pytest.raises(UserError, match="unknown timestep spacing 'leading'; choose one of"):
        GenerationSettings(timestep_spacing="leading")


def test_generation_encodes_prompts_in_fp32_as_training_cached_them(run_a, monkeypatch):
    import pipelines.text_to_image as text_to_image

    stack = load_stack(run_a, device="cpu")
    # the CPU's inference autocast is off: turn a bf16 one on, as CUDA's is, to see the text states stay outside it
    monkeypatch.setattr(text_to_image, "inference_autocast", lambda device: torch.autocast("cpu", torch.bfloat16))
    under_autocast, encode = [], stack.clip.text_states
    monkeypatch.setattr(stack.clip, "text_states",
                        lambda prompts: under_autocast.append(torch.is_autocast_enabled("cpu")) or encode(prompts))
    generate(stack, ["a red circle", "a blue square"], [0, 1], GenerationSettings(size=64, steps=2, eta=0.0))
    assert under_autocast == [False, False]  # the negative prompt, then the one batch of prompts
