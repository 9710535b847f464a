"""The interface every method implements; the loop and the evaluation see nothing else.

A method is an ``nn.Module`` with
- ``views()`` and ``loss(batch) -> dict``: ``"loss"`` is minimised, other entries are named terms for the
  logs. The batch holds one float [B, C, H, W] tensor in [0, 1] per view the method asked for, ``"label"``
  when ``needs_labels``, and one tensor per entry of ``random_inputs()``. A view listed in ``view_streams``
  is made from an independent mini-batch of its own (HybViT's diffusion stream); labels belong to stream 0.
- ``features(x, layer=None, pool=None) -> [B, D]``: the frozen representation the paper evaluates; a method
  with ``feature_maps`` also gives its layers' maps (pool "map": [B, C, h, w]) and their p x p average pools.
- optional capabilities, listed in ``capabilities`` so evaluation can tell what applies, each one typed
  call (``CAPABILITY_API``) whose method-specific options (sampler, steps, temperature, terms, ...) are keys
  of the method's own config, named in ``capability_options`` and reported by ``capability_settings``:
  ``logits(x)``, ``sample(n)``, ``complete(x, keep)``, ``nll(x)`` (bits/dim), ``score``
  (``grad_log_density(x)``: d log p(x) / dx).
- optional data-fitted state (``prepare``), frozen parts (``freeze``) and a causal mask that read-outs may
  switch (``causal_readout``, ``causal_mask``).
- optional state updated outside the gradient (an EMA codebook): ``loss`` returns per-micro-batch sums of
  its statistics under the names in ``state_stats`` and never writes a buffer itself; the loop sums them over
  the accumulation micro-batches and the processes and hands them to ``apply_state_stats`` after the
  optimizer step, so the update is the same under any split of the batch and compiles with the loss.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..data.augment import Augmentation
from ..errors import GenrepError
from ..fields import inert_fields, setting
from ..nn.pooling import MAP_POOL, is_map_pool, pool_feature_map  # noqa: F401 - the contract's poolings

CAPABILITIES = ("logits", "sample", "complete", "nll", "score")
# the function each capability promises (signatures on Method below)
CAPABILITY_API = {"logits": "logits", "sample": "sample", "complete": "complete", "nll": "nll",
                  "score": "grad_log_density"}


@dataclass(frozen=True)
class DataSpec:
    """What a method must know about its data to build itself."""
    image_size: int
    channels: int
    num_classes: int


@dataclass
class ViTConfig:
    """The backbone keys every ViT-based method shares (defaults: the HybViT paper's CIFAR ViT)."""
    dim: int = setting(384, min=1, max=65536)
    depth: int = setting(9, min=1, max=1024)
    num_heads: int = setting(12, min=1)
    mlp_ratio: float = setting(2.0, above=0, max=64)
    patch_size: int = setting(4, min=1)  # 4 on 32x32, 8 on larger images (the HybViT paper)
    pos_embed: str = setting("learned", choices=("learned", "sincos"))
    drop: float = setting(0.0, min=0, below=1)
    # stochastic depth, the same rate in every block (nn.vit.drop_path_rates); the paper's code trains its
    # supervised ViT with 0.1 (gevit_main.py --sd) and HybViT's network with 0
    drop_path: float = setting(0.0, min=0, below=1)

    def validate(self, section: str) -> None:
        check_heads(self.dim, self.num_heads, section)


def check_heads(dim: int, num_heads: int, section: str) -> None:
    """A transformer config's width must split into its heads (every method's model section)."""
    if dim % num_heads:
        raise GenrepError(f"{section}.dim {dim} is not divisible by {section}.num_heads {num_heads}")


# the ViT keys of a model small enough for the registry-wide tests (a couple of CPU seconds)
TINY_VIT = {"dim": 32, "depth": 2, "num_heads": 2}


def check_vit_shape(cfg: ViTConfig, data: DataSpec) -> None:
    """What a ViT-based method's config must satisfy on its data: patches tile the image (the config's own
    ranges were checked when it was built)."""
    if data.image_size % cfg.patch_size:
        raise GenrepError(f"model.patch_size {cfg.patch_size} does not divide the image size "
                          f"{data.image_size}; choose a divisor of {data.image_size}")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FrozenPart:
    """A module whose weights come from a file outside the run: referenced by path and sha256, never copied."""
    path: str
    sha256: str


class Method(nn.Module):
    name: ClassVar[str]
    config_class: ClassVar[type]
    capabilities: ClassVar[frozenset[str]] = frozenset()
    needs_labels: ClassVar[bool] = False
    feature_pools: ClassVar[tuple[str, ...]] = ("mean",)
    view_streams: ClassVar[dict[str, int]] = {}  # view -> independent mini-batch it comes from (default 0)
    # model config keys that change how features are read, not the weights (GenViT's feature_t)
    feature_options: ClassVar[tuple[str, ...]] = ()
    # capability -> the model config keys that set its options (GenViT: sample -> sampler, sample_steps, eta)
    capability_options: ClassVar[dict[str, tuple[str, ...]]] = {}
    # model keys a trained run may be read with changed (`genrep probe/evaluate/sample RUN --model.KEY V`):
    # the two above, unless a method says otherwise (set by __init_subclass__)
    read_options: ClassVar[tuple[str, ...]] = ()
    # a method trained with a causal attention mask; read-outs may switch it with ``causal_mask``
    causal_readout: ClassVar[bool] = False
    # what ``grad_log_density`` differentiates by: the pixels, or (models of quantized inputs, which have no pixel
    # gradient: iGPT, GCRL) their input embeddings, [B, ...] of the method's own shape
    score_wrt: ClassVar[str] = "pixels"
    # the loss couples the samples of a batch (NT-Xent's negatives): gradient accumulation is refused, and under
    # torchrun the method gathers across processes itself
    batch_coupled: ClassVar[bool] = False
    # model config overrides that make the registry-wide tests' tiny model (any data set, 8x8 images)
    tiny_config: ClassVar[dict] = {}
    # entries of the loss dict that are sums over the micro-batch's samples of statistics for state updated
    # outside the gradient (an EMA codebook's counts and sums): not logged; summed over micro-batches and
    # processes and given to ``apply_state_stats`` after the optimizer step
    state_stats: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "read_options" not in cls.__dict__:
            keys = list(cls.feature_options) + [k for keys in cls.capability_options.values() for k in keys]
            cls.read_options = tuple(dict.fromkeys(keys))

    def __init__(self, cfg, data: DataSpec):
        super().__init__()
        self.cfg = cfg
        self.data = data
        self.causal_mask: bool = self.causal_readout  # what the attention reads at forward time
        self._frozen: dict[str, FrozenPart] = {}
        # what the run's prepared.safetensors says of the installed fitted state (where it came from: fitted here,
        # or inherited from another run by --init); set by whoever installs it, {} until then
        self.prepared_meta: dict[str, str] = {}

    # ---- what the data pipeline must deliver
    def views(self) -> dict[str, str | Augmentation]:
        """View name -> augmentation kind (none | weak | strong | classifier), or an ``Augmentation`` where
        the kind takes options from the method's config (the classifier kind's policy and erasing)."""
        raise NotImplementedError

    @property
    def num_streams(self) -> int:
        return max(self.view_streams.values(), default=0) + 1

    @property
    def passes_per_image(self) -> int:
        """Forward passes a training image of the batch costs (one per view); throughput counts these."""
        return len(self.views())

    def random_inputs(self) -> dict[str, tuple[str, object]]:
        """Per-sample randomness the loop draws with the batch: name -> (kind, arg), a kind of
        ``data.random_inputs.RANDOM_KINDS`` (normal, steps, uniform, beta, permutation, boundaries, ...).
        It arrives in ``batch[name]``, drawn for the global batch, so a run does not depend on how the batch
        is split across processes or accumulation steps, and the compiled objective holds no random op."""
        return {}

    # ---- data-fitted state
    def prepare(self, images: torch.Tensor, *, device: torch.device, generator: torch.Generator
                ) -> dict[str, torch.Tensor]:
        """State fitted on the uint8 training images [N, C, H, W] (CPU) before step 0: a k-means palette,
        normalisation statistics. Called once, on rank 0; the result is broadcast, installed with
        ``load_prepared``, saved in the run folder and restored from there whenever the run is loaded —
        never refitted. ``{}``: the method has none."""
        return {}

    def load_prepared(self, state: dict[str, torch.Tensor]) -> None:
        """Install fitted state; by default each tensor becomes a non-persistent buffer of its name (so it
        follows the module to its device but stays out of checkpoints, which reference the run's copy)."""
        for key, value in state.items():
            self.register_buffer(key, value, persistent=False)

    def prepared_origin(self) -> str:
        """What the state ``prepare`` fits came from, in words (recorded with it as ``origin``, and carried into
        a run that continues this one): e.g. the file it was read from, or what it was fitted on."""
        return "fitted on the training set"

    @property
    def has_prepare(self) -> bool:
        return type(self).prepare is not Method.prepare

    # ---- frozen parts
    def freeze(self, name: str, module: nn.Module, source: str | Path) -> nn.Module:
        """Hold ``module`` (its weights already read from ``source``) as the frozen submodule ``name``: no
        gradients, and out of the optimizer, the EMA, checkpoints and the trainable parameter count. The run
        records ``source``'s path and sha256 and refuses to load if the file changed. While the holder is sized on
        the meta device (``runs.check_model_fits``) the file is not read: its sha256 is left empty."""
        source = Path(source)
        module.requires_grad_(False).eval()
        setattr(self, name, module)
        sizing = torch.get_default_device().type == "meta"
        self._frozen[name] = FrozenPart(path=str(source.resolve()), sha256="" if sizing else file_sha256(source))
        return module

    @property
    def frozen_parts(self) -> dict[str, FrozenPart]:
        return dict(self._frozen)

    def _is_frozen_key(self, key: str, prefix: str = "") -> bool:
        return any(key.startswith(f"{prefix}{name}.") for name in self._frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self._frozen:  # frozen parts stay in eval mode (no dropout, no batch-norm updates)
            getattr(self, name).eval()
        return self

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The trainable state only: frozen parts are referenced by the run, not copied into checkpoints."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if self._is_frozen_key(k, prefix)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not self._is_frozen_key(k)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys "
                               f"{missing[:5]}, unexpected keys {result.unexpected_keys[:5]}")
        return result

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": sum(p.numel() for p in self.trainable_parameters()), "total": total}

    # ---- training
    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # the loop calls the module itself so that DDP and torch.compile wrap the whole objective
        return self.loss(batch)

    def apply_state_stats(self, stats: dict[str, torch.Tensor]) -> None:
        """Update the state kept outside the gradient from ``stats`` (each entry of ``state_stats``, summed over
        the step's micro-batches and processes). The loop calls it under ``torch.no_grad()`` after
        ``optimizer.step()`` and before the weights' EMA, which then copies the updated floating buffers."""
        raise NotImplementedError(f"{self.name} names state_stats {self.state_stats} but does not apply them")

    # ---- representation
    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    default_layer: int | None = None
    default_pool: str = "mean"

    def features(self, x: torch.Tensor, layer: int | None = None, pool: str | None = None) -> torch.Tensor:
        raise NotImplementedError

    def check_feature_args(self, layer: int | None, pool: str | None) -> tuple[int, str]:
        layer = (self.default_layer or self.num_layers) if layer is None else layer
        pool = self.default_pool if pool is None or pool == "" else str(pool)
        if not 1 <= layer <= self.num_layers:
            raise GenrepError(f"layer {layer} does not exist in {self.name}; choose 1..{self.num_layers}")
        if self.feature_maps and is_map_pool(pool):
            size = self.feature_map_size(layer)
            if pool.isdigit() and not 1 <= int(pool) <= size:
                raise GenrepError(f"pool {pool} is larger than the {size}x{size} map of layer {layer} in {self.name}; "
                                  f"choose 1..{size}, '{MAP_POOL}' for the whole map or '{MAP_POOL}s' for it pooled "
                                  f"to at most s x s")
            return layer, pool
        if pool not in self.feature_pools:
            maps = (f", a size p (p x p average pool of the map), '{MAP_POOL}' or '{MAP_POOL}s' (the map pooled to at "
                    f"most s x s)" if self.feature_maps else "")
            raise GenrepError(f"pooling '{pool}' is not offered by {self.name}; "
                              f"choose one of {', '.join(self.feature_pools)}{maps}")
        return layer, pool

    # methods whose layers are spatial maps [B, C, h, w] (a U-Net's blocks, a ViT's patch grid) also read them
    # with pool "map" (the CNN head), "maps" (the map pooled to at most s x s: the attention head's map8) or "p"
    # (adaptive average pool to p x p, flattened)
    feature_maps: ClassVar[bool] = False

    def feature_map_size(self, layer: int) -> int:
        """The side of layer ``layer``'s square map (methods with ``feature_maps``)."""
        raise NotImplementedError

    def feature_sets(self, x: torch.Tensor, reads: list[tuple[int, str]]) -> list[torch.Tensor]:
        """Features of ``x`` at several (layer, pool) read-outs; a method whose layers come from one pass
        overrides it so a sweep pays one forward per batch, not one per read-out."""
        return [self.features(x, layer=layer, pool=pool) for layer, pool in reads]

    def feature_tag(self) -> str:
        """The feature options' values as a cache-key fragment ("-feature_tNone")."""
        return "".join(f"-{k}{getattr(self.cfg, k)}" for k in self.feature_options)

    @classmethod
    def size_options(cls, cfg, trained: int, size: int) -> dict | None:
        """The read options under which weights trained on ``trained`` x ``trained`` images read ``size`` x
        ``size`` ones (``genrep probe RUN --data.image_size``), e.g. DARL's RoPE position interpolation; a
        GenrepError says why this configuration cannot. None (the default): the model is sized by its data
        (a learned embedding per trained patch), so it reads only the size it was trained on."""
        return None

    @classmethod
    def inert_keys(cls, cfg) -> dict[str, str]:
        """The model keys that change nothing under ``cfg`` (DARL's Beta keys with the MSE decoder): key -> why,
        in words. By default the keys whose ``setting(only_if=...)`` does not hold; a method whose rule is not a
        value of another key extends it. `genrep grid` refuses an axis that no cell reads."""
        return inert_fields(cfg, "model")

    def readout_refusal(self, causal: bool) -> str | None:
        """Why the features cannot be read with the causal mask switched to ``causal`` (None: they can); the
        probes' and fine-tuning's preflight asks before any work."""
        return None

    # ---- capabilities: inputs and outputs are images in [0, 1]; options come from the method's config
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> class logits [B, num_classes] (the ``logits`` capability)."""
        raise NotImplementedError

    def sample(self, n: int, *, generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """``n`` new images [n, C, H, W] in [0, 1] on the model's device (the ``sample`` capability)."""
        raise NotImplementedError

    def complete(self, x: torch.Tensor, keep: torch.Tensor, *, generator: torch.Generator | None = None,
                 progress: bool = False) -> torch.Tensor:
        """Fill in the pixels of ``x`` [B, C, H, W] where the bool ``keep`` [B, 1, H, W] is False, conditioned
        on those where it is True; the kept pixels come back unchanged (the ``complete`` capability)."""
        raise NotImplementedError

    def nll(self, x: torch.Tensor, *, generator: torch.Generator | None = None, progress: bool = False
            ) -> torch.Tensor:
        """-log p(x) (or a bound on it) in bits/dim, [B], for 8-bit images in [0, 1] (the ``nll`` capability)."""
        raise NotImplementedError

    def grad_log_density(self, x: torch.Tensor) -> torch.Tensor:
        """d log p(x) / dx for images in [0, 1] (the ``score`` capability). Models with an explicit
        log-likelihood get it by autograd; diffusion models read it off their denoiser. A model of quantized
        inputs returns the gradient with respect to its input embeddings instead (``score_wrt``), [B, ...]."""
        raise NotImplementedError

    def capability_settings(self, capability: str) -> dict:
        """The options ``capability`` runs with, JSON-ready, for the results (the config's values by default;
        a method reports the effective ones where it adjusts them)."""
        return {k: getattr(self.cfg, k) for k in self.capability_options.get(capability, ())}

    # ---- optimisation hints
    def no_weight_decay(self) -> set[str]:
        """Names of parameters kept out of weight decay besides norms and biases (embeddings, tokens)."""
        return set()

    def flops_per_image(self) -> int:
        """Forward model-FLOPs for one training image (all the views one image contributes): analytic where
        a method has the formula, else counted once by ``torch.utils.flop_counter`` on a one-image batch."""
        if getattr(self, "_counted_flops", None) is None:
            self._counted_flops = count_flops_per_image(self)
        return self._counted_flops

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> [-1, 1], inside the model so wrapped models (PGD, OOD) take raw pixels."""
        return x * 2.0 - 1.0


def example_batch(method: Method, n: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of ``n`` random images per view, labels and random inputs, as the loop would deliver it."""
    from ..data.batches import draw_random_inputs

    d = method.data
    device = next(iter(method.parameters()), torch.empty(0)).device
    g = torch.Generator().manual_seed(seed)
    # views of one stream are views of the same images (here unaugmented), as the loop makes them
    base = [torch.rand(n, d.channels, d.image_size, d.image_size, generator=g).to(device)
            for _ in range(method.num_streams)]
    batch = {v: base[method.view_streams.get(v, 0)].clone() for v in method.views()}
    batch.update(draw_random_inputs(method.random_inputs(), batch, seed, 0, 0, n))
    if method.needs_labels:
        batch["label"] = torch.randint(0, d.num_classes, (n,), generator=g).to(device)
    return batch


def count_flops_per_image(method: Method) -> int:
    """Matmul FLOPs of the training forward on one image, counted with attention on the math path (the
    counter does not see fused attention kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    was_training = method.training
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            method.eval()(example_batch(method))
    finally:
        method.train(was_training)
    return int(counter.get_total_flops())
