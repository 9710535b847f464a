"""Evaluation during training (``train.eval_every``): a few cheap numbers of the EMA weights every N steps,
logged to ``log.jsonl`` beside the loss and plotted in the run's summary figure (the HybViT paper's FID
curve, figure 8, is one of them).

Each metric is a pure function of the weights and (seed, step), so a run killed and resumed writes the
same rows as one that was not: the trainer evaluates before it checkpoints a step, and a resume drops the
rows logged after its checkpoint.

- ``knn``: k-nearest-neighbour top-1 accuracy (k = the first of ``probe.knn_k``) of the method's default
  read-out, ``train.eval_n`` training images as the memory bank and as many test images as queries.
- ``knn5_loss``: the 5-NN test loss of GCRL's table 9 (its overfitting curve under weak augmentation): the
  0-1 loss, 1 - accuracy, of the same kNN vote with k = 5 on the same images. The paper does not define it
  and publishes no code; its CIFAR-100 curve (0.55 to 0.65) is what 1 - 5-NN accuracy is at its table's
  linear accuracies (0.48 to 0.58), while a cross-entropy of five votes is infinite whenever the true class
  gets none.
- ``accuracy``: the classifier's top-1 test accuracy (methods with the ``logits`` capability).
- ``fid``: FID of ``train.eval_samples`` samples (the method's own sampler settings) against the training
  set, with ``eval.generation``'s extractor; the reference features are cached as the evaluation's are.
"""

from __future__ import annotations

import time

import torch

from ..errors import GenrepError

PERIODIC_METRICS = ("knn", "knn5_loss", "accuracy", "fid")
_NEEDS = {"accuracy": "logits", "fid": "sample"}


def check_periodic(cfg, method) -> None:
    """Refuse, before training starts, a metric the method cannot give, or an extractor that cannot load."""
    t = cfg.train
    if t.eval_every is None:
        return
    for name in t.eval_metrics:
        need = _NEEDS.get(name)
        if need is not None and need not in method.capabilities:
            caps = ", ".join(sorted(method.capabilities)) or "none"
            raise GenrepError(f"train.eval_metrics '{name}' needs the {need} capability, which {cfg.method} does "
                              f"not have (it offers: {caps}); choose from "
                              f"{', '.join(m for m in PERIODIC_METRICS if _NEEDS.get(m) in (None, *method.capabilities))}")
    if "fid" in t.eval_metrics and cfg.eval.generation.extractor == "inception":
        from .metrics.extractors import inception_weights_path

        inception_weights_path(cfg.eval.generation.inception_weights or None)


class PeriodicEval:
    def __init__(self, cfg, train_set, test_set, device: torch.device):
        self.cfg, self.device = cfg, device
        n = cfg.train.eval_n
        self.train_set, self.test_set = train_set, test_set
        self.train_idx = _subset(len(train_set), n, cfg.train.seed)
        self.test_idx = _subset(len(test_set), n, cfg.train.seed + 1)
        self._extractor = None
        self._bank = None

    def due(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return every is not None and step % every == 0

    @torch.no_grad()
    def __call__(self, method, step: int) -> dict:
        """The metrics of ``method`` (the EMA weights) after ``step`` steps, as a log row's entries."""
        from ..data.batches import mix_seed

        was_training = method.training
        method.eval()
        row, t0 = {}, time.perf_counter()
        self._bank = None  # knn and knn5_loss share one extraction per step
        try:
            for name in self.cfg.train.eval_metrics:
                torch.manual_seed(mix_seed(self.cfg.train.seed, step, 0xE7A1))
                row[f"eval_{name}"] = round(float(getattr(self, f"_{name}")(method, step)), 6)
        finally:
            method.train(was_training)
            self._bank = None
        row["eval_seconds"] = round(time.perf_counter() - t0, 2)
        return row

    def _features(self, method, images: torch.Tensor) -> torch.Tensor:
        from .features import extract_features

        return extract_features(method, images, batch_size=self.cfg.eval.batch_size, device=self.device,
                                bf16=self.device.type == "cuda")

    def _knn_accuracy(self, method, k: int) -> float:
        from .metrics.probes import knn_classify

        tr, te = self.train_set, self.test_set
        if self._bank is None:
            self._bank = (self._features(method, tr.images[self.train_idx]),
                          self._features(method, te.images[self.test_idx]))
        train_x, test_x = self._bank
        k = min(k, len(train_x))
        return knn_classify(train_x, tr.labels[self.train_idx], test_x, te.labels[self.test_idx], tr.num_classes,
                            k=[k])[k]

    def _knn(self, method, step: int) -> float:
        return self._knn_accuracy(method, self.cfg.probe.knn_k[0])

    def _knn5_loss(self, method, step: int) -> float:
        return 1.0 - self._knn_accuracy(method, 5)

    def _accuracy(self, method, step: int) -> float:
        from .features import image_batches

        images, labels = self.test_set.images[self.test_idx], self.test_set.labels[self.test_idx]
        correct = 0
        for i, x in enumerate(image_batches(images, self.cfg.eval.batch_size, self.device)):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                pred = method.logits(x).argmax(-1).cpu()
            start = i * self.cfg.eval.batch_size
            correct += int((pred == labels[start:start + len(pred)]).sum())
        return correct / len(labels)

    def _fid(self, method, step: int) -> float:
        from ..data.batches import mix_seed
        from ..data.datasets import default_data_root
        from .metrics.generation import generation_metrics

        n, bs = self.cfg.train.eval_samples, self.cfg.eval.batch_size
        g = torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, step, 0xF1D))
        fake = torch.cat([(method.sample(min(bs, n - i), generator=g) * 255).round().to(torch.uint8).cpu()
                          for i in range(0, n, bs)])
        scores = generation_metrics(fake, self.train_set.images, self._get_extractor(), batch_size=bs,
                                    device=self.device, reference_cache=default_data_root() / "fid-reference",
                                    kid_subsets=1, seed=self.cfg.train.seed, progress=False)
        return scores["fid"]

    def _get_extractor(self):
        if self._extractor is None:
            from ..data.datasets import default_data_root
            from .metrics.extractors import dataset_classifier_extractor, inception_extractor

            s = self.cfg.eval.generation
            if s.extractor == "inception":
                self._extractor = inception_extractor(s.inception_weights or None)
            else:
                with torch.enable_grad():  # the data set's CNN may be trained here, inside the evaluation's no_grad
                    self._extractor = dataset_classifier_extractor(
                        self.train_set, self.test_set, cache_dir=default_data_root() / "extractors",
                        seed=self.cfg.eval.seed, device=self.device)
        return self._extractor


def _subset(n: int, k: int | None, seed: int) -> torch.Tensor:
    """A fixed, seeded choice of ``k`` of ``n`` indices (all of them when ``k`` is None or at least ``n``)."""
    if k is None or k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
