"""The differentiable solver core: linear solves, Gauss-Newton, Newton, implicit differentiation, fitting loops."""
