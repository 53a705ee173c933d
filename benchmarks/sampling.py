"""Sampling throughput: 50-step DDIM with classifier-free guidance, ours (``sample_ddim`` + ``cfg_denoiser``)
against the diffusers pipeline loop on its DDIMScheduler and UNet, plus our fast DPM-Solver++ setting and the
VAE decode of the same batch."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.cases import (IMPLS, Options, Setting, Sizes, fastest, is_compiled, is_eager, memory_format,
                              run_case, same_precision, speed_ratio)
from benchmarks.measure import count_flops, count_host_syncs, measure, release_memory
from benchmarks.twins import diffusers_ddim_scheduler, diffusers_guided_ddim, diffusers_unet, diffusers_vae
from diffusion.cuda_graph import CudaGraphCall
from diffusion.guidance import cfg_denoiser
from diffusion.samplers import SAMPLERS
from diffusion.schedule import NoiseSchedule
from engine.precision import set_low_precision_norms
from unet.model import UNet
from vae.model import AutoencoderKL


@dataclass
class SamplingInputs:
    noise: Tensor  # [B, C, h, w] float32
    cond: Tensor  # [B, L, D]
    uncond: Tensor  # [1, L, D]


def sampling_inputs(sizes: Sizes, device: torch.device) -> SamplingInputs:
    g = torch.Generator().manual_seed(0)
    b, s, cfg = sizes.sample_batch, sizes.latent_size, sizes.unet
    return SamplingInputs(noise=torch.randn(b, cfg.in_channels, s, s, generator=g).to(device),
                          cond=torch.randn(b, sizes.context_length, cfg.context_dim, generator=g).to(device),
                          uncond=torch.randn(1, sizes.context_length, cfg.context_dim, generator=g).to(device))


def wrap_call(call: Callable[..., Tensor], setting: Setting, opts: Options) -> Callable[..., Tensor]:
    if setting.compile_mode:
        call = torch.compile(call, mode=setting.compile_mode, dynamic=False)
    if setting.cuda_graph:
        call = CudaGraphCall(call, bf16_autocast=opts.device.type == "cuda")
    return call


def faster_settings(channels_last: bool, compile_mode: str | None, on_cuda: bool,
                    low_precision_norms: bool = False) -> list[Setting]:
    """CUDA graph alone, then compiled + CUDA graph (what mode="reduce-overhead" does); the pair isolates
    what compiling adds. Off CUDA: compiled alone. One compile per implementation keeps the run short."""
    base = Setting(channels_last=channels_last, low_precision_norms=low_precision_norms)
    settings = [replace(base, cuda_graph=True)] if on_cuda else []
    if compile_mode:
        settings.append(replace(base, compile_mode=compile_mode, cuda_graph=on_cuda))
    return settings


def timed_loop(loop: Callable[[], Tensor], setting: Setting, opts: Options, batch: int, steps: int,
               flops_per_call: int, count_syncs: bool) -> dict[str, Any]:
    def run() -> Tensor:
        attention = sdpa_kernel(SDPBackend.MATH) if setting.math_attention else nullcontext()
        with torch.no_grad(), opts.autocast(), attention:
            return loop()

    m = measure(run, 1, opts.sample_repeats, opts.device)
    syncs = count_host_syncs(run, opts.device) if count_syncs else None
    return {"images_per_s": batch / m.seconds_per_iter, "ms_per_iter": 1e3 * m.seconds_per_iter,
            "peak_mem_gb": m.peak_mem_gb, "mfu": opts.mfu(flops_per_call * steps, m.seconds_per_iter),
            "first_call_s": m.first_call_s, "steps": steps,
            "host_syncs_per_step": None if syncs is None else syncs / steps}


def forward_flops(call: Callable[..., Tensor], inputs: SamplingInputs, opts: Options) -> int:
    """FLOPs of one guided UNet call (batch 2B: unconditional and conditional halves)."""
    x = torch.cat([inputs.noise, inputs.noise])
    t = torch.zeros(len(x), dtype=torch.long, device=x.device)
    context = torch.cat([inputs.uncond.expand_as(inputs.cond), inputs.cond])
    with torch.no_grad(), opts.autocast():
        return count_flops(lambda: call(x, t, context))


def ours_sampling(sizes: Sizes, inputs: SamplingInputs, opts: Options, steps: int, fast_steps: int,
                  compile_mode: str | None) -> list[dict]:
    """Ours with each optimisation on and off: 50-step DDIM, and the fast DPM-Solver++ for the main settings."""
    schedule = NoiseSchedule(sizes.schedule)
    torch.manual_seed(0)
    model = UNet(sizes.unet).to(opts.device).eval()
    flops = forward_flops(model, inputs, opts)
    on_cuda = opts.device.type == "cuda"

    def measure_setting(setting: Setting, samplers: tuple[tuple[str, int], ...]) -> list[dict]:
        model.to(memory_format=memory_format(setting))
        set_low_precision_norms(model, setting.low_precision_norms)  # before any compile or capture reads it
        noise = inputs.noise.contiguous(memory_format=memory_format(setting))
        call = wrap_call(model, setting, opts)  # shared by the samplers: compiled / captured once
        denoiser = cfg_denoiser(call, schedule, sizes.prediction_type, inputs.cond, inputs.uncond,
                                sizes.guidance_scale)
        callback = (lambda i, x, x0: x0.abs().max().item()) if setting.host_sync else None
        rows = []
        for sampler, n in samplers:
            timesteps = schedule.sampling_timesteps(n)

            def loop(sampler: str = sampler, timesteps: Tensor = timesteps) -> Tensor:
                return SAMPLERS[sampler](denoiser, schedule, noise.clone(), timesteps, callback=callback)

            def body(loop: Callable[[], Tensor] = loop, n: int = n, sampler: str = sampler) -> dict[str, Any]:
                return timed_loop(loop, setting, opts, sizes.sample_batch, n, flops, count_syncs=sampler == "ddim")

            rows.append({"sampler": f"{sampler}-{n}", **run_case("ours", setting, body)})
            if "error" in rows[-1]:
                break
        release_memory(opts.device)
        return rows

    both = (("ddim", steps), ("dpmpp_2m", fast_steps))
    reference_only = both[:1]
    rows = []
    for channels_last in (False, True):
        rows += measure_setting(Setting(channels_last=channels_last), both)

    def ddim(row: dict) -> bool:
        return row["sampler"].startswith("ddim")

    fmt = (fastest(rows, "ours", ddim) or {"channels_last": True})["channels_last"]
    # what flash attention and a sync-free loop are worth, against the eager row of the same format
    rows += measure_setting(Setting(channels_last=fmt, math_attention=True), reference_only)
    rows += measure_setting(Setting(channels_last=fmt, host_sync=True), reference_only)
    rows += measure_setting(Setting(channels_last=fmt, low_precision_norms=True), both)
    norms = bool((fastest(rows, "ours", lambda r: ddim(r) and is_eager(r) and not r["math_attention"]
                          and not r["host_sync"]) or {}).get("low_precision_norms"))
    for setting in faster_settings(fmt, compile_mode, on_cuda, norms):
        rows += measure_setting(setting, both)
    return rows


def diffusers_sampling(sizes: Sizes, inputs: SamplingInputs, opts: Options, steps: int,
                       compile_mode: str | None) -> list[dict]:
    """The pipeline loop on diffusers' DDIMScheduler and UNet, with the same settings ours gets."""
    scheduler = diffusers_ddim_scheduler(sizes.schedule, sizes.prediction_type)
    torch.manual_seed(0)
    unet = diffusers_unet(sizes.unet, sizes.latent_size).to(opts.device).eval()

    def eps_model(x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return unet(x, t, encoder_hidden_states=context, return_dict=False)[0]

    flops = forward_flops(eps_model, inputs, opts)

    def measure_setting(setting: Setting) -> dict:
        def body() -> dict[str, Any]:
            unet.to(memory_format=memory_format(setting))
            if setting.fused_qkv:
                unet.fuse_qkv_projections()
            noise = inputs.noise.contiguous(memory_format=memory_format(setting))
            call = wrap_call(eps_model, setting, opts)

            def loop() -> Tensor:
                return diffusers_guided_ddim(call, scheduler, noise.clone(), inputs.cond, inputs.uncond,
                                             sizes.guidance_scale, steps)

            return timed_loop(loop, setting, opts, sizes.sample_batch, steps, flops, count_syncs=True)

        row = {"sampler": f"ddim-{steps}", **run_case("diffusers", setting, body)}
        release_memory(opts.device)
        return row

    rows = [measure_setting(Setting(channels_last=cl)) for cl in (False, True)]
    fmt = (fastest(rows, "diffusers") or {"channels_last": True})["channels_last"]
    extra = faster_settings(fmt, compile_mode, opts.device.type == "cuda")
    extra.append(Setting(channels_last=fmt, fused_qkv=True))  # last: it rewrites the model's attention layers
    rows += [measure_setting(setting) for setting in extra]
    return rows


def vae_decode_cases(sizes: Sizes, inputs: SamplingInputs, opts: Options) -> list[dict]:
    """Latents -> images for one sampling batch, eager and channels_last for both, ours also with bf16 norms
    (reported apart from sampling)."""
    latents = inputs.noise.contiguous(memory_format=torch.channels_last)
    ours = (lambda: AutoencoderKL(sizes.vae), lambda m, z: m.decode(z))
    theirs = (lambda: diffusers_vae(sizes.vae), lambda m, z: m.decode(z, return_dict=False)[0])
    builds = [("ours", Setting(), *ours), ("ours", Setting(low_precision_norms=True), *ours),
              ("diffusers", Setting(), *theirs)]
    rows = []
    for impl, setting, build, decode in builds:
        def body(build: Callable[[], nn.Module] = build, decode: Callable = decode, setting: Setting = setting
                 ) -> dict[str, Any]:
            torch.manual_seed(0)
            model = build().to(opts.device).eval().to(memory_format=torch.channels_last)
            set_low_precision_norms(model, setting.low_precision_norms)

            def run() -> Tensor:
                with torch.no_grad(), opts.autocast():
                    return decode(model, latents)

            m = measure(run, 1, opts.sample_repeats, opts.device)
            return {"images_per_s": len(latents) / m.seconds_per_iter, "ms_per_iter": 1e3 * m.seconds_per_iter,
                    "peak_mem_gb": m.peak_mem_gb, "first_call_s": m.first_call_s}
        rows.append(run_case(impl, setting, body))
        release_memory(opts.device)
    return rows


def ddim_loop_check(sizes: Sizes, device: torch.device, steps: int) -> dict[str, float]:
    """Our sample_ddim + cfg_denoiser and the diffusers loop, run on one shared toy epsilon model (float32),
    must give the same latents: then both loops do the same work and only the UNets differ."""
    schedule = NoiseSchedule(sizes.schedule)
    scheduler = diffusers_ddim_scheduler(sizes.schedule, sizes.prediction_type)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, sizes.unet.in_channels, 8, 8, generator=g).to(device)
    cond, uncond = torch.randn(2, 3, 5, generator=g).to(device), torch.randn(1, 3, 5, generator=g).to(device)

    def eps_model(x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return torch.tanh(x_t) * (t.float() / schedule.num_steps)[:, None, None, None] \
            + context.mean(dim=(1, 2))[:, None, None, None]

    ours = SAMPLERS["ddim"](cfg_denoiser(eps_model, schedule, sizes.prediction_type, cond, uncond,
                                         sizes.guidance_scale), schedule, x, schedule.sampling_timesteps(steps))
    theirs = diffusers_guided_ddim(eps_model, scheduler, x, cond, uncond, sizes.guidance_scale, steps)
    return {"steps": steps, "max_abs_diff": float((ours - theirs).abs().max()), "output_scale": float(ours.abs().max())}


def is_reference_sampler(steps: int) -> Callable[[dict], bool]:
    return lambda row: row["sampler"] == f"ddim-{steps}"


def sample_section(sizes: Sizes, opts: Options, steps: int, fast_steps: int, compile_mode: str | None) -> dict[str, Any]:
    inputs = sampling_inputs(sizes, opts.device)
    rows = ours_sampling(sizes, inputs, opts, steps, fast_steps, compile_mode)
    release_memory(opts.device)  # our model is gone before the twin is built
    rows += diffusers_sampling(sizes, inputs, opts, steps, compile_mode)
    release_memory(opts.device)
    decode = vae_decode_cases(sizes, inputs, opts)
    reference = is_reference_sampler(steps)
    best = speed_ratio(rows, lambda r: reference(r) and same_precision(r))  # equal treatment
    fast = speed_ratio(rows, lambda r: r["sampler"] == f"dpmpp_2m-{fast_steps}", reference)
    result = {"cases": rows, "vae_decode": decode, "batch_size": sizes.sample_batch, "steps": steps,
              "fast_steps": fast_steps, "compile_mode": compile_mode,
              "ddim_loop_check": ddim_loop_check(sizes, opts.device, steps),
              "ratios": {"best": best,
                         "eager": speed_ratio(rows, lambda r: reference(r) and is_eager(r) and same_precision(r)),
                         "compiled": speed_ratio(rows, lambda r: reference(r) and is_compiled(r) and same_precision(r)),
                         "fast_vs_diffusers_ddim": fast,
                         # ours at its best against diffusers' loop as shipped (eager, no CUDA graph)
                         "best_vs_diffusers_eager": speed_ratio(rows, reference,
                                                               lambda r: reference(r) and is_eager(r))}}
    decode_rate = {impl: (fastest(decode, impl) or {}).get("images_per_s") for impl in IMPLS}
    if best and all(decode_rate.values()):
        with_decode = {impl: 1 / (1 / best[f"{impl}_images_per_s"] + 1 / decode_rate[impl]) for impl in IMPLS}
        result["ratios"]["best_with_decode"] = {**{f"{k}_images_per_s": v for k, v in with_decode.items()},
                                                "speedup": with_decode["ours"] / with_decode["diffusers"]}
    return result
