"""The one training engine behind the VAE, CLIP and UNet stages.

A stage hands over a *training module* (its model plus its loss, so DDP sees a single forward),
the number of training items and a ``make_batch(indices, generator)`` function; the engine does the
rest: batch indices (deterministic, sharded per rank), bf16 autocast, fused AdamW, warm-up + cosine
learning rate, gradient accumulation and clipping (a step whose gradient is not finite is skipped), EMA,
atomic checkpoints, exact resume, progress, a JSONL log and a loss plot, a per-epoch callback for the stage's
pictures and metrics, and a rollback of loss spikes when asked for (``TrainConfig.spike_rollbacks``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import random
import time
from collections import deque
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import distributed, runlog
from .config import (ConfigError, TrainConfig, config_to_dict, flatten_config, setting_differences,
                     unrecorded_values)
from .ema import EMA
from .errors import UserError
from .graphed_training import check_cuda_graph, replay_training_calls
from .nonfinite import Finding, cudnn_attention, locate_nonfinite
from .precision import set_low_precision_norms
from .stage import CONFIG_FILE, StageError, StageModel, atomic_write, lineage_differences
from .tensorboard import TensorBoardLog

CHECKPOINT_NAME = "latest.pt"
MakeBatch = Callable[[torch.Tensor, torch.Generator], Any]
EpochCallback = Callable[[int, "Trainer"], "Mapping[str, Any] | None"]


class TrainingDiverged(UserError):
    """The weights went non-finite and no rollback was left: training stops before it saves them (one line: its
    remedy, a lower learning rate, is the user's to choose)."""


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """While it is open, torch runs only kernels that give the same bits every run (``TrainConfig.deterministic``);
    the previous setting comes back after, so the stages and the generation around a training keep theirs."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    # torch refuses deterministic cuBLAS calls without a fixed workspace; a value the user set (":16:8") is kept
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def checkpoint_path(out_dir: str | Path) -> Path:
    """Where the trainer of a stage folder keeps the checkpoint it resumes from."""
    return Path(out_dir) / "checkpoints" / CHECKPOINT_NAME


def read_checkpoint(path: Path, device: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A trainer's checkpoint (tensors and plain data only, never arbitrary pickles); a damaged file is a
    ``StageError``. ``mmap`` leaves the tensors on disk until they are touched: for reading its records."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as err:  # a truncated zip, a foreign pickle, a short read: each its own exception type
        raise StageError(f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {err}); delete it to "
                         "train the stage from the start, or restore it from a copy") from None


def resume_differences(state: Mapping[str, Any], settings: Mapping[str, Any],
                       inputs: Mapping[str, tuple[str | None, str]],
                       unrecorded: Mapping[str, Any] | None = None) -> list[str]:
    """How a checkpoint's ``state`` differs from a run asked with ``settings`` (a flattened config: only these
    keys are compared; ``unrecorded`` as ``setting_differences`` takes it) on ``inputs``
    (``engine.stage.lineage_differences``), one line each."""
    if "run_config" not in state:
        return ["it was written before checkpoints recorded their settings"]
    return (setting_differences(settings, state["run_config"], unrecorded)
            + lineage_differences(state.get("trained_on", {}), inputs))


def check_item_weights(weights: torch.Tensor | None, num_items: int) -> None:
    """``ConfigError`` naming what is wrong with a trainer's ``item_weights`` (one finite weight >= 0 per training
    item, not all zero) and the fix; None (uniform draws) passes."""
    if weights is None:
        return
    if weights.shape != (num_items,):
        raise ConfigError(f"item_weights has shape {tuple(weights.shape)} for {num_items} training items; give one "
                          "weight per item")
    if not bool(torch.isfinite(weights).all() and (weights >= 0).all()):
        raise ConfigError("item_weights holds a negative or non-finite weight; give every item a finite weight >= 0")
    if not weights.sum() > 0:
        raise ConfigError("item_weights are all zero; give at least one item a positive weight")


def weights_fingerprint(weights: torch.Tensor | None) -> str | None:
    """Identifies a trainer's ``item_weights`` (None: uniform draws), so a resume draws as the run it continues."""
    if weights is None:
        return None
    return hashlib.sha256(weights.detach().double().cpu().numpy().tobytes()).hexdigest()[:16]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ScaledLRFactor:
    """The scheduler's factor at each step: ``lr_factor`` times ``scale``, which each spike rollback lowers.

    Its own object, not a lambda over the trainer: that lambda made every trainer a reference cycle, alive with its
    DDP process group until a garbage collection, at worst the interpreter's teardown, where freeing gloo's work can
    abort the process."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        self.scale = 1.0

    def __call__(self, step: int) -> float:
        return self.scale * lr_factor(step, self.warmup_steps, self.total_steps, self.min_ratio)


# Above this share of a log interval's steps skipped for a non-finite gradient, a replay looks for the cause (one bad
# batch now and then costs its step; most of them, most of the training).
MOSTLY_SKIPPED = 0.5


def _seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers (stable across processes and runs)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part + 0x632BE59BD9B4E019 + (value << 6) + (value >> 2))) & ((1 << 63) - 1)
    return value


class Trainer:
    """Trains ``module`` whose ``forward(batch, step)`` returns ``(loss, logs)``.

    Args:
        module: the stage's training module (model + loss).
        cfg: engine settings.
        out_dir: where ``checkpoints/``, ``log.jsonl`` and ``loss.png`` go.
        num_train_items: size of the training set the batch indices are drawn from.
        ema_of: the sub-module whose weights get an EMA (when ``cfg.ema_decay`` or ``cfg.ema_std`` is set).
        cuda_graph_of: the sub-module whose forward and backward replay from CUDA graphs with ``cfg.cuda_graph``
            (``engine.graphed_training``: called once per step, tensors of fixed shapes, no host sync inside).
        param_groups: optional ``[{"params": [...], "lr_scale": 1.0, "weight_decay": ...}]``; default:
            every trainable parameter, weight decay on matrices/kernels only.
        find_unused_parameters: passed to DDP for modules whose forward skips parameters.
        resume: continue from ``out_dir/checkpoints/latest.pt`` when it exists.
        device: default: this process's GPU, else the CPU.
        run_config: the stage's whole config (default: ``cfg``), shown in TensorBoard and kept in checkpoints:
            resuming with other settings of what it learns is an error. A config object (not its dict) also
            tells which settings older checkpoints lack (``engine.config.unrecorded_values``).
        trained_on: the fingerprints of what the stage learns from (``{"data": ..., "vae": ...}``), kept in
            checkpoints (resuming on other inputs is an error) and in the finished stage's lineage.
        item_weights: optional ``[num_train_items]`` non-negative draw weights: each pass then draws its
            ``num_train_items`` indices with replacement in proportion to them instead of permuting the items
            (a checkpoint records their fingerprint: a resume with other weights, or none, is refused).
    """

    def __init__(self, module: nn.Module, cfg: TrainConfig, out_dir: str | Path, *, num_train_items: int,
                 ema_of: nn.Module | None = None, cuda_graph_of: nn.Module | None = None,
                 param_groups: list[dict[str, Any]] | None = None,
                 find_unused_parameters: bool = False, resume: bool = False,
                 device: str | torch.device | None = None, run_config: Any = None,
                 trained_on: Mapping[str, str] | None = None, item_weights: torch.Tensor | None = None) -> None:
        cfg.validate()
        check_item_weights(item_weights, num_train_items)
        self.item_weights = item_weights.detach().double().cpu() if item_weights is not None else None
        self.cfg = cfg
        self.env = distributed.setup(device)
        self.device = self.env.device
        self.out_dir = Path(out_dir)
        self.checkpoint_path = checkpoint_path(self.out_dir)
        self.log_path = self.out_dir / "log.jsonl"
        self._grad_norm_levels: list[float] = []  # the last log intervals' mean gradient norms (spike rule)
        # the training state at the last two log intervals' ends that passed the spike rule (in memory, on the
        # device): a spike rolls back to the older one
        self._snapshots: deque[dict[str, Any]] = deque(maxlen=2)
        self.spike_rollbacks_used = 0
        # off for the rest of the stage once cuDNN's attention made a step's gradient non-finite (_check_spike)
        self.cudnn_attention = cfg.cudnn_attention

        per_step = self.env.world_size * cfg.grad_accum
        if cfg.batch_size % per_step:
            raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by processes x grad_accum = {per_step}")
        self.micro_batch = cfg.batch_size // per_step
        check_cuda_graph(cfg, self.device, self.env.world_size, replayable=cuda_graph_of is not None)
        if num_train_items < cfg.batch_size:
            raise ConfigError(f"batch_size={cfg.batch_size} is larger than the training set ({num_train_items} items); "
                              "lower --batch_size")
        self.num_train_items = num_train_items
        # drop_last: every step sees a full batch
        self.steps_per_epoch = num_train_items * cfg.passes_per_epoch // cfg.batch_size
        self.total_steps = self.steps_per_epoch * cfg.epochs

        self.precision = cfg.precision
        if self.precision == "auto":
            self.precision = "bf16" if self.device.type == "cuda" else "fp32"

        if self.env.world_size > 1 and self.device.type == "cuda":
            # BatchNorm statistics over the global batch, so N GPUs train like one GPU at the same global
            # batch (the CLIP image encoder has BatchNorm). SyncBatchNorm runs on GPUs only; gloo keeps BN.
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        self.module = module.to(self.device)
        if self.memory_format == torch.channels_last:
            self.module.to(memory_format=torch.channels_last)
        if cfg.low_precision_norms and set_low_precision_norms(self.module, True) == 0:
            raise ConfigError("low_precision_norms=true, but this stage's model has no engine.precision "
                              "GroupNorm/LayerNorm to switch; set it to false")
        averaged = ema_of if ema_of is not None else module
        averages = [name for name in ("ema_decay", "ema_std", "ema_probe_stds") if getattr(cfg, name)]
        if averages and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in averaged.modules()):
            # the EMA averages parameters only: BatchNorm's running statistics would be the live weights'
            raise ConfigError("an EMA cannot average the running statistics of a model with BatchNorm (CLIP's "
                              f"image encoder); set {' and '.join(averages)} to 0")
        self.ema = EMA(averaged, cfg.ema_decay, std=cfg.ema_std) if cfg.ema_decay > 0 or cfg.ema_std > 0 else None
        self.ema_probes = {std: EMA(averaged, std=std) for std in cfg.ema_probe_stds}
        self.optimizer = self._make_optimizer(param_groups)
        self._lr_factor = factor = ScaledLRFactor(cfg.warmup_steps, self.total_steps, cfg.min_lr_ratio)
        # handed over as a function, which LambdaLR leaves out of its state (an object's attributes it would save):
        # the trainer checkpoints lr_scale itself, and a rollback's restored scheduler must not bring an older back
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: factor(step))

        run_config = cfg if run_config is None else run_config
        self.run_config = config_to_dict(run_config) if is_dataclass(run_config) else dict(run_config)
        self.unrecorded = unrecorded_values(run_config) if is_dataclass(run_config) else {}
        self.trained_on = dict(trained_on or {})
        self.step = 0
        self.epoch = 0  # epochs completed
        self.generator = torch.Generator(self.device)
        self.wrapped: nn.Module = module
        self.ddp: DistributedDataParallel | None = None
        if self.env.world_size > 1:
            self.ddp = DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters)
            self.wrapped = self.ddp
        if cfg.compile:
            self.wrapped = torch.compile(self.wrapped)
        self._release_cuda_graphs = replay_training_calls(cuda_graph_of) if cfg.cuda_graph else None

        self.resumed = False
        if resume and self.checkpoint_path.is_file():
            self._load_checkpoint()
            self.resumed = True
            # a checkpoint is written where the run had just taken a snapshot (an epoch's or a log interval's
            # end), so from the next interval on the snapshots are the uninterrupted run's
            self._snapshot()
        elif self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # a fresh run un-finishes the folder before writing in it (its caller checked that it may: stage
            # check_training_folder), so a stage half replaced never reads as finished; and starts a fresh log
            # and no checkpoint (the replaced run's would be what a --resume after a crash finds)
            (self.out_dir / CONFIG_FILE).unlink(missing_ok=True)
            self.log_path.unlink(missing_ok=True)
            self.checkpoint_path.unlink(missing_ok=True)
        self.tensorboard: TensorBoardLog | None = None  # main rank only
        if self.env.is_main:
            self.tensorboard = TensorBoardLog(self.out_dir / "tb", resume_step=self.step if self.resumed else None)
            self.tensorboard.config(self.run_config, self.step)

    # ------------------------------------------------------------------ set-up
    def _make_optimizer(self, param_groups: list[dict[str, Any]] | None) -> torch.optim.Optimizer:
        if param_groups is None:
            params = [p for p in self.module.parameters() if p.requires_grad]
            # No weight decay on biases and norm gains (the usual AdamW practice).
            param_groups = [
                {"params": [p for p in params if p.ndim >= 2]},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            ]
        groups = []
        for group in param_groups:
            group = dict(group)
            group["lr"] = self.cfg.lr * group.pop("lr_scale", 1.0)
            group.setdefault("weight_decay", self.cfg.weight_decay)
            if group["params"]:
                groups.append(group)
        # fused on the CPU too: only the fused AdamW skips a step on the device flag _train_step sets
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2),
                                 weight_decay=self.cfg.weight_decay, fused=True)

    @property
    def lr_scale(self) -> float:
        """The learning rate's factor from spike rollbacks: times ``spike_lr_backoff`` per rollback."""
        return self._lr_factor.scale

    @lr_scale.setter
    def lr_scale(self, value: float) -> None:
        self._lr_factor.scale = value

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout 4-D batches should have (channels-last only on CUDA and when configured)."""
        if self.cfg.channels_last and self.device.type == "cuda":
            return torch.channels_last
        return torch.contiguous_format

    def autocast(self):
        """bf16 autocast on CUDA (the engine's precision), nothing in fp32."""
        if self.precision == "bf16":  # a CUDA-graph capture refuses autocast's weight-cast cache
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.cfg.cuda_graph)
        return nullcontext()

    @contextmanager
    def ema_weights(self, probe: float | None = None) -> Iterator[None]:
        """Use the EMA weights inside the block (the plain weights when EMA is off), or those of the probe EMA
        of width ``probe`` (one of ``cfg.ema_probe_stds``)."""
        ema = self.ema if probe is None else self.ema_probes[probe]
        with ema.swapped_in() if ema is not None else nullcontext():
            yield

    # ------------------------------------------------------------------ data order
    def _epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's batch indices for ``epoch``: ``[steps, grad_accum, micro_batch]``.

        Like ``DistributedSampler``: one permutation per pass (from the seed and epoch), or with ``item_weights``
        as many draws with replacement in proportion to them, split so that every rank sees its own shard of
        each global batch.
        """
        g = torch.Generator().manual_seed(_seed_for(self.cfg.seed, epoch))

        def one_pass() -> torch.Tensor:
            if self.item_weights is None:
                return torch.randperm(self.num_train_items, generator=g)
            return torch.multinomial(self.item_weights, self.num_train_items, replacement=True, generator=g)

        order = torch.cat([one_pass() for _ in range(self.cfg.passes_per_epoch)])
        order = order[: self.steps_per_epoch * self.cfg.batch_size]
        order = order.view(self.steps_per_epoch, self.cfg.grad_accum, self.env.world_size, self.micro_batch)
        return order[:, :, self.env.rank]

    def _reseed(self, epoch: int, *step: int) -> None:
        """Every epoch starts from RNG states fixed by (seed, epoch, rank), so resuming at an epoch boundary
        is exact whatever ran before (sampling callbacks included); ``step`` too for a start inside an epoch."""
        seed = _seed_for(self.cfg.seed, epoch, self.env.rank, *step)
        torch.manual_seed(seed)
        random.seed(seed)
        self.generator.manual_seed(seed + 1)

    # ------------------------------------------------------------------ loop
    def fit(self, make_batch: MakeBatch, on_epoch_end: EpochCallback | None = None) -> None:
        """Train for the configured epochs (from where a resumed checkpoint stopped); once: the TensorBoard log
        and any CUDA graphs of the step are closed at the end."""
        progress = tqdm(total=self.total_steps, initial=self.step, disable=not self.env.is_main,
                        desc=self.out_dir.name, dynamic_ncols=True, smoothing=0.05)
        with deterministic_algorithms(self.cfg.deterministic), cudnn_attention(self.cudnn_attention):
            while not self._run_epochs(make_batch, on_epoch_end, progress):  # False: a spike was rolled back
                progress.n = self.step
                progress.refresh()
        progress.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self._release_cuda_graphs is not None:  # before the next phase's model needs the memory
            self._release_cuda_graphs()

    def _run_epochs(self, make_batch: MakeBatch, on_epoch_end: EpochCallback | None, progress: tqdm) -> bool:
        """The epochs from ``self.step`` on; False when a loss spike was rolled back (``self.step`` went back)."""
        cfg = self.cfg
        start_epoch = self.epoch
        skip_steps = self.step - start_epoch * self.steps_per_epoch  # > 0 after a mid-epoch checkpoint or rollback
        sums: dict[str, torch.Tensor] = {}
        grad_peak: torch.Tensor | None = None  # the largest gradient norm of the log interval, kept on the device
        skip_flags: list[torch.Tensor] = []  # the interval's steps, 1 where one was skipped (read only to replay)
        count = 0
        t_last = time.perf_counter()
        for epoch in range(start_epoch, cfg.epochs):
            if skip_steps == 0:
                self._reseed(epoch)
            indices = self._epoch_indices(epoch)
            self.module.train()
            for step_in_epoch in range(skip_steps, self.steps_per_epoch):
                logs = self._train_step(make_batch, indices[step_in_epoch])
                for key, value in logs.items():
                    sums[key] = sums.get(key, 0.0) + value
                if "grad_norm" in logs:
                    grad_peak = logs["grad_norm"] if grad_peak is None else torch.maximum(grad_peak, logs["grad_norm"])
                skip_flags.append(logs["skipped_steps"])
                count += 1
                progress.update(1)
                last_in_epoch = step_in_epoch == self.steps_per_epoch - 1
                if self.step % cfg.log_every == 0 or last_in_epoch:
                    now = time.perf_counter()
                    record = self._log_train(sums, count, now - t_last, grad_peak)
                    progress.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['lr']:.2e}")
                    spike = self._check_spike(record, count, lambda: self._locate_nonfinite(
                        make_batch, indices, step_in_epoch, skip_flags))
                    if spike is not None and self._roll_back(spike):
                        return False
                    if spike is not None and spike.get("cudnn_attention_off"):  # no rollback was left
                        self._record_cudnn_attention_off(spike)
                    if not last_in_epoch:  # at an epoch's end the snapshot is taken after the epoch's work
                        self._snapshot()
                    sums, grad_peak, skip_flags, count, t_last = {}, None, [], 0, now
                if self._step_checkpoint_due() and not last_in_epoch:  # at an epoch's end: after its work
                    self.save_checkpoint()
            skip_steps = 0
            self.epoch = epoch + 1
            self._end_epoch(on_epoch_end)
            self._snapshot()
            t_last = time.perf_counter()  # throughput counts training steps, not the epoch-end work
        return True

    def _step_is_dynamic(self) -> AbstractContextManager:
        """Under torch.compile, trace ``step`` as a symbolic int from the first compile.

        Dynamo otherwise bakes the first step's value into the graph and compiles the whole training graph a
        second time at step 1 (that cost 3 minutes on the UNet on an H100). ``dynamic_sources`` names the
        argument as the compiled frame sees it: the module's ``step``, or DDP's ``kwargs['step']``.
        """
        if not self.cfg.compile or not hasattr(torch.compiler.config, "dynamic_sources"):
            return nullcontext()
        return torch.compiler.config.patch(dynamic_sources="L['step'],L['kwargs']['step']")

    def _train_step(self, make_batch: MakeBatch, step_indices: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        logs_sum: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = make_batch(step_indices[micro].to(self.device, non_blocking=True), self.generator)
            sync = micro == cfg.grad_accum - 1 or self.ddp is None
            with (nullcontext() if sync else self.ddp.no_sync()), self.autocast(), self._step_is_dynamic():
                loss, logs = self.wrapped(batch, step=self.step)
            (loss / cfg.grad_accum).backward()
            logs = {"loss": loss, **logs}
            for key, value in logs.items():
                logs_sum[key] = logs_sum.get(key, 0.0) + value.detach().float() / cfg.grad_accum
        # grad_clip=0 clips at an infinite norm: the gradients are scaled by exactly 1, and the norm is measured for
        # the skip below alone (not logged, so the spike rule, which reads clipped norms, stays off)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.grad_clip or math.inf)
        # A step whose gradient is not finite (one bad batch, an overflow) is skipped, as GradScaler skips one, not
        # written into the weights as NaN: the fused AdamW reads the flag on the device (no sync) and leaves
        # weights, moments and its step count alone. Its logs count as zero and the interval's mean is over the
        # steps taken (_log_train); an interval with none taken is a spike, or unclipped the stage's end
        # (_check_spike).
        finite = torch.isfinite(grad_norm)
        self.optimizer.found_inf = (~finite).float()
        logs_sum = {key: torch.where(finite, value, 0.0) for key, value in logs_sum.items()}
        if cfg.grad_clip > 0:
            logs_sum["grad_norm"] = torch.where(finite, grad_norm, 0.0)
        logs_sum["skipped_steps"] = self.optimizer.found_inf
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for ema in ([self.ema] if self.ema is not None else []) + list(self.ema_probes.values()):
            ema.update()
        self.step += 1
        return logs_sum

    def _log_train(self, sums: dict[str, torch.Tensor], count: int, seconds: float,
                   grad_peak: torch.Tensor | None) -> dict[str, Any]:
        """One host sync per ``log_every`` steps: average the accumulated device scalars and append them, with
        the interval's largest gradient norm; say so when the interval looks like a loss spike."""
        keys = sorted(sums)
        values = torch.stack([torch.as_tensor(sums[k], device=self.device).float() for k in keys])
        # means over the steps taken (none taken: NaN, a spike); skips as a count (every step logs its flag)
        skipped = keys.index("skipped_steps")
        values = values / (count - values[skipped])
        values[skipped] = sums["skipped_steps"]
        if grad_peak is not None:  # every rank clips the same all-reduced gradients: the mean is that peak
            keys, values = keys + ["grad_norm_max"], torch.cat([values, grad_peak.float().view(1)])
        values = distributed.all_reduce_mean(values).tolist()
        record = {"kind": "train", "step": self.step, "epoch": self.epoch,
                  "lr": self.scheduler.get_last_lr()[0],
                  "samples_per_s": count * self.cfg.batch_size / max(seconds, 1e-9)}
        record.update({f"train/{k}": v for k, v in zip(keys, values)})
        if self.env.is_main:
            runlog.append_record(self.log_path, record)
            self.tensorboard.scalars(record, self.step)
        return record

    def _check_spike(self, record: Mapping[str, Any], count: int,
                     find_nonfinite: Callable[[], Finding]) -> dict[str, Any] | None:
        """The spike rule on this log interval (every rank reads the same all-reduced figures, so all decide alike):
        the spike as ``runlog.loss_spikes`` reports one, or None. An interval with no finite step, or with more
        than ``MOSTLY_SKIPPED`` of its steps skipped, also says what a replay of its last skipped step's batch
        found (``find_nonfinite``; the spike's ``nonfinite``). When cuDNN's attention made it (on any rank), that
        is off from here and the interval is a spike (``skipped``: how many, when some step was taken): it rolls
        back without lowering the learning rate, or with no rollback left training goes on from the weights the
        skipped steps left alone. A mostly skipped interval that cuDNN did not make is only reported: the steps
        taken were sound. Without clipping (no norm logged) the skips are only reported, and an interval with none
        taken stops the stage."""
        first, name = self.step - count + 1, self.out_dir.name
        skipped = round(record.get("train/skipped_steps", 0))
        if skipped and self.env.is_main:
            tqdm.write(f"{name}: {skipped} of steps {first}-{self.step} skipped: the gradient was not finite")
        if "train/grad_norm" not in record:  # not clipped: no norm is logged, so no spike rule and no rollback
            if skipped == count:
                raise TrainingDiverged(f"{name}: every step of steps {first}-{self.step} had a gradient that is not "
                                       "finite (each was skipped); train the stage again at a lower learning rate "
                                       "(--lr)")
            return None
        grad_norm = record["train/grad_norm"]
        ratio = runlog.spike_ratio(self._grad_norm_levels, grad_norm)
        if math.isfinite(grad_norm):  # a NaN would spoil the level the next intervals are measured against
            self._grad_norm_levels = (self._grad_norm_levels + [grad_norm])[-runlog.SPIKE_HISTORY:]
        none_taken = not math.isfinite(grad_norm)
        mostly_skipped = not none_taken and skipped > MOSTLY_SKIPPED * count
        if ratio is None and not mostly_skipped:
            return None
        spike = {"first_step": first, "last_step": self.step, "grad_norm": grad_norm, "ratio": ratio}
        made_by_cudnn = False
        if none_taken or mostly_skipped:
            finding = find_nonfinite()
            spike["nonfinite"] = finding.where
            if self.cudnn_attention:
                found_on = torch.tensor(float(finding.made_by_cudnn_attention), device=self.device)
                made_by_cudnn = distributed.all_reduce_mean(found_on).item() > 0
            if none_taken and not made_by_cudnn and not self._can_roll_back():
                raise TrainingDiverged(f"{name}: every step of steps {first}-{self.step} had a gradient that is not "
                                       "finite (each was skipped), and no rollback is left (a replay of the last "
                                       f"batch: {finding.where}); train the stage again at a lower learning rate "
                                       "(--lr)")
        if mostly_skipped:
            if self.env.is_main:
                tqdm.write(f"{name}: a replay of the last skipped step's batch: {finding.where}")
            if made_by_cudnn:
                spike["skipped"] = skipped
            elif ratio is None:  # the steps taken were sound: reported, not a spike
                return None
        if self.env.is_main and ratio is not None:
            averaged = f"the gradient norm averaged {grad_norm:.3g} over steps {first}-{self.step}"
            tqdm.write(f"{name}: loss spike? {averaged}, "
                       + (f"{ratio:.1f}x its level before" if not none_taken
                          else f"no step with a finite gradient (a replay of the last batch: {spike['nonfinite']})")
                       + ("" if self._can_roll_back() or made_by_cudnn else "; if train/loss stays up from here, the "
                          "run is damaged: train the stage again"))
        if made_by_cudnn:  # with no rollback left, the weights the skips left alone train on without it
            self._turn_off_cudnn_attention(spike)
        return spike

    def _turn_off_cudnn_attention(self, spike: dict[str, Any]) -> None:
        """From here to the stage's end (a resume too: checkpoints keep it), SDPA leaves cuDNN's attention."""
        self.cudnn_attention = False
        torch.backends.cuda.enable_cudnn_sdp(False)  # fit's context restores the caller's setting at the end
        spike["cudnn_attention_off"] = True
        if self.env.is_main:
            tqdm.write(f"{self.out_dir.name}: cuDNN's attention made the gradients of steps {spike['first_step']}-"
                       f"{spike['last_step']} non-finite (the last skipped step's batch is finite without it): it "
                       "is off for the rest of this stage")

    def _record_cudnn_attention_off(self, spike: Mapping[str, Any]) -> None:
        """With no rollback left, the log says why the spike's interval stays in it (``runlog.cudnn_attention_off``):
        its steps were skipped and cuDNN's attention is off from here, so the weights are not damaged."""
        if self.env.is_main:
            runlog.append_record(self.log_path, {"kind": "cudnn_attention_off", "step": self.step, **dict(spike)})

    def _locate_nonfinite(self, make_batch: MakeBatch, indices: torch.Tensor, step_in_epoch: int,
                          skip_flags: Sequence[torch.Tensor]) -> Finding:
        """Replay the first micro-batch of the log interval's last skipped step (``skip_flags``: one per step of
        the interval, which ends at ``step_in_epoch`` of the epoch ``indices`` orders), with its own random draws,
        through the plain module, forward and backward, and say where a value first stopped being finite
        (``engine.nonfinite``); ``make_batch`` is called once more. The gradients are zeroed after, and the
        trainer's random streams are left as they were, since training may go on from here."""
        if self.cfg.cuda_graph:
            return Finding("not run: CUDA graphs hide the place (train with cuda_graph=false to find it)")
        back = int(torch.stack(list(skip_flags)).flip(0).argmax())  # steps after the last skipped one (argmax: first)
        step = self.step - back
        generator = torch.Generator(self.device).manual_seed(_seed_for(self.cfg.seed, step))

        def loss_of(batch: Any) -> torch.Tensor:
            with self.autocast():
                return self.module(batch, step=step - 1)[0]  # the step count that step trained with

        devices = [self.device] if self.device.type == "cuda" else []  # the streams training draws from
        try:
            with torch.random.fork_rng(devices=devices):
                batch = make_batch(indices[step_in_epoch - back][0].to(self.device, non_blocking=True), generator)
                return locate_nonfinite(self.module, batch, loss_of)
        except torch.OutOfMemoryError:
            return Finding("out of memory")
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ spike rollback
    def _rollbacks_left(self) -> bool:
        return self.spike_rollbacks_used < self.cfg.spike_rollbacks

    def _can_roll_back(self) -> bool:
        return self._rollbacks_left() and bool(self._snapshots)

    def _snapshot(self) -> None:
        """Keep this moment's training state in memory while rollbacks are left (a copy on the device: ~4x the
        weights' size with AdamW and an EMA)."""
        if self._rollbacks_left():
            if len(self._snapshots) == self._snapshots.maxlen:
                self._snapshots.popleft()  # before copying: never three copies at once
            self._snapshots.append(copy.deepcopy({**self._training_state(), "rng": self._rng_state()}))

    def _roll_back(self, spike: Mapping[str, Any]) -> bool:
        """Go back to the older snapshot, lower the learning rate, and leave a record of it in the log; False when
        no rollback is left (the spike stays, as a warning)."""
        if not self._can_roll_back():
            return False
        target, spiked_at = self._snapshots[0], self.step
        self._snapshots = deque([target], maxlen=2)  # the newer one goes first: at most two copies at once
        self._load_training_state(copy.deepcopy(target))  # a copy: the optimizer keeps the tensors it is given
        self._set_rng_state(target["rng"])
        self.spike_rollbacks_used += 1
        if not spike.get("cudnn_attention_off"):  # a kernel's fault, not the learning rate's
            self.lr_scale *= self.cfg.spike_lr_backoff
        for group, base_lr, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                          self.scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)
        if self.env.is_main:
            runlog.truncate_after(self.log_path, self.step)  # the spiked steps are trained again
            self.tensorboard.purge_after(self.step)
            runlog.append_record(self.log_path, {"kind": "rollback", "step": self.step, **dict(spike),
                                                 "lr_scale": self.lr_scale})
            tqdm.write(f"{self.out_dir.name}: rolled back from step {spiked_at} to step {self.step}; the learning "
                       f"rate is x{self.lr_scale:.3g} from here ({self.spike_rollbacks_used} of "
                       f"{self.cfg.spike_rollbacks} rollbacks used)")
        self.save_checkpoint()  # a checkpoint written on the spiked path must not be what a resume finds
        return True

    def _end_epoch(self, on_epoch_end: EpochCallback | None) -> None:
        metrics: dict[str, Any] = {}
        if on_epoch_end is not None and self.env.is_main:
            self.module.eval()
            with torch.no_grad():
                metrics = dict(on_epoch_end(self.epoch, self) or {})
            self.module.train()
        if self.env.is_main:
            runlog.append_record(self.log_path, {"kind": "epoch", "step": self.step, "epoch": self.epoch, **metrics})
            self.tensorboard.scalars(metrics, self.step)
            runlog.plot_losses(self.log_path, self.out_dir / "loss.png", title=self.out_dir.name)
        distributed.barrier()
        last = self.epoch == self.cfg.epochs
        if last or self.epoch % self.cfg.checkpoint_every_epochs == 0 or self._step_checkpoint_due():
            self.save_checkpoint()

    def _step_checkpoint_due(self) -> bool:
        return bool(self.cfg.checkpoint_every_steps) and self.step % self.cfg.checkpoint_every_steps == 0

    def log_image(self, tag: str, png: str | Path) -> None:
        """Show a picture grid the stage saved (main rank) in TensorBoard at the current step."""
        if self.tensorboard is not None:
            self.tensorboard.image(tag, png, self.step)

    def last_epoch_metrics(self) -> dict[str, Any]:
        """What the epoch callback returned after the last finished epoch, read back from the log (main rank).

        Stages take their final validation figures from here instead of evaluating the same weights again;
        the log keeps the record across a resume, also one that had no epochs left to run.
        """
        epochs = [r for r in runlog.read_records(self.log_path) if r.get("kind") == "epoch"]
        if not epochs:
            raise RuntimeError(f"{self.log_path} holds no finished epoch: call fit() first")
        return {k: v for k, v in epochs[-1].items() if k not in ("kind", "step", "epoch")}

    def finish_stage(self, model: StageModel, cfg: Any, final_metrics: Callable[[], dict[str, Any]],
                     describe: Callable[[dict[str, Any]], str], started: float) -> Path:
        """The end of every stage: on the main process, with the EMA weights in place, take the stage's final
        metrics, save the stage folder (config.json last) and print one line; then wait for every process.

        ``final_metrics`` runs under the EMA weights (the VAE measures its scaling factor there); ``steps``
        and ``minutes`` (since ``started``, a ``time.perf_counter()``) are added to what it returns.
        """
        if self.env.is_main:
            with self.ema_weights():
                model.eval()
                metrics = {**final_metrics(), "steps": self.step, "minutes": (time.perf_counter() - started) / 60}
                model.save(self.out_dir, training=config_to_dict(cfg), trained_on=self.trained_on, metrics=metrics)
            tqdm.write(f"{model.STAGE_KIND.upper()} stage saved to {self.out_dir}: {describe(metrics)}, "
                       f"{metrics['minutes']:.1f} min")
        distributed.barrier()
        return self.out_dir

    # ------------------------------------------------------------------ checkpoints
    def _rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "python": random.getstate(), "generator": self.generator.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: Mapping[str, Any]) -> None:
        # RNG states are CPU byte tensors whatever the generator's device; the checkpoint is loaded onto the
        # training device, so they come back from there
        torch.set_rng_state(state["torch"].cpu())
        random.setstate(state["python"])
        self.generator.set_state(state["generator"].cpu())
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)

    def save_checkpoint(self) -> None:
        """Atomically write model, EMA, optimizer, schedule, step and every rank's RNG state."""
        rng = [self._rng_state()]
        if self.env.world_size > 1:
            rng = [None] * self.env.world_size
            dist.all_gather_object(rng, self._rng_state())
        if self.env.is_main:
            state = {
                **self._training_state(),
                "lr_scale": self.lr_scale,
                "spike_rollbacks_used": self.spike_rollbacks_used,
                "cudnn_attention": self.cudnn_attention,
                "rng": rng,
                "run_config": flatten_config(self.run_config),
                "trained_on": self.trained_on,
                "item_weights": weights_fingerprint(self.item_weights),
                "world_size": self.env.world_size,
            }
            atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))
        distributed.barrier()

    def _training_state(self) -> dict[str, Any]:
        """What a checkpoint and a spike snapshot both hold (references to the live tensors, not copies)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "ema_probes": {std: ema.state_dict() for std, ema in self.ema_probes.items()},
            "grad_norm_levels": list(self._grad_norm_levels),
        }

    def _load_training_state(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        for std, ema in self.ema_probes.items():  # the probes are in the run config: a checkpoint has them all
            ema.load_state_dict(state["ema_probes"][std])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self._grad_norm_levels = list(state.get("grad_norm_levels", []))  # absent in older checkpoints

    def _load_checkpoint(self) -> None:
        state = read_checkpoint(self.checkpoint_path, self.device)
        # the whole stage config, not only the engine's: a resumed run that learns with other settings or inputs
        # is neither the run that was started nor the one asked for (how it runs, e.g. compiled or not, may change)
        differences = resume_differences(state, flatten_config(self.run_config),
                                         {name: (value, "") for name, value in self.trained_on.items()},
                                         self.unrecorded)
        if state.get("item_weights") != weights_fingerprint(self.item_weights):  # older checkpoints: uniform draws
            differences.append("it drew its training items with other item_weights")
        if differences:
            raise ConfigError(f"cannot resume {self.checkpoint_path}: it differs from what is asked "
                              f"({'; '.join(differences[:4])}{'; ...' if len(differences) > 4 else ''}); ask for "
                              "what it was trained with, or delete that checkpoint to train this stage from the start")
        self._load_training_state(state)
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.spike_rollbacks_used = int(state.get("spike_rollbacks_used", 0))
        self.cudnn_attention = self.cfg.cudnn_attention and bool(state.get("cudnn_attention", True))
        rng = state["rng"]
        if len(rng) == self.env.world_size:
            self._set_rng_state(rng[self.env.rank])
        else:  # written by another number of processes: each rank a stream of its own from here (not the run's)
            self._reseed(self.epoch, self.step)
        if self.env.is_main:
            runlog.truncate_after(self.log_path, self.step)
