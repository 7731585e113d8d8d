"""InfSplign for ComfyUI: spatial-relation guidance from the UNet's cross-attention.

The node mappings are resolved on first access (ComfyUI's loader reads them with
hasattr/getattr), so importing this package by itself needs no ComfyUI: pytest imports
the repository root as a package when it collects the tests.
"""
WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]


def __getattr__(name: str):
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from . import nodes
        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
