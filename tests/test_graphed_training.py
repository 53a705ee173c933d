"""TrainConfig.cuda_graph: the UNet's training forward and backward replayed from CUDA graphs.

The capture logic is checked on the CPU with torch's capture stood in for; the replay itself needs a GPU (CI has
none; it runs on the GPU machine)."""

import pytest
import torch
from torch import nn

from benchmarks.step_speed import step_indices, unet_trainer
from diffusion.config import UNetTrainConfig
from engine import ConfigError, Trainer, TrainConfig
from engine.graphed_training import replay_training_calls
from tests.test_engine import ToyModule

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.factor * x


def test_the_first_training_call_captures_later_ones_replay_and_another_shape_is_refused(monkeypatch):
    captures = []

    def capture(module, sample, allow_unused_input):  # stands in for torch's: "replay" adds 100
        captures.append([tuple(a.shape) for a in sample])
        traced = module.forward  # the class's own forward: what torch must graph
        module.forward = lambda *args: traced(*args) + 100
        return module

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    model = Scale()
    release = replay_training_calls(model)
    x = torch.ones(3)
    model.eval()
    assert torch.equal(model(x), 2 * x) and not captures  # validation and sample grids run eagerly
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x), 2 * x) and not captures
    assert torch.equal(model(x), 2 * x + 100) and captures == [[(3,)]]
    assert torch.equal(model(3 * x), 6 * x + 100) and len(captures) == 1  # replayed with the new tensors
    model.eval()
    assert torch.equal(model(x), 2 * x)
    model.train()
    with pytest.raises(RuntimeError, match="captured for inputs .*fixed batch shapes"):
        model(torch.ones(4))  # a graph's buffers hold 3: a copy would broadcast or fail deep inside torch
    release()
    assert torch.equal(model(x), 2 * x) and "forward" not in vars(model)  # its own forward, the graphs dropped


def test_cuda_graph_settings_that_cannot_replay_are_refused_with_the_fix_named(tmp_path):
    cfg = TrainConfig(batch_size=8, cuda_graph=True)
    with pytest.raises(ConfigError, match="nothing to replay.*cuda_graph=false"):
        Trainer(ToyModule(), cfg, tmp_path, num_train_items=64, device="cpu")
    module = ToyModule()
    with pytest.raises(ConfigError, match="this run is on cpu.*cuda_graph=false"):
        Trainer(module, cfg, tmp_path, num_train_items=64, cuda_graph_of=module.net, device="cpu")
    for other in ({"compile": True}, {"grad_accum": 2}):
        with pytest.raises(ConfigError, match="compile=false and grad_accum=1"):
            TrainConfig(cuda_graph=True, **other).validate()
    unet_cfg = UNetTrainConfig()
    unet_cfg.train.cuda_graph, unet_cfg.model.gradient_checkpointing = True, True
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        unet_cfg.validate()


@needs_cuda
def test_graphed_unet_steps_train_as_the_eager_ones(tmp_path, monkeypatch):
    captures = []
    real = torch.cuda.make_graphed_callables
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda *a, **k: captures.append(1) or real(*a, **k))
    runs = {}
    for cuda_graph in (False, True):
        torch.manual_seed(0)
        trainer, make_batch = unet_trainer({"cuda_graph": cuda_graph}, "tiny", tmp_path / str(cuda_graph),
                                           device="cuda")
        losses = [float(trainer._train_step(make_batch, step_indices(trainer))["loss"]) for _ in range(4)]
        runs[cuda_graph] = losses, [p.detach().clone() for p in trainer.module.model.parameters()]
    assert len(captures) == 1  # once, at the graphed run's first step
    (eager_losses, eager_params), (graphed_losses, graphed_params) = runs[False], runs[True]
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-3)  # the same kernels, on new noise each step
    assert len(set(graphed_losses)) == 4
    for eager, graphed in zip(eager_params, graphed_params):  # the optimizer saw the graphs' gradients
        torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-3)
