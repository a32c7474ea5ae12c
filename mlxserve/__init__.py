"""mlxserve: an MLX-first local model server."""

__version__ = "0.1.0"
