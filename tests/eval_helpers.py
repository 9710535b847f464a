"""Evaluation settings sized for tiny models, shared by the evaluation tests."""

from __future__ import annotations

from genrep.config import PROTOCOLS, EvalConfig
from genrep.eval.protocols.energy import EnergySettings
from genrep.eval.protocols.finetune import FinetuneSettings
from genrep.eval.protocols.generation import GenerationSettings
from genrep.eval.protocols.likelihood import LikelihoodSettings
from genrep.eval.protocols.lowshot import LowshotSettings
from genrep.eval.protocols.ood import OODSettings
from genrep.eval.protocols.probes import ProbesSettings
from genrep.eval.protocols.robustness import RobustnessSettings
from genrep.eval.protocols.similarity import SimilaritySettings
from genrep.eval.protocols.sweep import SweepSettings
from genrep.methods import get_method

# every protocol at a size that runs in seconds on a tiny model. The read-out sweeps keep two weight decays (the
# held-out choice still runs) but drop the smallest: on a tiny ADM's features full-batch L-BFGS takes 400-800
# iterations at 1e-5 and 70-160 at these, and those fits were most of the time of evaluating it.
SWEEP_DECAYS = [1e-3, 1e-2]
FAST = EvalConfig(device="cpu", batch_size=64, ood=OODSettings(n=48), likelihood=LikelihoodSettings(n=8),
                  probes=ProbesSettings(epochs=10, sweep_weight_decay=SWEEP_DECAYS),
                  sweep=SweepSettings(weight_decay=SWEEP_DECAYS),
                  generation=GenerationSettings(samples=24, extractor="classifier"),
                  energy=EnergySettings(n=24, bins=8, classes_shown=4, per_class=2),
                  robustness=RobustnessSettings(n=24, steps=2, linf_eps=[0, 8], l2_eps=[0, 100]),
                  similarity=SimilaritySettings(cka_n=48, tsne_n=48), finetune=FinetuneSettings(epochs=1, batch_size=64),
                  lowshot=LowshotSettings(seeds=[0, 1], fractions=[0.05, 0.1]), protocols=list(PROTOCOLS))

# the sampling and likelihood sizes are the method's read options, set on the trained model
FAST_OPTIONS = {"sample_steps": 3, "nll_terms": 4}


def fast_options(method: str) -> dict:
    """FAST_OPTIONS that ``method`` reads (a supervised ViT neither samples nor has a likelihood)."""
    return {k: v for k, v in FAST_OPTIONS.items() if k in get_method(method).read_options}


def no_extraction(monkeypatch) -> list:
    """Make any feature extraction fail the test: a check before the work, or a cache hit, extracts nothing."""
    from genrep.eval.protocols import context

    work = []

    def no_work(*args, **kwargs):
        work.append(args)
        raise AssertionError("features were extracted")

    for fn in ("extract_features", "extract_feature_sets"):
        monkeypatch.setattr(context, fn, no_work)
    return work
