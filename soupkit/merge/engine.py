"""The streaming soup engine: weighted averages, one chunk of one tensor at a time.

For each tensor and each chunk of at most ``CHUNK`` elements: widen every ingredient's chunk to
float32, multiply by its normalised weight (rounded to float32), add left to right into a float32
accumulator, then round once to the output dtype and append the bytes to the open output shard.

Memory is a handful of chunk-sized buffers reused for the whole run (fresh temporaries, not
arithmetic, dominate a merge on a CPU: a bf16 average into fresh arrays ran at ~0.1 Gelem/s, bound
by page faults). Inputs are ``mmap``'d, so their pages are page cache, not process memory. numpy does the arithmetic, which keeps ``soupkit merge``
free of the 2-3 s torch import; bfloat16 is widened and rounded with integer operations that match
torch's conversion (round to nearest, ties to even; NaN -> 0x7FC0) bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from soupkit.errors import SoupkitError
from soupkit.merge.methods import (
    METHODS,
    TensorJob,
    jit_enabled,
    merge_stream,
    mergekit_t,
    prepare,
    resolve,
)
from soupkit.merge.preflight import MergePlan
from soupkit.modeldir import STORAGE, Checkpoint
from soupkit.shards import PlannedTensor, ShardedWriter, parse_size

CHUNK = 1 << 20
Progress = Callable[[int, int], None]


class Buffers:
    """Reusable float32 scratch space for one chunk."""

    def __init__(self, size: int = CHUNK):
        self.acc = np.empty(size, dtype=np.float32)
        self.tmp = np.empty(size, dtype=np.float32)
        self.bits = np.empty(size, dtype=np.uint32)
        self.half = np.empty(size, dtype=np.uint16)
        self.inputs: list[np.ndarray] = []

    def input(self, j: int) -> np.ndarray:
        """float32 scratch space for input ``j`` of a task-vector merge (one chunk)."""
        while len(self.inputs) <= j:
            self.inputs.append(np.empty(self.acc.size, dtype=np.float32))
        return self.inputs[j]


def widen(src: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """Exact float32 copy of a float chunk stored as ``dtype`` (bf16 arrives as uint16; a chunk
    already in float32, such as an adapter's materialised tensor, is copied as it is)."""
    if dtype == "BF16" and src.dtype == np.uint16:
        bits = out.view(np.uint32)
        np.copyto(bits, src, casting="unsafe")
        np.left_shift(bits, 16, out=bits)
    else:
        np.copyto(out, src, casting="unsafe")
    return out


def round_bf16(acc: np.ndarray, buf: Buffers) -> np.ndarray:
    """Round float32 to bfloat16 bits: nearest, ties to even; NaN -> 0x7FC0 (as torch/c10)."""
    n = acc.size
    u = acc.view(np.uint32)
    bias = buf.bits[:n]
    np.right_shift(u, 16, out=bias)
    np.bitwise_and(bias, 1, out=bias)
    np.add(bias, 0x7FFF, out=bias)
    np.add(bias, u, out=bias)  # wraps only for negative NaNs, fixed below
    np.right_shift(bias, 16, out=bias)
    out = buf.half[:n]
    np.copyto(out, bias, casting="unsafe")
    nan = np.isnan(acc)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def narrow(acc: np.ndarray, dtype: str, buf: Buffers) -> np.ndarray:
    """Round the float32 accumulator once to the output dtype's storage."""
    if dtype == "BF16":
        return round_bf16(acc, buf)
    if dtype == "F32":
        return acc
    return acc.astype(STORAGE[dtype][0])  # F16 (IEEE round to nearest even) or F64 (exact)


def average_chunk(chunks: list[np.ndarray], dtypes: list[str], weights: list[float], buf: Buffers) -> np.ndarray:
    """float32 sum of ``weights[i] * chunks[i]``, accumulated left to right."""
    n = chunks[0].size
    acc, tmp = buf.acc[:n], buf.tmp[:n]
    widen(chunks[0], dtypes[0], acc)
    np.multiply(acc, np.float32(weights[0]), out=acc)
    for chunk, dtype, weight in zip(chunks[1:], dtypes[1:], weights[1:]):
        widen(chunk, dtype, tmp)
        np.multiply(tmp, np.float32(weight), out=tmp)
        np.add(acc, tmp, out=acc)
    return acc


def output_dtype(plan: MergePlan, name: str) -> str:
    info = plan.models[0].tensors[name]
    if plan.spec.dtype is None or not info.is_float:
        return info.dtype
    from soupkit.modeldir import DTYPE_NAMES

    return DTYPE_NAMES[plan.spec.dtype]


def averaged_chunks(arrays: list[np.ndarray], dtypes: list[str], weights: list[float], out_dtype: str,
                    buf: Buffers) -> Iterator[np.ndarray]:
    """The weighted average of flat arrays, chunk after chunk, each rounded once to ``out_dtype``'s
    storage (a view into ``buf``: use it before the next chunk)."""
    n = arrays[0].size
    for start in range(0, max(n, 1), CHUNK):
        stop = min(start + CHUNK, n)
        acc = average_chunk([a[start:stop] for a in arrays], dtypes, weights, buf)
        yield narrow(acc, out_dtype, buf)


def merge_tensor(plan: MergePlan, name: str, writer: ShardedWriter, buf: Buffers,
                 ready: Future | None = None) -> None:
    """Average one tensor chunk by chunk; non-float tensors are copied from the first model.
    ``ready``: a task-vector method's ``methods.prepare`` of this tensor, run by ``Lookahead``."""
    if plan.spec.method in METHODS:
        return merge_task_tensor(plan, name, writer, buf, ready)
    arrays = [m.array(name) for m in plan.models]
    if not plan.models[0].tensors[name].is_float:
        writer.write(name, arrays[0])
        return
    dtypes = [m.tensors[name].dtype for m in plan.models]
    for chunk in averaged_chunks(arrays, dtypes, plan.weights[name], output_dtype(plan, name), buf):
        writer.write(name, chunk)


def merge_task_tensor(plan: MergePlan, name: str, writer: ShardedWriter, buf: Buffers,
                      ready: Future | None = None) -> None:
    """A task-vector method on one tensor (``soupkit.merge.methods``: a statistics pass if the method
    needs one, then float32 chunks), each chunk rounded once to the output dtype; non-float tensors are
    copied from the base."""
    source = plan.source
    if not source.tensors[name].is_float:
        writer.write(name, source.array(name))
        return
    out_dtype = output_dtype(plan, name)
    fused = out_dtype == "BF16" and jit_enabled()  # one numba pass instead of five numpy ones
    if fused:
        from soupkit.merge.kernels import narrow_bf16
    stream = ready.result()() if ready is not None else merge_stream(plan.spec.method, task_job(plan, name, buf))
    for merged in stream:
        for start in range(0, merged.size, CHUNK):
            chunk = merged[start:start + CHUNK]
            if fused:
                narrow_bf16(chunk, buf.half[: chunk.size])
                writer.write(name, buf.half[: chunk.size])
            else:
                writer.write(name, narrow(chunk, out_dtype, buf))


def task_job(plan: MergePlan, name: str, buf: Buffers) -> TensorJob:
    """One tensor's inputs (read chunk by chunk into ``buf``) and parameters (resolved with mergekit's
    depth and name rules)."""
    spec, roles = plan.spec, plan.task_roles
    ckpts = [plan.base] + [plan.models[i] for i in roles.indices]
    arrays = [c.array(name) for c in ckpts]
    dtypes = [c.tensors[name].dtype for c in ckpts]

    def read(j: int, start: int, stop: int) -> np.ndarray:
        src = arrays[j][start:stop]
        if isinstance(src, np.ndarray) and src.dtype == np.float32:
            return src  # read-only mmap view: no copy
        return widen(src, dtypes[j], buf.input(j)[: stop - start])

    t = mergekit_t(name, plan.num_layers)
    per_model = [{key: resolve(value, name, t, f"merge.models[{i}].{key}") for key, value in settings.items()}
                 for i, settings in zip(roles.indices, roles.per_model)]
    shared = {key: resolve(value, name, t, f"merge.parameters.{key}") for key, value in roles.shared.items()}
    kinds = {(d, a.dtype) if isinstance(a, np.ndarray) else None for d, a in zip(dtypes, arrays)}
    stored = None  # the fused kernels widen bfloat16 themselves when every input is stored alike
    if len(kinds) == 1 and kinds.pop() in (("BF16", np.uint16), ("F32", np.float32)):
        def stored(j: int, start: int, stop: int) -> np.ndarray:
            return arrays[j][start:stop]
    return TensorJob(name, plan.source.tensors[name].shape, read, len(roles.indices), per_model, shared,
                     spec.seed, working_dtype(spec), stored)


def working_dtype(spec: Any) -> str | None:
    """A mergekit YAML's ``dtype`` as a safetensors code when it is narrower than float32, else None."""
    name = (spec.mergekit_config or {}).get("dtype")
    return {"float16": "F16", "fp16": "F16", "half": "F16", "bfloat16": "BF16", "bf16": "BF16"}.get(str(name))


def average_tensors(tensors: list[Any], weights: list[float], buf: Buffers | None = None) -> Any:
    """The weighted average of same-shaped float torch tensors (any device, one dtype), as a new CPU
    tensor of that dtype: the arithmetic of ``write_soup``, so equal to ``soupkit merge`` bit for bit."""
    import torch

    from soupkit.modeldir import torch_dtype_codes, torch_to_numpy

    code = {v: k for k, v in torch_dtype_codes().items()}[tensors[0].dtype]
    arrays = [torch_to_numpy(t.detach().cpu()) for t in tensors]
    chunks = averaged_chunks(arrays, [code] * len(arrays), weights, code, buf or Buffers())
    out = np.concatenate([chunk.copy() for chunk in chunks])  # each chunk is reused scratch space
    if code == "BF16":
        return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).reshape(tensors[0].shape)
    return torch.from_numpy(out).reshape(tensors[0].shape)


def planned_tensors(plan: MergePlan) -> list[PlannedTensor]:
    """The output's tensors, in order, with their output dtypes: what ``write_soup`` will write."""
    return [PlannedTensor(n, output_dtype(plan, n), plan.models[0].tensors[n].shape) for n in plan.names]


def write_soup(plan: MergePlan, out_dir: Path, progress: Progress | None = None) -> int:
    """Merge every tensor of ``plan`` into safetensors shards in ``out_dir``; returns bytes written."""
    planned = planned_tensors(plan)
    writer = ShardedWriter(out_dir, planned, parse_size(plan.spec.shard_size))
    buf = Buffers()
    total, done = sum(t.nbytes for t in planned), 0
    try:
        with Lookahead(plan, [t.name for t in planned], buf) as ahead:
            for tensor in planned:
                merge_tensor(plan, tensor.name, writer, buf, ahead.next())
                done += tensor.nbytes
                if progress is not None:
                    progress(done, total)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return total


class Lookahead:
    """Prepares the coming tensors of a task-vector merge in one worker thread while the caller writes
    the current one: ``methods.prepare``'s statistics passes (TIES's cut, DARE's rescale, the dot
    products of SLERP and Model Stock) run up to ``DEPTH`` tensors ahead of the output passes, on a
    second core. Only for the fused kernels (they release the GIL) reading the inputs as stored (no
    shared scratch); the output is the same bits either way, and only the caller writes. Off with
    one CPU or ``SOUPKIT_MERGE_THREADS=1``."""

    DEPTH = 4

    def __init__(self, plan: MergePlan, names: list[str], buf: Buffers):
        self.plan, self.names, self.buf = plan, names, buf
        self.index, self.submitted = 0, 0
        self.pending: dict[int, Future] = {}
        usable = plan.spec.method in METHODS and jit_enabled() and merge_threads() > 1
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="soupkit-prepare") if usable else None

    def __enter__(self) -> Lookahead:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def next(self) -> Future | None:
        """The current tensor's preparation (None: prepare it in the caller); the coming ones queued.
        The first tensor is prepared here, with the worker's help, before anything is queued."""
        i = self.index
        self.index += 1
        while self.pool is not None and self.submitted < min(i + 1 + self.DEPTH, len(self.names)):
            name = self.names[self.submitted]
            if self.plan.source.tensors[name].is_float:
                job = task_job(self.plan, name, self.buf)
                if job.stored is not None:
                    self.pending[self.submitted] = self._prepare(self.submitted, job)
            self.submitted += 1
        return self.pending.pop(i, None)

    def _prepare(self, i: int, job: TensorJob) -> Future:
        if i > 0:
            return self.pool.submit(prepare, self.plan.spec.method, job)
        done: Future = Future()
        done.set_result(prepare(self.plan.spec.method, job, self.pool))
        return done


def merge_threads() -> int:
    """Threads a merge may use: ``SOUPKIT_MERGE_THREADS`` (default 2), at most the CPUs this process
    may run on."""
    value = os.environ.get("SOUPKIT_MERGE_THREADS", "2")
    if not value.isdigit() or int(value) < 1:
        raise SoupkitError(f"SOUPKIT_MERGE_THREADS: {value!r} is not a positive integer")
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(int(value), cpus)


def checkpoint_dtype(ckpt: Checkpoint) -> str | None:
    """The dtype most of a checkpoint's float bytes are stored in."""
    sizes: dict[str, int] = {}
    for info in ckpt.tensors.values():
        if info.is_float:
            sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
    return max(sizes, key=sizes.__getitem__) if sizes else None
