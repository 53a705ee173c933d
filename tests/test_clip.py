import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from clip.config import PRESETS, CLIPConfig, CLIPTrainConfig
from clip.loss import CLIPTrainingModule, contrastive_loss, duplicate_mask, gather_across_ranks
from clip.metrics import cosine_similarities, recall_at_k, retrieval_metrics
from clip.model import CLIPModel
from clip.tokenizer import BPETokenizer, train_tokenizer
from clip.train import prepare_tokenizer, train
from data import load_captions
from engine.config import ConfigError, apply_overrides, build_config
from engine.stage import file_fingerprint, read_stage

CAPTIONS = [
    "A green frog with a bulb on its back.",
    "A red lizard with a flaming tail.",
    "A blue turtle with a brown shell.",
    "A yellow mouse with red cheeks.",
    "一只背上有球茎的绿色青蛙。",
    "一只尾巴燃着火焰的红色蜥蜴。",
    "一只有棕色壳的蓝色乌龟。",
    "一只脸颊红红的黄色老鼠。",
]




def tiny_config(vocab_size: int, dropout: float = 0.0, image_size: int = 32) -> CLIPConfig:
    return CLIPConfig(vocab_size=vocab_size, text_width=32, text_layers=2, text_heads=2, image_size=image_size,
                      image_channels=(8, 16), embed_dim=16, dropout=dropout)


@pytest.fixture(scope="module")
def model() -> CLIPModel:
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=320)
    return CLIPModel(tiny_config(tokenizer.vocab_size, dropout=0.1), tokenizer).eval()


def test_output_shapes(model):
    tokens = model.tokenizer.encode(CAPTIONS[:3])
    hidden, pooled = model.encode_text(tokens)
    assert hidden.shape == (3, 77, 32) and pooled.shape == (3, 16)
    assert model.context_dim == 32
    assert model.text_states(["a red lizard", ""]).shape == (2, 77, 32)
    for size in (32, 48):
        assert model.encode_image(torch.rand(3, 3, size, size) * 2 - 1).shape == (3, 16)


def test_bad_inputs_are_explained(model):
    with pytest.raises(ValueError, match="square"):
        model.encode_image(torch.zeros(1, 3, 32, 40))
    with pytest.raises(ValueError, match="tokenizer.encode"):
        model.encode_text(torch.zeros(2, 10, dtype=torch.long))


def test_text_states_are_float32_whatever_autocast_surrounds_them(model):
    # the UNet trains on cached states and samples under CUDA's bf16 autocast: both must see the same states
    plain = model.text_states(["a red lizard", ""])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = model.text_states(["a red lizard", ""])
    assert plain.dtype == under_autocast.dtype == torch.float32
    assert torch.equal(plain, under_autocast)


def test_null_prompt_state_is_deterministic_and_batch_independent(model):
    alone = model.text_states([""])[0]
    assert torch.equal(alone, model.text_states([""])[0])
    in_batch = model.text_states(["A blue turtle with a brown shell.", ""])[1]
    assert torch.allclose(alone, in_batch, atol=1e-5)
    assert torch.isfinite(alone).all()


def test_pooled_embedding_ignores_padding_and_truncation_keeps_eos(model):
    tokens = model.tokenizer.encode(["a red lizard", " ".join(["a red lizard"] * 60)])
    _, pooled = model.encode_text(tokens)
    assert torch.isfinite(pooled).all()
    assert tokens[1, -1] == model.tokenizer.eos_id


def test_loss_with_equal_logits_is_log_batch():
    b = 6
    same = torch.ones(b, 16)
    assert torch.allclose(contrastive_loss(same, same, torch.tensor(1.0)), torch.tensor(math.log(b)))
    # Identical embeddings give equal logits at any temperature.
    assert torch.allclose(contrastive_loss(same, same, torch.tensor(30.0)), torch.tensor(math.log(b)))


def test_loss_is_symmetric():
    torch.manual_seed(0)
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    scale = torch.tensor(7.0)
    assert torch.allclose(contrastive_loss(image, text, scale), contrastive_loss(text, image, scale))


def test_duplicate_captions_are_not_negatives():
    b = 5
    tokens = torch.randint(3, 50, (b, 77))
    tokens[1] = tokens[0]  # two images share one caption
    same = duplicate_mask(tokens)
    assert same[0, 1] and same[1, 0] and same.diagonal().all() and same.sum() == b + 2
    # The same source image under two captions (e.g. English and Chinese) is no negative either.
    same_image = duplicate_mask(tokens, image_ids=torch.tensor([0, 1, 2, 3, 2]))
    assert same_image[2, 4] and same_image[4, 2] and same_image[0, 1] and same_image.sum() == b + 4
    # Equal logits: rows 0 and 1 each lose one candidate (log(b-1)), the rest keep all b.
    ones = torch.ones(b, 8)
    expected = (2 * math.log(b - 1) + (b - 2) * math.log(b)) / b
    assert torch.allclose(contrastive_loss(ones, ones, torch.tensor(1.0), same), torch.tensor(expected))
    # A perfect model (each image on its caption's embedding) has ~0 loss only when duplicates are masked;
    # unmasked, rows 0 and 1 split their probability between two equal logits and pay log(2) each.
    text = torch.eye(b, 8)
    text[1] = text[0]
    image = text.clone()
    assert contrastive_loss(image, text, torch.tensor(100.0), same) < 1e-3
    assert torch.allclose(contrastive_loss(image, text, torch.tensor(100.0)), torch.tensor(2 * math.log(2) / b))


def test_logit_scale_starts_at_clip_init_and_is_clamped(model):
    assert model.temperature_scale().item() == pytest.approx(1 / 0.07, rel=1e-4)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    try:
        assert model.temperature_scale().item() == pytest.approx(100.0)
    finally:
        with torch.no_grad():
            model.logit_scale.fill_(model.config.logit_scale_init)


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=320)
    module = CLIPTrainingModule(CLIPModel(tiny_config(tokenizer.vocab_size, image_size=16), tokenizer))
    batch = {"images": torch.rand(len(CAPTIONS), 3, 16, 16) * 2 - 1, "tokens": tokenizer.encode(CAPTIONS)}
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    first, _ = module(batch, step=0)
    for step in range(25):
        loss, logs = module(batch, step=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(first) and set(logs) == {"logit_scale"}
    assert loss.item() < 0.25 * first.item()


def test_a_logit_scale_past_its_cap_is_brought_back_and_can_come_down():
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=320)
    module = CLIPTrainingModule(CLIPModel(tiny_config(tokenizer.vocab_size, image_size=16), tokenizer))
    batch = {"images": torch.rand(len(CAPTIONS), 3, 16, 16) * 2 - 1, "tokens": tokenizer.encode(CAPTIONS)}
    cap = module.model.config.logit_scale_max
    with torch.no_grad():
        module.model.logit_scale.fill_(cap + 0.5)  # where Adam's momentum can carry it past the cap
    loss, _ = module(batch, step=0)
    loss.backward()
    assert module.model.logit_scale.item() == pytest.approx(cap)  # clamped as a parameter, as open_clip does
    assert module.model.logit_scale.grad.abs().item() > 0  # so the loss still moves it (clamped only in the
    # forward pass, its gradient was 0 above the cap and it stayed there)
    with pytest.raises(ConfigError, match="logit_scale_init=5.0 is above logit_scale_max"):
        apply_overrides(CLIPTrainConfig(), {"model.logit_scale_init": "5.0"}).model.validate()


def test_clip_refuses_gradient_accumulation_which_would_shrink_its_negatives():
    with pytest.raises(ConfigError, match="grad_accum=2: the contrastive loss takes its negatives from one "
                                          "micro-batch"):
        build_config(CLIPTrainConfig, PRESETS, "tiny", {"train.grad_accum": "2"})


def test_retrieval_similarities_stay_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(6, 16, generator=g), torch.randn(5, 16, generator=g)
    exact = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        similarity = cosine_similarities(queries, keys)
    assert similarity.dtype == torch.float32 and torch.allclose(similarity, exact, atol=1e-6)


def test_save_load_round_trip(model, tmp_path):
    folder = tmp_path / "clip"
    fingerprint = model.save(folder, training={"epochs": 1}, trained_on={"data": "abc"}, metrics={"t2i_r5_en": 0.5})
    info = read_stage(folder, kind="clip")
    assert info.fingerprint == fingerprint and info.trained_on == {"data": "abc"}
    assert file_fingerprint(folder / "tokenizer.json") == model.tokenizer.fingerprint
    assert json.loads((folder / "metrics.json").read_text())["t2i_r5_en"] == 0.5
    loaded = CLIPModel.load(folder)
    assert not loaded.training and loaded.config == model.config
    tokens = model.tokenizer.encode(CAPTIONS)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.tokenizer.encode(CAPTIONS), tokens)
    for original, reloaded in zip(model.encode_text(tokens), loaded.encode_text(tokens)):
        assert torch.equal(original, reloaded)
    assert torch.equal(model.encode_image(images), loaded.encode_image(images))
    assert torch.equal(model.text_states([""]), loaded.text_states([""]))


def test_recall_at_k_closed_forms():
    assert recall_at_k(torch.eye(10)) == {1: 1.0, 5: 1.0, 10: 1.0}
    # The right candidate of every query scores lowest: rank n-1, found only within the top n.
    worst = 1 - torch.eye(10)
    assert recall_at_k(worst, ks=(1, 9, 10)) == {1: 0.0, 9: 0.0, 10: 1.0}
    # Rows 0 and 1 share a caption: each one's top candidate is the other, which counts as right.
    swapped = torch.eye(4)[[1, 0, 2, 3]]
    equivalent = torch.zeros(4, 4, dtype=torch.bool)
    equivalent[0, 1] = equivalent[1, 0] = True
    assert recall_at_k(swapped, ks=(1,)) == {1: 0.5}
    assert recall_at_k(swapped, equivalent, ks=(1,)) == {1: 1.0}


def test_retrieval_metrics_keys_and_mode(model):
    model.train()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    metrics = retrieval_metrics(model, images, {"en": CAPTIONS[:4], "zh": CAPTIONS[4:]})
    assert model.training
    model.eval()
    for direction in ("t2i", "i2t"):
        for k in (1, 5, 10):
            for language in ("en", "zh"):
                assert 0.0 <= metrics[f"{direction}_r{k}_{language}"] <= 1.0
    assert metrics["t2i_r5_en"] == 1.0  # 4 candidates: the right one is always in the top 5
    assert metrics["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-4)


class _PairEncoders(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(6, 4)

    def forward(self, x, y):
        return contrastive_loss(gather_across_ranks(self.image(x)), gather_across_ranks(self.text(y)),
                                torch.tensor(5.0), duplicate_mask(gather_across_ranks(y.long())))


def _ddp_worker(rank: int, port: int, x: torch.Tensor, y: torch.Tensor, state: dict, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        module = _PairEncoders()
        module.load_state_dict(state)
        ddp = nn.parallel.DistributedDataParallel(module)
        half = len(x) // 2
        ddp(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]).backward()
        out[rank] = {name: p.grad.clone() for name, p in module.named_parameters()}
        del ddp  # it holds the process group: gone before the group is (see tests/test_distributed.py)
        dist.barrier()  # leave together: a rank that tears gloo down while its peer still works can abort the peer
    finally:
        dist.destroy_process_group()


def test_two_process_gather_matches_one_big_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randn(8, 6) * 10
    module = _PairEncoders()
    module(x, y).backward()
    expected = {name: p.grad.clone() for name, p in module.named_parameters()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_ddp_worker, args=(port, x, y, module.state_dict(), out), nprocs=2, start_method="spawn")
        grads = dict(out)
    for rank in (0, 1):
        for name, grad in expected.items():
            assert torch.allclose(grads[rank][name], grad, atol=1e-5), (rank, name)


def test_train_writes_a_loadable_stage(tmp_path):
    cfg = apply_overrides(CLIPTrainConfig(), {
        "image_size": 16, "vocab_size": 300, "text_width": 32, "text_layers": 1, "text_heads": 2,
        "image_channels": (8, 16), "embed_dim": 16, "epochs": 2, "batch_size": 16, "passes_per_epoch": 1,
        "warmup_steps": 2, "log_every": 1})
    folder = train(cfg, "shapes:60", tmp_path / "clip", device="cpu")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"t2i_r1_en", "t2i_r5_zh", "i2t_r10_en", "i2t_r5_zh", "logit_scale", "minutes"} <= set(metrics)
    info = read_stage(folder, kind="clip")
    assert info.model["vocab_size"] == cfg.model.vocab_size <= 300 and "data" in info.trained_on
    model = CLIPModel.load(folder)
    assert model.text_states(["a red circle"]).shape == (1, 77, 32)
    epochs = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]
    assert all("val/t2i_r5_en" in r for r in epochs if r["kind"] == "epoch")
    tokens = model.tokenizer.encode(["A Red Círcle", "a red circle"])
    assert torch.equal(tokens[0], tokens[1])  # the default tokenizer lowercases and strips accents

    cfg.tokenizer_normalize, cfg.train.epochs = False, 1
    case_keeping = CLIPModel.load(train(cfg, "shapes:60", tmp_path / "clip_case_keeping", device="cpu"))
    tokens = case_keeping.tokenizer.encode(["A Red Circle", "a red circle"])
    assert not torch.equal(tokens[0], tokens[1])


def test_recall_counts_ties_against_the_query():
    from clip.metrics import recall_at_k
    collapsed = torch.zeros(10, 10)  # every candidate scores alike
    assert recall_at_k(collapsed)[1] == 0.0 and recall_at_k(collapsed)[5] == 0.0
    assert recall_at_k(torch.eye(10))[1] == 1.0


def test_a_clip_trained_with_sync_batchnorm_saves_and_loads_as_plain_batchnorm(model, tmp_path):
    """Under CUDA DDP the engine swaps BatchNorm for SyncBatchNorm; the stage it saves must still load into
    the plain model in one process (same state-dict keys and running statistics)."""
    import copy
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    first_bn = next(m for m in converted.modules() if isinstance(m, nn.SyncBatchNorm))
    first_bn.running_mean.fill_(0.25)  # statistics the saved stage must carry over
    converted.save(tmp_path / "clip")
    loaded = CLIPModel.load(tmp_path / "clip")
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in loaded.modules())
    assert torch.equal(next(m for m in loaded.modules() if isinstance(m, nn.BatchNorm2d)).running_mean,
                       first_bn.running_mean)


def test_a_resume_without_a_checkpoint_trains_a_fresh_tokenizer_with_todays_settings(tmp_path):
    train_set = load_captions("shapes:20", resolution=32).subset("train")
    stale = train_tokenizer(train_set.en, 300, normalize=False)  # killed before its first checkpoint
    stale.save(tmp_path / "tokenizer.json")
    cfg = build_config(CLIPTrainConfig, PRESETS, "tiny", {"tokenizer_normalize": "true"})
    tokenizer, new = prepare_tokenizer(cfg, train_set, tmp_path, resume=True)
    assert new and BPETokenizer.load(tmp_path / "tokenizer.json").vocab_size == stale.vocab_size  # not written
    assert tokenizer.encode(["A RED Circle"]).tolist() == tokenizer.encode(["a red circle"]).tolist()  # normalises
    assert cfg.model.vocab_size == tokenizer.vocab_size != stale.vocab_size
