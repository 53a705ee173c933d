"""engine.nonfinite: where a replayed training step first stops being finite."""

import re

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.step_speed import step_indices, unet_trainer
from engine.nonfinite import locate_nonfinite


class Chain(nn.Module):
    """``entry -> first -> middle -> last``, the loss their mean output; ``hole`` puts a NaN into its own code
    between ``first`` and ``middle``."""

    def __init__(self, middle: nn.Module, hole: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.entry, self.first, self.middle = nn.Linear(4, 4), nn.Linear(4, 4), middle
        self.last, self.hole = nn.Linear(4, 1), hole

    def forward(self, x):
        h = self.first(self.entry(x))
        if self.hole:
            h = h * float("nan")
        return self.last(self.middle(h)).mean()


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN wherever the input is negative


class SqrtAtZero(nn.Module):
    """The identity in the forward, with an infinite derivative: ``sqrt(x - x)`` is 0, its slope 1 / (2 * 0)."""

    def forward(self, x):
        return torch.sqrt(x - x.detach()) + x


def locate(model, x=None, scale=1.0):
    batch = {"x": torch.randn(8, 4, generator=torch.Generator().manual_seed(1)) if x is None else x}
    return locate_nonfinite(model, batch, lambda b: model(b["x"]) * scale).where


def test_each_place_a_value_stops_being_finite_is_named():
    assert locate(Chain(nn.Identity())) == ("finite throughout (the skipped steps depended on their own batches or "
                                            "noise)")
    assert locate(Chain(Log())) == "first non-finite in the forward, at the output of middle"
    assert locate(Chain(nn.Identity(), hole=True)) == ("first non-finite in the forward, in the code just before "
                                                       "middle (its input was not finite)")
    assert locate(Chain(nn.Identity()), scale=float("inf")) == "a non-finite loss from finite outputs"
    # entry's and first's gradients are both non-finite: the later of the two is named; a replay with cuDNN's
    # attention kernels off (the flag is on by default on the CPU too) changes nothing here
    assert locate(Chain(SqrtAtZero())) == ("first non-finite gradients in the backward, at or just after first (the "
                                           "last module in forward order whose weights' gradients are not finite); "
                                           "not finite with cuDNN's attention kernels off either")
    poisoned = Chain(nn.Identity())
    with torch.no_grad():
        poisoned.last.weight[0, 0] = float("nan")
    assert locate(poisoned) == "non-finite weights (last.weight)"
    assert locate(Chain(nn.Identity()), x=torch.full((8, 4), float("inf"))) == "a non-finite batch (x)"


class CudnnOnlyHole(nn.Module):
    """``SqrtAtZero`` while SDPA may pick cuDNN's attention kernels, the identity otherwise: a stand-in on the CPU
    for cuDNN's attention backward returning NaN."""

    def forward(self, x):
        return SqrtAtZero()(x) if torch.backends.cuda.cudnn_sdp_enabled() else x


def test_a_backward_finding_is_replayed_with_cudnn_attention_off_from_the_same_random_draws():
    found = ("first non-finite gradients in the backward, at or just after first (the last module in forward order "
             "whose weights' gradients are not finite)")
    batch = {"x": torch.randn(8, 4, generator=torch.Generator().manual_seed(1))}
    model = Chain(CudnnOnlyHole())
    assert locate_nonfinite(model, batch, lambda b: model(b["x"])) == (
        found + "; finite with cuDNN's attention kernels off", True)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the setting comes back
    model = Chain(SqrtAtZero())
    assert not locate_nonfinite(model, batch, lambda b: model(b["x"])).made_by_cudnn_attention  # not cuDNN's doing

    class NoisyChain(Chain):  # its input gets noise from the batch's generator and from the global stream
        def __init__(self):
            super().__init__(CudnnOnlyHole())
            self.draws = []

        def forward(self, x, generator):
            noise = torch.randn(x.shape, generator=generator) + torch.randn(x.shape)
            self.draws.append(noise)
            return super().forward(x + noise)

    model = NoisyChain()
    batch = {"x": torch.zeros(8, 4), "generator": torch.Generator().manual_seed(3)}
    assert locate_nonfinite(model, batch, lambda b: model(b["x"], b["generator"])).made_by_cudnn_attention
    first, second = model.draws  # two replays, one random draw
    assert torch.equal(first, second)


def test_the_hooks_are_removed_and_a_finite_replay_leaves_its_gradients():
    for model in (Chain(Log()), Chain(nn.Identity())):  # a replay that stops in the forward, and one that does not
        locate(model)
        assert all(not sub._forward_hooks for sub in model.modules())
    assert model.first.weight.grad is not None and torch.isfinite(model.first.weight.grad).all()  # caller zeroes


def test_the_unet_stage_replay_names_the_attention_whose_backward_is_not_finite(tmp_path, monkeypatch):
    trainer, make_batch = unet_trainer({"precision": "fp32"}, "tiny", tmp_path, device="cpu")
    sdpa = F.scaled_dot_product_attention

    def cudnn_like(q, k, v, *args, **kwargs):  # every attention's backward NaN while cuDNN's kernels may run
        out = sdpa(q, k, v, *args, **kwargs)
        return torch.sqrt(out - out.detach()) + out if torch.backends.cuda.cudnn_sdp_enabled() else out

    monkeypatch.setattr(F, "scaled_dot_product_attention", cudnn_like)
    one_step = step_indices(trainer)[None]  # an epoch of one step, skipped
    finding = trainer._locate_nonfinite(make_batch, one_step, 0, [torch.ones(())])
    # the projections feeding the last attention in forward order; the one after it (``out``) stays finite
    assert re.search(r"at or just after model\.\S+\.(self|cross)_attn\.(qkv|q|kv) \(", finding.where), finding.where
    assert finding.made_by_cudnn_attention and finding.where.endswith("finite with cuDNN's attention kernels off")
    assert all(p.grad is None for p in trainer.module.parameters())  # the replay's gradients are not left behind
