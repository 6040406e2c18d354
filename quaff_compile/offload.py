"""Move the float weights of quantized linears out of the process's memory, into files.

Once a linear runs in int8, its float weight is only read again to save,
merge or run the model outside the compiled graph. With the option
`offload_weights`, the backend writes each such weight to a file and maps the
file back as the parameter's data (a private, copy-on-write memory map). The
parameter keeps its values, shape, dtype and identity, so `state_dict`,
`save_pretrained`, merging adapters and eager calls read the exact values,
paging them in from the file when they do. Until then the pages are file
cache, which the kernel can evict, not memory of the process.

The file is deleted as soon as it is mapped, so nothing is left behind: the
space on disk is freed when the parameter's data is. A write into the
parameter (`load_state_dict`, a merge) copies the touched pages into the
process's memory, as with any private mapping, and never reaches the file.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# madvise(2) advice that reclaims the pages of a range: clean file pages are
# dropped (read again from the file when touched), changed ones are kept or
# swapped, so no data is lost. Linux 5.4 and later; Python's mmap lacks the name.
MADV_PAGEOUT = 21
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

# Folders already warned about, so that each is warned about once, not once per weight.
_UNUSABLE_FOLDERS: set[str] = set()


def page_out(tensor: torch.Tensor) -> None:
    """Ask the kernel to reclaim the whole memory pages inside `tensor`'s span (a hint, never a loss).

    The span runs from its first to its last element, not over its whole
    storage: a parameter of a model loaded from safetensors is a view into
    one storage that maps the whole file.
    """
    if _LIBC is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    elements = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    first = tensor.data_ptr()
    start = -(-first // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (first + elements * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT)


def default_folder() -> Path:
    """Return the folder for offloaded weights when the option is True: a folder in the user's cache.

    Not the system temporary folder, which is memory (tmpfs) on some systems.
    """
    from quaff_compile.models import cache_root

    return cache_root() / "offload"


def offload_weight(weight: torch.Tensor, folder: Path) -> bool:
    """Replace the data of the CPU parameter `weight` by a memory map of a file holding the same values.

    Returns False, leaving the weight as it was, where it is not a contiguous
    CPU tensor or the file cannot be written (the reason is logged).
    """
    data = weight.detach()
    if data.device.type != "cpu":
        log.debug("offload_weights: a weight on %s stays where it is; only CPU weights are offloaded", data.device)
        return False
    if data.numel() == 0:
        return False
    if not data.is_contiguous():
        # A contiguous copy would change the parameter's strides, which Dynamo guards on.
        log.debug("offload_weights: a non-contiguous weight stays in memory")
        return False
    raw = data.view(-1).view(torch.uint8)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, path = tempfile.mkstemp(prefix="weight-", suffix=".bin", dir=folder)
    except OSError as error:
        if str(folder) not in _UNUSABLE_FOLDERS:
            _UNUSABLE_FOLDERS.add(str(folder))
            log.warning(
                "offload_weights: cannot create a file in %s (%s); the weights stay in memory. "
                "Pass a writable folder on a disk.",
                folder,
                error,
            )
        return False
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(memoryview(raw.numpy()))
        with open(path, "r+b") as file:
            mapping = mmap.mmap(file.fileno(), raw.numel(), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as error:
        log.warning("offload_weights: writing %s failed (%s); the weight stays in memory", path, error)
        return False
    finally:
        Path(path).unlink(missing_ok=True)

    # The tensor keeps the mapping alive.
    mapped = torch.frombuffer(mapping, dtype=torch.uint8).view(data.dtype).view(data.shape)
    if not torch.equal(mapped, data):
        log.warning("offload_weights: the file read back differs from the weight; the weight stays in memory")
        return False
    # Reclaim the pages the comparison read, and those of the old data: a
    # model loaded by mapping its safetensors file keeps that mapping alive
    # for its other parameters.
    page_out(mapped)
    page_out(data)
    weight.data = mapped
    return True
