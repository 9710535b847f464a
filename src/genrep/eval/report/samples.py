"""`genrep sample RUN`: draw images from a generative run, write PNG grids, rank them by energy; the grid
helpers serve the generation protocol's figure too.

The energy ranking is the HybViT paper's appendix C.1 (after JEM): each sample is assigned the class
its classifier head prefers, and within a class samples are ordered by E(x) = logsumexp(logits),
the classifier's unnormalised log-density; a row shows a class's best and worst samples.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import torch

from ...devices import resolve_device
from ...errors import GenrepError
from ...io import atomic_write_bytes, atomic_write_json, check_can_write, check_overwrite

GAP = 2  # pixels between grid cells
# Written into every grid PNG and sample JSON, so that a later call recognises its own files and may replace them
PNG_MARK = ("genrep", "samples")
SAMPLES_FORMAT = "genrep-samples-1"


def grid(images: torch.Tensor, nrow: int, pad_value: float = 1.0) -> torch.Tensor:
    """[N, C, H, W] in [0, 1] -> one [3, H', W'] image, ``nrow`` cells per row, row-major."""
    n, c, h, w = images.shape
    if c == 1:
        images = images.expand(-1, 3, -1, -1)
    rows = math.ceil(n / nrow)
    out = torch.full((3, rows * (h + GAP) + GAP, nrow * (w + GAP) + GAP), pad_value)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        out[:, GAP + r * (h + GAP):GAP + r * (h + GAP) + h, GAP + col * (w + GAP):GAP + col * (w + GAP) + w] = img
    return out


def save_png(image: torch.Tensor, path: Path, scale: int = 1, mark: bool = False) -> Path:
    """[3, H, W] in [0, 1] -> PNG written atomically; ``scale`` enlarges small images (nearest neighbour);
    ``mark`` tags it as genrep sample's own output (``PNG_MARK``), which a later call may replace."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    from PIL.PngImagePlugin import PngInfo

    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    info = PngInfo()
    if mark:
        info.add_text(*PNG_MARK)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def is_sample_png(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.text.get(PNG_MARK[0]) == PNG_MARK[1]
    except (OSError, ValueError, SyntaxError):
        return False


def is_sample_json(path: Path) -> bool:
    import json

    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("format") == SAMPLES_FORMAT


def sample_outputs(out: Path, rank_energy: bool) -> dict[str, Path]:
    """Every file a sampling call writes for ``out``: the grid, its settings beside it, the energy grid."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise GenrepError(f"-o names the PNG grid and must end in .png (the settings go beside it as the same name "
                          f"with .json), got {out}")
    files = {"grid": out, "settings": out.with_suffix(".json")}
    if rank_energy:
        files["ranked_grid"] = out.with_name(out.stem + "-by-energy.png")
    return files


def display_scale(size: int) -> int:
    """Enlarge tiny images (digits are 16x16) so a grid is readable."""
    return max(1, 64 // size)


@torch.no_grad()
def rank_by_energy(method, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class [N], energy logsumexp(logits) [N]) of images in [0, 1]."""
    preds, energies = [], []
    for i in range(0, len(images), batch_size):
        logits = method.logits(images[i:i + batch_size]).float()
        preds.append(logits.argmax(-1))
        energies.append(torch.logsumexp(logits, dim=-1))
    return torch.cat(preds), torch.cat(energies)


def class_rows(images: torch.Tensor, preds: torch.Tensor, energy: torch.Tensor, num_classes: int,
               per_class: int) -> torch.Tensor:
    """A [classes * (2k+1)] cell list: per class k best, a blank cell, k worst (grey where a class has fewer)."""
    c, h, w = images.shape[1:]
    blank = torch.full((c, h, w), 0.5, device=images.device)
    gap = torch.ones((c, h, w), device=images.device)
    cells = []
    for y in range(num_classes):
        idx = (preds == y).nonzero().flatten()
        order = idx[energy[idx].argsort(descending=True)]
        best, worst = order[:per_class], order.flip(0)[:per_class].flip(0)
        cells += [images[i] for i in best] + [blank] * (per_class - len(best)) + [gap]
        cells += [blank] * (per_class - len(worst)) + [images[i] for i in worst]
    return torch.stack(cells)


# the sampling flags of `genrep sample` and the model options they set
SAMPLE_FLAGS = {"sampler": "sampler", "steps": "sample_steps", "eta": "eta", "temperature": "temperature"}


def run_sampling(run, *, n: int = 64, sampler: str | None = None, steps: int | None = None,
                 eta: float | None = None, temperature: float | None = None, seed: int = 0, weights: str = "ema",
                 device: str = "auto", rank_energy: bool = False, per_class: int = 8, out: Path | None = None,
                 progress: bool = True, force: bool = False) -> dict:
    """Draw ``n`` samples from ``run`` (a :class:`~genrep.run.Run`, or a folder opened here); ``sampler``, ``steps`` and ``eta`` (a diffusion model's) or ``temperature``
    (a token model's) override the method's own options (``model.sampler``, ``model.sample_steps``,
    ``model.eta``, ``model.temperature``) for this call, None keeps the run's. Files already at the outputs are
    replaced only if an earlier sampling call wrote them, or with ``force``."""
    from ...methods import get_method
    from ...run import Run

    if n < 1:
        raise GenrepError(f"-n must be at least 1, got {n}")
    if not 0 <= seed < 2 ** 63:
        raise GenrepError(f"--seed must be an integer from 0 to 2**63-1, got {seed}")
    if per_class < 1:
        raise GenrepError(f"--per-class must be at least 1, got {per_class}")
    if out is not None:
        sample_outputs(out, rank_energy)  # a bad -o is refused before the model is loaded
    opened = Run.of(run)   # the folder checked (no link to write through) and its config read once
    run = opened.path
    name = opened.config.method
    caps = get_method(name).capabilities
    if "sample" not in caps:
        raise GenrepError(f"{run} holds a {name} model, which cannot sample; sample from a generative run "
                          f"(genvit, hybvit)")
    if rank_energy and "logits" not in caps:
        raise GenrepError(f"--rank-energy needs a classifier head and {name} has none; use a hybvit run")
    given = {"sampler": sampler, "steps": steps, "eta": eta, "temperature": temperature}
    own = get_method(name).capability_options.get("sample", ())
    foreign = [f"--{flag}" for flag, v in given.items() if v is not None and SAMPLE_FLAGS[flag] not in own]
    if foreign:
        offered = ", ".join(f"--{f}" for f, key in SAMPLE_FLAGS.items() if key in own) or "none"
        raise GenrepError(f"{' and '.join(foreign)} do not apply to {name} runs; their sampling flags: {offered}")
    options = {SAMPLE_FLAGS[flag]: v for flag, v in given.items() if v is not None}
    dev = resolve_device(device)
    cfg, method, train_set, _ = opened.load(weights, dev, options)
    cs = method.capability_settings("sample")
    if steps is not None and cs.get("steps") != steps:  # the method caps a config's steps; a flag is explicit
        if cs.get("sampler") == "ddpm":
            raise GenrepError(f"DDPM runs all T = {cs['steps']} steps, got --steps {steps}; use --sampler ddim "
                              f"for fewer steps")
        raise GenrepError(f"asked for {steps} steps but the model was trained with T = {cs['steps']} diffusion "
                          f"steps; choose --steps 1..{cs['steps']}")
    sampler, steps, eta = cs.get("sampler"), cs.get("steps"), cs.get("eta", 0.0)
    tag = f"{sampler}-{steps}steps" if sampler else "-".join(f"{k}{cs[k]}" for k in own if k in cs) or "samples"
    out = Path(out) if out else run / "samples" / f"{tag}-n{n}-seed{seed}.png"
    files = sample_outputs(out, rank_energy)
    for key, path in files.items():  # all before sampling, which is the slow part
        check_can_write(path, "sample file")
        check_overwrite(path, is_sample_json if key == "settings" else is_sample_png, "sample file", force)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    images = method.sample(n, generator=g, progress=progress)
    seconds = time.perf_counter() - t0
    scale = display_scale(images.shape[-1])
    result = {"run": str(run), "method": cfg.method, "weights": weights, "sampler": sampler, "steps": steps,
              "eta": eta, "sample": cs, "n": n, "seed": seed, "seconds": round(seconds, 2), "grid": str(out)}
    save_png(grid(images.cpu(), nrow=math.ceil(math.sqrt(n))), out, scale, mark=True)
    if rank_energy:
        preds, energy = rank_by_energy(method, images)
        ranked = files["ranked_grid"]
        k = len(train_set.classes)
        save_png(grid(class_rows(images, preds, energy, k, per_class).cpu(), nrow=2 * per_class + 1), ranked,
                 scale, mark=True)
        result["ranked_grid"] = str(ranked)
        result["per_class"] = {train_set.classes[y]: {"count": int((preds == y).sum()),
                                                      "mean_energy": float(energy[preds == y].mean())
                                                      if (preds == y).any() else None}
                               for y in range(k)}
    atomic_write_json(files["settings"], {"format": SAMPLES_FORMAT, **result})
    return result
