"""The markdown tables of a benchmark summary."""

from __future__ import annotations

from typing import Any

from benchmarks.cases import SECTIONS, TARGETS


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def case_table(rows: list[dict], with_sampler: bool = False) -> list[str]:
    head = "| impl |" + (" sampler |" if with_sampler else "") + \
        " setting | images/s | ms/iter | peak GB | MFU | host syncs/step | first call s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        sampler = f" {r.get('sampler', '')} |" if with_sampler else ""
        if "error" in r:
            lines.append(f"| {r['impl']} |{sampler} {r['setting']} | failed: {r['error'][:80]} | | | | | |")
            continue
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        lines.append(f"| {r['impl']} |{sampler} {r['setting']} | {r['images_per_s']:.1f} | {r['ms_per_iter']:.1f} | "
                     f"{_fmt(r.get('peak_mem_gb'), '.2f')} | {_fmt(mfu, '.1f')}{'%' if mfu is not None else ''} | "
                     f"{_fmt(r.get('host_syncs_per_step'), '.2f')} | {r['first_call_s']:.1f} |")
    return lines


def summary_rows(summary: dict[str, Any]) -> list[str]:
    lines = ["| comparison | ours images/s | diffusers images/s | ours / diffusers | target |", "|---|---|---|---|---|"]
    for section, title in (("unet_train", "UNet training"), ("vae_train", "VAE training"), ("sample", "sampling")):
        for kind, ratio in summary.get("ratios", {}).get(section, {}).items():
            if ratio is None:
                continue
            target = TARGETS[section] if kind == "best" else None  # issue 17 judges equal treatment
            lines.append(f"| {title}, {kind.replace('_', ' ')} | {ratio['ours_images_per_s']:.1f} | "
                         f"{ratio['diffusers_images_per_s']:.1f} | {ratio['speedup']:.2f}x | "
                         f"{'>= ' + format(target, '.1f') + 'x' if target else ''} |")
    return lines


def markdown(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    lines = [f"# ours vs diffusers {summary['diffusers']} on {summary['gpu']} (torch {summary['torch']})", "",
             f"`{summary['command']}`", "",
             f"bf16 autocast: {s['bf16_autocast']}; MFU against {s['peak_tflops']} TFLOP/s ({s['peak_note']}); "
             f"compile modes tried: {', '.join(s['compile_modes']) or 'none'}; total {summary['elapsed_s']:.0f} s.", "",
             "| parameters | ours | diffusers | ratio |", "|---|---|---|---|"]
    for name, c in summary["params"].items():
        lines.append(f"| {name} | {c['ours']:,} | {c['diffusers']:,} | {c['ratio']:.4f} |")
    lines += ["", "## Summary", ""] + summary_rows(summary)
    titles = {"unet_train": f"UNet training (batch {s['unet_batch']}, {s['latent_size']}x{s['latent_size']} latents)",
              "vae_train": f"VAE training (batch {s['vae_batch']}, {s['vae_crop']} px crops)",
              "sample": f"Sampling (batch {s['sample_batch']}, guidance {s['guidance_scale']}, VAE decode not included)"}
    for section in SECTIONS:
        if section not in summary:
            continue
        lines += ["", f"## {titles[section]}", ""] + case_table(summary[section]["cases"], section == "sample")
        if "flops_per_step" in summary[section]:
            flops = summary[section]["flops_per_step"]
            lines += ["", f"GFLOP per training step (FlopCounterMode): ours {flops['ours'] / 1e9:,.1f}, diffusers "
                          f"{flops['diffusers'] / 1e9:,.1f}; compile mode given to both: "
                          f"{summary[section]['compile_winner'] or 'none'}."]
        if section == "sample":
            lines += ["", "VAE decode of the same batch (eager, channels_last):", ""]
            lines += case_table(summary[section]["vae_decode"])
    if summary.get("quality"):
        q = summary["quality"]
        lines += ["", f"## Fast-sampler quality vs {q['reference']} ({q['num_images']} images, same seeds)", "",
                  "| setting | latent RMS diff | pixel RMS diff | judge FD | judge cosine |", "|---|---|---|---|---|"]
        for label, row in q["vs_reference"].items():
            lines.append(f"| {label} | {row['latent_rms_diff']:.4f} | {row['pixel_rms_diff']:.4f} | "
                         f"{_fmt(row.get('judge_fd'), '.4f')} | {_fmt(row.get('judge_cosine'), '.4f')} |")
    return "\n".join(lines) + "\n"
