import os
from pathlib import Path

# Headless rendering and a KeOps cache inside the repository, also when pytest runs directly.
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("KEOPS_CACHE_FOLDER", str(ROOT / ".cache" / "keops"))
os.environ.setdefault("PYVISTA_OFF_SCREEN", "true")
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

ASSETS = ROOT / "assets"


@pytest.fixture
def assets() -> Path:
    return ASSETS


@pytest.fixture
def ant():
    import shapeflow as sf

    return sf.read(ASSETS / "ant.ply")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def dask_client():
    """A 2-worker Dask LocalCluster (processes, one thread each) shared by the cohort tests."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        yield client
