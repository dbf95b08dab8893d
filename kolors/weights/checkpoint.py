"""Reading Kolors checkpoints (finding and downloading them: kolors.weights.hub).

Weights are read tensor by tensor into a model built on the meta device: each tensor is converted to the target
dtype and device as it is read, so the full model never exists twice in memory. Loading is strict: a missing,
unexpected or mis-shaped tensor is an error that names the file, the key and the shapes, raised from the files'
headers before any data is read. A Checkpoint can also give a few tensors on demand: the low-memory mode streams
the text encoder's layers from it (kolors/weights/stream.py).
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kolors.errors import KolorsError

# ---------------------------------------------------------------------------------------------------- reading

# safetensors' dtype names, as its format specification spells them.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit on the JSON header
HALF_DTYPES = {torch.float16, torch.bfloat16}
CAST_CHUNK = 1024**2  # elements: a 4 MB float32 buffer, near the cache
# One read of a safetensors file: large enough that a disk reads at its full rate, small enough that three buffers
# (one converting, two read ahead by the one reader thread) cost little memory (BENCHMARKS.md, loading).
READ_BYTES = 128 * 1024**2
BLOCK = 4096  # O_DIRECT wants file offsets, lengths and memory aligned to the device's block: 4096 covers all


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, its name there, and in a safetensors file the offset of its bytes."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = -1  # absolute byte offset of the data; -1 in a pickled file, which torch.load reads

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Checkpoint:
    """One component's tensors across its weight files, by model key, known from the files' headers alone.

    Nothing is read until asked: `check` compares keys and shapes with a model built on the meta device before
    any data is touched, and `read` gives the tensors, each converted into its one new tensor as its bytes arrive
    (kolors never maps a whole file: safetensors' get_tensor copies out of such a mapping, whose touched pages
    count in the resident set until the file is closed: twice the model at the end of a load)."""

    def __init__(self, files: list[Path], transform: Callable[[dict], dict] | None = None):
        self.files = list(files)
        self.entries: dict[str, TensorEntry] = {}
        for file in self.files:
            for name, entry in _index(file).items():
                # The component's key transform (strip a prefix, drop an unused tensor) only looks at keys.
                self.entries.update(transform({name: entry}) if transform else {name: entry})

    def check(self, model: nn.Module) -> None:
        """Strict: every tensor of `model` is here with the shape the config gives it, and nothing else is."""
        expected = model.state_dict(keep_vars=True)
        missing = sorted(set(expected) - set(self.entries))
        unexpected = sorted(set(self.entries) - set(expected))
        if missing:
            raise KolorsError(
                f"weights in {self.files[0].parent} lack {len(missing)} tensor(s) the config needs, e.g. "
                f"'{missing[0]}'; the config and the weights are from different models"
            )
        if unexpected:
            entry = self.entries[unexpected[0]]
            raise KolorsError(
                f"weight file {entry.file} has {len(unexpected)} tensor(s) the config does not know, e.g. "
                f"'{entry.name}'; the config and the weights are from different models"
            )
        for key, tensor in expected.items():
            entry = self.entries[key]
            if entry.shape != tuple(tensor.shape):
                raise KolorsError(
                    f"weight '{entry.name}' in {entry.file} has shape {entry.shape} but the config makes "
                    f"{tuple(tensor.shape)}; the config and the weights are from different models"
                )

    def read(
        self,
        keys: Iterable[str],
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        keep_dtype: Callable[[str], bool] = lambda key: False,
        reread: bool = False,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) for each key, file by file in storage order, each a new tensor in `dtype` on `device`.
        Integer tensors keep their dtype; `keep_dtype(key)` keeps a tensor in float32 (computed in fp32).
        Data not in the page cache is read past it (see _Source); `reread=True` for data that will be read
        again soon (the low-memory mode's streamed layers), which the page cache then keeps."""
        by_file: dict[Path, list[tuple[str, TensorEntry]]] = {}
        for key in keys:
            entry = self.entries[key]
            by_file.setdefault(entry.file, []).append((key, entry))

        def new_tensor(key: str, entry: TensorEntry) -> torch.Tensor:
            floating = entry.dtype.is_floating_point
            target = (torch.float32 if keep_dtype(key) else dtype) if floating else entry.dtype
            return torch.empty(entry.shape, dtype=target, device=device)

        for file, items in by_file.items():
            items.sort(key=lambda item: item[1].offset)
            if file.suffix == ".safetensors":
                yield from _read_safetensors(file, items, new_tensor, direct=not reread)
            else:
                yield from _read_pickled(file, items, new_tensor)

    def load(
        self,
        model: nn.Module,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        keep_dtype: Callable[[str], bool] = lambda key: False,
        loaded: Callable[[str], None] | None = None,
    ) -> nn.Module:
        """Check, then read every tensor into `model` (built on the meta device) as it comes, so each weight
        exists once; `loaded(key)` is called after each (the UNet packs its weights there)."""
        self.check(model)
        for key, tensor in self.read(model.state_dict(), dtype=dtype, device=device, keep_dtype=keep_dtype):
            set_tensor(model, key, tensor)
            if loaded is not None:
                loaded(key)
        return model


def load_weights(
    model: nn.Module,
    files: list[Path],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    transform: Callable[[dict], dict] | None = None,
    keep_dtype: Callable[[str], bool] = lambda key: False,
    loaded: Callable[[str], None] | None = None,
) -> nn.Module:
    """Strictly load `files` into `model` (built on the meta device), converting each tensor to `dtype` and
    `device` as it is read. `transform` is the component's one visible key transform (a prefix, an unused
    tensor); `keep_dtype(key)` keeps a tensor in float32 when the model computes it in full precision;
    `loaded(key)` runs after each tensor is in place."""
    checkpoint = Checkpoint(files, transform)
    return checkpoint.load(model, dtype=dtype, device=device, keep_dtype=keep_dtype, loaded=loaded)


def set_tensor(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the parameter or buffer `key` of `module`. Parameters come back as Parameters
    without gradients: kolors only runs inference."""
    owner_name, _, name = key.rpartition(".")
    owner = module.get_submodule(owner_name)
    if name in owner._parameters:
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=False)
        owner._parameters[name] = tensor
    else:
        owner._buffers[name] = tensor


# What module constructors call to initialise their weights: pointless for weights that come from a checkpoint.
INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_")


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module with its parameters on the meta device and nothing initialised: the checkpoint gives
    the weights. Each parameter moves to meta as it is registered (its CPU storage, never written, is never
    resident); buffers stay on the CPU (small, and read from the checkpoint too). Not `with torch.device("meta")`:
    the first meta op without a C++ kernel (arange, normal_) imports torch's Python references, 3 s of a load."""
    register, initialisers = (
        nn.Module.register_parameter,
        {name: getattr(nn.init, name) for name in INITIALISERS},
    )

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    try:
        nn.Module.register_parameter = register_on_meta
        for name in INITIALISERS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        return factory()
    finally:
        nn.Module.register_parameter = register
        for name, function in initialisers.items():
            setattr(nn.init, name, function)


def _workers() -> int:
    return torch.get_num_threads()


@functools.cache
def _cast_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="kolors-cast")


def _convert(pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """dst.copy_(src) for each (src, dst) pair of flat tensors, shared out in CAST_CHUNK pieces among one worker
    per core, each running torch on one thread: waking torch's own workers for every small tensor costs more
    than it saves (it made the UNet's 1,700 tensors load 5x slower on a busy machine). fp16 <-> bf16 on the
    CPU goes through float32: torch's direct cast between the two is scalar code, about five times slower than
    the two vectorised casts through float32, which holds both exactly, so the result has the same bits."""
    work = [
        (src[i : i + CAST_CHUNK], dst[i : i + CAST_CHUNK])
        for src, dst in pieces
        for i in range(0, len(src), CAST_CHUNK)
    ]
    on_cpu = all(dst.device.type == "cpu" for _, dst in pieces)
    workers = min(_workers(), len(work)) if on_cpu else 1  # copies to a GPU stay on the caller's thread
    inference = torch.is_inference_mode_enabled()  # thread-local: the new tensors may be inference tensors

    def run(worker: int) -> None:
        torch.set_num_threads(1)  # this thread's own setting (OpenMP), not the caller's
        scratch = None
        with torch.inference_mode(inference):
            for src, dst in work[worker::workers]:
                if dst.device.type == "cpu" and {src.dtype, dst.dtype} == HALF_DTYPES:
                    if scratch is None:
                        scratch = torch.empty(CAST_CHUNK, dtype=torch.float32)
                    chunk = scratch[: len(src)]
                    chunk.copy_(src)
                    dst.copy_(chunk)
                else:
                    dst.copy_(src)

    with one_thread():
        if workers <= 1:
            run(0)
        else:
            list(_cast_pool(workers).map(run, range(workers)))


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside: many small ops cost less than waking its other threads for each (the loader's
    casts, a LoRA's hundreds of small tensors; BENCHMARKS.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _index(file: Path) -> dict[str, TensorEntry]:
    try:
        return _safetensors_index(file) if file.suffix == ".safetensors" else _pickled_index(file)
    except KolorsError:
        raise
    except (
        Exception
    ) as e:  # a short read, bad JSON, a broken zip: one message for a truncated or corrupt file
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KolorsError(
            f"weight file {file} is truncated or corrupt ({detail}); delete it and download the model again"
        ) from None


def _safetensors_index(file: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file from its header: 8 bytes of little-endian header length, the JSON
    header (name -> dtype, shape, data_offsets relative to the end of the header), then the data."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"a header of {length} bytes in a file of {size}")
        header = json.loads(f.read(length))
    start = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise KolorsError(
                f"weight '{name}' in {file} has dtype {info['dtype']}, which kolors cannot read"
            )
        entry = TensorEntry(
            file,
            name,
            SAFETENSORS_DTYPES[info["dtype"]],
            tuple(info["shape"]),
            start + info["data_offsets"][0],
        )
        end = start + info["data_offsets"][1]
        if end > size or end - entry.offset != entry.nbytes:
            raise ValueError(f"'{name}' needs bytes {entry.offset}..{end} but the file has {size}")
        entries[name] = entry
    return entries


def _pickled_index(file: Path) -> dict[str, TensorEntry]:
    return {name: TensorEntry(file, name, t.dtype, tuple(t.shape)) for name, t in _torch_load(file).items()}


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, memory-mapped (its tensors are read when touched) and with weights_only=True, so
    unpickling runs no code from the file."""
    state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    return {name: t for name, t in state.items() if isinstance(t, torch.Tensor)}


@dataclass
class _Read:
    """One read of a file: bytes start..end (aligned to BLOCK) and the tensor pieces (key, entry, first and
    last element) whose bytes lie inside."""

    start: int
    end: int
    pieces: list[tuple[str, TensorEntry, int, int]]


def _plan_reads(items: list[tuple[str, TensorEntry]]) -> list[_Read]:
    """Reads of at most READ_BYTES covering the tensors (in file order); a tensor larger than what is left of a
    read is split at an element boundary and goes on in the next. A gap of more than a block between tensors
    (a streamed subset of the file) starts a new read."""
    reads: list[_Read] = []
    for key, entry in items:
        size, count = entry.dtype.itemsize, math.prod(entry.shape)
        first = 0
        while first < count:
            byte = entry.offset + first * size
            if not reads or byte > reads[-1].end + BLOCK or byte + size > reads[-1].start + READ_BYTES:
                reads.append(_Read(byte - byte % BLOCK, byte, []))
            read = reads[-1]
            last = min(count, first + (read.start + READ_BYTES - byte) // size)
            read.pieces.append((key, entry, first, last))
            read.end = entry.offset + last * size
            first = last
    return reads


def _read_safetensors(file: Path, items, new_tensor, *, direct: bool) -> Iterator[tuple[str, torch.Tensor]]:
    out: dict[str, torch.Tensor] = {}
    for key, entry in items:
        if entry.nbytes == 0:
            yield key, new_tensor(key, entry)
    for read, data in _stream(file, _plan_reads(items), direct=direct):
        pieces, done = [], []
        for key, entry, first, last in read.pieces:
            if key not in out:
                out[key] = new_tensor(key, entry)
            size = entry.dtype.itemsize
            start = entry.offset + first * size - read.start
            raw = data[start : start + (last - first) * size]
            if start % size:  # safetensors does not promise aligned data
                raw = raw.clone()
            pieces.append((raw.view(entry.dtype), out[key].view(-1)[first:last]))
            if last == math.prod(entry.shape):
                done.append(key)
        _convert(pieces)
        for key in done:
            yield key, out.pop(key)


def _stream(file: Path, reads: list[_Read], *, direct: bool) -> Iterator[tuple[_Read, torch.Tensor]]:
    """Each read with its bytes (valid until the next is asked for), read ahead on a thread while the caller
    converts: reading and converting the 17.8 GB of Kolors' files overlap instead of taking turns."""
    if not reads:
        return
    # Anonymous mappings: page-aligned, as O_DIRECT needs, and returned to the system when dropped.
    buffers = [mmap.mmap(-1, READ_BYTES) for _ in range(min(3, len(reads)))]
    views = [torch.frombuffer(buffer, dtype=torch.uint8) for buffer in buffers]
    with (
        _Source(file, direct=direct) as source,
        ThreadPoolExecutor(1, thread_name_prefix="kolors-read") as pool,
    ):

        def submit(i: int) -> Future:
            return pool.submit(source.read_into, buffers[i % len(buffers)], reads[i].start, reads[i].end)

        pending = deque(submit(i) for i in range(len(buffers)))
        for i, read in enumerate(reads):
            if pending.popleft().result() < read.end - read.start:
                raise KolorsError(f"weight file {file} is truncated; delete it and download the model again")
            yield read, views[i % len(buffers)][: read.end - read.start]
            if i + len(buffers) < len(reads):  # the caller is done with this buffer
                pending.append(submit(i + len(buffers)))


class _Source:
    """A weight file read in large pieces. A piece mostly in the page cache is read through it (memory speed).
    Any other piece, on Linux, is read with O_DIRECT, straight from the disk into kolors' buffer: through the
    page cache the kernel spends a core on copying and caching the pages (BENCHMARKS.md, loading), on a load that
    needs every core for casting, and fills the memory with a second copy of weights the process is about to hold. Written by hand:
    safetensors and torch read only through the page cache."""

    def __init__(self, file: Path, *, direct: bool):
        self.file = open(file, "rb", buffering=0)
        self.direct = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.direct = os.open(file, os.O_RDONLY | os.O_DIRECT)
            except OSError:  # a file system without O_DIRECT (tmpfs): through the page cache
                pass

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        if self.direct is not None:
            os.close(self.direct)

    def read_into(self, buffer: mmap.mmap, start: int, end: int) -> int:
        """Bytes start..end of the file into `buffer`; the count read (less only at the end of the file). An
        O_DIRECT read asks for whole blocks, past `end` up to the buffer's end: the file ends there or the
        bytes are not needed."""
        done = 0
        direct = self.direct is not None and _cached_fraction(self.file.fileno(), start, end - start) < 0.5
        while start + done < end:
            if direct:
                stop = min(len(buffer), end - start + -(end - start) % BLOCK)
                try:
                    n = os.preadv(self.direct, [memoryview(buffer)[done:stop]], start + done)
                except OSError:  # O_DIRECT refused after all (the alignment rules of an odd device)
                    direct = False
                    continue
            else:
                self.file.seek(start + done)
                n = self.file.readinto(memoryview(buffer)[done : end - start])
            if not n:
                break
            done += n
        return min(done, end - start)


def _cached_fraction(fd: int, start: int, length: int) -> float:
    """The part of a file range in the page cache, from mincore(2) on a mapping nothing reads; 0 if unknown."""
    offset = start - start % mmap.PAGESIZE
    try:
        pages = mmap.mmap(fd, length + start - offset, offset=offset, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return 0.0
    address = None
    try:
        address = ctypes.c_char.from_buffer(pages)
        count = -(-len(pages) // mmap.PAGESIZE)
        resident = (ctypes.c_ubyte * count)()
        failed = _libc().mincore(ctypes.addressof(address), len(pages), resident)
        return 0.0 if failed else 1 - bytes(resident).count(0) / count
    except (AttributeError, OSError):  # no mincore: not Linux, where there is no O_DIRECT either
        return 0.0
    finally:
        del address  # the mapping cannot close while a ctypes object points into it
        pages.close()


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_ubyte),
    ]  # 64-bit address
    return libc


def _read_pickled(file: Path, items, new_tensor) -> Iterator[tuple[str, torch.Tensor]]:
    state = _torch_load(file)  # the mapping closes when `state` goes, after this file's tensors
    for key, entry in items:
        tensor = new_tensor(key, entry)
        _convert([(state[entry.name].reshape(-1), tensor.view(-1))])
        yield key, tensor
