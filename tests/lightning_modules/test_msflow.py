"""MSFlow's precision under the bf16 presets: the frozen extractor and the flows run in fp32."""

from __future__ import annotations

import torch

from lightning_modules.anomaly.msflow import MSFlow


def test_extractor_and_flows_run_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = MSFlow(backbone="resnet18", pretrained=False).eval()
    extracted: list[torch.dtype] = []
    model.extractor.register_forward_hook(lambda module, inputs, outputs: extracted.extend(o.dtype for o in outputs))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        latents, log_det = model(torch.randn(1, 3, 64, 64))
    assert extracted and set(extracted) == {torch.float32}  # the authors' features are fp32
    assert {z.dtype for z in latents} == {torch.float32} and log_det.dtype == torch.float32
