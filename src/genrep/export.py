"""``genrep export``: a trained run's weights for use outside genrep.

``timm``: the ViT backbone as the state dict of timm's ``VisionTransformer`` (``timm.models.vision_transformer``),
with the constructor's keyword arguments in a JSON file beside it, so detection and segmentation libraries that take
a timm backbone can load it. timm is never imported here: the names are written from what genrep's ViT holds, and the
tests load the file into timm and compare features. A backbone is exported only where timm's plain ViT computes
exactly what genrep computes; anything else (RoPE, a second stream's inputs, a U-Net, colour tokens) is refused in one
line naming what timm lacks.

``safetensors``: any method, its whole trainable state dict as genrep saved it (plus the fitted state of
``prepared.safetensors`` under ``prepared.``), and a JSON of the architecture (the method, its resolved model section,
the data shape it was built for), so a reader can rebuild it with ``genrep.methods.build_method``.

Both files carry ``genrep-export-1`` (the safetensors header's metadata, the JSON's ``format``), which is how a later
export knows it may replace them; anything else at the output is refused unless ``--force``. The header also holds
the JSON's content (``export_json``), so the weights file describes itself on its own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import GenrepError

EXPORT_FORMAT = "genrep-export-1"
FORMATS = ("timm", "safetensors")
WEIGHTS = ("ema", "model")
EXPORT_DIR = "export"
TIMM_CLASS = "timm.models.vision_transformer.VisionTransformer"
PREPARED_PREFIX = "prepared."

# the parameters of one genrep ``nn.transformer.Block`` (and timm's ``Block``, which has the same names); a block
# holding anything else (a qk-norm, a layer scale, a modulation) is not timm's block
BLOCK_PARAMS = tuple(f"{part}.{kind}" for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                     for kind in ("weight", "bias"))

# what a method's network is, for the refusal of a method whose network is no ViT at all
NOT_A_VIT = {
    "adm": "the guided-diffusion U-Net (convolutions, resampling and skip connections), which is no ViT",
    "igpt": "a transformer over colour tokens (codes of a k-means palette, not image patches) behind a start token",
    "simclr": "a transformer over colour tokens (codes of a k-means palette, not image patches)",
    "gcrl": "a transformer over colour tokens (codes of a k-means palette, not image patches), dense or axial",
    "vq": "a convolutional VQ-VAE tokenizer, which is no ViT",
}


@dataclass(frozen=True)
class Backbone:
    """Where a method keeps its ViT backbone (state-dict prefixes) and how it is read."""
    patch_embed: str   # the patch embedding's Conv2d
    cls_token: str
    pos_embed: str     # the learned table's parameter (a sincos table is a buffer outside the state dict)
    blocks: str
    norm: str
    pool: str          # the genrep pooling timm's global_pool reproduces: cls or mean
    readout: str       # in words: which of genrep's read-outs the exported network computes


# ---------------------------------------------------------------- outputs


def default_output(run: Path, fmt: str, weights: str) -> Path:
    return Path(run) / EXPORT_DIR / f"{fmt}-{weights}.safetensors"


def json_beside(out: Path) -> Path:
    return Path(out).with_suffix(".json")


def is_export_file(path: Path) -> bool:
    """A file a genrep export wrote: the safetensors header's metadata, or the JSON's ``format``."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text()).get("format") == EXPORT_FORMAT
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100_000_000:
                return False
            header = json.loads(f.read(n))
        return header.get("__metadata__", {}).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_outputs(run: Path, out: Path, force: bool) -> None:
    """Refuse, before any work, an output that is not a .safetensors file, a place in the run other than its
    export folder (its weights must stay), and a file genrep's export did not write (unless ``force``)."""
    from .io import check_can_write, check_overwrite
    from .runs import check_no_links, is_inside

    if out.suffix != ".safetensors":
        raise GenrepError(f"-o {out} must name a .safetensors file (the JSON goes beside it as {out.stem}.json); "
                          f"choose a name ending in .safetensors")
    if is_inside(out, run):
        if not is_inside(out, Path(run) / EXPORT_DIR):
            raise GenrepError(f"-o {out} is inside the run {run}, where genrep export writes only under "
                              f"{Path(run) / EXPORT_DIR} (the run's own files stay as training wrote them); choose a "
                              f"path there or outside the run")
        check_no_links(run)
    for path in (out, json_beside(out)):
        check_can_write(path, "weights export")
        check_overwrite(path, is_export_file, "weights export", force)


# ---------------------------------------------------------------- the run


def read_weights(run: Path, weights: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """The run's weights file and the step its metadata names."""
    from safetensors import safe_open

    from .train.checkpoint import load_safetensors

    path = Path(run) / f"{weights}.safetensors"
    state = load_safetensors(path)
    with safe_open(str(path), "pt") as f:
        step = (f.metadata() or {}).get("step")
    return state, step


def meta_method(cfg, state: dict[str, torch.Tensor], source: Path):
    """The run's method built on the meta device (no memory, no data read for a registered set) with the weights
    assigned, so a file that does not fit the config is refused before anything is written."""
    from .methods import build_method
    from .runs import CONFIG_FILE, trained_data_spec

    spec, _ = trained_data_spec(cfg)
    with torch.device("meta"):
        method = build_method(cfg.method, cfg.model, spec)
    try:
        method.load_state_dict(dict(state), assign=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = "; ".join(lines[1:2] or lines[:1])[:200]
        raise GenrepError(f"{source} does not fit the {cfg.method} model in {source.parent / CONFIG_FILE} ({why}); "
                          f"export a run whose weights genrep trained with that config") from None
    return method.eval(), spec


def read_prepared(run: Path, method) -> dict[str, torch.Tensor]:
    """The run's fitted state, checked to be this method's (runs' own reader), or none when the run has no file."""
    from .runs import PREPARED_FILE, read_prepared_file

    return read_prepared_file(run, method)[0] if (Path(run) / PREPARED_FILE).is_file() else {}


def read_frozen(run: Path) -> dict:
    from .runs import FROZEN_FILE

    path = Path(run) / FROZEN_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- timm


def refuse(cfg, missing: str, instead: str = "") -> GenrepError:
    """The one-line refusal: what timm's VisionTransformer lacks, and what works instead."""
    other = f"{instead}, or " if instead else ""
    return GenrepError(f"the {cfg.method} run cannot be exported as timm's VisionTransformer: {missing}; "
                       f"{other}export it with --format safetensors (the weights and a JSON of the architecture)")


def positions_refusal(cfg) -> GenrepError | None:
    """RoPE rotates queries and keys inside attention, which timm's plain ViT does not."""
    pos = cfg.model.pos_embed
    if pos.startswith("rope"):
        kind = "2D RoPE (rotary positions by patch row and column)" if pos == "rope2d" else \
            "1D RoPE (rotary positions over the sequence)"
        return refuse(cfg, f"it has no {kind}, which model.pos_embed {pos} puts in every attention",
                      f"a {cfg.method} run trained with model.pos_embed learned, sincos or none exports")
    return None


def supervised_backbone(cfg) -> Backbone:
    causal = " (timm's plain forward; this run was trained causal: forward_features(x, is_causal=True) gives its " \
             "masked read-out)" if cfg.model.causal else ""
    pool = "mean" if cfg.model.causal else "cls"
    return Backbone("encoder.patch_embed.proj", "encoder.cls_token", "encoder.pos_embed.pos", "encoder.blocks",
                    "encoder.norm", pool, f"the encoder without a causal mask{causal}, pooled {pool}")


def genvit_backbone(cfg) -> Backbone:
    pool = "cls" if cfg.method == "hybvit" else "mean"
    readout = ("the untimed pass (the network without a time input): HybViT's classification pass, its clean "
               "read-out" if cfg.method == "hybvit" else
               "the untimed pass (the network without a time input, HybViT's classification pass); genvit's own "
               "read-out is timed at step 0, which adds the time modulation timm's blocks lack")
    return Backbone("net.patch_embed.proj", "net.cls_token", "net.pos_embed.pos", "net.blocks", "net.norm", pool,
                    f"{readout}, pooled {pool}")


def gvp_backbone(cfg) -> Backbone:
    m = cfg.model
    if m.target == "d2d":
        raise refuse(cfg, "its content stream embeds a tokenizer's codes (model.target d2d), not image patches, and "
                          "timm's ViT takes pixels", "a gvp run with model.target p2p or p2d exports")
    if m.condition:
        raise refuse(cfg, "its content stream reads a second condition token, another run's projected features "
                          "(model.condition), which timm's ViT has no input for",
                     "a gvp run without model.condition exports")
    pool = m.feature_pool
    return Backbone("patch_embed.proj", "cls_token", "pos_embed.pos", "net.blocks", "net.norm", pool,
                    f"the content stream without its mask (fine-tuning's read-out; the probes' group mask and the "
                    f"query stream, which only predicts, are left out), pooled {pool}")


def darl_backbone(cfg) -> Backbone:
    return Backbone("encoder.patch_embed.proj", "encoder.cls_token", "encoder.pos_embed.pos", "encoder.blocks",
                    "encoder.norm", "mean",
                    "the sequence without the causal mask (the paper's fine-tuning reads it so; the start token is "
                    "timm's class token, the patches in raster order, which without the mask equals any fixed "
                    "order's mean), pooled mean; the patch decoder and any query stream are left out")


BACKBONES = {"supervised": supervised_backbone, "genvit": genvit_backbone, "hybvit": genvit_backbone,
             "gvp": gvp_backbone, "darl": darl_backbone}


def timm_backbone(cfg) -> Backbone:
    """The method's backbone where timm can hold it; a one-line refusal naming what timm lacks otherwise."""
    if cfg.method in NOT_A_VIT:
        raise refuse(cfg, f"its network is {NOT_A_VIT[cfg.method]}")
    if cfg.method not in BACKBONES:
        raise refuse(cfg, f"genrep knows no timm mapping of the {cfg.method} network (it maps the ViTs of "
                          f"{', '.join(BACKBONES)})")
    refusal = positions_refusal(cfg) if hasattr(cfg.model, "pos_embed") else None
    if refusal is not None:
        raise refusal
    return BACKBONES[cfg.method](cfg)


def timm_kwargs(cfg, spec, pos_kind: str, pool: str) -> dict:
    """``VisionTransformer(**kwargs)`` of genrep's ViT: positions added to the patches before the class token is put
    in front (no_embed_class), the final norm before pooling (fc_norm False), GELU's tanh form (genrep's MLP), no
    classifier (num_classes 0: the backbone). LayerNorm's eps is 1e-6 in both."""
    m = cfg.model
    return {"img_size": spec.image_size, "patch_size": m.patch_size, "in_chans": spec.channels, "num_classes": 0,
            "global_pool": "token" if pool == "cls" else "avg", "embed_dim": m.dim, "depth": m.depth,
            "num_heads": m.num_heads, "mlp_ratio": m.mlp_ratio, "qkv_bias": True, "class_token": True,
            "pos_embed": "none" if pos_kind == "none" else "learn", "no_embed_class": True, "fc_norm": False,
            "act_layer": "gelu_tanh"}


def position_table(cfg, spec, state: dict[str, torch.Tensor], b: Backbone) -> torch.Tensor | None:
    """The table added to the patches: learned (in the weights), sincos (genrep's fixed buffer, recomputed; timm
    holds it as a learned table of the same values), or none."""
    from .nn.embeddings import sincos_2d

    kind = "none" if cfg.model.pos_embed not in ("learned", "sincos") else cfg.model.pos_embed
    if kind == "learned":
        return state[b.pos_embed]
    if kind == "sincos":
        return sincos_2d(cfg.model.dim, spec.image_size // cfg.model.patch_size)[None]
    return None


def timm_state(state: dict[str, torch.Tensor], b: Backbone, pos: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """genrep's backbone tensors under timm's names; a backbone tensor timm has no place for is refused."""
    out = {"patch_embed.proj.weight": state[f"{b.patch_embed}.weight"],
           "patch_embed.proj.bias": state[f"{b.patch_embed}.bias"],
           "cls_token": state[b.cls_token],
           "norm.weight": state[f"{b.norm}.weight"], "norm.bias": state[f"{b.norm}.bias"]}
    if pos is not None:
        out["pos_embed"] = pos
    block = re.compile(re.escape(b.blocks) + r"\.(\d+)\.(.+)")
    for key, value in state.items():
        found = block.fullmatch(key)
        if found is None:
            continue
        if found.group(2) not in BLOCK_PARAMS:
            raise GenrepError(f"{key} is a part of the backbone's blocks that timm's Block lacks; export the run "
                              f"with --format safetensors (the weights and a JSON of the architecture)")
        out[f"blocks.{found.group(1)}.{found.group(2)}"] = value
    return out


def timm_export(cfg, spec, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    b = timm_backbone(cfg)
    pos = position_table(cfg, spec, state, b)
    kwargs = timm_kwargs(cfg, spec, "none" if pos is None else "table", b.pool)
    tensors = timm_state(state, b, pos)
    expected = 2 + 1 + 2 + (pos is not None) + cfg.model.depth * len(BLOCK_PARAMS)
    if len(tensors) != expected:
        raise GenrepError(f"the {cfg.method} backbone has {len(tensors)} tensors where timm's VisionTransformer of "
                          f"depth {cfg.model.depth} has {expected}; export the run with --format safetensors")
    doc = {"timm": {"class": TIMM_CLASS, "kwargs": kwargs,
                    "load": "model = VisionTransformer(**kwargs) (or timm.create_model(any vit_* name, "
                            "pretrained=False, **kwargs): the kwargs set every size); model.load_state_dict("
                            "safetensors.torch.load_file(FILE)); model(x) is the pooled feature, "
                            "model.forward_features(x) every token"},
           "readout": {"matches": b.readout, "layer": cfg.model.depth, "pool": b.pool, "causal": False,
                       "tokens": "forward_features(x): [B, 1 + patches, dim], the class token, then the patches in "
                                 "raster order, after the final norm"}}
    return tensors, doc


# ---------------------------------------------------------------- safetensors


def safetensors_export(cfg, spec, state: dict[str, torch.Tensor], run: Path,
                       method) -> tuple[dict[str, torch.Tensor], dict]:
    prepared = read_prepared(run, method)
    tensors = {**state, **{PREPARED_PREFIX + k: v for k, v in prepared.items()}}
    doc = {"architecture": {"method": cfg.method, "model": cfg.to_dict()["model"],
                            "data": {"name": cfg.data.name, "image_size": spec.image_size,
                                     "channels": spec.channels, "num_classes": spec.num_classes}},
           "build": "genrep.methods.build_method(method, get_method(method).config_class(**model), "
                    "DataSpec(image_size, channels, num_classes)).load_state_dict(the tensors not named prepared.*)",
           "fitted_state": {"keys": sorted(PREPARED_PREFIX + k for k in prepared),
                            "install": "method.load_prepared({name: tensor}) with the prefix prepared. removed"}
           if prepared else None,
           "frozen_parts": read_frozen(run) or None}
    return tensors, doc


# ---------------------------------------------------------------- the command


def check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise GenrepError(f"{what} {value!r} is unknown; choose {' or '.join(choices)}")


def export_run(run, out: Path | None = None, fmt: str = "timm", weights: str = "ema", *,
               force: bool = False) -> dict:
    """Write the ``weights`` (ema or model) of ``run`` (a :class:`~genrep.run.Run`, or a folder opened here) in
    ``fmt`` (timm or safetensors) to ``out`` (default RUN/export/FMT-WEIGHTS.safetensors) and its JSON beside it;
    returns the JSON's content with both paths."""
    from importlib.metadata import PackageNotFoundError, version

    from .io import atomic_save_safetensors, atomic_write_json
    from .run import Run

    check_choice(fmt, FORMATS, "--format")
    check_choice(weights, WEIGHTS, "--weights")
    opened = Run.of(run)
    run, cfg = opened.path, opened.config
    out = Path(out) if out is not None else default_output(run, fmt, weights)
    check_outputs(run, out, force)
    state, step = read_weights(run, weights)
    method, spec = meta_method(cfg, state, run / f"{weights}.safetensors")
    tensors, doc = (timm_export(cfg, spec, state) if fmt == "timm"
                    else safetensors_export(cfg, spec, state, run, method))
    try:
        genrep_version = version("genrep")
    except PackageNotFoundError:
        genrep_version = None
    doc = {"format": EXPORT_FORMAT, "export": fmt, "weights_file": out.name, **doc,
           "input": {"image_size": spec.image_size, "channels": spec.channels, "mean": [0.5] * spec.channels,
                     "std": [0.5] * spec.channels, "range": "images in [0, 1], normalised as (x - mean) / std "
                                                            "(genrep's [-1, 1])"},
           "genrep": {"method": cfg.method, "recipe": cfg.recipe, "run": str(run.resolve()), "weights": weights,
                      "step": int(step) if step is not None and step.isdigit() else None,
                      "version": genrep_version}}
    # the JSON in the header too: the weights file describes itself even if the JSON beside it is lost or stale
    meta = {"format": EXPORT_FORMAT, "export": fmt, "method": cfg.method, "weights": weights,
            "export_json": json.dumps(doc, sort_keys=True)}
    atomic_save_safetensors(out, tensors, meta, what="export")
    atomic_write_json(json_beside(out), doc, what="export")
    return {**doc, "path": str(out), "json": str(json_beside(out)), "tensors": len(tensors)}
