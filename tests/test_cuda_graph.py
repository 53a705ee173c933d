"""CUDA-graph replay of the UNet call: same output as eager, one graph per shape, weights read live.

All but the first test need a GPU (CI has none; they run on the GPU machine, see docs/BENCHMARKS.md)."""

import pytest
import torch

from diffusion.cuda_graph import CudaGraphCall
from tests.test_unet import inputs, tiny_config, wake_up
from unet import UNet

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_cpu_tensors_are_refused_with_a_clear_error():
    call = CudaGraphCall(lambda x: x * 2, bf16_autocast=False)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        call(torch.ones(2))


def cuda_unet() -> tuple[UNet, tuple[torch.Tensor, ...]]:
    cfg = tiny_config()
    torch.manual_seed(0)
    model = wake_up(UNet(cfg)).cuda().eval()
    return model, tuple(a.cuda() for a in inputs(cfg, batch=4))


@needs_cuda
@torch.no_grad()
def test_replay_matches_eager_and_keeps_one_graph_per_shape():
    model, (x, t, context) = cuda_unet()
    call = CudaGraphCall(model, bf16_autocast=True, max_graphs=2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(x, t, context)
    first = call(x, t, context)
    second = call(x * 0.5, t, context)  # replayed with new inputs, not the captured ones
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected_half = model(x * 0.5, t, context)
    assert torch.allclose(first, expected, atol=1e-2, rtol=1e-2)
    assert torch.allclose(second, expected_half, atol=1e-2, rtol=1e-2)
    assert not torch.allclose(first, second)  # a copy per call, not the static buffer overwritten
    assert len(call.graphs) == 1
    call(x[:2], t[:2], context[:2])
    call(x[:1], t[:1], context[:1])  # a third shape evicts the least recently used one
    assert len(call.graphs) == 2
    assert ((tuple(x.shape), x.dtype, x.device), (tuple(t.shape), t.dtype, t.device),
            (tuple(context.shape), context.dtype, context.device)) not in call.graphs


@needs_cuda
@torch.no_grad()
def test_weights_changed_in_place_are_seen_by_the_replay():
    model, (x, t, context) = cuda_unet()
    call = CudaGraphCall(model, bf16_autocast=True)
    before = call(x, t, context)
    for p in model.parameters():
        p.mul_(1.1)
    after = call(x, t, context)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(x, t, context)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, expected, atol=1e-2, rtol=1e-2)
