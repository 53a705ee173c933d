"""Two CPU processes (gloo) under the engine train like one process with the same global batch."""

import faulthandler
import os
import re
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from engine import Trainer, TrainConfig, distributed
from engine.runlog import rollbacks, skipped_steps

DATA_X = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
DATA_Y = DATA_X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


class Regression(nn.Module):
    """No dropout or noise: with the same global batch, one and two processes must take the same steps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, batch, step):
        x, y = batch
        loss = (self.net(x) - y).square().mean()
        return loss, {}


def _train(out: str) -> Trainer:
    """Three epochs of 8 steps; step 17's targets are 100x off, once: a spike every rank sees in the all-reduced
    gradient norm of steps 17-20, rolled back to step 12 by all of them. In the first epoch item 0's target is NaN:
    under two processes one rank holds it, and the all-reduced gradient makes every rank skip that step."""
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-2, warmup_steps=2, ema_decay=0.9, log_every=4, spike_rollbacks=1)
    trainer = Trainer(Regression(), cfg, out, num_train_items=len(DATA_X), device="cpu")
    spike_left = [True]

    def make_batch(indices, generator):
        if trainer.step == 16 and spike_left[0]:
            spike_left[0] = False
            return DATA_X[indices], 100 * DATA_Y[indices]
        if trainer.epoch == 0:
            return DATA_X[indices], torch.where((indices == 0)[:, None], float("nan"), DATA_Y[indices])
        return DATA_X[indices], DATA_Y[indices]

    trainer.fit(make_batch)
    assert trainer.spike_rollbacks_used == 1 and trainer.step == 24
    return trainer


def _as_rank(rank: int, world_size: int, port: int) -> None:
    """The environment torchrun gives a rank; and a traceback of every thread should the process abort (a rank
    once aborted in CI at exit, after training correctly: the next one says where)."""
    faulthandler.enable(all_threads=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    _as_rank(rank, world_size, port)
    torch.set_num_threads(1)
    trainer = _train(out)
    assert trainer.micro_batch == 4 and trainer.env.world_size == 2
    if rank == 0:
        torch.save({k: v.clone() for k, v in trainer.module.state_dict().items()}, os.path.join(out, "final.pt"))
    # the trainer's DDP wrapper holds the process group: gone before the group is, not at the interpreter's teardown
    del trainer
    # both ranks leave together: a rank that tears gloo down while its peer still writes can abort the peer
    torch.distributed.barrier()
    distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process_a_rolled_back_spike_included(tmp_path):
    single = _train(str(tmp_path / "single"))
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp" / "final.pt", weights_only=True)
    for name, value in single.module.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6)
    # rank 0 alone wrote the log and the checkpoint, in the same layout as one process
    assert {p.name for p in (tmp_path / "ddp").iterdir()} == {p.name for p in (tmp_path / "single").iterdir()} | {
        "final.pt"}
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "latest.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # every rank's RNG state is kept
    assert [r["step"] for r in rollbacks(tmp_path / "ddp" / "log.jsonl")] == [12]
    skipped = skipped_steps(tmp_path / "single" / "log.jsonl")
    assert [s["skipped"] for s in skipped] == [1] and skipped == skipped_steps(tmp_path / "ddp" / "log.jsonl")


def _embeddings():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 5, (8, 77), generator=g)
    tokens[5] = tokens[1]  # a duplicate caption across the two ranks' halves: masked on both
    return torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g), tokens


def _contrastive_worker(rank: int, world_size: int, port: int, out: str) -> None:
    from clip.loss import contrastive_loss, duplicate_mask, gather_across_ranks
    _as_rank(rank, world_size, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    image, text, tokens = (t.chunk(world_size)[rank] for t in _embeddings())
    image.requires_grad_(True)
    loss = contrastive_loss(gather_across_ranks(image), gather_across_ranks(text), torch.tensor(10.0),
                            duplicate_mask(gather_across_ranks(tokens)))
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": image.grad}, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.barrier()  # leave together (see _worker)
    torch.distributed.destroy_process_group()


def test_all_gathered_contrastive_loss_equals_the_single_process_loss(tmp_path):
    from clip.loss import contrastive_loss, duplicate_mask
    image, text, tokens = _embeddings()
    image.requires_grad_(True)
    expected = contrastive_loss(image, text, torch.tensor(10.0), duplicate_mask(tokens))
    expected.backward()
    mp.spawn(_contrastive_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], expected.detach())
        # each rank receives the gradient of its own rows from both ranks' (identical) losses: world_size x;
        # DDP's averaging over the ranks divides that back out.
        torch.testing.assert_close(got["grad"], 2 * image.grad.chunk(2)[rank])


# the adversarial term (and its adaptive weight) runs under DDP too, and the other rank reads the recoloured copies'
# latents that rank 0 encodes
TRAIN_ALL_ARGS = ["--data", "shapes:60", "--preset", "tiny", "--device", "cpu", "--skip-eval",
                  "--vae.disc_start_step=2", "--unet.recolour.copies=1"]


def _train_all_worker(rank: int, world_size: int, port: int, out: str) -> None:
    import train_all
    _as_rank(rank, world_size, port)
    torch.set_num_threads(1)
    train_all.main(TRAIN_ALL_ARGS + ["--run", out])


def _layout(root):
    # TensorBoard names each event file by time and process: compare how many there are, not their names
    return sorted(re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents.*", str(p.relative_to(root)))
                  for p in root.rglob("*") if "latents" not in p.parts)


def test_train_all_under_two_processes_writes_the_layout_of_one(tmp_path):
    import train_all
    from engine import read_stage
    from pipelines.stages import load_stack
    train_all.main(TRAIN_ALL_ARGS + ["--run", str(tmp_path / "single")])
    mp.spawn(_train_all_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    assert _layout(tmp_path / "ddp") == _layout(tmp_path / "single")
    summary = (tmp_path / "ddp" / "summary.json").read_text()
    assert '"world_size": 2' in summary
    stack = load_stack(tmp_path / "ddp", device="cpu")  # the stages written under DDP load and fit together
    assert stack.unet.config.context_dim == stack.clip.context_dim
    # both runs recoloured: the same copies' captions recorded, and the copies' latents cached
    single, ddp = (read_stage(tmp_path / run / "unet").trained_on["trained_captions"] for run in ("single", "ddp"))
    assert single == ddp and list((tmp_path / "ddp" / "unet" / "latents").glob("recoloured-*.safetensors"))


def test_a_device_name_torch_cannot_read_or_a_gpu_the_machine_lacks_is_a_user_error(tmp_path):
    from engine.errors import UserError
    from pipelines.stages import load_stack

    assert distributed.resolve_device("cpu") == torch.device("cpu")
    assert distributed.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="--device gpu0 is no device torch knows; pass e.g. cuda, cuda:1 or cpu"):
        distributed.resolve_device("gpu0")
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 on a machine without one)
    with pytest.raises(UserError, match=f"--device {missing}: this machine's CUDA devices: "):
        distributed.resolve_device(missing)
    with pytest.raises(UserError, match="--pipeline-device mps: this project runs on cpu or cuda"):
        distributed.resolve_device("mps", "--pipeline-device")
    with pytest.raises(UserError, match="--device gpu0 is no device"):  # before the stages are read
        load_stack(tmp_path / "missing", device="gpu0")
