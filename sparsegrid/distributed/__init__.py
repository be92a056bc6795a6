"""Beyond one process: tiled inference on Dask, data-parallel training over MPI.

Names are imported on first use, so ``import sparsegrid.distributed`` imports neither
Dask nor mpi4py (docs/distributed.md).
"""

import importlib

# public name -> submodule that defines it
_LAZY = {
    # data-parallel training over MPI (sparsegrid.distributed.mpi; pip install "sparsegrid[mpi]")
    "DataParallel": "mpi",
    "PeerFailure": "mpi",
    "local_rank": "mpi",
    "save_checkpoint": "mpi",
    # exact tiled inference (sparsegrid.distributed.tiling; Dask: pip install "sparsegrid[dask]")
    "NotTileable": "tiling",
    "ReceptiveField": "tiling",
    "TiledVoxels": "tiling",
    "predict_scene": "tiling",
    "predict_tiled": "tiling",
    "receptive_field": "tiling",
    "total_stride": "tiling",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
