import subprocess
import sys


def test_star_import_gives_the_public_api():
    namespace: dict = {}
    exec("from shapeflow import *", namespace)
    for name in ["register", "read", "write", "load_deformation", "PointCloud", "Mesh", "Landmarks",
                 "ResNetFlow", "Rigid", "Similarity", "Affine", "Result", "viz"]:
        assert name in namespace, name


def test_import_prints_nothing_and_loads_no_heavy_optional_parts():
    code = ("import sys, shapeflow; "
            "print(sorted(m for m in ('pyvista', 'cupy', 'pykeops', 'geomloss', 'pyamg') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert out.stderr == ""
