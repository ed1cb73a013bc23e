"""Shared regularisers: the Laplacians (grid, mesh, kNN), the energies built on them, Jacobians."""
from shapeflow.regularizers.energies import bending, diffusion, grid_bending, grid_diffusion, kinetic_energy
from shapeflow.regularizers.jacobians import folding_statistics, jacobian_determinant
from shapeflow.regularizers.laplacians import (LAPLACIANS, cotangent_laplacian, grid_laplacian, grid_laplacian_apply,
                                               grid_laplacian_slab, grid_slabs, knn_laplacian, mesh_laplacian,
                                               mesh_mass, uniform_laplacian, shape_laplacian, shape_mass, bending_matrix, vertex_normals,
                                               SHAPE_LAPLACIANS)

__all__ = ["grid_laplacian", "grid_laplacian_apply", "grid_laplacian_slab", "grid_slabs", "mesh_laplacian",
           "cotangent_laplacian", "uniform_laplacian", "mesh_mass", "knn_laplacian", "LAPLACIANS",
           "shape_laplacian", "shape_mass", "bending_matrix", "vertex_normals", "SHAPE_LAPLACIANS",
           "diffusion", "bending", "grid_diffusion", "grid_bending", "kinetic_energy",
           "jacobian_determinant", "folding_statistics"]
