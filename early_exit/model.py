"""The early-exit CNN: a VGG-style backbone with a classifier head after every stage."""

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

BASE_CHANNELS = (64, 128, 256, 512)
SEED_STAGE_DROPOUT = (0.0, 0.3, 0.4, 0.5)
SEED_HEAD_DROPOUT = (0.0, 0.4, 0.5, 0.5)


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class Stage(nn.Sequential):
    """Two 3x3 conv-BN-ReLU layers and a 2x2 max-pool; as in the seed, dropout sits between the convs."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        layers = conv_bn_relu(in_channels, out_channels)
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        layers += conv_bn_relu(out_channels, out_channels)
        layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


def patch_covariance(images: Tensor, kernel_size: int = 3) -> Tensor:
    """The second-moment matrix, (C·k·k)², of every k x k patch of the (N, C, H, W) ``images``: what a stem that
    whitens its input is computed from."""
    patches = F.unfold(images.float(), kernel_size)  # (N, C·k·k, patches per image), ordered like conv weights
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return patches.T @ patches / len(patches)


HeadKind = Literal["mlp", "pool", "conv"]


class MLPHead(nn.Sequential):
    """Global average pool and a two-layer MLP, the seed's exit classifier."""

    def __init__(self, channels: int, size: int, num_classes: int, dropout: float) -> None:
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [
            nn.Linear(channels, 2 * channels),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(2 * channels),
            nn.Linear(2 * channels, num_classes),
        ]
        super().__init__(*layers)


class MixedPoolHead(nn.Module):
    """Shallow-Deep Networks' exit: max and average pooling to a small grid, mixed by a learned weight, then one
    linear layer; unlike a global pool it keeps where in the image things are."""

    def __init__(self, channels: int, size: int, num_classes: int, dropout: float, grid: int = 4) -> None:
        super().__init__()
        grid = min(grid, size)
        self.max_pool, self.avg_pool = nn.AdaptiveMaxPool2d(grid), nn.AdaptiveAvgPool2d(grid)
        self.mix = nn.Parameter(torch.tensor(0.5))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                        nn.Linear(channels * grid * grid, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.mix * self.max_pool(x) + (1 - self.mix) * self.avg_pool(x))


class ConvHead(nn.Sequential):
    """MSDNet's exit: two strided 3x3 conv-BN-ReLU layers (at most 128 channels), global average pooling and a
    linear layer."""

    def __init__(self, channels: int, size: int, num_classes: int, dropout: float, width: int = 128) -> None:
        width = min(width, channels)
        layers = [
            nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, num_classes),
        ]
        super().__init__(*layers)


HEADS: dict[str, type[nn.Module]] = {"mlp": MLPHead, "pool": MixedPoolHead, "conv": ConvHead}


class EarlyExitCNN(nn.Module):
    """A CNN whose every stage ends in an exit, so inference can stop after any stage.

    ``forward`` returns the logits of all exits (training needs them all). ``head`` picks the exit
    classifier: the seed's global-pool MLP (``mlp``), Shallow-Deep Networks' mixed pooling to a 4x4 grid
    (``pool``) or MSDNet's strided convs (``conv``). Without ``batchnorm_scale`` the stages' BatchNorm scales
    are fixed at 1 and only their shifts learn. ``stage_flops`` and ``head_flops`` are measured, not
    hand-typed, forward FLOPs per image: the cost an exit policy trades against accuracy.
    """

    def __init__(
        self,
        num_classes: int = 10,
        num_stages: int = 4,
        width: float = 1.0,
        stage_dropout: Sequence[float] = SEED_STAGE_DROPOUT,
        head_dropout: Sequence[float] = SEED_HEAD_DROPOUT,
        image_size: int = 32,
        head: HeadKind = "mlp",
        batchnorm_scale: bool = True,
    ) -> None:
        super().__init__()
        if not 1 <= num_stages <= len(BASE_CHANNELS):
            raise ValueError(f"num_stages must be between 1 and {len(BASE_CHANNELS)}, got {num_stages}")
        for name, rates in (("stage_dropout", stage_dropout), ("head_dropout", head_dropout)):
            if len(rates) < num_stages:
                raise ValueError(f"{name} needs one rate per stage ({num_stages}), got {list(rates)}")
        channels = [max(1, round(c * width)) for c in BASE_CHANNELS[:num_stages]]
        in_channels = [3] + channels[:-1]
        self.stages = nn.ModuleList(
            Stage(cin, cout, p) for cin, cout, p in zip(in_channels, channels, stage_dropout)
        )
        if not batchnorm_scale:  # airbench's BatchNorm: it learns shifts only, its scales stay at 1
            for norm in self.stages.modules():
                if isinstance(norm, nn.BatchNorm2d):
                    norm.weight.requires_grad_(False)
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        sizes = [image_size >> (k + 1) for k in range(num_stages)]  # each stage halves the map
        self.exits = nn.ModuleList(HEADS[head](c, size, num_classes, p)
                                   for c, size, p in zip(channels, sizes, head_dropout))
        self.stage_flops, self.head_flops = self._measure_flops(image_size)

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def forward(self, x: Tensor) -> list[Tensor]:
        logits = []
        for stage, head in zip(self.stages, self.exits):
            x = stage(x)
            logits.append(head(x))
        return logits

    @torch.no_grad()
    def whiten_stem(self, covariance: Tensor, eps: float = 5e-4) -> None:
        """Initialise the first conv as a whitening filter bank (airbench's stem, on the first conv itself):
        filter i is the i-th principal direction of the input's 3x3 patches (``covariance``, from
        :func:`patch_covariance`) scaled to unit response variance, and the next filters are their negations,
        so the ReLU keeps both signs. The stem then starts as a decorrelated view of the image (a lossless one
        with 54 filters or more) instead of random filters; filters beyond twice the patch size keep their
        initialisation."""
        conv = self.stages[0][0]
        values, vectors = torch.linalg.eigh(covariance.to(conv.weight.device, torch.float64))
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)  # largest variance first
        k = min(len(values), conv.out_channels // 2)
        filters = (vectors[:, :k] / (values[:k] + eps).sqrt()).T.reshape(k, *conv.weight.shape[1:])
        conv.weight[:2 * k] = torch.cat([filters, -filters]).to(conv.weight.dtype)

    @property
    def exit_flops(self) -> list[int]:
        """Cumulative FLOPs per image of answering at exit k: stages 1..k plus head k."""
        cumulative, backbone = [], 0
        for stage, head in zip(self.stage_flops, self.head_flops):
            backbone += stage
            cumulative.append(backbone + head)
        return cumulative

    @torch.no_grad()
    def _measure_flops(self, image_size: int) -> tuple[list[int], list[int]]:
        """Forward FLOPs per image of each stage and each head, counted by torch's FLOP counter."""
        was_training = self.training
        self.eval()
        x = torch.zeros(1, 3, image_size, image_size)
        stage_flops, head_flops = [], []
        for stage, head in zip(self.stages, self.exits):
            with FlopCounterMode(display=False) as counter:
                x = stage(x)
            stage_flops.append(counter.get_total_flops())
            with FlopCounterMode(display=False) as counter:
                head(x)
            head_flops.append(counter.get_total_flops())
        self.train(was_training)
        return stage_flops, head_flops
