"""CenterNet parts as FairMOT uses them (ifzhang/FairMOT ``models/networks/pose_dla_dcn.py``,
``models/losses.py``, ``models/decode.py``, ``datasets/dataset/jde.py``; method card 6a).

- :class:`DLASeg`: a timm DLA's stride-4..32 features merged up to stride 4 by CenterNet's
  iterative (``DLAUp``) and hierarchical (``IDAUp``) aggregation, every projection and merge node
  a modulated deformable 3×3 convolution (:class:`DeformConv`, torchvision's ``deform_conv2d``
  with zero-initialised offsets and masks) with BatchNorm and ReLU, upsampling by grouped
  transposed convolutions initialised bilinear; then one head per output (3×3 conv to 256,
  ReLU, 1×1), the heatmap's bias −2.19.
- :func:`focal_loss`: CenterNet's penalty-reduced focal loss (α 2, β 4) on the clamped sigmoid
  heatmap, normalised by the number of objects.
- :func:`center_targets`: the heatmap (a Gaussian of CenterNet's radius at each centre), the
  l/t/r/b distances and centre offsets, the flat index and the id of each box.
- :func:`decode_centers`: 3×3 max-pool peaks, the top K, boxes from l/t/r/b plus offsets, and
  the embeddings at the peaks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from lightning_modules.nn.backbones import create_backbone

HEATMAP_BIAS = -2.19  # CenterNet: sigmoid(-2.19) = 0.1 at the start


class DeformConv(nn.Module):
    """Modulated deformable 3×3 convolution (DCNv2), then BatchNorm and ReLU; with
    ``deformable=False`` a plain 3×3 convolution in its place (torchvision's CPU
    ``deform_conv2d`` is about 10× slower than the rest of the network: the mini preset's choice)."""

    def __init__(self, in_channels: int, out_channels: int, deformable: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.offset_mask = nn.Conv2d(in_channels, 3 * 9, 3, padding=1) if deformable else None  # 18 offsets, 9 masks
        if self.offset_mask is not None:
            nn.init.zeros_(self.offset_mask.weight)
            nn.init.zeros_(self.offset_mask.bias)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.offset_mask is None:
            return F.relu(self.bn(F.conv2d(x, self.weight, self.bias, padding=1)))
        o1, o2, mask = self.offset_mask(x).chunk(3, dim=1)
        offset = torch.cat([o1, o2], dim=1)
        y = deform_conv2d(x, offset, self.weight, self.bias, padding=(1, 1), mask=torch.sigmoid(mask))
        return F.relu(self.bn(y))


def bilinear_upsampling(channels: int, factor: int) -> nn.ConvTranspose2d:
    """A grouped transposed convolution ×``factor`` initialised as bilinear interpolation (CenterNet's ``fill_up_weights``)."""
    up = nn.ConvTranspose2d(channels, channels, factor * 2, stride=factor, padding=factor // 2, groups=channels, bias=False)
    f = math.ceil(up.weight.shape[2] / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    grid = torch.arange(up.weight.shape[2], dtype=torch.float32)
    kernel = 1 - torch.abs(grid / f - c)
    with torch.no_grad():
        up.weight.copy_((kernel[:, None] * kernel[None, :]).expand_as(up.weight))
    return up


class IDAUp(nn.Module):
    """Iterative deep aggregation: layers[start+1..end) projected to ``out_channels``, upsampled to
    the previous layer's size and merged with it, in place."""

    def __init__(self, out_channels: int, channels: list[int], factors: list[int], deformable: bool = True) -> None:
        super().__init__()
        self.project = nn.ModuleList([DeformConv(c, out_channels, deformable) for c in channels[1:]])
        self.upsample = nn.ModuleList([bilinear_upsampling(out_channels, int(f)) for f in factors[1:]])
        self.node = nn.ModuleList([DeformConv(out_channels, out_channels, deformable) for _ in channels[1:]])

    def forward(self, layers: list[Tensor], start: int, end: int) -> None:
        for i in range(start + 1, end):
            k = i - start - 1
            layers[i] = self.upsample[k](self.project[k](layers[i]))
            layers[i] = self.node[k](layers[i] + layers[i - 1])


class DLAUp(nn.Module):
    """CenterNet's ``DLAUp`` over features of ``channels`` at strides 1, 2, 4, 8 (relative)."""

    def __init__(self, channels: list[int], deformable: bool = True) -> None:
        super().__init__()
        self.channels = channels
        scales = np.array([2 ** i for i in range(len(channels))], dtype=int)
        in_channels = list(channels)
        self.ida = nn.ModuleList()
        for i in range(len(channels) - 1):
            j = -i - 2
            self.ida.append(IDAUp(channels[j], in_channels[j:], list(scales[j:] // scales[j]), deformable))
            scales[j + 1 :] = scales[j]
            in_channels[j + 1 :] = [channels[j]] * len(in_channels[j + 1 :])

    def forward(self, layers: list[Tensor]) -> list[Tensor]:
        layers = list(layers)
        out = [layers[-1]]
        for i, ida in enumerate(self.ida):
            ida(layers, len(layers) - i - 2, len(layers))
            out.insert(0, layers[-1])
        return out


def head(in_channels: int, out_channels: int, head_channels: int = 256, bias: float = 0.0) -> nn.Sequential:
    """3×3 conv to ``head_channels``, ReLU, 1×1 conv to ``out_channels`` (bias ``bias``)."""
    layers = nn.Sequential(nn.Conv2d(in_channels, head_channels, 3, padding=1), nn.ReLU(inplace=True),
                           nn.Conv2d(head_channels, out_channels, 1))
    nn.init.constant_(layers[-1].bias, bias)
    return layers


class DLASeg(nn.Module):
    """A timm DLA (``dla34`` in FairMOT) to stride-4 features [B, C2, H/4, W/4] (module docstring)."""

    def __init__(self, backbone: str = "dla34", pretrained: bool = True, weights: str | None = None,
                 deformable: bool = True) -> None:
        super().__init__()
        self.base = create_backbone(backbone, pretrained, weights, features_only=True, out_indices=(2, 3, 4, 5))
        channels = list(self.base.feature_info.channels())
        if list(self.base.feature_info.reduction()) != [4, 8, 16, 32]:
            raise ValueError(f"FairMOT's neck merges stride 4, 8, 16 and 32 features; '{backbone}' gives "
                             f"{self.base.feature_info.reduction()}")
        self.dla_up = DLAUp(channels, deformable)
        self.ida_up = IDAUp(channels[0], channels[:3], [1, 2, 4], deformable)
        self.out_channels = channels[0]

    @property
    def level_channels(self) -> list[int]:
        """Channels of the backbone's stride 4, 8, 16 and 32 features."""
        return list(self.base.feature_info.channels())

    def levels(self, images: Tensor) -> list[Tensor]:
        """The backbone's stride 4, 8, 16 and 32 features."""
        return self.base(images)

    def merge(self, levels: list[Tensor]) -> Tensor:
        """The neck: the four levels merged to stride 4."""
        features = self.dla_up(levels)
        merged = [features[i].clone() for i in range(3)]
        self.ida_up(merged, 0, len(merged))
        return merged[-1]

    def forward(self, images: Tensor) -> Tensor:
        return self.merge(self.levels(images))


# ------------------------------------------------------------------------------ losses, targets


def focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """CenterNet's focal loss of heatmap logits against Gaussian targets (1 at centres): the
    sigmoid clamped to [1e-4, 1 − 1e-4]; −Σ[(1−p)² log p at centres + (1−y)⁴ p² log(1−p)
    elsewhere] / number of centres (the negative sum alone without centres)."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    positive_loss = (torch.log(p) * (1 - p) ** 2 * positive).sum()
    negative_loss = (torch.log(1 - p) * p ** 2 * (1 - target) ** 4 * (1 - positive)).sum()
    count = positive.sum()
    return -negative_loss if count == 0 else -(positive_loss + negative_loss) / count


def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius: the smallest of the three corner cases keeping IoU ≥ ``min_overlap``."""
    a1, b1, c1 = 1, height + width, width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4, 2 * (height + width), (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (height + width), (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def draw_gaussian(heatmap: Tensor, center: tuple[int, int], radius: int) -> None:
    """The element-wise maximum of ``heatmap`` [H, W] and a Gaussian (σ = diameter / 6) at ``center`` (x, y)."""
    diameter = 2 * radius + 1
    sigma = diameter / 6
    grid = torch.arange(-radius, radius + 1, dtype=heatmap.dtype, device=heatmap.device)
    gaussian = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * sigma * sigma))
    x, y = center
    height, width = heatmap.shape
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    region = heatmap[y - top : y + bottom, x - left : x + right]
    patch = gaussian[radius - top : radius + bottom, radius - left : radius + right]
    torch.maximum(region, patch, out=region)


def center_targets(boxes: Tensor, stride: int, size: tuple[int, int]) -> dict[str, Tensor]:
    """Targets of one image's boxes [n, 4] (x1, y1, x2, y2 input pixels) on the ``size`` (h, w)
    output grid: ``heatmap`` [1, h, w], ``ltrb`` [n, 4] and ``offset`` [n, 2] (output cells),
    ``index`` [n] (flat centre cell), ``valid`` [n] (boxes of positive size)."""
    height, width = size
    heatmap = torch.zeros(1, height, width)
    scaled = boxes.float() / stride
    centres = ((scaled[:, :2] + scaled[:, 2:]) / 2)
    centres[:, 0] = centres[:, 0].clamp(0, width - 1)
    centres[:, 1] = centres[:, 1].clamp(0, height - 1)
    cells = centres.long()
    sizes = scaled[:, 2:] - scaled[:, :2]
    valid = (sizes > 0).all(dim=1)
    for (x, y), (w, h), ok in zip(cells.tolist(), sizes.tolist(), valid.tolist()):
        if ok:
            draw_gaussian(heatmap[0], (x, y), max(0, int(gaussian_radius(math.ceil(h), math.ceil(w)))))
    ltrb = torch.cat([centres - scaled[:, :2], scaled[:, 2:] - centres], dim=1)
    return {"heatmap": heatmap, "ltrb": ltrb, "offset": centres - cells.float(), "index": cells[:, 1] * width + cells[:, 0],
            "valid": valid}


def gather(maps: Tensor, index: Tensor) -> Tensor:
    """Values [K, C] of maps [C, h, w] at flat indices [K]."""
    return maps.flatten(1)[:, index].T


def decode_centers(heatmap_logits: Tensor, ltrb: Tensor, offset: Tensor, top_k: int = 500) -> tuple[Tensor, Tensor, Tensor]:
    """One image's peaks: (scores [K], boxes [K, 4] x1, y1, x2, y2 in output cells, flat indices
    [K]) of the heatmap [1, h, w] after 3×3 max-pool suppression, the top ``top_k``."""
    heat = torch.sigmoid(heatmap_logits)
    peaks = heat * (F.max_pool2d(heat[None], 3, stride=1, padding=1)[0] == heat).float()
    scores, index = peaks.flatten().topk(min(top_k, peaks.numel()))
    width = heat.shape[-1]
    xs = (index % width).float() + gather(offset, index)[:, 0]
    ys = (index // width).float() + gather(offset, index)[:, 1]
    distances = gather(ltrb, index)
    boxes = torch.stack([xs - distances[:, 0], ys - distances[:, 1], xs + distances[:, 2], ys + distances[:, 3]], dim=1)
    return scores, boxes, index
