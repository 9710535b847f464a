"""The evaluation protocols of the five papers, one module each, and their registry.

A protocol module holds its settings dataclass (the ``eval.<name>`` config section, valid values declared
next to each field and checked when the config is built), ``run(ctx) -> dict`` (a JSON-ready dict of
numbers, and ``figures``: name -> PNG path relative to the run) and, where the data or the method decide
what is valid, ``check(ctx)`` (the driver's preflight). :data:`PROTOCOLS` says what each needs, and
:func:`skip_reason` why a protocol does not apply to a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import (calibration, completion, energy, finetune, generation, likelihood, lowshot, ood, probes, robustness,
               similarity, sweep)
from .context import EvalContext


@dataclass(frozen=True)
class Protocol:
    needs: tuple[str, ...]              # the capabilities the method must offer, all of them; (): every method
    settings: type                      # its settings dataclass, the eval.<name> section
    run: Callable[[EvalContext], dict]
    check: Callable[[EvalContext], None] | None  # preflight checks that need the method or the data
    expensive: bool


PROTOCOLS: dict[str, Protocol] = {
    "probes": Protocol((), probes.ProbesSettings, probes.run, probes.check, False),
    "calibration": Protocol(("logits",), calibration.CalibrationSettings, calibration.run, None, False),
    "ood": Protocol((), ood.OODSettings, ood.run, ood.check, False),
    "likelihood": Protocol(("nll",), likelihood.LikelihoodSettings, likelihood.run, None, False),
    "generation": Protocol(("sample",), generation.GenerationSettings, generation.run, generation.check, True),
    "completion": Protocol(("complete",), completion.CompletionSettings, completion.run, completion.check, True),
    "energy": Protocol(("sample", "logits"), energy.EnergySettings, energy.run, None, True),
    "robustness": Protocol(("logits",), robustness.RobustnessSettings, robustness.run, None, True),
    "similarity": Protocol((), similarity.SimilaritySettings, similarity.run, similarity.check, False),
    "finetune": Protocol((), finetune.FinetuneSettings, finetune.run, finetune.check, True),
    "lowshot": Protocol((), lowshot.LowshotSettings, lowshot.run, lowshot.check, False),
    "sweep": Protocol((), sweep.SweepSettings, sweep.run, sweep.check, True),
}

NEEDS = {"logits": "a classifier head (the 'logits' capability)", "nll": "a likelihood (the 'nll' capability)",
         "sample": "a sampler (the 'sample' capability)",
         "complete": "image completion (the 'complete' capability)"}


def skip_reason(name: str, method) -> str | None:
    """Why protocol ``name`` does not apply to ``method`` (None when it does): the capabilities it lacks."""
    missing = [c for c in PROTOCOLS[name].needs if c not in method.capabilities]
    if not missing:
        return None
    caps = ", ".join(sorted(method.capabilities)) or "none"
    return f"needs {' and '.join(NEEDS[c] for c in missing)}; {method.name} offers: {caps}"


__all__ = ["NEEDS", "PROTOCOLS", "EvalContext", "Protocol", "skip_reason"]
