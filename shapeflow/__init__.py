"""shapeflow: register shapes and images with one set of deformations and one solver core."""
