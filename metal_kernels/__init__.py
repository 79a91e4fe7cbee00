"""Metal kernel sources (*.metal), installed as the package mlx_dsv4.metal_kernels; see mlx_dsv4/kernels."""
