"""The parts of HCPN and HGPU (Pei et al., IEEE TIP: "Hierarchical Co-attention Propagation
Network for Zero-Shot Video Object Segmentation" and "Hierarchical Graph Pattern Understanding
for Zero-Shot Video Object Segmentation"; NUST-Machine-Intelligence-Laboratory/HCPN
``libs/model/HCPN.py`` and /HGPU ``libs/model/HGPU.py``; method cards 4 and 3), in plain torch.
Both read two frames I_t, I_t+1 and the colour-coded flow O_t with three ResNets that exchange
features between their stages.

- :class:`ThreeBranchResNet`: three timm ResNets, not sharing weights, run stage by stage.
- :class:`CoAttention` (HCPN's PCAM, HGPU's ``MessageAgg``): ``stacks`` rounds of a spatial soft
  attention (1×1 conv → one map, softmax over positions, times the features) then a
  co-attention: A = tanh(P_b(b)ᵀ P_a(a)) over positions, â = a·Aᵀ, b̂ = b·A, each L2-normalised
  over channels; between rounds a ← ReLU(â + a), b ← ReLU(b̂ + b). The convolutions are shared
  by the rounds, so the number of rounds does not change the parameters.
- :class:`GatedContext` (HCPN's GAC, HGPU's MACU): x·(1 + tanh(γ·g/RMS_C(g) + β)),
  g = α·‖x‖ over positions; the identity at initialisation (γ = β = 0).
- :class:`AttentionalFusion` (HCPN's GAF, HGPU's FR): w = σ(local(x + y) + global(x + y)),
  z = x·w + y·(1 − w), then a second pass on z with its own local branch and the first pass's
  global branch (as the code), returning x·w₂ + y·(1 − w₂); fusing x with itself returns x.
- :class:`ConvGRUCell` (HGPU's update): 1×1 gates, orthogonal initialisation, zero biases.
- :class:`SideMaps` (HCPN's ``MotionContour``, HGPU's ``MotionRef``): a map per level
  (BN–3×3 conv–ReLU–BN–3×3 conv–ReLU–1×1 conv), fused by a 3×3 conv over the four maps
  upsampled to the input, then a sigmoid.
- :class:`MaskDecoder`: the coarsest level (with its side map) through a global convolution
  (7×1+1×7 ‖ 1×7+7×1) and a residual pair of 3×3 convolutions, refined with each finer level
  (:class:`Refine`: a pyramid dilation convolution, residual 3×3 pairs), a 3×3 convolution to
  one channel at the finest level, upsampled to the input, sigmoid.
- :class:`HCPNNetwork` and :class:`HGPUNetwork` (their docstrings).
- :func:`hard_negative_bce`: the authors' BCE with hard negatives weighted 1 + n;
  :func:`mask_contour`: HCPN's contour targets from the masks.

Deviations from the authors' code:

- Modules the code creates but never calls are not created (the second global branch of
  GAF/FR, the pyramid's 12 and 18 dilations, ``Refine.convFS1``, ``pred3``-``pred5``, the res2
  co-attention): their parameters would get no gradient, which DDP rejects.
- The pyramid dilation convolution applies its rate-6 convolution three times, as the code does
  (the paper's rates 6/12/18 with ``pyramid_rates_as_paper``).
- Sizes follow the input instead of the code's fixed 512.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nn.backbones import create_backbone

Levels = list[Tensor]  # res2, res3, res4, res5 features (strides 4, 8, 16, 32)


class ThreeBranchResNet(nn.Module):
    """Three timm ResNets (frame t, frame t+1, flow), one per branch, weights not shared; each
    loads the same pretrained weights. ``channels``: res2-res5 widths."""

    STAGES = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, backbone: str, pretrained: bool, weights: str | None) -> None:
        super().__init__()
        networks = [create_backbone(backbone, pretrained, weights) for _ in range(3)]
        for name in ("conv1", "bn1", "act1", "maxpool", *self.STAGES):
            if not hasattr(networks[0], name):
                raise ValueError(f"HCPN/HGPU's encoders are ResNets (conv1, bn1, act1, maxpool, layer1-4); "
                                 f"'{backbone}' has no {name}")
        self.stems = nn.ModuleList(nn.Sequential(n.conv1, n.bn1, n.act1, n.maxpool, n.layer1) for n in networks)
        self.stages = nn.ModuleList(nn.ModuleList(getattr(n, s) for s in self.STAGES[1:]) for n in networks)
        self.channels = tuple(info["num_chs"] for info in networks[0].feature_info[1:5])

    def res2(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        return [stem(x) for stem, x in zip(self.stems, inputs)]

    def next_stage(self, level: int, features: Sequence[Tensor]) -> list[Tensor]:
        """res{level+1} of each branch from its res{level} features (level 2, 3 or 4)."""
        return [stages[level - 2](x) for stages, x in zip(self.stages, features)]


class CoAttention(nn.Module):
    """HCPN's PCAM / HGPU's message (module docstring); ``stacks`` 5 (HGPU's ``'main'``, HCPN) or
    1 (HGPU's ``'pre'``). Returns (â, b̂, the last round's soft-attended a and b)."""

    def __init__(self, channels: int, stacks: int = 5, reduction: int = 16) -> None:
        super().__init__()
        if stacks < 1:
            raise ValueError(f"co-attention stacks must be >= 1, got {stacks}")
        self.stacks = stacks
        low = max(channels // reduction, 1)
        self.project_a, self.project_b = nn.Conv2d(channels, low, 1), nn.Conv2d(channels, low, 1)
        self.map_a, self.map_b = nn.Conv2d(channels, 1, 1), nn.Conv2d(channels, 1, 1)

    @staticmethod
    def soft_attention(x: Tensor, to_map: nn.Conv2d) -> Tensor:
        weights = to_map(x).flatten(2).softmax(dim=-1).view(x.shape[0], 1, *x.shape[2:])
        return weights * x

    def affinity(self, a: Tensor, b: Tensor) -> Tensor:
        """A [B, HW_b, HW_a] = tanh(P_b(b)ᵀ P_a(a))."""
        return torch.tanh(self.project_b(b).flatten(2).transpose(1, 2) @ self.project_a(a).flatten(2))

    def co_attention(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        affinity = self.affinity(a, b)
        a_hat = (a.flatten(2) @ affinity.transpose(1, 2)).view_as(a)
        b_hat = (b.flatten(2) @ affinity).view_as(b)
        return F.normalize(a_hat, dim=1), F.normalize(b_hat, dim=1)

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        for stack in range(self.stacks):
            a_attended, b_attended = self.soft_attention(a, self.map_a), self.soft_attention(b, self.map_b)
            a_hat, b_hat = self.co_attention(a_attended, b_attended)
            if stack < self.stacks - 1:
                a, b = F.relu(a_hat + a), F.relu(b_hat + b)
        return a_hat, b_hat, a_attended, b_attended


class GatedContext(nn.Module):
    """GAC / MACU (module docstring); the identity at initialisation."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        embedding = (x.pow(2).sum((2, 3), keepdim=True) + self.eps).sqrt() * self.alpha
        norm = (embedding.pow(2).mean(dim=1, keepdim=True) + self.eps).sqrt()
        return x + x * torch.tanh(embedding * self.gamma / norm + self.beta)


def _attention_branch(channels: int, inner: int, pooled: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1)] if pooled else []
    return nn.Sequential(*layers, nn.Conv2d(channels, inner, 1), nn.BatchNorm2d(inner), nn.ReLU(inplace=True),
                         nn.Conv2d(inner, channels, 1), nn.BatchNorm2d(channels))


class AttentionalFusion(nn.Module):
    """GAF / FR (module docstring), inner width channels / ``reduction`` (4)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        inner = max(channels // reduction, 1)
        self.local1, self.local2 = _attention_branch(channels, inner, False), _attention_branch(channels, inner, False)
        self.global_ = _attention_branch(channels, inner, True)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        both = x + y
        weight = torch.sigmoid(self.local1(both) + self.global_(both))
        fused = x * weight + y * (1 - weight)
        weight = torch.sigmoid(self.local2(fused) + self.global_(fused))
        return x * weight + y * (1 - weight)


class ConvGRUCell(nn.Module):
    """HGPU's ``ConvGRU2.ConvGRUCell`` with 1×1 kernels: the message is the input, the node's
    feature the hidden state."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reset, self.update, self.out = (nn.Conv2d(2 * channels, channels, 1) for _ in range(3))
        for gate in (self.reset, self.update, self.out):
            nn.init.orthogonal_(gate.weight)
            nn.init.zeros_(gate.bias)

    def forward(self, message: Tensor, hidden: Tensor) -> Tensor:
        stacked = torch.cat([message, hidden], dim=1)
        update, reset = torch.sigmoid(self.update(stacked)), torch.sigmoid(self.reset(stacked))
        candidate = torch.tanh(self.out(torch.cat([message, hidden * reset], dim=1)))
        return hidden * (1 - update) + candidate * update


def decoder_init_(module: nn.Module) -> None:
    """The authors' decoder initialisation: convolutions N(0, 0.001) with zero biases,
    BatchNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.001)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SideMaps(nn.Module):
    """One raw map per level and their fusion (module docstring): ``forward`` returns the raw
    maps (at their levels' sizes) and σ(fuse(maps upsampled to ``size``))."""

    def __init__(self, channels: Sequence[int], width: int = 64) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c), nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(width),
                          nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 1)) for c in channels)
        self.fuse = nn.Conv2d(len(channels), 1, 3, padding=1)

    def forward(self, levels: Levels, size: tuple[int, int]) -> tuple[Levels, Tensor]:
        maps = [head(x) for head, x in zip(self.heads, levels)]
        upsampled = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
        return maps, torch.sigmoid(self.fuse(torch.cat(upsampled, dim=1)))


class PyramidDilation(nn.Module):
    """1×1 ‖ three dilated 3×3 convolutions, then BatchNorm. As the authors' code: one rate-6
    convolution applied three times; ``rates_as_paper``: three convolutions at 6, 12, 18."""

    def __init__(self, in_channels: int, out_channels: int, rates_as_paper: bool = False) -> None:
        super().__init__()
        self.point = nn.Conv2d(in_channels, out_channels, 1)
        rates = (6, 12, 18) if rates_as_paper else (6,)
        self.dilated = nn.ModuleList(nn.Conv2d(in_channels, out_channels, 3, padding=r, dilation=r) for r in rates)
        self.norm = nn.BatchNorm2d(4 * out_channels)

    def forward(self, x: Tensor) -> Tensor:
        dilated = [conv(x) for conv in self.dilated]
        return self.norm(torch.cat([self.point(x), *(dilated * (3 // len(dilated)))], dim=1))


class Refine(nn.Module):
    """A finer level into the coarser mask features (module docstring)."""

    def __init__(self, in_channels: int, channels: int, rates_as_paper: bool = False) -> None:
        super().__init__()
        self.pyramid = PyramidDilation(in_channels, channels // 4, rates_as_paper)
        self.skip = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.merge = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, skip: Tensor, coarse: Tensor) -> Tensor:
        s = self.pyramid(skip)
        s = s + self.skip(s)
        m = s + F.interpolate(coarse, size=s.shape[-2:], mode="bilinear", align_corners=False)
        return m + self.merge(m)


class MaskDecoder(nn.Module):
    """Mask probabilities [B, 1, H, W] from res2-res5 features, each with its side map appended
    (``channels`` counts the features only)."""

    def __init__(self, channels: Sequence[int], width: int = 256, rates_as_paper: bool = False) -> None:
        super().__init__()
        c2, c3, c4, c5 = (c + 1 for c in channels)
        self.global_left = nn.Sequential(nn.Conv2d(c5, width, (7, 1), padding=(3, 0)), nn.Conv2d(width, width, (1, 7), padding=(0, 3)))
        self.global_right = nn.Sequential(nn.Conv2d(c5, width, (1, 7), padding=(0, 3)), nn.Conv2d(width, width, (7, 1), padding=(3, 0)))
        self.residual = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1))
        self.refine = nn.ModuleList(Refine(c, width, rates_as_paper) for c in (c4, c3, c2))
        self.predict = nn.Sequential(nn.ReLU(), nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, levels: Levels, side_maps: Levels, size: tuple[int, int]) -> Tensor:
        r2, r3, r4, r5 = (torch.cat([x, m], dim=1) for x, m in zip(levels, side_maps))
        x = self.global_left(r5) + self.global_right(r5)
        x = x + self.residual(x)
        for refine, skip in zip(self.refine, (r4, r3, r2)):
            x = refine(skip, x)
        return torch.sigmoid(F.interpolate(self.predict(x), size=size, mode="bilinear", align_corners=False))


class HCPNNetwork(nn.Module):
    """HCPN (card 4): at res3, res4 and res5 each frame is co-attended with the flow (one PCAM
    per level, used by both pairs); a frame branch adds the flow features attended at its
    positions, h ← ReLU(b̂ + h); the flow branch adds the cross co-attention of its two
    soft-attended versions, h ← ReLU(GAF(GAC(b₁), GAC(b₂)) + h). Each frame's levels are
    GAC([frame ‖ flow]); contours are :class:`SideMaps` of them, masks :class:`MaskDecoder` of
    them with each level's raw contour map appended. ``forward`` returns (mask_t, contour_t,
    mask_t+1, contour_t+1), probabilities at the input size."""

    def __init__(self, backbone: str = "resnet101.tv_in1k", pretrained: bool = True, weights: str | None = None,
                 stacks: int = 5, decoder_width: int = 256, side_width: int = 64, rates_as_paper: bool = False) -> None:
        super().__init__()
        self.encoder = ThreeBranchResNet(backbone, pretrained, weights)
        channels = self.encoder.channels
        self.co_attention = nn.ModuleList(CoAttention(c, stacks) for c in channels[1:])
        self.cross_gate = nn.ModuleList(GatedContext(c) for c in channels[1:])
        self.cross_fusion = nn.ModuleList(AttentionalFusion(c) for c in channels[1:])
        self.level_gate = nn.ModuleList(GatedContext(2 * c) for c in channels)
        doubled = [2 * c for c in channels]
        self.decoder = nn.ModuleDict({"contours": SideMaps(doubled, side_width),
                                      "masks": MaskDecoder(doubled, decoder_width, rates_as_paper)})
        decoder_init_(self.decoder)

    def encode(self, frame1: Tensor, frame2: Tensor, flow: Tensor) -> tuple[Levels, Levels]:
        h1, h2, h3 = self.encoder.res2([frame1, frame2, flow])
        joint1, joint2 = [torch.cat([h1, h3], 1)], [torch.cat([h2, h3], 1)]
        for i, level in enumerate((2, 3, 4)):
            h1, h2, h3 = self.encoder.next_stage(level, [h1, h2, h3])
            _, attended_flow1, _, soft_flow1 = self.co_attention[i](h1, h3)
            _, attended_flow2, _, soft_flow2 = self.co_attention[i](h2, h3)
            h1, h2 = F.relu(attended_flow1 + h1), F.relu(attended_flow2 + h2)
            gate = self.cross_gate[i]
            h3 = F.relu(self.cross_fusion[i](gate(soft_flow1), gate(soft_flow2)) + h3)
            joint1.append(torch.cat([h1, h3], 1))
            joint2.append(torch.cat([h2, h3], 1))
        return ([g(x) for g, x in zip(self.level_gate, joint1)], [g(x) for g, x in zip(self.level_gate, joint2)])

    def forward(self, frame1: Tensor, frame2: Tensor, flow: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        size = frame1.shape[-2:]
        outputs = []
        for levels in self.encode(frame1, frame2, flow):
            maps, contour = self.decoder["contours"](levels, size)
            outputs += [self.decoder["masks"](levels, maps, size), contour]
        return tuple(outputs)  # type: ignore[return-value]


class HGPUNetwork(nn.Module):
    """HGPU (card 3): the three branches are graph nodes (1 = I_t, 2 = I_t+1, 3 = flow) and the
    edges (1, 3), (2, 3), (1, 2) exchange messages. At res2 each edge's readout
    R(a, b) = FR(MACU(a), MACU(b)) gives the next stage's inputs Q¹ = R(h¹, h³), Q² = R(h², h³),
    Q³ = R(h¹, h²): from res3 on the third branch carries the frame-frame node. At res3-res5,
    per edge (a, b): messages (â, b̂) = co-attention(a, b), updates g_a = GRU(â, a),
    g_b = GRU(b̂, b), readout R(g_a, g_b), in the same order. Each node's levels are a final
    MACU of its readouts. The refinement maps (:class:`SideMaps` of node 3) gate both masks:
    mask_k = MaskDecoder(node k with the raw maps appended) × σ(fused maps). ``forward``
    returns (mask_t, mask_t+1), probabilities at the input size."""

    EDGES = ((0, 2), (1, 2), (0, 1))

    def __init__(self, backbone: str = "resnet101.tv_in1k", pretrained: bool = True, weights: str | None = None,
                 stacks: int = 5, decoder_width: int = 256, side_width: int = 64, rates_as_paper: bool = False) -> None:
        super().__init__()
        self.encoder = ThreeBranchResNet(backbone, pretrained, weights)
        channels = self.encoder.channels
        self.messages = nn.ModuleList(CoAttention(c, stacks) for c in channels[1:])
        self.updates = nn.ModuleList(ConvGRUCell(c) for c in channels[1:])
        self.readout_gates = nn.ModuleList(GatedContext(c) for c in channels)
        self.readout_fusions = nn.ModuleList(AttentionalFusion(c) for c in channels)
        self.level_gate = nn.ModuleList(GatedContext(c) for c in channels)
        self.decoder = nn.ModuleDict({"refinement": SideMaps(channels, side_width),
                                      "masks": MaskDecoder(channels, decoder_width, rates_as_paper)})
        decoder_init_(self.decoder)

    def readout(self, level: int, a: Tensor, b: Tensor) -> Tensor:
        gate = self.readout_gates[level]
        return self.readout_fusions[level](gate(a), gate(b))

    def encode(self, frame1: Tensor, frame2: Tensor, flow: Tensor) -> list[Levels]:
        h = self.encoder.res2([frame1, frame2, flow])
        readouts = [self.readout(0, h[a], h[b]) for a, b in self.EDGES]
        nodes: list[Levels] = [[q] for q in readouts]
        for i, level in enumerate((2, 3, 4)):
            h = self.encoder.next_stage(level, readouts)
            readouts = []
            for a, b in self.EDGES:
                message_a, message_b, _, _ = self.messages[i](h[a], h[b])
                updated_a, updated_b = self.updates[i](message_a, h[a]), self.updates[i](message_b, h[b])
                readouts.append(self.readout(i + 1, updated_a, updated_b))
            for node, q in zip(nodes, readouts):
                node.append(q)
        return [[g(x) for g, x in zip(self.level_gate, node)] for node in nodes]

    def forward(self, frame1: Tensor, frame2: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
        size = frame1.shape[-2:]
        node1, node2, node3 = self.encode(frame1, frame2, flow)
        maps, gate = self.decoder["refinement"](node3, size)
        masks = self.decoder["masks"]
        return masks(node1, maps, size) * gate, masks(node2, maps, size) * gate


def hard_negative_bce(probabilities: Tensor, target: Tensor, hard_negatives: Tensor) -> Tensor:
    """The authors' ``Loss`` (``libs/utils/obj.py``): BCE of probabilities [B, 1, H, W] against a
    0/1 ``target`` [B, H, W] (255: void, weight 0), each pixel weighted 1 + n (``hard_negatives``
    [B, H, W], zero on the object), averaged over all pixels. In float32 outside autocast (BCE
    on probabilities is unsafe in half precision)."""
    with torch.autocast(probabilities.device.type, enabled=False):
        valid = (target != 255).float()
        weight = (1.0 + hard_negatives.float()) * valid
        return F.binary_cross_entropy(probabilities[:, 0].float(), (target == 1).float(), weight)


def mask_contour(mask: Tensor) -> Tensor:
    """The object's contour [B, H, W] (0/1) of a 0/1 mask [B, H, W] (void as background): its
    3×3 morphological gradient, a band two pixels wide across the boundary."""
    binary = (mask == 1).float()[:, None]
    dilated = F.max_pool2d(binary, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-binary, 3, stride=1, padding=1)
    return (dilated - eroded)[:, 0].long()
