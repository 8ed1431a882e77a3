"""Direct costs behind three lean-step changes (benchmarks/README.md, "The lean step").

    python benchmarks/micro.py [--json benchmarks/micro.json]

1. AdamW update of ViT-S/16 MAE's parameters: the default per-parameter loop, ``foreach``, fused.
2. Block masks (CAE's ratio 0.5, 14 x 14 grid, a per-GPU batch of 256): the torch-scalar version
   of commit e341481 against the numpy one now in ``mimkit.ssl.masking``.
3. DeepSpeed's ``allreduce_gradients`` at world size 1, which the trainer now skips, on the same
   model's gradients.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TORCH_SCALAR_MASKS_COMMIT = "e341481"  # the last commit with BlockMasking drawing torch 0-d tensors


def median_ms(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return round(statistics.median(times) * 1e3, 1)


def adamw(model: torch.nn.Module) -> dict[str, float]:
    from mimkit.train.optim import param_groups

    for p in model.parameters():
        p.grad = torch.randn_like(p)
    out = {}
    for name, kwargs in (
        ("loop", {"foreach": False}),
        ("foreach", {"foreach": True}),
        ("fused", {"fused": True}),
    ):
        opt = torch.optim.AdamW(param_groups(model, 0.05, ["pos_embed", "_token"]), lr=1e-4, **kwargs)
        out[f"adamw_{name}_ms"] = median_ms(opt.step)
    model.zero_grad(set_to_none=True)
    return out


def block_masks() -> dict[str, float]:
    from mimkit.ssl import masking

    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{TORCH_SCALAR_MASKS_COMMIT}:mimkit/ssl/masking.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    before = type(sys)("masking_before")
    exec(compile(source, "masking_before", "exec"), before.__dict__)
    out = {}
    for name, module in (("torch_scalars", before), ("numpy", masking)):
        gen = module.BlockMasking(ratio=0.5)
        g = torch.Generator().manual_seed(0)
        out[f"block_masks_256_{name}_ms"] = median_ms(lambda gen=gen, g=g: gen(256, (14, 14), generator=g))
    return out


def allreduce() -> dict[str, float]:
    from benchmarks import step
    from mimkit.train.distributed import init_distributed

    parser = argparse.ArgumentParser()
    step.add_args(parser)
    args = parser.parse_args(["--zero-stage", "0", "--batch", "2"])
    path = step.TrainerPath(
        step.build_recipe("mae", args, "fp32"), init_distributed(), torch.randn(2, 3, 224, 224)
    )
    path.engine.backward(path.engine({"image": path.images})["loss"])  # the trainer skips the reduce here
    return {"deepspeed_allreduce_world1_ms": median_ms(path.engine.allreduce_gradients)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    from mimkit.ssl import build_method

    model = build_method({"name": "mae", "backbone": {"name": "vit_small_patch16"}})
    result = {"parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    result.update(adamw(model))
    result.update(block_masks())
    result.update(allreduce())
    result["torch_threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
