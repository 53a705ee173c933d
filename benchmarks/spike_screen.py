"""Loss-spike screen: how often, and how hard, the UNet stage's low-resolution phase spikes, setting by setting.

Each probe is the real UNet stage (``python -m diffusion.train``) on a finished VAE and CLIP, stopped once its
low-resolution phase has logged ``--steps`` steps. The learning-rate schedule is the whole stage's, so every
step up to there is the step a full run takes. Probes run ``--concurrent`` at a time on one GPU (the default's
256-px phase peaks at 28 GB on an H200, where four fit; two took 65.8 GB on an H100, so ``--concurrent 2``
there). Per probe it reports the spikes by the trainer's own rule
(``engine.runlog.loss_spikes``), the largest gradient norm and the mean training loss over the last tenth of
the steps; per setting, how many of its seeds spiked. Probes run with the stage's spike rollback off
(``--train.spike_rollbacks=0``: the screen measures how often a setting spikes, not how the stage recovers); a
setting may turn it back on, and a rolled-back spike is then reported as one.

    python -m benchmarks.spike_screen --data ../shared/pokemon --vae runs/A/vae --clip runs/A/clip \\
        --out runs/spike --steps 300 --seeds 1 2 3 4 --concurrent 4 --common=--lr=6e-4 \\
        --setting "adam_0999:" --setting "adam_099: --beta2=0.99"

Writes ``OUT/screen.json`` and prints a table; each probe's stage folder and console log stay under ``OUT``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from data import load_captions
from diffusion.config import PRESETS, UNetTrainConfig
from diffusion.train import lowres_folder
from engine import build_config, read_stage
from engine.cli import check_counts, command_line
from engine.config import parse_overrides
from engine.distributed import resolve_device
from engine.errors import UserError, add_debug_flag, run_cli
from engine.runlog import loss_spikes, read_records, rollbacks
from engine.stage import write_json
from pipelines.study import split_named

POLL_SECONDS = 2.0
PROBE_LOG_EVERY = 10  # the probes log (and the spike rule reads) every this many steps
ROLLBACK_OFF = "--train.spike_rollbacks=0"  # before a setting's own overrides, which may turn it back on


@dataclass
class Probe:
    setting: str
    seed: int
    folder: Path
    args: list[str]  # the stage's overrides, as passed


def plan_probes(settings: Sequence[tuple[str, list[str]]], common: list[str], seeds: Sequence[int], out: Path,
                preset: str | None) -> list[Probe]:
    """One probe per setting and seed, seed-major (a screen cut short leaves every setting with the same seeds);
    each setting's config is built and validated first, so a bad key fails before anything trains."""
    names = [name for name, _ in settings]
    if len(set(names)) != len(names):
        raise UserError(f"--setting names must differ, got {names}")
    for name, overrides in settings:
        cfg = build_config(UNetTrainConfig, PRESETS, preset, parse_overrides(common + overrides))
        if cfg.lowres_epochs == 0:
            raise UserError(f"setting {name} trains no low-resolution phase (lowres_epochs=0): the screen watches "
                            "that phase; drop the override")
    return [Probe(name, seed, out / f"{name}_s{seed}",
                  [ROLLBACK_OFF] + common + overrides + [f"--train.seed={seed}"])
            for seed in seeds for name, overrides in settings]


def last_step(folder: Path) -> int:
    """The last training step a probe's low-resolution log holds (read while the probe writes it)."""
    return max((r["step"] for r in read_records(lowres_folder(folder) / "log.jsonl") if r.get("kind") == "train"),
               default=0)


def run_probes(probes: Sequence[Probe], data: str, vae: Path, clip: Path, steps: int, concurrent: int,
               preset: str | None, device: str | None) -> None:
    """Run the probes ``concurrent`` at a time; stop each once its low-resolution log reaches ``steps``."""
    pending, running = list(probes), []
    try:
        while pending or running:
            while pending and len(running) < concurrent:
                probe = pending.pop(0)
                command = [sys.executable, "-m", "diffusion.train", "--data", data, "--vae", str(vae), "--clip",
                           str(clip), "--out", str(probe.folder), f"--log_every={PROBE_LOG_EVERY}", *probe.args]
                command += (["--preset", preset] if preset else []) + (["--device", device] if device else [])
                probe.folder.parent.mkdir(parents=True, exist_ok=True)
                log = open(probe.folder.with_suffix(".log"), "w", encoding="utf-8")
                running.append((probe, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
                print(f"probe {probe.folder.name}: started", flush=True)
            time.sleep(POLL_SECONDS)
            for entry in list(running):
                probe, process, log = entry
                reached = last_step(probe.folder) >= steps
                if reached and process.poll() is None:
                    process.terminate()
                if reached or process.poll() is not None:
                    code = process.wait()
                    log.close()
                    running.remove(entry)
                    if not reached and code != 0:
                        raise RuntimeError(f"probe {probe.folder.name} failed (exit {code}) before step {steps}; "
                                           f"see {probe.folder.with_suffix('.log')}")
                    print(f"probe {probe.folder.name}: stopped at step {last_step(probe.folder)}", flush=True)
    finally:  # a failed probe or Ctrl-C leaves no probe training on
        for _, process, log in running:
            process.kill()
            process.wait()
            log.close()


def probe_record(probe: Probe, steps: int) -> dict[str, Any]:
    log = lowres_folder(probe.folder) / "log.jsonl"
    train = [r for r in read_records(log) if r.get("kind") == "train" and r["step"] <= steps]
    tail = [r["train/loss"] for r in train if r["step"] > 0.9 * steps]
    return {"setting": probe.setting, "seed": probe.seed, "overrides": probe.args,
            "steps": train[-1]["step"] if train else 0,
            "spikes": [s for s in loss_spikes(log) if s["last_step"] <= steps],
            "rollbacks": [r for r in rollbacks(log) if r["last_step"] <= steps],
            "grad_norm_max": max((r.get("train/grad_norm_max", r["train/grad_norm"]) for r in train), default=None),
            "train_loss_tail": sum(tail) / len(tail) if tail else None}


def summarise(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| setting | seed | spikes (steps, x its level) | largest gradient norm | train loss, last tenth |",
             "|---|---|---|---|---|"]
    for r in records:
        spikes = ", ".join([f"{s['first_step']}-{s['last_step']} ({s['ratio']:.1f}x)" for s in r["spikes"]]
                           + [f"{s['first_step']}-{s['last_step']} ({s['ratio']:.1f}x, rolled back to {s['step']})"
                              for s in r["rollbacks"]]) or "none"
        lines.append(f"| {r['setting']} | {r['seed']} | {spikes} | {r['grad_norm_max'] or float('nan'):.3f} | "
                     f"{r['train_loss_tail'] or float('nan'):.4f} |")
    lines.append("")
    for setting in dict.fromkeys(r["setting"] for r in records):
        mine = [r for r in records if r["setting"] == setting]
        lines.append(f"{setting}: {sum(bool(r['spikes'] or r['rollbacks']) for r in mine)} of {len(mine)} seeds "
                     "spiked")
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.spike_screen", description=__doc__.split("\n\n")[0])
    add_debug_flag(parser)
    parser.add_argument("--data", required=True)
    parser.add_argument("--vae", type=Path, required=True, help="finished VAE stage folder")
    parser.add_argument("--clip", type=Path, required=True, help="finished CLIP stage folder")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the probes and screen.json")
    parser.add_argument("--setting", action="append", required=True, help="NAME: --key=value ... (UNet stage)")
    parser.add_argument("--common", default="", help="overrides every setting shares, e.g. --common=--lr=6e-4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=300, help="low-resolution steps a probe runs")
    parser.add_argument("--concurrent", type=int, default=4, help="probes at once")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    check_counts(args, "--steps", "--concurrent")
    if args.steps % PROBE_LOG_EVERY:  # the tail and the peak read logged steps: the last must be step --steps
        raise UserError(f"--steps must be a multiple of the probes' log interval, {PROBE_LOG_EVERY}, got "
                        f"{args.steps}")
    resolve_device(args.device)  # the probes' device: named here, not as every probe's failure
    if len(set(args.seeds)) < len(args.seeds):  # two probes of one setting and seed would train into one folder
        raise UserError(f"--seeds has a seed twice ({' '.join(map(str, args.seeds))}); give each seed once")
    if args.out.exists():
        raise UserError(f"{args.out} exists; the screen writes a new folder: pass another --out or remove it")
    for folder, kind in ((args.vae, "vae"), (args.clip, "clip")):
        read_stage(folder, kind)  # a missing or unfinished stage is named before anything runs
    settings = [split_named(s, "--setting", "adam_099: --beta2=0.99") for s in args.setting]
    probes = plan_probes(settings, args.common.split(), args.seeds, args.out, args.preset)
    # a bad --data fails here, not in every probe; decoded at the stage's resolution, the probes read it cached
    load_captions(args.data, resolution=build_config(UNetTrainConfig, PRESETS, args.preset).resolution)
    run_probes(probes, args.data, args.vae, args.clip, args.steps, args.concurrent, args.preset, args.device)
    records = [probe_record(p, args.steps) for p in probes]
    result = {"command": command_line("python -m benchmarks.spike_screen", argv),
              "steps": args.steps, "records": records}
    write_json(args.out / "screen.json", result)
    print("\n".join(summarise(records)), flush=True)
    return result


if __name__ == "__main__":
    run_cli(main)
