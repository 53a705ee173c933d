"""engine.precision: the GroupNorm/LayerNorm switch that runs them in autocast's dtype, and the trainer's use of it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.step_speed import unet_trainer
from engine import ConfigError, Trainer, TrainConfig
from engine.precision import GroupNorm, LayerNorm, set_low_precision_norms


def _norms():
    torch.manual_seed(0)
    group, layer = GroupNorm(4, 8, eps=1e-6), LayerNorm(5)
    for norm in (group, layer):  # not the identity affine, so a dropped or mis-cast weight shows
        nn.init.normal_(norm.weight, 1.0, 0.3)
        nn.init.normal_(norm.bias, 0.0, 0.3)
    x = torch.randn(3, 8, 6, 5) * 3 + 1
    low = {"group": lambda: F.group_norm(x.bfloat16(), 4, group.weight.bfloat16(), group.bias.bfloat16(), 1e-6),
           "layer": lambda: F.layer_norm(x.bfloat16(), (5,), layer.weight.bfloat16(), layer.bias.bfloat16())}
    return {"group": group, "layer": layer}, x, low


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_a_switched_norm_runs_in_autocasts_dtype_and_a_plain_one_as_torch_does(kind):
    norms, x, low = _norms()
    norm = norms[kind]
    plain_class = nn.GroupNorm if kind == "group" else nn.LayerNorm
    reference = plain_class.forward(norm, x)  # fp32, no autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        unswitched = norm(x)
        set_low_precision_norms(norm, True)
        switched = norm(x)
    # off: exactly the torch layer under the same autocast (on CPU autocast leaves an fp32 norm in fp32)
    assert unswitched.dtype == torch.float32 and torch.equal(unswitched, reference)
    # on: the same normalisation computed in bf16, close to the fp32 one
    assert switched.dtype == torch.bfloat16
    assert torch.equal(switched, low[kind]())
    assert (switched.float() - reference).abs().max() < 0.05 * reference.abs().max()
    # outside autocast the switch does nothing
    assert torch.equal(norm(x), reference)


def test_switched_norms_keep_the_plain_layers_state_dict_and_gradients():
    norms, x, _ = _norms()
    plain = nn.GroupNorm(4, 8, eps=1e-6)
    plain.load_state_dict(norms["group"].state_dict(), strict=True)
    set_low_precision_norms(norms["group"], True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norms["group"](x).float().square().sum().backward()
    assert norms["group"].weight.grad is not None and norms["group"].weight.grad.dtype == torch.float32


def test_the_trainer_switches_every_norm_of_the_model_when_asked(tmp_path):
    on, _ = unet_trainer({"low_precision_norms": True, "precision": "fp32"}, "tiny", tmp_path / "on", device="cpu")
    off, _ = unet_trainer({"low_precision_norms": False, "precision": "fp32"}, "tiny", tmp_path / "off", device="cpu")
    norms_on = [m for m in on.module.modules() if isinstance(m, (GroupNorm, LayerNorm))]
    # the tiny UNet: GroupNorms in its ResBlocks, transformers and output, LayerNorms in its transformer blocks
    assert {type(m) for m in norms_on} == {GroupNorm, LayerNorm} and len(norms_on) > 10
    assert all(m.low_precision for m in norms_on)
    assert not any(getattr(m, "low_precision", False) for m in off.module.modules())


def test_asking_for_low_precision_norms_on_a_model_without_them_is_a_clear_error(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))  # torch's own norm: no switch to turn
    with pytest.raises(ConfigError, match="low_precision_norms=true, but this stage's model has no engine.precision"):
        Trainer(model, TrainConfig(low_precision_norms=True), tmp_path, num_train_items=64, device="cpu")
