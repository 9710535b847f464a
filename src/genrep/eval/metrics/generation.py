"""Generation metrics: FID, KID and Inception Score of generated samples against real images.

Protocol (:func:`generation_metrics`)
    The usual setting (HybViT/GenViT, JEM: IS and FID of 50,000 samples against the CIFAR-10 training
    set; GCRL: FID-10K) with torch-fidelity's Inception v3 (:func:`~genrep.eval.metrics.extractors.inception_extractor`).
    Both sets are passed through the extractor in batches; the metric arithmetic is torchmetrics':

    * FID (Heusel et al. 2017): ``||mu_f - mu_r||^2 + Tr(S_f + S_r - 2 (S_f S_r)^(1/2))`` with unbiased
      covariances, accumulated and computed in float64 (``FrechetInceptionDistance``).
    * KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
      ``(x.y / D + 1)^3``, averaged over ``kid_subsets`` random subsets of ``kid_subset_size`` images of
      each set (``KernelInceptionDistance``, float64); mean and (population) std over subsets.
      ``kid_subset_size`` is clipped to ``min(n_fake, n_real)`` (the standard 1000 exceeds small sets);
      the value used is in the result.
    * IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` on the fake images over ``is_splits``
      splits (``InceptionScore``); mean and std over splits. Only for extractors with class logits
      (Inception: ``logits_unbiased``, as torch-fidelity); otherwise ``None`` with the reason in
      ``result["skipped"]``.

    The features are extracted here and handed to torchmetrics through an identity module, so the
    real-image features can be cached: with ``reference_cache`` (a folder) they are stored as
    safetensors under a name built from ``reference_key``, the number of real images, a digest of
    their bytes and a digest of the extractor (label, parameters and buffers), and reused only when all
    of these match; a file that does not read cleanly is recomputed. Subset and split sampling is seeded
    (``seed``), so the same inputs give the same numbers, cached or not.

    Every result names its extractor (``"extractor"``, ``"custom_extractor"``): numbers from a custom
    extractor are not comparable with published Inception FID/IS/KID.

:func:`frechet_distance` is an independent float64 implementation (``scipy.linalg.sqrtm``, as
pytorch-fid) that the tests check torchmetrics' eigenvalue formula against.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ...errors import GenrepError
from ...io import atomic_save_safetensors
from .extractors import Extractor, content_digest

__all__ = ["feature_statistics", "frechet_distance", "generation_metrics"]


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean ``[D]`` and unbiased covariance ``[D, D]`` of features ``[N, D]``."""
    f = np.asarray(torch.as_tensor(features).detach().cpu().double())
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))`` in float64 (pytorch-fid's recipe)."""
    from scipy import linalg

    mu1, mu2 = (np.atleast_1d(np.asarray(torch.as_tensor(m).cpu().double())) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(torch.as_tensor(s).cpu().double())) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise GenrepError(f"frechet_distance needs means [D] and covariances [D, D] of one D, got {mu1.shape}, "
                          f"{s1.shape}, {mu2.shape}, {s2.shape}")
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: nudge the diagonals, as pytorch-fid does
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


class _Precomputed(nn.Module):
    """Identity 'feature extractor' for torchmetrics: the features were extracted already."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


# ----------------------------------------------------------------------------------------------- inputs
def _check_images(x, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception:  # noqa: BLE001 - as_tensor raises many types
            raise GenrepError(f"{what} images must be a tensor [N, C, H, W], got {type(x).__name__}") from None
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise GenrepError(f"{what} images must be [N, C, H, W] with C = 1 or 3, got shape {tuple(x.shape)}")
    if len(x) < 2:
        raise GenrepError(f"{what} has {len(x)} images; FID/KID/IS need at least 2 (thousands for stable numbers)")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise GenrepError(f"{what} images must be uint8 in [0, 255] or float in [0, 1], got dtype {x.dtype}")
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 1:
        raise GenrepError(f"{what} float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; clamp "
                          f"or rescale them (uint8 images are read as 0..255)")
    return x


def _check_positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise GenrepError(f"{name} must be a positive integer, got {v!r}")
    return v


@torch.no_grad()
def _extract(extractor: Extractor, images: Tensor, batch_size: int, dev: torch.device, want_logits: bool,
             progress: bool, desc: str) -> tuple[Tensor, Tensor | None]:
    from tqdm.auto import tqdm

    feats, logits = [], []
    starts = range(0, len(images), batch_size)
    for a in tqdm(starts, desc=desc, unit="batch", leave=False, disable=None if progress else True):
        x = images[a:a + batch_size].to(dev)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        try:
            f, lg = extractor.features_and_logits(x)
        except GenrepError:
            raise
        except Exception as e:  # noqa: BLE001 - a custom module may raise anything; report it in one line
            msg = " ".join(str(e).split())[:200] or type(e).__name__
            raise GenrepError(f"extractor {extractor.label!r} failed on a {desc} batch of shape {tuple(x.shape)}: "
                              f"{msg} (if memory ran out, lower batch_size)") from None
        feats.append(f.float())
        if want_logits:
            logits.append(lg.float())
    f = torch.cat(feats)
    if not torch.isfinite(f).all():
        raise GenrepError(f"extractor {extractor.label!r} gave non-finite features (NaN/inf) for the {desc} images")
    return f, (torch.cat(logits) if want_logits else None)


# ----------------------------------------------------------------------------------------------- cache
def _reference_file(cache: Path, key: str | None, n: int, digest: str, fingerprint: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", key or "real").strip("_")[-60:] or "real"
    return Path(cache) / f"{stem}-n{n}-{digest[:12]}-{fingerprint[:12]}.safetensors"


def _load_reference(path: Path, meta: dict[str, str], n: int) -> Tensor | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            if f.metadata() != meta:
                return None
            feats = f.get_tensor("features")
    except Exception:  # noqa: BLE001 - truncated or not safetensors: recompute rather than trust it
        return None
    if feats.dim() != 2 or len(feats) != n or feats.dtype != torch.float32 or not torch.isfinite(feats).all():
        return None
    return feats


# ----------------------------------------------------------------------------------------------- metrics
def generation_metrics(fake, real, extractor: Extractor, *, kid_subsets: int = 100, kid_subset_size: int = 1000,
                       is_splits: int = 10, batch_size: int = 256, device: str | torch.device = "cpu",
                       reference_cache: str | Path | None = None, reference_key: str | None = None,
                       seed: int = 0, progress: bool = False) -> dict:
    """FID, KID and IS of ``fake`` against ``real`` (uint8 or [0, 1] float ``[N, C, H, W]``); see the module doc.

    Returns ``{"fid", "kid", "kid_std", "inception_score", "inception_score_std", "extractor",
    "custom_extractor", "n_fake", "n_real", "feature_dim", "kid_subsets", "kid_subset_size", "is_splits",
    "reference_cached", "skipped", "seconds"}``; ``skipped`` maps a metric left out to the reason.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    from ...devices import resolve_device

    t0 = time.perf_counter()
    if not isinstance(extractor, Extractor):
        raise GenrepError(f"extractor must come from inception_extractor, custom_extractor or "
                          f"dataset_classifier_extractor, got {type(extractor).__name__}")
    fake, real = _check_images(fake, "fake"), _check_images(real, "real")
    if fake.shape[1:] != real.shape[1:]:
        raise GenrepError(f"fake images are {tuple(fake.shape[1:])} but real images are {tuple(real.shape[1:])}; "
                          f"compare samples with real images of the same channels and size")
    if extractor.input_shape is not None and tuple(fake.shape[1:]) != tuple(extractor.input_shape):
        raise GenrepError(f"extractor {extractor.label!r} takes {tuple(extractor.input_shape)} images, got "
                          f"{tuple(fake.shape[1:])}; build it on data of the same channels and size")
    kid_subsets, kid_subset_size, is_splits, batch_size = (
        _check_positive_int(v, k) for v, k in ((kid_subsets, "kid_subsets"), (kid_subset_size, "kid_subset_size"),
                                               (is_splits, "is_splits"), (batch_size, "batch_size")))
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    extractor = extractor.to(dev).eval()
    n_fake, n_real = len(fake), len(real)

    real_feats, cached, ref_path = None, False, None
    if reference_cache is not None:
        digest, fingerprint = content_digest(real), extractor.fingerprint()
        meta = {"extractor": extractor.label, "extractor_digest": fingerprint, "real_digest": digest,
                "n_real": str(n_real), "reference_key": str(reference_key)}
        ref_path = _reference_file(Path(reference_cache), reference_key, n_real, digest, fingerprint)
        real_feats = _load_reference(ref_path, meta, n_real)
        cached = real_feats is not None
    if real_feats is None:
        real_feats, _ = _extract(extractor, real, batch_size, dev, False, progress, "real")
        if ref_path is not None:
            atomic_save_safetensors(ref_path, {"features": real_feats}, metadata=meta)
    real_feats = real_feats.to(dev)
    fake_feats, fake_logits = _extract(extractor, fake, batch_size, dev, extractor.has_logits, progress, "fake")
    if fake_feats.shape[1] != real_feats.shape[1]:
        raise GenrepError(f"fake features have {fake_feats.shape[1]} dimensions but real ones {real_feats.shape[1]}; "
                          f"the extractor must give one feature size")
    d = int(fake_feats.shape[1])
    subset = min(kid_subset_size, n_fake, n_real)
    splits = min(is_splits, n_fake)

    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        torch.manual_seed(seed)  # KID subsets and IS splits are drawn with torch.randperm on the CPU generator
        fid = FrechetInceptionDistance(feature=_Precomputed(d), reset_real_features=True).to(dev)
        fid.update(real_feats.double(), real=True)
        fid.update(fake_feats.double(), real=False)
        kid = KernelInceptionDistance(feature=_Precomputed(d), subsets=kid_subsets, subset_size=subset).to(dev)
        kid.update(real_feats.double(), real=True)
        kid.update(fake_feats.double(), real=False)
        kid_mean, kid_std = kid.compute()
        result = {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
                  "inception_score": None, "inception_score_std": None}
        skipped = {}
        if fake_logits is not None:
            isc = InceptionScore(feature=_Precomputed(int(fake_logits.shape[1])), splits=splits).to(dev)
            isc.update(fake_logits.double())
            is_mean, is_std = isc.compute()
            result.update(inception_score=float(is_mean), inception_score_std=float(is_std))
        else:
            skipped["inception_score"] = (f"extractor {extractor.label!r} has no class logits; IS needs class "
                                          f"probabilities (pass logits_module= to custom_extractor)")
    return {**result, "extractor": extractor.label, "custom_extractor": bool(extractor.is_custom),
            "n_fake": n_fake, "n_real": n_real, "feature_dim": d, "kid_subsets": kid_subsets,
            "kid_subset_size": subset, "is_splits": splits if fake_logits is not None else None,
            "reference_cached": cached, "skipped": skipped, "seconds": round(time.perf_counter() - t0, 3)}
