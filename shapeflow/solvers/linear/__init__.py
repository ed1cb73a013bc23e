"""Linear solves: CG, BiCGSTAB, AMG and CuPy backends, and the differentiable `linear_solve`."""
