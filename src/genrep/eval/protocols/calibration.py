"""The calibration protocol: ECE of the classifier head on the test set and its reliability diagram."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import GenrepError
from ...data.packed import is_uint8_images
from ...fields import setting
from ..features import image_batches
from ..metrics.calibration import expected_calibration_error
from .context import EvalContext, methods_with


@dataclass
class CalibrationSettings:
    # equal-width confidence bins of every ECE (fine-tuning and low-shot too): 15 as Guo et al. and GCRL;
    # the HybViT recipes use 20 like its code
    bins: int = setting(15, min=1)


def predict_probs(method, images_uint8: Tensor, *, device: torch.device | str = "cpu", batch_size: int = 512,
                  progress: bool = False) -> Tensor:
    """Class probabilities softmax(logits) [N, K], float32 on the CPU, of uint8 [N, C, H, W] images.

    The softmax is taken in float32 whatever dtype the head returns, so a bf16 model's confidences are
    not rounded into the wrong ECE bin.
    """
    if "logits" not in method.capabilities:
        raise GenrepError(f"ECE needs a classifier head, and {method.name} has none; it applies to methods with "
                          f"the 'logits' capability ({', '.join(methods_with('logits')) or 'none registered'})")
    if not is_uint8_images(images_uint8):
        raise GenrepError(f"predict_probs needs uint8 images [N, C, H, W], got "
                          f"{getattr(images_uint8, 'dtype', type(images_uint8).__name__)} "
                          f"{tuple(getattr(images_uint8, 'shape', ()))}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GenrepError(f"batch_size must be a positive integer, got {batch_size!r}")
    method.eval()
    chunks = [torch.zeros(0, method.data.num_classes)]
    with torch.no_grad():
        for x in image_batches(images_uint8, batch_size, device, progress=progress, desc="probabilities"):
            chunks.append(torch.softmax(method.logits(x).float(), dim=-1).cpu())
    return torch.cat(chunks)


def run(ctx: EvalContext) -> dict:
    from ..metrics.selective import msp_selective
    from ..report.figures import reliability_diagram, risk_coverage_figure

    bins = ctx.ev.calibration.bins
    probs = predict_probs(ctx.method, ctx.test.images, device=ctx.device, batch_size=ctx.ev.batch_size,
                          progress=ctx.progress)
    ece = expected_calibration_error(probs, ctx.test.labels, bins)
    fig = reliability_diagram(probs, ctx.test.labels, ctx.figure("reliability"), n_bins=bins,
                              title=f"{ctx.cfg.method} on {ctx.cfg.data.name}")
    # selective classification by the top-class probability (MSP): what genrep predict abstains by, without its
    # OOD choice of score
    selective = msp_selective(probs, ctx.test.labels)
    curve = risk_coverage_figure({"MSP": selective}, ctx.figure("risk-coverage"),
                                 title=f"{ctx.cfg.method} on {ctx.cfg.data.name}")
    return {"ece": ece, "bins": bins, "accuracy": float((probs.argmax(1) == ctx.test.labels).float().mean()),
            "mean_confidence": float(probs.max(1).values.mean()), "n": len(probs), "selective": selective,
            "figures": {"reliability diagram": ctx.rel(fig), "risk-coverage (MSP)": ctx.rel(curve)}}
