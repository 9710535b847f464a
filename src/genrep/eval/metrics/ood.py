"""Out-of-distribution detection: scores and the threshold-free metrics.

Convention: every score is "higher = more in-distribution", and the metrics treat the in-distribution
set as the positive class.

Scores (``KINDS``; :func:`genrep.eval.protocols.ood.applicable_scores` says which a method offers)
    ``gaussian``   supervised OOD of GCRL (sec. 4.3, after Lee et al. 2018): class-conditional Gaussians
                   fitted on the training set's frozen features, s(x) = max_c log N(z(x) | mu_c, Sigma_c)
                   (:class:`GaussianOODScore`; the paper's max of densities, reported as a log density).
    ``msp``        maximum softmax probability max_y p(y|x) (Hendrycks & Gimpel 2017; HybViT paper table 11).
    ``energy``     logsumexp of the logits (the negative free energy, Liu et al. 2020; JEM's log p(x) up to a
                   constant, the HybViT paper's table 3 score for classifiers).
    ``bpd``        minus the diffusion bound in bits/dim (the HybViT paper's log p(x) for GenViT/HybViT).
    ``score_norm`` unsupervised OOD of GCRL: minus the L2 norm of the score function d log p(x) / dx, with x
                   the image in [0, 1] (``Method.grad_log_density``: GenViT and HybViT read it off the
                   denoiser at a small step; a model with an explicit log p can use :func:`score_norm`).

Metrics (:func:`ood_metrics`, float64 on the CPU)
    ``auroc``  area under the ROC curve, ties counted half (the Mann-Whitney statistic);
    ``auprc``  average precision with in-distribution positive, as ``sklearn.metrics.average_precision_score``
               (a step-wise sum over distinct thresholds, no interpolation);
    ``fpr95``  the fraction of OOD samples scored at or above the highest threshold that keeps at least 95 % of
               the in-distribution samples (the smallest FPR among ROC points with TPR >= 0.95).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ...errors import GenrepError

__all__ = ["COVARIANCES", "KINDS", "GaussianOODScore", "energy_score", "msp_score", "ood_metrics", "score_norm"]

KINDS = ("gaussian", "msp", "energy", "bpd", "score_norm")
_NEEDS = {"msp": ("logits", "needs a classifier head (logits)"),
          "energy": ("logits", "needs a classifier head (logits)"),
          "bpd": ("nll", "needs a likelihood (the nll capability: a diffusion model's bits/dim)"),
          "score_norm": ("score", "needs the score function d log p(x) / dx (the score capability)")}
COVARIANCES = ("shared", "class")


# ----------------------------------------------------------------------------------------------- metrics
def _scores(x, name: str) -> np.ndarray:
    try:
        a = (x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise GenrepError(f"{name} OOD scores must be a 1-D tensor of numbers, got {type(x).__name__}") from e
    if a.ndim != 1:
        raise GenrepError(f"{name} OOD scores must be 1-D (one score per image), got shape {a.shape}")
    if a.size == 0:
        raise GenrepError(f"{name} OOD scores are empty; AUROC needs at least one in- and one out-of-"
                          f"distribution image")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise GenrepError(f"{name} OOD scores have {bad} non-finite values (NaN or inf) of {a.size}; check the "
                          f"model or the score")
    return a


def ood_metrics(score_in, score_out) -> dict[str, float]:
    """AUROC, AUPRC (in-distribution positive) and FPR at 95 % TPR of "higher = in-distribution" scores."""
    s_in, s_out = _scores(score_in, "in-distribution"), _scores(score_out, "out-of-distribution")
    scores = np.concatenate([s_in, s_out])
    positive = np.concatenate([np.ones(s_in.size), np.zeros(s_out.size)])
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    # one ROC point per distinct threshold: tied scores enter together, which is what makes ties count half
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]
    tp = np.cumsum(positive)[last]
    fp = (last + 1) - tp
    tpr, fpr = np.r_[0.0, tp / s_in.size], np.r_[0.0, fp / s_out.size]
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    auprc = float(np.sum(np.diff(tpr) * tp / (tp + fp)))
    # TPR >= 0.95 tested in integers (20 tp >= 19 n_in); fpr never decreases, so the first such point is the min
    fpr95 = float(fpr[np.argmax(np.r_[0.0, tp] * 20 >= 19 * s_in.size)])
    return {"auroc": auroc, "auprc": auprc, "fpr95": fpr95}


# ----------------------------------------------------------------------------------------------- scores
def msp_score(logits: Tensor) -> Tensor:
    """Maximum softmax probability [B] (softmax in float32 at least, so bf16 logits do not saturate)."""
    return torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
                         dim=-1).amax(dim=-1)


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy T logsumexp(logits / T) [B] (float32 at least; logsumexp does not overflow)."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return temperature * torch.logsumexp(x / temperature, dim=-1)


def score_norm(log_density_fn, x: Tensor) -> Tensor:
    """Minus the per-sample L2 norm of d log_density_fn(x).sum() / dx, [B], detached.

    GCRL's unsupervised OOD score: typical inputs sit near a mode, where the density's gradient is small.
    ``x`` are images in [0, 1] (the gradient is per [0, 1] pixel unit); samples do not interact, so the
    gradient of the sum is each sample's own gradient. Parameter gradients are not touched.
    """
    x = x.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logp = log_density_fn(x)
        if not isinstance(logp, Tensor) or logp.shape != x.shape[:1]:
            raise GenrepError(f"score_norm needs a log density of one value per image [{x.shape[0]}], got "
                              f"{tuple(getattr(logp, 'shape', ())) or type(logp).__name__}")
        if not logp.requires_grad:
            raise GenrepError("score_norm: the log density does not depend on the input (no gradient to x)")
        (grad,) = torch.autograd.grad(logp.float().sum(), x)
    return -grad.flatten(1).double().norm(dim=1).to(x.dtype)


class GaussianOODScore:
    """Class-conditional Gaussians on frozen features; ``score`` = max_c log N(z | mu_c, Sigma_c), float64.

    ``fit(features, labels, covariance=..., shrinkage=...)``:

    * ``covariance="shared"`` (default): one covariance pooled over classes, sum_c sum_{i in c}
      (z_i - mu_c)(z_i - mu_c)^T / N (maximum likelihood, as the Mahalanobis detector of Lee et al. 2018);
      the score is then minus half the smallest Mahalanobis distance plus a constant.
    * ``covariance="class"``: each class's own maximum-likelihood covariance (GCRL's Sigma_c). A class with
      at most D samples has a singular sample covariance in D dimensions; it uses the shared covariance
      instead (listed in ``fallback_classes``), rather than a density dominated by the ridge.
    * ``shrinkage`` (default 1e-4): every covariance gets ``shrinkage`` times its mean variance added to the
      diagonal (1.0 when all variances are 0), so it is invertible (ViT features after a LayerNorm lie on a
      hyperplane, making the raw covariance exactly singular) while well-estimated directions barely change.

    Both departures from the paper's plain Sigma_c are recorded, never silent: :meth:`summary` gives the
    ridge and the classes that fell back, which the OOD protocol writes beside its numbers.

    Class indices that have no sample are left out of the max. Densities are evaluated via Cholesky factors
    on the device of the fitted features, ``chunk`` rows at a time.
    """

    def __init__(self) -> None:
        self.means: Tensor | None = None        # [K, D] float64
        self.chol: Tensor | None = None         # [K, D, D] lower factors (shared: [1, D, D])
        self.classes: Tensor | None = None      # [K] the class index of each row of ``means``
        self.covariance: str | None = None
        self.shrinkage: float | None = None
        self.fallback_classes: list[int] = []
        self.ridge: Tensor | None = None        # [1 or K] the absolute ridge added to each covariance's diagonal
        self.counts: Tensor | None = None       # [K] training samples per class

    def fit(self, features: Tensor, labels: Tensor, covariance: str = "shared",
            shrinkage: float = 1e-4) -> GaussianOODScore:
        if covariance not in COVARIANCES:
            raise GenrepError(f"unknown Gaussian OOD covariance {covariance!r}; choose one of "
                              f"{', '.join(COVARIANCES)}")
        if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not (
                math.isfinite(shrinkage) and shrinkage >= 0):
            raise GenrepError(f"shrinkage must be a finite number >= 0, got {shrinkage!r}")
        self.fallback_classes = []  # a refit must not report an earlier fit's classes
        z = self._check(features, "training features")
        if (not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point()
                or len(labels) != len(z)):
            raise GenrepError(f"Gaussian OOD fit needs integer labels [{len(z)}], one per feature row, got "
                              f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
        y = labels.to(z.device, torch.long)
        if int(y.min()) < 0:
            raise GenrepError(f"Gaussian OOD fit got negative labels (min {int(y.min())}); labels must be 0..K-1")
        classes, y = torch.unique(y, return_inverse=True)
        k, (n, d) = len(classes), z.shape
        counts = torch.bincount(y, minlength=k).double()
        means = torch.zeros(k, d, dtype=torch.float64, device=z.device).index_add_(0, y, z) / counts[:, None]
        centred = z - means[y]
        shared = centred.T @ centred / n
        if covariance == "shared":
            covs = shared[None]
        else:
            covs = torch.empty(k, d, d, dtype=torch.float64, device=z.device)
            for c in range(k):
                if counts[c] <= d:
                    covs[c] = shared
                    self.fallback_classes.append(int(classes[c]))
                else:
                    zc = centred[y == c]
                    covs[c] = zc.T @ zc / counts[c]
        scale = covs.diagonal(dim1=-2, dim2=-1).mean(-1)
        ridge = shrinkage * torch.where(scale > 0, scale, torch.ones_like(scale))
        covs = covs + ridge[:, None, None] * torch.eye(d, dtype=torch.float64, device=z.device)
        chol, info = torch.linalg.cholesky_ex(covs)
        if int(info.max()) > 0:
            raise GenrepError(f"the Gaussian OOD covariance is not positive definite even with shrinkage "
                              f"{shrinkage}; pass a larger shrinkage (e.g. 1e-3)")
        self.means, self.chol, self.classes = means, chol, classes
        self.covariance, self.shrinkage = covariance, float(shrinkage)
        self.ridge = ridge.cpu()
        self.counts = counts.long().cpu()
        return self

    def summary(self) -> dict:
        """What the fit did beyond the plain maximum-likelihood Gaussians, for the result: the covariance kind,
        the ridge (relative and absolute, per Gaussian: the shared one, or each class's) and, per class, which
        classes had at most D samples and so use the shared covariance."""
        if self.means is None:
            raise GenrepError("GaussianOODScore.summary called before fit; fit it on the training set's features")
        d = int(self.means.shape[1])
        out = {"covariance": self.covariance, "dim": d, "classes": len(self.classes),
               "ridge": {"relative": self.shrinkage,
                         "rule": "relative x the covariance's mean variance, added to its diagonal",
                         "min": float(self.ridge.min()), "max": float(self.ridge.max())}}
        if self.covariance == "class":
            out["min_class_samples"] = int(self.counts.min())
            out["fallback_classes"] = list(self.fallback_classes)
            out["fallback_rule"] = (f"a class with at most D = {d} training samples has a singular covariance; "
                                    f"it uses the shared one")
        return out

    def state(self) -> dict[str, Tensor]:
        """What :meth:`score` needs, to save (``from_state`` reads it back; the covariance kind is kept apart)."""
        if self.means is None:
            raise GenrepError("GaussianOODScore.state called before fit; fit it on the training set's features")
        return {"means": self.means, "chol": self.chol, "classes": self.classes}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], covariance: str) -> GaussianOODScore:
        """Gaussians that score as the fitted ones whose :meth:`state` this is; shapes that do not fit together are
        refused in one line."""
        means, chol, classes = state["means"], state["chol"], state["classes"]
        k = len(means)
        if (means.dim() != 2 or chol.dim() != 3 or chol.shape[1:] != (means.shape[1], means.shape[1])
                or len(chol) not in (1, k) or classes.shape != (k,) or covariance not in COVARIANCES):
            raise GenrepError(f"these are not Gaussians that fit together (means {tuple(means.shape)}, factors "
                              f"{tuple(chol.shape)}, classes {tuple(classes.shape)}, covariance {covariance!r})")
        g = cls()
        g.means, g.chol, g.classes, g.covariance = means.double(), chol.double(), classes.long(), covariance
        return g

    def to(self, device: torch.device | str) -> GaussianOODScore:
        """Move the fitted parameters (in place) to ``device``, where ``score`` then computes."""
        for k in ("means", "chol", "classes"):
            if getattr(self, k) is not None:
                setattr(self, k, getattr(self, k).to(device))
        return self

    @torch.no_grad()
    def score(self, features: Tensor, chunk: int = 4096) -> Tensor:
        """max_c log N(z | mu_c, Sigma_c) per row of ``features`` [M, D] -> float64 [M] on the features' device."""
        if self.means is None:
            raise GenrepError("GaussianOODScore.score called before fit; fit it on the training set's features")
        device = features.device if isinstance(features, Tensor) else torch.device("cpu")
        z = self._check(features, "features").to(self.means.device)
        d = self.means.shape[1]
        if z.shape[1] != d:
            raise GenrepError(f"features have {z.shape[1]} dimensions but the Gaussians were fitted on {d}; use "
                              f"the same layer and pooling for both")
        log_det = 2 * self.chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)            # [1 or K]
        const = -0.5 * (d * math.log(2 * math.pi) + log_det)
        shared = len(self.chol) == 1
        if shared:  # one whitening serves every class: ||L^-1 z - L^-1 mu_c||^2
            w_mu = torch.linalg.solve_triangular(self.chol[0], self.means.T, upper=False).T          # [K, D]
        out = []
        for z_chunk in z.split(chunk):
            if shared:
                w = torch.linalg.solve_triangular(self.chol[0], z_chunk.T, upper=False).T            # [B, D]
                # the direct difference, not |a|^2 + |b|^2 - 2ab, which cancels badly far from the means
                maha = torch.cdist(w, w_mu, compute_mode="donot_use_mm_for_euclid_dist").square()
            else:
                maha = torch.stack([torch.linalg.solve_triangular(L, (z_chunk - mu).T, upper=False).square().sum(0)
                                    for L, mu in zip(self.chol, self.means)], dim=1)                  # [B, K]
            out.append((const - 0.5 * maha).amax(dim=1))
        return torch.cat(out).to(device)

    @staticmethod
    def _check(features, what: str) -> Tensor:
        if not isinstance(features, Tensor) or features.dim() != 2 or features.is_complex():
            raise GenrepError(f"Gaussian OOD {what} must be a 2-D tensor [N, D], got "
                              f"{tuple(getattr(features, 'shape', ())) or type(features).__name__}")
        if len(features) == 0 or features.shape[1] == 0:
            raise GenrepError(f"Gaussian OOD {what} are empty ({tuple(features.shape)}); pass at least one row "
                              f"of at least one feature")
        z = features.detach().double()
        if not torch.isfinite(z).all():
            raise GenrepError(f"Gaussian OOD {what} have non-finite values (NaN or inf); check the model")
        return z


