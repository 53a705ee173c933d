"""benchmarks.step_speed times the steps the way Trainer.fit runs them."""
import pytest
import torch

from benchmarks.step_speed import run_steps, unet_trainer


@pytest.mark.parametrize("deterministic", [True, False])
def test_timed_steps_run_under_the_configs_deterministic_setting_and_leave_it_as_it_was(tmp_path, deterministic):
    trainer, make_batch = unet_trainer({"deterministic": deterministic, "precision": "fp32"}, "tiny", tmp_path,
                                       device="cpu")
    seen = []

    def recording_batch(indices, generator):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return make_batch(indices, generator)

    before = torch.are_deterministic_algorithms_enabled()
    run_steps(trainer, recording_batch, 2)
    assert seen and set(seen) == {deterministic}
    assert torch.are_deterministic_algorithms_enabled() == before
