"""Benchmark: `register(model=...)` of a 10k-point cloud with default options (one CPU thread).

Data: 10,000 points sampled uniformly on the triangles of `assets/ant.ply` (seed 0), and their
image under `shapeflow.synthetic.smooth_deformation(amplitude=0.04, seed=1)` (known
correspondence, used only to score). Prints seconds, vertex RMSE / bounding-box diagonal and
`min_jacobian_det` per model.

    OMP_NUM_THREADS=1 python benchmarks/lddmm_10k.py [lddmm resnet ...]
"""
import sys
import time
from pathlib import Path

import torch

import shapeflow as sf
from shapeflow.synthetic import smooth_deformation

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def cloud(n: int = 10_000, seed: int = 0) -> torch.Tensor:
    """`(n, 3)` points uniform over the ant's triangles' barycentric coordinates."""
    ant = sf.read(ASSETS / "ant.ply")
    gen = torch.Generator().manual_seed(seed)
    triangles = ant.points[ant.faces[torch.randint(len(ant.faces), (n,), generator=gen)]]   # (n, 3, 3)
    weights = torch.rand(n, 3, generator=gen)
    return (triangles * (weights / weights.sum(1, keepdim=True))[:, :, None]).sum(1)


def main(models: list[str]) -> None:
    torch.set_num_threads(1)
    source = cloud()
    target = smooth_deformation(source, amplitude=0.04, seed=1)
    diagonal = float((target.max(0).values - target.min(0).values).norm())
    for model in models:
        start = time.perf_counter()
        result = sf.register(source.numpy(), target.numpy(), model=model, progress=False)
        seconds = time.perf_counter() - start
        rmse = float((torch.as_tensor(result.warped) - target).pow(2).sum(1).mean().sqrt())
        print(f"{model:8s} {seconds:6.1f} s  rmse/diagonal {rmse / diagonal:.4f}  "
              f"min_jacobian_det {result.metrics['min_jacobian_det']:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["lddmm", "resnet"])
