"""``python tools/benchmark.py extract``: images/s of feature extraction against the encoder's forward alone.

Every evaluation tool turns a labelled source into frozen features with
:func:`mimkit.eval.features.extract_features`; this measures how close that comes to the rate of
the frozen forward pass on pre-made tensors (the ceiling: no decoding, no transform, no collation),
per source and per DataLoader worker count. The sources default to the two embedded sets and an
image folder of PNGs written from ``synthetic:textures`` into a temporary directory (class
folders, so it is labelled), all at the encoder's input size.

The encoder is ``--encoder`` (an export or run directory) or, by default, a random init of the
demo's ViT-Ti/8 at 64 px; weights do not change the speed. Each setting is timed in ``--repeat``
rounds after one untimed warm-up, each round running the forward pass alone on the same number
of images and then the extraction. ``of_forward`` is the best extraction round's rate over the
best forward round's: other load only ever slows a run down, so over enough rounds both best
rounds are the unloaded machine's (the per-round ratios' median and range are kept too). On a
shared machine the load of other jobs changes the forward rate several-fold within minutes;
rates compared across separate runs read that load, not the code. At 0 workers a further row
times extraction as it was before the prefetch thread and the mask-free sources (``before``), as
the baseline.

    python tools/benchmark.py extract --images 256 --repeat 8 --workers 0 1 2 --json benchmarks/extract.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, print_table

DEFAULT_SOURCES = ("synthetic:textures", "synthetic:shapes", "folder")


def add_args(parser: argparse.ArgumentParser) -> None:
    """The ``extract`` options."""
    parser.add_argument(
        "--sources",
        nargs="+",
        default=list(DEFAULT_SOURCES),
        help="source URIs; 'folder' writes PNGs of synthetic:textures to a temporary folder "
        "(default: synthetic:textures synthetic:shapes folder)",
    )
    parser.add_argument(
        "--encoder", default=None, help="export or run directory (default: demo ViT-Ti/8 64 px)"
    )
    parser.add_argument("--images", type=int, default=512, help="images per timed extraction (default 512)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader processes (0 1 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (default fp32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds per setting (default 5)")


def _encoder(spec: str | None, device: str):
    import torch

    from mimkit.eval.features import load_encoder
    from mimkit.models import create_backbone

    if spec is not None:
        return load_encoder(spec, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_backbone("vit_tiny_patch16", img_size=64, patch_size=8)
    model.origin = {"spec": "vit_tiny_patch16 (img 64, patch 8), random init", "random_init": True}
    return model.to(device).eval().requires_grad_(False)


def write_folder(root: Path, images: int, size: int) -> str:
    """``images`` PNGs of ``synthetic:textures`` in class folders under ``root``; returns its URI.

    The images are ``size`` pixels wide, or the smallest size the set draws where that is larger.
    """
    from PIL import Image

    from mimkit.data import build_source
    from mimkit.data.synthetic import MIN_TEXTURE_SIZE

    size = max(size, MIN_TEXTURE_SIZE)
    source = build_source(f"synthetic:textures?size={size}&train={images}&val=1", "train", None)
    for i in range(images):
        scene = source.scene(i)
        folder = root / "train" / source.class_names[scene.label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(folder / f"{i:06d}.png")
    return f"folder:{root}"


def _sized(uri: str, images: int, size: int) -> str:
    if not uri.startswith("synthetic:"):
        return uri
    sep = "&" if "?" in uri else "?"
    return f"{uri}{sep}size={size}&train={images}&val=1"


def _forward_pass(encoder: Any, images: int, batch: int, precision: str, device: str):
    """A callable timing :func:`~mimkit.eval.features.encode` on pre-made tensors (the ceiling)."""
    import torch

    from mimkit.eval.features import encode

    size = encoder.patch_embed.img_size[0]
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(min(batch, images - i), encoder.in_chans, size, size, generator=g).to(device)
        for i in range(0, images, batch)
    ]

    def run() -> None:
        for x in batches:
            encode(encoder, x, 1, precision)["cls"].cpu()

    return run


def _extraction(
    encoder: Any, uri: str, workers: int, batch: int, precision: str, device: str, baseline: bool = False
):
    """A callable running :func:`~mimkit.eval.features.extract_features` over ``uri``'s train split,
    built as :func:`~mimkit.eval.features.source_features` builds it.

    ``baseline`` reproduces extraction before the prefetch thread and the mask-free sources: the
    embedded sets' masks are drawn, cropped and collated, and the loader runs in the calling thread
    between forward passes.
    """
    from mimkit.data import build_source, build_transform
    from mimkit.eval import features
    from mimkit.eval.settings import ExtractSettings

    size = encoder.patch_embed.img_size[0]
    transform = build_transform("eval", size, features.input_normalization(encoder))
    dataset = (build_source if baseline else features.classification_source)(uri, "train", transform)
    settings = ExtractSettings(
        batch_size=batch, workers=workers, precision=precision, device=device, progress=False
    )

    def run() -> None:
        threaded = features.prefetched
        if baseline:
            features.prefetched = lambda batches, depth=2: iter(batches)
        try:
            features.extract_features(encoder, dataset, settings)
        finally:
            features.prefetched = threaded

    return run, len(dataset)


def _timings(fns: list, repeat: int, device: str) -> list[list[float]]:
    """Seconds of each callable in each of ``repeat`` rounds (after a warm-up round).

    The callables take turns within a round, so the runs of one round see about the same load;
    rates are compared round by round.
    """
    for fn in fns:
        fn()  # warm-up: first-touch costs, the page cache, loader start-up paths
    rounds = []
    for _ in range(repeat):
        times = []
        for fn in fns:
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        rounds.append(times)
    return rounds


def _sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict:
    """``extract``: a table and the result dict (options, machine, one row per source and worker count)."""
    import torch

    for name in ("images", "batch_size", "repeat"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if min(args.workers) < 0:
        raise ValueError(f"--workers {args.workers}: worker counts must be non-negative")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    encoder = _encoder(args.encoder, args.device)
    size = encoder.patch_embed.img_size[0]
    forward = _forward_pass(encoder, args.images, args.batch_size, args.precision, args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mimkit-extract-") as tmp:
        for source in args.sources:
            if source == "folder":
                uri = write_folder(Path(tmp), args.images, size)
            else:
                uri = _sized(source, args.images, size)
            settings = [(w, False) for w in args.workers] + ([(0, True)] if 0 in args.workers else [])
            for workers, baseline in settings:
                extraction, images = _extraction(
                    encoder, uri, workers, args.batch_size, args.precision, args.device, baseline
                )
                rounds = _timings([forward, extraction], args.repeat, args.device)
                ratios = sorted((t_f / args.images) / (t_e / images) for t_f, t_e in rounds)
                best_forward = args.images / min(t for t, _ in rounds)
                best_extract = images / min(t for _, t in rounds)
                loader = f"{workers} process{'es' if workers > 1 else ''}" if workers else "prefetch thread"
                rows.append(
                    {
                        "source": "folder (PNGs of synthetic:textures)" if source == "folder" else source,
                        "workers": workers,
                        "loader": "before: calling thread, with masks" if baseline else loader,
                        "forward_images_per_s": round(best_forward, 1),
                        "extract_images_per_s": round(best_extract, 1),
                        "of_forward": round(best_extract / best_forward, 3),
                        "of_forward_per_round": {
                            "median": round(statistics.median(ratios), 3),
                            "range": [round(ratios[0], 3), round(ratios[-1], 3)],
                        },
                    }
                )
    print_table(
        rows, ["source", "workers", "loader", "forward_images_per_s", "extract_images_per_s", "of_forward"]
    )
    options = {
        k: getattr(args, k)
        for k in (
            "sources",
            "encoder",
            "images",
            "batch_size",
            "workers",
            "threads",
            "precision",
            "device",
            "repeat",
        )
    }
    options["img_size"] = size
    options["encoder_description"] = encoder.origin["spec"]
    return {"benchmark": "extract", "options": options, "machine": machine, "results": rows}
