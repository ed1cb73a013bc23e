"""Normal operators `J^T J + lam L` of Gauss-Newton problems: on grids (images) and sparse (meshes, clouds)."""
