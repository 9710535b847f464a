"""GVP-p2d on digits with two tokenizers: genrep's VQ-VAE (a ``vq-digits`` run, ``model.tokenizer``) against a
VQGAN built from taming-transformers' own modules and read through genrep's VQGAN reader (``model.vqgan``), each
pretrained with ``gvp-p2d-digits`` and read by its linear probe (the recipe's ``eval.probes``: the causal mask
kept, section 5; without the sweep over blocks and poolings unless ``--sweep``), two seeds each (issue 27, item 12).

The VQGAN is taming's Encoder, Decoder and VectorQuantizer2 at a digits size (1 channel, width 32, ch_mult 1, 2: one
code per 2x2 pixels, GVP's patch; attention at the 4x4 level and in the middle; 128 codes of width 16, the
VQ-VAE's), saved as taming's ``{"state_dict": ...}``. ``--vqgan trained`` (default) fits it for the VQ-VAE's number
of steps on the training images with taming's quantizer loss plus the pixels' MSE: not VQGAN's objective (no LPIPS,
no discriminator, which need ImageNet-sized images and weights), a tokenizer made from taming's modules, whose codes
genrep's reader must reproduce; ``--vqgan random`` keeps taming's initialisation. The script checks that genrep's
reader gives taming's codes on the test images before GVP trains on them.

Per tokenizer it prints the test reconstruction MSE (pixels in [0, 1]) and how many codes the test images use; per
run the final loss, the linear probe's test accuracy and seconds. ``--steps N`` trains every tokenizer and every GVP
N steps (a check of the script, not a result). Any other ``--KEY value`` is a config override of every GVP run.
Needs taming's modules: pip install --no-deps taming-transformers-rom1504 einops (its declared dependencies,
PyTorch Lightning and omegaconf, are not used).

The full measurement (CPU; two threads):
    python benchmarks/gvp_tokenizers.py --out runs/gvp-tokenizers --threads 2 --json gvp_tokenizers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genrep.config import parse_overrides, resolve_config
from genrep.errors import GenrepError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import parse_names, parse_seeds  # noqa: E402 - the sibling benchmark's argument helpers

RECIPE, TOKENIZER_RECIPE = "gvp-p2d-digits", "vq-digits"
TOKENIZERS = ("vq", "vqgan")
# taming's ddconfig and codebook at the digits' size; the model.vqgan_* keys GVP reads it with
VQGAN = dict(n_embed=128, embed_dim=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], z_channels=16,
             resolution=8)


def taming_modules():
    try:
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import VectorQuantizer2
    except ImportError as e:
        raise GenrepError(f"taming-transformers' modules cannot be imported ({e}); pip install --no-deps "
                          "taming-transformers-rom1504 einops") from None
    return Encoder, Decoder, VectorQuantizer2


class TamingVQ(nn.Module):
    """taming's VQModel under its attribute names, without its Lightning base and loss."""

    def __init__(self, channels: int):
        super().__init__()
        Encoder, Decoder, VectorQuantizer2 = taming_modules()
        dd = dict(double_z=False, z_channels=VQGAN["z_channels"], resolution=VQGAN["resolution"], in_channels=channels,
                  out_ch=channels, ch=VQGAN["ch"], ch_mult=VQGAN["ch_mult"], num_res_blocks=VQGAN["num_res_blocks"],
                  attn_resolutions=VQGAN["attn_resolutions"], dropout=0.0)
        self.encoder, self.decoder = Encoder(**dd), Decoder(**dd)
        self.quantize = VectorQuantizer2(VQGAN["n_embed"], VQGAN["embed_dim"], beta=0.25)
        self.quant_conv = nn.Conv2d(VQGAN["z_channels"], VQGAN["embed_dim"], 1)
        self.post_quant_conv = nn.Conv2d(VQGAN["embed_dim"], VQGAN["z_channels"], 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x in [0, 1] -> (reconstruction in [-1, 1], the quantizer's loss, codes [B, N] in raster order)."""
        quant, qloss, (_, _, codes) = self.quantize(self.quant_conv(self.encoder(x * 2 - 1)))
        return self.decoder(self.post_quant_conv(quant)), qloss, codes.view(len(x), -1)


def images(split: str) -> torch.Tensor:
    from genrep.data.datasets import load_dataset

    return load_dataset("digits", split, image_size=8).images.float() / 255


def make_vqgan(path: Path, init: str, steps: int, batch: int, seed: int) -> TamingVQ:
    torch.manual_seed(seed)
    train = images("train")
    model = TamingVQ(train.shape[1])
    if init == "trained":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = train[torch.randint(len(train), (batch,), generator=g)]
            recon, qloss, _ = model(x)
            loss = F.mse_loss(recon, x * 2 - 1) + qloss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    torch.save({"state_dict": model.state_dict()}, path)
    return model


def vqgan_overrides(path: Path) -> dict:
    return {"model.tokenizer": "", "model.vqgan": str(path), **{f"model.vqgan_{k}": v for k, v in VQGAN.items()}}


@torch.no_grad()
def tokenizer_stats(name: str, encode_decode) -> dict:
    x = images("test")
    codes, recon = encode_decode(x)
    return {"tokenizer": name, "test_mse": float(F.mse_loss(recon, x)), "codes_used": int(codes.unique().numel())}


def prepare_tokenizers(out: Path, kinds: list[str], steps: int | None, init: str, device: str) -> tuple[dict, list]:
    """Each tokenizer's GVP overrides, and its statistics."""
    from genrep.methods.tokenizers import load_tokenizer, load_vqgan
    from genrep.runs import data_spec
    from genrep.train.loop import pretrain

    overrides, stats = {}, []
    spec = None
    if "vq" in kinds:
        settings = {"train.device": device, "train.progress": False, "train.seed": 0}
        if steps:
            settings.update({"train.steps": steps, "train.ckpt_every": steps, "train.log_every": steps})
        cfg = resolve_config(TOKENIZER_RECIPE, settings)
        t0 = time.perf_counter()
        trained = pretrain(cfg, out / "vq")
        from genrep.data.datasets import load_dataset

        spec = data_spec(load_dataset("digits", image_size=8))
        vq, _ = load_tokenizer(out / "vq", spec)
        stats.append({**tokenizer_stats("vq", lambda x: (vq.encode(x), vq.decode(vq.encode(x)))),
                      "steps": trained.steps, "seconds": round(time.perf_counter() - t0, 1)})
        overrides["vq"] = {"model.tokenizer": str(out / "vq")}
    if "vqgan" in kinds:
        n = steps or resolve_config(TOKENIZER_RECIPE, {}).train.epochs * -(-len(images("train")) // 128)
        t0 = time.perf_counter()
        path = out / "vqgan-last.ckpt"
        taming = make_vqgan(path, init, int(n), 128, seed=0)
        if spec is None:
            from genrep.data.datasets import load_dataset

            spec = data_spec(load_dataset("digits", image_size=8))
        cfg = resolve_config(RECIPE, vqgan_overrides(path))
        ours, _ = load_vqgan(path, cfg.model.vqgan_arch(spec.channels), spec)
        x = images("test")
        with torch.no_grad():
            _, _, codes = taming(x)
            if not torch.equal(ours.encode(x), codes):
                raise GenrepError("genrep's VQGAN reader gives other codes than taming's modules on the test images")
        stats.append({**tokenizer_stats("vqgan", lambda x: (ours.encode(x), ours.decode(ours.encode(x)))),
                      "steps": int(n) if init == "trained" else 0, "init": init,
                      "seconds": round(time.perf_counter() - t0, 1)})
        overrides["vqgan"] = vqgan_overrides(path)
    return overrides, stats


def measure(out: Path, tokenizer: str, seed: int, overrides: dict, steps: int | None, device: str,
            sweep: bool) -> dict:
    from genrep.eval.evaluate import evaluate_run
    from genrep.train.loop import pretrain

    settings = {**overrides, "train.seed": seed, "train.device": device, "train.progress": False}
    if steps:
        settings.update({"train.steps": steps, "train.ckpt_every": steps, "train.log_every": steps})
    cfg = resolve_config(RECIPE, settings)
    run = out / f"gvp-{tokenizer}-s{seed}"
    t0 = time.perf_counter()
    trained = pretrain(cfg, run)
    train_s = time.perf_counter() - t0
    ev = replace(cfg.eval, protocols=["probes"], device=device, probes=replace(cfg.eval.probes, sweep=sweep))
    t0 = time.perf_counter()
    probes = evaluate_run(run, ev, progress=False, say=lambda _: None)["protocols"]["probes"]
    return {"tokenizer": tokenizer, "seed": seed, "run": str(run), "steps": trained.steps,
            "loss": trained.last_log.get("loss"), "probe_acc": probes["headline"]["test_acc"],
            "probe": f"{probes['headline']['name']}, block {probes['layer']}, {probes['pool']}, causal mask "
                     f"{'kept' if probes.get('causal') else 'off'}",
            "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - t0, 1)}


def table(stats: list[dict], rows: list[dict]) -> str:
    lines = ["| tokenizer | steps | test MSE | codes used (test) | seconds |", "| --- | --- | --- | --- | --- |"]
    for s in stats:
        name = s["tokenizer"] + (f" ({s['init']})" if "init" in s else "")
        lines.append(f"| {name} | {s['steps']} | {s['test_mse']:.4f} | {s['codes_used']} | {s['seconds']:.0f} |")
    lines += ["", "| tokenizer | seed | final loss | linear probe | pretrain s | eval s |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        lines.append(f"| {r['tokenizer']} | {r['seed']} | {loss} | {100 * r['probe_acc']:.2f}% | {r['train_s']:.0f} | "
                     f"{r['eval_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizers", default=",".join(TOKENIZERS), help=f"comma-separated, from {', '.join(TOKENIZERS)}")
    p.add_argument("--vqgan", choices=("trained", "random"), default="trained", help="the taming-built VQGAN's weights")
    p.add_argument("--seeds", default="0,1", help="comma-separated GVP training seeds")
    p.add_argument("--out", type=Path, default=None, help="the runs' parent folder (default: a temporary one)")
    p.add_argument("--steps", type=int, default=None, help="train every tokenizer and GVP this many steps")
    p.add_argument("--sweep", action="store_true", help="also the probes' sweep over blocks and poolings (slow)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args, rest = p.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        kinds = parse_names(args.tokenizers, TOKENIZERS, "tokenizer", "--tokenizers")
        seeds = parse_seeds(args.seeds)
        if args.steps is not None and args.steps < 1:
            raise GenrepError("--steps must be at least 1")
        if "vqgan" in kinds:
            taming_modules()
        overrides = parse_overrides(rest)
        for k in kinds:  # every configuration checked before anything trains
            resolve_config(RECIPE, {**overrides, **({"model.tokenizer": "x"} if k == "vq" else vqgan_overrides(
                Path("x")))})
        out = args.out or Path(tempfile.mkdtemp(prefix="gvp-tokenizers-"))
        taken = [q for q in [out / "vq", out / "vqgan-last.ckpt", *(out / f"gvp-{k}-s{s}" for k in kinds for s in seeds)]
                 if q.exists()]
        if taken:
            raise GenrepError(f"{taken[0]} exists; choose another --out (runs are never overwritten)")
        out.mkdir(parents=True, exist_ok=True)
        tokenizer_overrides, stats = prepare_tokenizers(out, kinds, args.steps, args.vqgan, args.device)
        rows = []
        for k in kinds:
            for s in seeds:
                rows.append(measure(out, k, s, {**overrides, **tokenizer_overrides[k]}, args.steps, args.device,
                                    args.sweep))
                print(f"{k} seed {s}: probe {100 * rows[-1]['probe_acc']:.2f}% ({rows[-1]['train_s']:.0f} s + "
                      f"{rows[-1]['eval_s']:.0f} s)", file=sys.stderr, flush=True)
    except GenrepError as e:
        print(f"genrep: error: {e}", file=sys.stderr)
        return 2
    print(f"{RECIPE}, {rows[0]['steps']} steps; probe: {rows[0]['probe']}; runs under {out}")
    print(table(stats, rows))
    if args.json:
        args.json.write_text(json.dumps({"tokenizers": stats, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
