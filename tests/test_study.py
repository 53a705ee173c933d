"""Stage studies on the tiny preset: what each variant trains or reuses, resume, misfits, the report."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

import pipelines.study as study_module
import train_all
from engine.errors import UserError
from engine.stage import StageError, file_fingerprint, folder_lock, is_complete, read_stage
from pipelines.evaluate import default_judge
from pipelines.metrics import PROMPT_COLOURS
from pipelines.stages import judge_path, load_stack, stage_paths
from pipelines.study import main as study
from pipelines.text_to_image import DEFAULT_CONDITION_NOISE

DATA = "shapes:40"
FAST = ["--data", DATA, "--steps", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run = tmp_path_factory.mktemp("study") / "base"
    train_all.main(["--data", DATA, "--run", str(run), "--preset", "tiny", "--device", "cpu", "--skip-eval",
                    "--vae.epochs=1", "--clip.epochs=1", "--unet.epochs=1"])
    train_all.train_stage("judge", train_all.stage_config("judge", "tiny", {"epochs": "1"}), run, DATA, {}, "cpu")
    return run


@pytest.fixture(scope="module")
def done(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    args = ["--base", str(base), "--out", str(out), *FAST,
            "--variant", "no_terms: --unet.div_weight=0 --unet.cons_weight=0",
            "--variant", "strong_kl: --vae.kl_weight=1e-3"]
    return out, args, study(args)


def copy_of_study(done, tmp_path):
    """A copy of the finished tiny study, the arguments that name it, and its columns' evaluation times."""
    out, args, _ = done
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    finished = {name: (copy / name / "evaluation.json").stat().st_mtime_ns
                for name in ("base", "no_terms", "strong_kl")}
    return copy, [copy.as_posix() if a == str(out) else a for a in args], finished


def report_rows(report):
    """The report's table rows: first cell -> the others, stripped."""
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in report.splitlines() if line.startswith("| "))}


def test_a_unet_variant_retrains_only_the_unet(base, done):
    out, _, result = done
    assert result["sources"]["no_terms"] == {"vae": "base", "clip": "base", "unet": "trained"}
    assert is_complete(out / "no_terms" / "unet")
    assert not (out / "no_terms" / "vae").exists() and not (out / "no_terms" / "clip").exists()
    stages = json.loads((out / "no_terms" / "stages.json").read_text())  # relative to the column's folder
    assert stages["unet"] == "unet" and stages["vae"] == os.path.relpath(base / "vae", out / "no_terms")
    assert stage_paths(out / "no_terms") == {"vae": base / "vae", "clip": base / "clip",
                                             "unet": out / "no_terms" / "unet"}
    assert judge_path(out / "no_terms") == base / "judge"
    unet = read_stage(out / "no_terms" / "unet", "unet")
    assert unet.training["loss"]["div_weight"] == 0 and unet.training["loss"]["cons_weight"] == 0
    # the rest of its config is the base UNet's (one epoch, as recorded), not the preset's two
    assert unet.training["train"]["epochs"] == 1
    assert unet.trained_on["vae"] == file_fingerprint(base / "vae" / "model.safetensors")


def test_a_vae_variant_retrains_the_vae_and_the_unet_and_reuses_the_clip(base, done):
    out, _, result = done
    assert result["sources"]["strong_kl"] == {"vae": "trained", "clip": "base", "unet": "trained"}
    assert not (out / "strong_kl" / "clip").exists()
    assert read_stage(out / "strong_kl" / "vae", "vae").training["kl_weight"] == 1e-3
    unet = read_stage(out / "strong_kl" / "unet", "unet")
    assert unet.trained_on["vae"] == file_fingerprint(out / "strong_kl" / "vae" / "model.safetensors")
    assert unet.trained_on["clip"] == file_fingerprint(base / "clip" / "model.safetensors")


def test_every_column_is_judged_alike_and_the_report_names_every_variant(base, done):
    out, _, result = done
    report = (out / "report.md").read_text(encoding="utf-8")
    for name in ("base", "no_terms", "strong_kl"):
        evaluation = json.loads((out / name / "evaluation.json").read_text())
        assert evaluation["judge"].startswith(str(base / "judge"))
        assert evaluation["settings"]["steps"] == 1 and evaluation["settings"]["size"] == 64
        assert evaluation["vae"]["image_size"] == 64  # reconstructed at the sampling size, and says so
        counts = evaluation["generation"]  # each language's colour prompts, the n of its adherence's error bar
        assert counts["colour_samples_en"] == counts["colour_samples_zh"] == counts["colour_samples"] / 2
        per_colour = [counts[f"colour_samples_{c}"] for c in PROMPT_COLOURS if f"colour_samples_{c}" in counts]
        assert per_colour and sum(per_colour) == counts["colour_samples"]  # each colour's adherence's n
        assert f"| {name} |" in report
    for name in ("no_terms", "strong_kl"):
        assert f"- **{name}** (retrained" in report and name in result["summary"]["headline"]
    assert "| VAE PSNR at the sampling size (dB) |" in report
    rows = report_rows(report)

    def steps(*folders):  # a progressive UNet's steps are both phases'
        return sum(json.loads((folder / "metrics.json").read_text())["steps"] for folder in folders)
    base_vae, variant_vae = steps(base / "vae"), steps(out / "strong_kl" / "vae")
    assert rows["vae training steps"] == ["—", f"{base_vae:,} (base)", f"{base_vae:,} (base)", f"{variant_vae:,}"]
    unet = out / "no_terms" / "unet"
    assert rows["unet training steps"][2] == f"{steps(unet, unet / 'lowres'):,}"
    assert "default step noise (eta 1 at the levels sigma <= 3)" in report  # how every column sampled
    assert "condition noise (0.25 from sigma 2.6, all noise from 18)" in report
    assert "| near-copies (pixel) |" in report and "→" in report
    assert all(f"| colour adherence ({colour}) |" in report for colour in ("red", "blue", "purple"))
    # each column against the base on the same prompts and seeds, sample for sample
    assert "## Sample for sample" in report
    paired = rows["near-copies, judge space"]
    assert len(paired) == 2 and all(" → " in cell and "pairs only before / after" in cell for cell in paired)
    assert "paired, ±" in rows["foreground regions per sample"][0]
    for picture in ("compare.png", "losses.png", "metrics.png"):
        assert (out / picture).is_file() and f"]({picture})" in report
    summary = json.loads((out / "study.json").read_text())
    assert set(summary["variants"]) == {"no_terms", "strong_kl"} and summary["stage"] == "unet, vae"
    # each column's UNet fit, read from its own logs (the base column's from the base run's UNet)
    assert "## The UNet's fit" in report
    for name, unet in (("base", base / "unet"), ("no_terms", unet)):
        last = json.loads((unet / "metrics.json").read_text())
        fit = summary["unet_fit"][name]["unet"]
        assert (fit["val_loss"], fit["train_images_loss"]) == (last["val_loss"], last["train_images_loss"])
        assert f"| {name} | unet/lowres | lowest validation loss" in report
    assert summary["command"].startswith("python -m pipelines.study") and summary["compare_png"].endswith("compare.png")


def test_resume_skips_finished_variants_and_trains_a_new_one_concurrently(done, tmp_path, capsys):
    copy, args, finished = copy_of_study(done, tmp_path)
    result = study([*args, "--concurrent", "--variant", "fast_lr: --unet.lr=3e-3"])
    printed = capsys.readouterr().out
    assert result["pending"] == ["fast_lr"]
    for name, mtime in finished.items():
        assert f"{name}: finished" in printed and (copy / name / "evaluation.json").stat().st_mtime_ns == mtime
    assert is_complete(copy / "fast_lr" / "unet") and (copy / "fast_lr" / "train.log").is_file()
    assert read_stage(copy / "fast_lr" / "unet", "unet").training["train"]["compile"] is False
    assert "| fast_lr |" in (copy / "report.md").read_text(encoding="utf-8")


def test_a_finished_study_is_re_read_against_another_column_without_training(done, tmp_path):
    copy, args, finished = copy_of_study(done, tmp_path)
    result = study([*args, "--reference", "no_terms"])
    assert result["pending"] == [] and all((copy / name / "evaluation.json").stat().st_mtime_ns == mtime
                                           for name, mtime in finished.items())
    report = (copy / "report.md").read_text(encoding="utf-8")
    assert "## What each column changed against no_terms" in report
    assert "Differences in brackets are column − no_terms" in report
    assert "- **base** (the base run)" in report and "- **strong_kl** (retrained vae, unet)" in report
    assert "- **no_terms**" not in report
    evaluations = {name: json.loads((copy / name / "evaluation.json").read_text()) for name in finished}
    strong_kl = SimpleNamespace(name="strong_kl", sources={"vae": "trained", "clip": "base", "unet": "trained"})
    sentence, _ = study_module.describe_column(strong_kl, evaluations["no_terms"], evaluations["strong_kl"])
    assert f"- {sentence}\n" in report
    section, key, label, share = next(m for m in study_module.KEY_METRICS if m[2].startswith("VAE PSNR"))
    row = report_rows(report)[label]  # real images, base, no_terms, strong_kl
    value = {name: study_module.metric_value(evaluations[name], section, key) for name in finished}
    assert row[1].endswith(f"({study_module.format_difference(value['base'] - value['no_terms'], share)})")
    assert "(" not in row[2]  # the reference column itself
    assert row[3].endswith(f"({study_module.format_difference(value['strong_kl'] - value['no_terms'], share)})")
    summary = json.loads((copy / "study.json").read_text())
    assert summary["reference"] == "no_terms" and summary["variants"]["no_terms"]["sentence"] == ""
    with pytest.raises(UserError, match=r"--reference nope is no column of this study; pass base or a variant's"):
        study([*args, "--reference", "nope"])


def test_with_one_seed_set_a_share_is_tested_against_its_binomial_noise():
    def results(copies, zh=0.71, purple=0.625):  # shares over 262, 48 and 16 samples, and one without known noise
        return {"generation": {"near_copy_share_pixel": copies, "samples": 262, "fd_en": 0.1 + copies,
                               "colour_adherence_zh": zh, "colour_samples_zh": 48,
                               "colour_adherence_purple": purple, "colour_samples_purple": 16}}
    base = results(0.06)
    base_column = SimpleNamespace(name="base", sources={"vae": "base", "clip": "base", "unet": "base"})
    variant = SimpleNamespace(name="terms_off", sources={"vae": "base", "clip": "base", "unet": "trained"})
    # 6 % and 10 % of 262 samples: standard errors 1.5 and 1.9 points (Agresti-Coull), twice the combined 4.9 > 4
    sentence, _ = study_module.describe_column(variant, base, results(0.10))
    assert "near-copies (pixel) 6 % → 10 % (within binomial noise)" in sentence
    sentence, _ = study_module.describe_column(variant, base, results(0.20))
    assert "near-copies (pixel) 6 % → 20 %" in sentence and "within binomial noise" not in sentence
    sentence, _ = study_module.describe_column(variant, base, results(0.06, zh=0.83))  # 48 prompts: ±6.4 and 5.5
    assert "colour adherence (zh) 71 % → 83 % (within binomial noise)" in sentence
    # one colour's 16 prompts: 10 of 16 against 7 of 16 is noise (±11 points each); 16 of 16 against 1 is not
    sentence, _ = study_module.describe_column(variant, base, results(0.06, purple=0.4375))
    assert "colour adherence (purple) 62 % → 44 % (within binomial noise)" in sentence
    # a change within its noise comes after the others, however large: 6 % -> 4 % of 262 is noise (a third less),
    # FD's 0.16 -> 0.14 has no known noise (an eighth less)
    sentence, headline = study_module.describe_column(variant, base, results(0.04))
    assert sentence.index("FD (en)") < sentence.index("near-copies (pixel) 6 % → 4 % (within binomial noise)")
    assert headline == "terms_off: FD (en) 0.16 → 0.14"
    sentence, _ = study_module.describe_column(variant, results(0.06, purple=1.0), results(0.06, purple=0.0625))
    assert "colour adherence (purple) 100 % → 6 %" in sentence and "within binomial noise" not in sentence
    table = study_module.metrics_markdown([base_column, variant], {"base": base, "terms_off": results(0.10)})
    assert "| near-copies (pixel) | — | 6 % ± 2 pts | 10 % ± 2 pts (+4 pts) |" in table
    assert "| FD (en) | — | 0.16 | 0.2 (+0.04) |" in table  # no error bar where no noise is known
    # the real-images column reads each figure's real key: FD's floor, colour at the prompts' colour mix
    real = {"generation": {**base["generation"], "colour_adherence": 0.7, "colour_adherence_real": 0.66,
                           "colour_adherence_real_prompt_mix": 0.6, "fd_real": 0.04}}
    table = study_module.metrics_markdown([base_column], {"base": real})
    assert "| colour adherence | 60 % | 70 % |" in table and "| FD (en) | 0.04 | 0.16 |" in table


def test_a_column_whose_training_spiked_is_named_in_the_report(done, tmp_path):
    copy, args, _ = copy_of_study(done, tmp_path)
    assert "## Loss spikes" not in (copy / "report.md").read_text(encoding="utf-8")  # the tiny runs are smooth
    norms = [0.2, 0.18, 0.17, 0.16, 0.6]  # steps 41-50: 0.6 over the median 0.18
    (copy / "no_terms" / "unet" / "lowres" / "log.jsonl").write_text("".join(
        json.dumps({"kind": "train", "step": 10 * (i + 1), "train/grad_norm": g}) + "\n" for i, g in enumerate(norms)))
    result = study(args)  # every column finished: only the report is written again
    report = (copy / "report.md").read_text(encoding="utf-8")
    assert "## Loss spikes" in report and "- **no_terms**: unet/lowres at steps 41-50 (3.3x)" in report
    assert list(result["summary"]["loss_spikes"]) == ["no_terms"] and result["summary"]["spike_rollbacks"] == {}
    (copy / "no_terms" / "unet" / "lowres" / "log.jsonl").write_text(json.dumps(
        {"kind": "rollback", "step": 10, "first_step": 21, "last_step": 30, "grad_norm": 0.6, "ratio": 3.0,
         "lr_scale": 0.7}) + "\n")
    result = study(args)
    report = (copy / "report.md").read_text(encoding="utf-8")
    assert "## Loss spikes" not in report and "## Spikes rolled back" in report
    assert "- **no_terms**: unet/lowres at steps 21-30 (3.0x), back to step 10, learning rate x0.7 after" in report
    assert list(result["summary"]["spike_rollbacks"]) == ["no_terms"]
    (copy / "no_terms" / "unet" / "lowres" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "train", "step": 10, "train/grad_norm": 0.2}, {"kind": "train", "step": 20, "train/grad_norm": 0.2},
        {"kind": "train", "step": 30, "train/grad_norm": float("nan")},
        {"kind": "cudnn_attention_off", "step": 30, "first_step": 21, "last_step": 30, "grad_norm": float("nan"),
         "ratio": float("inf"), "cudnn_attention_off": True, "nonfinite": "(...)"}]))
    result = study(args)  # cuDNN's attention turned off with no rollback left: said so, not a spike left
    report = (copy / "report.md").read_text(encoding="utf-8")
    assert "## Loss spikes" not in report and "## cuDNN's attention turned off" in report
    assert "- **no_terms**: unet/lowres at steps 21-30 (no finite gradient)" in report
    assert list(result["summary"]["cudnn_attention_off"]) == ["no_terms"] and result["summary"]["loss_spikes"] == {}


def test_a_given_guidance_is_every_columns_and_is_recorded(base, done, tmp_path, monkeypatch):
    used, evaluate_run = [], study_module.evaluate_run

    def recording_evaluate_run(stack, data, judge, settings, **kwargs):
        used.append((settings.guidance_scale, settings.guidance_interval, settings.condition_noise))
        return evaluate_run(stack, data, judge, settings, **kwargs)

    monkeypatch.setattr(study_module, "evaluate_run", recording_evaluate_run)
    out, taken = tmp_path / "guided", f"taken: unet={done[0] / 'no_terms' / 'unet'}"  # a folder: nothing trains
    study(["--base", str(base), "--out", str(out), *FAST, "--guidance", "3", "--guidance-interval", "0.3", "8",
           "--variant", taken])
    # the base column and the variant, not the UNet configs' 5 everywhere; generation's default condition noise
    assert used == [(3.0, (0.3, 8.0), DEFAULT_CONDITION_NOISE)] * 2
    assert "guidance 3 in the noise-level interval (0.3, 8]," in (out / "report.md").read_text(encoding="utf-8")
    variant_file = out / "taken" / study_module.VARIANT_FILE  # as a column judged before condition noise was recorded
    column = json.loads(variant_file.read_text(encoding="utf-8"))
    del column["recorded_as"]["condition_noise"]
    variant_file.write_text(json.dumps(column), encoding="utf-8")
    with pytest.raises(UserError, match=r"condition_noise was None, now \[0.25, 2.6, 18.0\]"):
        study(["--base", str(base), "--out", str(out), *FAST, "--guidance", "3", "--guidance-interval", "0.3", "8",
               "--variant", taken])
    with pytest.raises(UserError, match="guidance was 3.0, now 2.0"):  # a finished column is not re-judged silently
        study(["--base", str(base), "--out", str(out), *FAST, "--guidance", "2", "--guidance-interval", "0.3", "8",
               "--variant", taken])
    with pytest.raises(UserError, match="guidance_interval"):
        study(["--base", str(base), "--out", str(out), *FAST, "--guidance", "3", "--variant", taken])
    with pytest.raises(UserError, match="guidance scale must be a finite number >= 0"):
        study(["--base", str(base), "--out", str(tmp_path / "bad"), *FAST, "--guidance", "-1", "--variant", taken])
    with pytest.raises(UserError, match="sigma_lo < sigma_hi"):
        study(["--base", str(base), "--out", str(tmp_path / "bad"), *FAST, "--guidance-interval", "8", "0.3",
               "--variant", taken])
    assert not (tmp_path / "bad").exists()


def test_a_changed_variant_under_a_finished_name_is_refused(done):
    out, args, _ = done
    changed = [a.replace("--unet.cons_weight=0", "--unet.cons_weight=0.5") for a in args]
    with pytest.raises(UserError, match=r"holds column no_terms of another study \(spec was .*another name"):
        study(changed)
    with folder_lock(out, "another study"):  # its columns are read only once the folder is held
        with pytest.raises(StageError, match="in use by another command"):
            study(changed)


def test_a_column_trained_on_other_colour_sentences_is_refused(done, tmp_path, request):
    copy, args, _ = copy_of_study(done, tmp_path)
    study(args)  # as it was trained: nothing to refuse
    request.getfixturevalue("other_colour_sentences")  # from here on
    with pytest.raises(StageError, match=r"no_terms/unet holds a finished unet stage that differs from variant "
                                         r"no_terms \(it was trained on other training captions"):
        study(args)


def test_a_study_folder_another_command_writes_to_is_refused_before_anything_is_written(base, tmp_path, capsys):
    out = tmp_path / "out"
    with folder_lock(out, "python -m pipelines.study --out out (the first)"):
        with pytest.raises(StageError, match=r"out is in use by another command \(python -m pipelines.study --out out "
                                             r"\(the first\), pid"):
            study(["--base", str(base), "--out", str(out), *FAST, "--variant", "no_terms: --unet.div_weight=0"])
    assert [p.name for p in out.iterdir()] == [".lock"]  # no column folder, no variant file
    assert "Study plan" not in capsys.readouterr().out  # nor a plan that cannot run


def test_a_mismatched_stage_folder_is_a_clear_error_before_anything_trains(base, tmp_path):
    out = tmp_path / "out"
    wrong_kind = ["--variant", f"wrong_kind: vae={base / 'clip'}"]
    with pytest.raises(StageError, match=r"variant wrong_kind: .*holds a 'clip' stage, but a 'vae' stage was expected"):
        study(["--base", str(base), "--out", str(out), *FAST, *wrong_kind])
    narrow = tmp_path / "narrow_clip"
    shutil.copytree(base / "clip", narrow)
    config = json.loads((narrow / "config.json").read_text())
    config["model"]["text_width"] = 32
    (narrow / "config.json").write_text(json.dumps(config))
    narrow_variant = ["--variant", f"narrow: clip={narrow} unet={base / 'unet'}"]
    with pytest.raises(StageError, match=r"variant narrow: .*32-wide text states but the UNet .* cross-attends to 64"):
        study(["--base", str(base), "--out", str(out), *FAST, *narrow_variant])
    assert not out.exists()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("SCRATCH_DIFFUSION_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "pipelines.study", "--base", str(base), "--out", str(out), *FAST,
                           "--variant", f"wrong_kind: unet={base / 'vae'}"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: variant wrong_kind: {base / 'vae'} holds a 'vae' stage, but a 'unet' stage was expected"]


def test_the_plan_retrains_downstream_and_never_the_judge(base, tmp_path):
    plan = study(["--base", str(base), "--out", str(tmp_path / "o"), *FAST, "--plan-only",
                  "--variant", "english_only: --clip.zh_prob=0", "--variant", f"given_vae: vae={base / 'vae'}",
                  "--variant", f"own_unet: vae={base / 'vae'} unet={base / 'unet'}"])
    assert plan["sources"]["english_only"] == {"vae": "base", "clip": "trained", "unet": "trained"}
    assert plan["sources"]["given_vae"] == {"vae": "given", "clip": "base", "unet": "trained"}
    assert plan["sources"]["own_unet"] == {"vae": "given", "clip": "base", "unet": "given"}
    assert not (tmp_path / "o").exists()


def test_the_time_estimate_scales_each_unet_phase_by_its_epochs(base, tmp_path):
    def minutes(folder):
        return json.loads((folder / "metrics.json").read_text())["minutes"]

    low, high = minutes(base / "unet" / "lowres"), minutes(base / "unet")  # 1 low-resolution epoch, 1 at 64 px
    plan = study(["--base", str(base), "--out", str(tmp_path / "o"), *FAST, "--plan-only",
                  "--variant", "longer: --unet.epochs=3 --unet.lowres_epochs=2",
                  "--variant", "one_phase: --unet.lowres_epochs=0"])
    assert plan["estimate_minutes"]["longer"] == pytest.approx(3 * high + 2 * low)
    assert plan["estimate_minutes"]["one_phase"] == pytest.approx(high)


@pytest.fixture(scope="module")
def low_res_base(base, tmp_path_factory):
    """The base run's VAE (64 px) and CLIP with a UNet trained on 32-px images."""
    run = tmp_path_factory.mktemp("study") / "low_res"
    train_all.main(["--data", DATA, "--run", str(run), "--preset", "tiny", "--device", "cpu", "--skip-eval",
                    "--reuse", f"vae={base / 'vae'}", "--reuse", f"clip={base / 'clip'}",
                    "--judge", str(base / "judge"), "--unet.epochs=1", "--unet.resolution=32"])
    return run


def test_the_study_draws_at_the_base_unets_resolution_and_a_column_at_another_needs_size(low_res_base, tmp_path,
                                                                                        capsys):
    assert load_stack(low_res_base, device="cpu").image_size == 32  # not the VAE's 64
    out = tmp_path / "o"
    plan = study(["--base", str(low_res_base), "--out", str(out), *FAST, "--plan-only",
                  "--variant", "no_terms: --unet.div_weight=0 --unet.cons_weight=0"])
    assert plan["settings"]["size"] == 32 and "1 steps at 32 px" in capsys.readouterr().out
    sharper = ["--variant", "sharper: --unet.resolution=64"]
    with pytest.raises(UserError, match="variant sharper's UNet trains at 64 px but the study draws every column at "
                                        "the base UNet's 32 px; pass --size"):
        study(["--base", str(low_res_base), "--out", str(out), *FAST, *sharper])
    assert not out.exists()
    plan = study(["--base", str(low_res_base), "--out", str(out), *FAST, "--plan-only", "--size", "64", *sharper])
    assert plan["settings"]["size"] == 64 and plan["sources"]["sharper"]["unet"] == "trained"


def test_a_judge_taken_with_train_all_judge_is_the_runs_judge_everywhere(base, low_res_base):
    assert not (low_res_base / "judge").exists()  # train_all --judge recorded it in stages.json instead
    assert judge_path(low_res_base) == base / "judge"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the run's own CLIP
        assert default_judge(load_stack(low_res_base, device="cpu"), low_res_base) == base / "judge"
    plan = study(["--base", str(low_res_base), "--out", str(low_res_base.parent / "o"), *FAST, "--plan-only",
                  "--variant", "no_terms: --unet.div_weight=0"])
    assert plan["settings"]["judge"] == str(base / "judge")


@pytest.mark.parametrize("variant, message", [
    ("no_terms --unet.div_weight=0", "takes 'NAME: ITEMS'"),
    ("base: --unet.div_weight=0", "cannot be named 'base'"),
    ("../up: --unet.div_weight=0", "NAME a plain word"),  # a name is a folder under --out
    ("-x: --unet.div_weight=0", "NAME a plain word"),
    ("x: --judge.epochs=1", "changes the judge, the study's fixed ruler"),
    ("x: --lr=1", "cannot read '--lr=1'; write --STAGE.key=value"),
    ("x: vea=runs/a/vae", "cannot read 'vea=runs/a/vae'"),
    ("x:", "changes nothing"),
    ("x: --unet.div_weight=0.05", "are the base's own unet settings"),
    ("x: --unet.nonsense=1", "nonsense"),
])
def test_a_bad_variant_is_one_clear_error(base, tmp_path, variant, message):
    with pytest.raises(UserError, match=message):
        study(["--base", str(base), "--out", str(tmp_path / "o"), *FAST, "--variant", variant])
    assert not (tmp_path / "o").exists()


def test_a_runs_folder_is_refused_as_the_study_folder(base, tmp_path):
    report = (base / "report.md").read_bytes() if (base / "report.md").is_file() else None
    with pytest.raises(UserError, match="is a run's folder: the study's report.md would replace the run's"):
        study(["--base", str(base), "--out", str(base / ".." / base.name), *FAST, "--variant", "x: --unet.epochs=2"])
    assert not (base / "base").exists() and not (base / "x").exists()  # no column folder written into the run
    assert report is None or (base / "report.md").read_bytes() == report
    other_run = tmp_path / "other_run"  # another finished run, recognised by train_all's summary.json
    other_run.mkdir()
    (other_run / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="is a run's folder"):
        study(["--base", str(base), "--out", str(other_run), *FAST, "--variant", "x: --unet.epochs=2"])
    assert [p.name for p in other_run.iterdir()] == ["summary.json"]


def test_a_name_may_carry_the_value_it_sets():
    assert study_module.split_named("lr3e-4: --unet.lr=3e-4", "--variant", "x: y") == ("lr3e-4", ["--unet.lr=3e-4"])
    assert study_module.split_named(" ema_0.99 :", "--variant", "x: y") == ("ema_0.99", [])


@pytest.mark.parametrize("size, variant, message", [
    ("72", "no_terms: --unet.div_weight=0", r"--size 72 does not fit the stages: a size must be a positive multiple "
                                            r"of 16 .*; try 64 or 80"),
    ("0", "no_terms: --unet.div_weight=0", r"--size 0 does not fit the stages: .*; try 16"),
    # fits the base (16 | 48), not the variant's deeper UNet, which halves the latent once more
    ("48", "deeper: --unet.model.channel_mult=1,2,2", r"variant deeper: --size 48 does not fit the stages: a size "
                                                      r"must be a positive multiple of 32 \(the VAE downsamples by 8, "
                                                      r"the UNet by 4 more\); try 32 or 64"),
])
def test_a_size_a_column_cannot_draw_is_refused_before_anything_trains(base, tmp_path, size, variant, message):
    with pytest.raises(UserError, match=message):
        study(["--base", str(base), "--out", str(tmp_path / "o"), *FAST, "--size", size, "--variant", variant])
    assert not (tmp_path / "o").exists()


def test_data_too_small_to_evaluate_on_is_refused_before_anything_trains(base, tmp_path):
    with pytest.raises(UserError, match=r"the validation split of shapes:12 has 1 row\(s\) .* at least 20 rows"):
        study(["--base", str(base), "--out", str(tmp_path / "o"), "--data", "shapes:12", "--steps", "1",
               "--device", "cpu", "--variant", "no_terms: --unet.div_weight=0"])
    assert not (tmp_path / "o").exists()


def test_a_bad_device_or_an_out_that_is_a_file_is_refused_before_the_plan(tmp_path, capsys):
    with pytest.raises(UserError, match="--device"):
        study(["--base", str(tmp_path / "missing"), "--data", DATA, "--out", str(tmp_path / "s"),
               "--variant", "v: --unet.lr=1e-4", "--device", "nonsense"])
    assert not (tmp_path / "s").exists() and capsys.readouterr().out == ""
    (tmp_path / "afile").write_text("")
    with pytest.raises(StageError, match=r"--out .*afile is a file, not a folder"):
        study(["--base", str(tmp_path / "missing"), "--data", DATA, "--out", str(tmp_path / "afile"),
               "--variant", "v: --unet.lr=1e-4"])
