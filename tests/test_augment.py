"""Non-leaking geometric augmentation: the transform, the augmented latent cache, the labels reaching the UNet in
training, and the zero label at sampling."""

import torch

from data.augment import AUGMENT_DIM, apply_geometry, random_geometry
from diffusion.latents import GeometryAugment, LatentCache, LatentNormalisation, TextStateCache, build_latent_cache
from diffusion.losses import DiffusionLossConfig, DiffusionTrainingModule
from diffusion.schedule import NoiseSchedule, ScheduleConfig
from diffusion.train import LatentBatchMaker
from unet import UNet, UNetConfig
from vae import AutoencoderKL, VAEConfig


def label(log2_scale=0.0, shift_x=0.0, shift_y=0.0, degrees=0.0, log2_aspect=0.0) -> torch.Tensor:
    angle = torch.deg2rad(torch.tensor(degrees))
    return torch.tensor([[log2_scale, shift_x, shift_y, angle.sin(), angle.cos() - 1, log2_aspect]])


def disc_image(size: int = 32, radius: float = 0.4) -> torch.Tensor:
    """A black disc on white, [-1, 1], [1, 3, size, size]."""
    coords = (torch.arange(size) + 0.5) / size * 2 - 1
    inside = coords[None, :] ** 2 + coords[:, None] ** 2 < radius ** 2
    return torch.where(inside, -1.0, 1.0).expand(1, 3, size, size).clone()


def test_zero_label_is_the_identity_and_shrinking_pads_with_white():
    image = disc_image()
    assert torch.equal(apply_geometry(image, torch.zeros(1, AUGMENT_DIM)), image)
    half = apply_geometry(image, label(log2_scale=-1.0))
    dark = lambda x: (x.mean(1) < 0).float().sum()  # noqa: E731
    assert abs(dark(half) / dark(image) - 0.25) < 0.05  # half the side: a quarter of the area
    assert bool((half[..., :4, :] == 1).all())  # the uncovered border is white, not grey


def test_shift_and_rotation_move_content_as_labelled():
    image = -torch.ones(1, 3, 32, 32)
    image[..., :, :16] = 1.0  # left half white, right half black
    shifted = apply_geometry(image, label(shift_x=0.5))  # 0.5 normalised units = a quarter of the side, to the right
    column = shifted[0, 0, 16]
    assert bool((column[:8] == 1).all()) and bool((column[8:24] == 1).all()) and bool((column[25:] == -1).all())
    turned = apply_geometry(image, label(degrees=90.0))  # a quarter turn, clockwise on screen (y points down):
    assert turned[0, 0, 28, 16].item() < 0 < turned[0, 0, 4, 16].item()  # the black right half is now the bottom
    stretched = apply_geometry(disc_image(radius=0.3), label(log2_aspect=0.5))
    rows, cols = (stretched.mean(1)[0] < 0).nonzero().unbind(1)
    assert (cols.max() - cols.min()) > 1.6 * (rows.max() - rows.min())  # x widened by 2**0.5, y narrowed


def test_random_labels_stay_in_range():
    labels = random_geometry(2000, (-0.7, 0.2), 0.2, 20.0, 0.25, generator=torch.Generator().manual_seed(0))
    assert labels.shape == (2000, AUGMENT_DIM)
    assert labels[:, 0].min() >= -0.7 and labels[:, 0].max() <= 0.2
    assert labels[:, 1:3].abs().max() <= 0.2 and labels[:, 5].abs().max() <= 0.25
    angles = torch.rad2deg(torch.atan2(labels[:, 3], labels[:, 4] + 1))
    assert angles.abs().max() <= 20.0 + 1e-4 and angles.abs().max() > 18.0


def tiny_cache(tmp_path, copies: int = 3) -> LatentCache:
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(base_channels=8, channel_mult=(1, 2), norm_groups=4, scaling_factor=0.5)).eval()
    images = (disc_image(16).add(1).mul(127.5)).to(torch.uint8).repeat(5, 1, 1, 1)
    images[:, 0] = torch.arange(5, dtype=torch.uint8)[:, None, None] * 40  # five distinct images
    return build_latent_cache(vae, images, tmp_path / "c.safetensors", 4, torch.device("cpu"),
                              LatentNormalisation.of_vae(vae.config), augment=GeometryAugment(copies=copies))


def test_augmented_cache_layout_and_round_trip(tmp_path):
    cache = tiny_cache(tmp_path)
    assert len(cache) == 5 * (2 + 3) and cache.num_plain_rows == 10 and cache.num_augmented_copies == 3
    assert bool((cache.labels[:10] == 0).all()) and bool((cache.labels[10:] != 0).any(dim=1).all())
    assert not torch.allclose(cache.mean[10:15], cache.mean[:5])  # the augmented copies really differ
    rows = cache.augmented_rows(torch.arange(10).repeat(50), torch.Generator().manual_seed(0))
    assert bool((rows >= 10).all()) and torch.equal(cache.image_ids(rows), torch.arange(10).repeat(50) % 5)
    assert set(rows.tolist()) == set(range(10, 25))  # every copy gets used
    loaded = LatentCache.load(tmp_path / "c.safetensors", cache.normalisation)
    assert torch.equal(loaded.labels, cache.labels) and loaded.num_plain_rows == 10


def test_batches_carry_labels_at_the_augmentation_rate(tmp_path):
    cache = tiny_cache(tmp_path)
    texts = TextStateCache(torch.zeros(5, 1, 2, 4), torch.zeros(5, 1, 2, 4), torch.zeros(2, 4))
    rows = torch.arange(10).repeat(200)
    for prob in (0.0, 0.5, 1.0):
        maker = LatentBatchMaker(cache, texts, 0.5, 0.1, prob, torch.contiguous_format)
        batch = maker(rows, torch.Generator().manual_seed(0))
        augmented = (batch["augment"] != 0).any(dim=1).float().mean().item()
        assert abs(augmented - prob) < 0.05
        assert batch["latents"].shape == (len(rows), *cache.mean.shape[1:])


class Recorder(torch.nn.Module):
    """Stands in for the UNet and remembers the augmentation labels it was called with."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, x, t, context, augment=None):
        self.seen.append(augment)
        return x * self.scale


def test_training_passes_the_labels_and_validation_passes_none():
    model = Recorder()
    module = DiffusionTrainingModule(model, NoiseSchedule(ScheduleConfig()), "v_prediction", DiffusionLossConfig())
    labels = torch.randn(4, AUGMENT_DIM)
    module({"latents": torch.randn(4, 4, 8, 8), "context": torch.randn(4, 3, 8), "augment": labels}, step=0)
    assert torch.equal(model.seen[-1], labels)
    module.loss_terms(torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.zeros(4, dtype=torch.long),
                      torch.randn(4, 3, 8), step=0)
    assert model.seen[-1] is None


def test_unet_label_none_is_the_zero_label():
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, head_dim=8, norm_groups=8,
                            context_dim=8, augment_dim=AUGMENT_DIM)).eval()
    for p in model.parameters():  # leave the zero inits, so every input reaches the output
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 8)
    plain = model(x, t, context)
    assert torch.equal(plain, model(x, t, context, torch.zeros(2, AUGMENT_DIM)))  # sampling = the zero label
    assert not torch.allclose(plain, model(x, t, context, label(-0.5).repeat(2, 1)))
