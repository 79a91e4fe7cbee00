"""mlx-dsv4: DeepSeek-V4 on Apple silicon with MLX."""

__version__ = "0.1.0"
