"""PEFT LoRA adapter directories as soup ingredients, references and policy starts.

A LoRA adapter (Hu et al. 2021, arXiv 2106.09685) changes a base weight ``W`` (out x in) to
``W + s * B @ A`` with ``A`` (r x in), ``B`` (out x r) and ``s = lora_alpha / r`` (``lora_alpha /
sqrt(r)`` with rsLoRA, arXiv 2312.03732). Read here from ``adapter_config.json`` and
``adapter_model.safetensors`` (the files ``PeftModel.save_pretrained`` writes), without torch.

Two ways to use adapters in a soup:

- **As ingredients** (``AdapterCheckpoint``): every tensor of the base, with each adapted tensor
  materialised chunk by chunk as ``float32(base) + float32(s * (B @ A))``, the product summed in
  float64. The soup of adapters is then the soup of the merged models (``merge_and_unload``),
  never holding a whole merged model in memory.
- **As an exact low-rank soup** (``write_adapter_soup``): ``sum_i w_i s_i B_i A_i`` is the product
  of the concatenations ``B' = [w_1 s_1/s' B_1 ... w_n s_n/s' B_n]`` (out x sum r_i) and
  ``A' = [A_1; ...; A_n]`` (sum r_i x in), so an adapter of rank ``sum r_i`` and scale ``s'``
  *is* the soup, exactly. Averaging the factors instead, ``mean(B) @ mean(A)``, adds the cross
  terms ``B_i A_j`` (i != j) that belong to no ingredient: it is not the soup.

mergekit's ``BASE+ADAPTER`` spelling names an adapter on an explicit base.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from soupkit.errors import SoupkitError
from soupkit.modeldir import (
    Checkpoint,
    TensorInfo,
    open_checkpoint,
    read_safetensors_header,
    resolve_model_dir,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
FACTORS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}
REFUSED = {  # adapter_config key -> why soupkit cannot treat the adapter as W + s B A
    "use_dora": "DoRA rescales each column of W + s B A, which is not a sum of low-rank terms",
    "lora_bias": "a LoRA bias term is not part of W + s B A",
    "layer_replication": "layer replication changes the base's layers",
    "target_parameters": "LoRA on raw parameters is not supported",
    "trainable_token_indices": "trainable tokens are not supported",
}


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a local directory holding a PEFT adapter (``adapter_config.json``)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def split_spelling(ref: str) -> tuple[str, str] | None:
    """mergekit's ``BASE+ADAPTER`` as ``(base, adapter)``; None for a plain reference (a path
    that exists as given, '+' included, is a path)."""
    if "+" not in ref or Path(ref).expanduser().exists():
        return None
    base, _, adapter = ref.rpartition("+")
    return (base, adapter) if base and adapter else None


def is_adapter_ref(ref: str | Path) -> bool:
    """An adapter directory, or ``BASE+ADAPTER``."""
    return split_spelling(str(ref)) is not None or is_adapter_dir(ref)


@dataclass(frozen=True)
class LoraModule:
    """One adapted base tensor: where its factors are and how they combine."""

    target: str
    """The base tensor the update is added to, e.g. ``model.layers.0.mlp.up_proj.weight``."""
    a: str
    b: str
    rank: int
    scale: float
    transpose: bool
    """The update is ``(B @ A).T``: GPT-2's Conv1D (``fan_in_fan_out``) and embeddings store W as in x out."""


@dataclass
class Adapter:
    """An adapter directory, read: config, factor locations, and its base's directory."""

    ref: str
    path: Path
    config: dict[str, Any]
    base_ref: str
    base_path: Path
    tensors: dict[str, TensorInfo]
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)
    """Base tensor -> adapter tensor stored whole (PEFT's ``modules_to_save``, or the embedding
    layer it saves with embedding LoRA), which replaces the base's as it does in PEFT."""

    @property
    def tokenizer_dir(self) -> Path:
        """The adapter's own tokenizer when it saved one (an SFT run does), else the base's."""
        has_own = any((self.path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
        return self.path if has_own else self.base_path


def read_adapter(ref: str, what: str = "adapter") -> Adapter:
    """Read an adapter (a directory or ``BASE+ADAPTER``) and resolve its base; checks the
    config and files, not the base's tensors (``open_adapter`` does that)."""
    spelled = split_spelling(ref)
    adapter_ref, base_ref = (spelled[1], spelled[0]) if spelled else (ref, None)
    path = resolve_model_dir(adapter_ref, what)
    config = _read_config(path, what)
    if base_ref is None:
        base_ref = config.get("base_model_name_or_path")
        if not base_ref:
            raise SoupkitError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path; "
                               f"name the base as BASE+{adapter_ref}")
    base_path = _base_dir(str(base_ref), path, what)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise SoupkitError(f"{what} {adapter_ref!r}: missing {ADAPTER_WEIGHTS} in {path}"
                           + (" (adapter_model.bin is pickle; resave it as safetensors)"
                              if (path / "adapter_model.bin").is_file() else ""))
    tensors = read_safetensors_header(weights)
    adapter = Adapter(ref, path, config, str(base_ref), base_path, tensors)
    _index(adapter, what)
    return adapter


def _read_config(path: Path, what: str) -> dict[str, Any]:
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise SoupkitError(f"{what} {path}: missing {ADAPTER_CONFIG}; is it a PEFT adapter?")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise SoupkitError(f"{file}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise SoupkitError(f"{file}: peft_type {config.get('peft_type')!r}; soupkit reads LoRA adapters only")
    for key, why in REFUSED.items():
        if config.get(key):
            raise SoupkitError(f"{file}: {key} is set; {why}")
    if config.get("bias", "none") != "none":
        raise SoupkitError(f"{file}: bias {config['bias']!r}; an adapter that trains biases is not W + s B A")
    return config


def _base_dir(base_ref: str, adapter_path: Path, what: str) -> Path:
    """The base's directory: as written, or relative to the adapter (PEFT records the path the
    trainer was given, often relative to where it ran)."""
    for candidate in (base_ref, str(adapter_path / base_ref)):
        try:
            path = resolve_model_dir(candidate, f"{what} base")
        except SoupkitError:
            continue
        if is_adapter_dir(path):
            raise SoupkitError(f"{what} {adapter_path}: its base {base_ref!r} is itself an adapter; "
                               "merge that one into its base first")
        return path
    raise SoupkitError(f"{what} {adapter_path}: its base {base_ref!r} (adapter_config.json "
                       f"base_model_name_or_path) is not found; name the base as BASE+{adapter_path}")


def _index(adapter: Adapter, what: str) -> None:
    """Pair every ``lora_A``/``lora_B`` and ``modules_to_save`` tensor with its base tensor."""
    halves: dict[str, dict[str, str]] = {}
    for key in adapter.tensors:
        name = key.removeprefix(PREFIX)
        factor = next((f for f in FACTORS if name.endswith("." + f)), None)
        if factor is None:
            # modules_to_save, or an embedding layer PEFT saved whole beside its LoRA factors
            adapter.replaced[name.replace(".modules_to_save", "").replace(".base_layer", "")] = key
            continue
        module = name[: -len(factor) - 1]
        halves.setdefault(module, {})[FACTORS[factor]] = key
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise SoupkitError(f"{what} {adapter.path}: {module} has no {missing} tensor ({ADAPTER_WEIGHTS})")
        adapter.modules[module + ".weight"] = _module(adapter, module, pair, what)


def _module(adapter: Adapter, module: str, pair: dict[str, str], what: str) -> LoraModule:
    a, b = adapter.tensors[pair["A"]], adapter.tensors[pair["B"]]
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise SoupkitError(f"{what} {adapter.path}: {module}: lora_A {list(a.shape)} and lora_B "
                           f"{list(b.shape)} do not multiply (rank mismatch)")
    rank = a.shape[0]
    alpha = _pattern_value(adapter.config.get("alpha_pattern") or {}, module, adapter.config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if adapter.config.get("use_rslora") else alpha / rank
    embedding = pair["A"].endswith("lora_embedding_A")
    return LoraModule(module + ".weight", pair["A"], pair["B"], rank, float(scale),
                      embedding or bool(adapter.config.get("fan_in_fan_out")))


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: a pattern matches a module name's dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# ---------------------------------------------------------------------------------------------
# An adapter as a checkpoint of merged tensors


class Materialised:
    """A flat view of ``base + s * B @ A`` (or of ``base`` alone: a tensor the adapter stores whole)
    that computes the float32 elements of a slice when asked; the engine reads it chunk by chunk."""

    def __init__(self, base: np.ndarray, base_dtype: str, shape: tuple[int, ...], a: np.ndarray | None = None,
                 b: np.ndarray | None = None, scale: float = 1.0, transpose: bool = False):
        self.base, self.base_dtype, self.shape = base, base_dtype, shape
        self.size = math.prod(shape)
        self.scale, self.left, self.right = scale, None, None
        if a is not None and b is not None:  # float64 factors: the r-term sums carry no fp32 rounding
            self.left = (a.T if transpose else b).astype(np.float64)
            self.right = (b.T if transpose else a).astype(np.float64)

    def __getitem__(self, item: slice) -> np.ndarray:
        from soupkit.merge.engine import widen

        start, stop, _ = item.indices(self.size)
        out = widen(self.base[start:stop], self.base_dtype, np.empty(stop - start, np.float32))
        if self.left is not None:
            out += self.delta(start, stop)
        return out

    def delta(self, start: int, stop: int) -> np.ndarray:
        """float32(s * (B @ A)) for flat elements [start, stop), from the rows they span."""
        cols = self.shape[-1]
        r0, r1 = start // cols, -(-stop // cols)
        rows = self.left[r0:r1] @ self.right
        rows *= self.scale
        return rows.reshape(-1)[start - r0 * cols: stop - r0 * cols].astype(np.float32)


class AdapterCheckpoint:
    """A base checkpoint with an adapter applied: the base's config and tensor list; ``array``
    gives the merged tensor (a ``Materialised`` view for the adapted ones). Stands in for a
    ``Checkpoint`` in the merge engine and the weight diagnostics."""

    pickled = None

    def __init__(self, adapter: Adapter, base: Checkpoint):
        self.adapter, self.base = adapter, base
        self.ref, self.config, self.tensors = adapter.ref, base.config, base.tensors
        self.path = adapter.tokenizer_dir
        self._weights: Checkpoint = Checkpoint(adapter.ref, adapter.path, {}, adapter.tensors)

    def array(self, name: str) -> np.ndarray | Materialised:
        info = self.base.tensors[name]
        key, module = self.adapter.replaced.get(name), self.adapter.modules.get(name)
        if key is None and module is None:
            return self.base.array(name)
        base, dtype = (self._weights.array(key), self.adapter.tensors[key].dtype) if key else \
            (self.base.array(name), info.dtype)
        if module is None:
            return Materialised(base, dtype, info.shape)
        a, b = self.factor(module.a), self.factor(module.b)
        return Materialised(base, dtype, info.shape, a, b, module.scale, module.transpose)

    def factor(self, key: str) -> np.ndarray:
        """A factor as a float32 matrix."""
        from soupkit.merge.engine import widen

        info = self.adapter.tensors[key]
        flat = widen(self._weights.array(key), info.dtype, np.empty(info.numel, np.float32))
        return flat.reshape(info.shape)

    def close(self) -> None:
        self.base.close()
        self._weights.close()

    def __enter__(self) -> AdapterCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_adapter(ref: str, what: str = "adapter") -> AdapterCheckpoint:
    """An adapter (directory or ``BASE+ADAPTER``) on its base, checked against the base's
    tensors: every adapted tensor exists, is 2-D, and has the shape ``B @ A`` gives."""
    adapter = read_adapter(ref, what)
    base = open_checkpoint(str(adapter.base_path), what=f"{what} base")
    for name, module in adapter.modules.items():
        info = base.tensors.get(name)
        if info is None:
            raise SoupkitError(f"{what} {adapter.path}: adapts {name!r}, which its base {adapter.base_ref} "
                               "does not have (an adapter for another base?)")
        out, r = adapter.tensors[module.b].shape
        shape = (adapter.tensors[module.a].shape[1], out) if module.transpose else (out, adapter.tensors[module.a].shape[1])
        if info.shape != shape:
            raise SoupkitError(f"{what} {adapter.path}: {name!r} is {list(info.shape)} in the base "
                               f"{adapter.base_ref} but the adapter's B @ A is {list(shape)}")
    for name, key in adapter.replaced.items():
        info = base.tensors.get(name)
        if info is None or info.shape != adapter.tensors[key].shape:
            raise SoupkitError(f"{what} {adapter.path}: stores {key!r} whole, which does not match "
                               f"a tensor of its base {adapter.base_ref}")
    return AdapterCheckpoint(adapter, base)


def check_same_bases(models: list[Any]) -> None:
    """Adapter ingredients must sit on one base: their updates are differences from it."""
    on = [m for m in models if isinstance(m, AdapterCheckpoint)]
    for other in on[1:]:
        if other.adapter.base_path.resolve() != on[0].adapter.base_path.resolve():
            raise SoupkitError(f"adapters on different bases: {on[0].ref} is on {on[0].adapter.base_ref} "
                               f"but {other.ref} is on {other.adapter.base_ref}")


def check_adapter_soup(models: list[Any]) -> None:
    """``output_format: adapter`` needs LoRA adapters on one base adapting the same tensors."""
    for model in models:
        if not isinstance(model, AdapterCheckpoint):
            raise SoupkitError(f"merge.output_format adapter: {model.ref} is not a LoRA adapter; "
                               "an adapter soup needs every ingredient to be one")
        if model.adapter.replaced:
            raise SoupkitError(f"merge.output_format adapter: {model.ref} stores "
                               f"{next(iter(model.adapter.replaced))!r} whole (modules_to_save, or a saved embedding "
                               "layer); use output_format: model")
    first = models[0].adapter
    for model in models[1:]:
        diff = set(first.modules) ^ set(model.adapter.modules)
        if diff:
            name = min(diff)
            owner, lacking = (models[0], model) if name in first.modules else (model, models[0])
            raise SoupkitError(f"merge.output_format adapter: {owner.ref} adapts {name!r} but {lacking.ref} does "
                               "not (different target modules); use output_format: model")
    ranks = {sum(m.adapter.modules[name].rank for m in models) for name in first.modules}
    if len(ranks) > 1:
        raise SoupkitError(f"merge.output_format adapter: the summed rank differs between modules ({sorted(ranks)}; "
                           "rank_pattern); use output_format: model")


def write_adapter_soup(plan: Any, out: Path) -> None:
    """The exact low-rank soup of ``plan``'s adapters as one PEFT adapter in ``out``:
    ``A' = [A_1; ...; A_n]``, ``B' = [w_1 s_1/s' B_1 ... w_n s_n/s' B_n]`` per module, with
    ``w_i`` the normalised soup weights of the module's base tensor and ``s'`` the first adapter's
    scale (so each block is ``w_i B_i`` when the scales agree), rounded once to float32."""
    from safetensors.numpy import save_file

    models: list[AdapterCheckpoint] = plan.models
    first = models[0].adapter
    scale = _config_scale(first.config)
    tensors: dict[str, np.ndarray] = {}
    for name, module in first.modules.items():
        parts = [(m, m.adapter.modules[name]) for m in models]
        weights = plan.weights[name]
        tensors[module.a] = np.concatenate([m.factor(lm.a) for m, lm in parts], axis=0)
        blocks = [m.factor(lm.b).astype(np.float64) * (w * lm.scale / scale) for (m, lm), w in zip(parts, weights)]
        tensors[module.b] = np.concatenate(blocks, axis=1).astype(np.float32)
    rank = next(iter(tensors.values())).shape[0] if tensors else 0
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = dict(first.config, r=rank, lora_alpha=_alpha_for(scale, rank, first.config), alpha_pattern={},
                  rank_pattern={}, base_model_name_or_path=_portable_base(first))
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _config_scale(config: dict[str, Any]) -> float:
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _alpha_for(scale: float, rank: int, config: dict[str, Any]) -> float:
    """The ``lora_alpha`` that gives ``scale`` at ``rank`` (PEFT divides by r, or sqrt(r) with rsLoRA)."""
    return scale * (math.sqrt(rank) if config.get("use_rslora") else rank)


def _portable_base(adapter: Adapter) -> str:
    """The base as a Hub id when it was named by one, else as an absolute path."""
    return adapter.base_ref if not Path(adapter.base_ref).expanduser().exists() and \
        not (adapter.path / adapter.base_ref).exists() else str(adapter.base_path.resolve())


def mergekit_name(ckpt: Any) -> str:
    """How mergekit names a checkpoint: its directory, or ``BASE+ADAPTER`` (mergekit then merges
    the adapter into its base itself)."""
    if isinstance(ckpt, AdapterCheckpoint):
        return f"{ckpt.adapter.base_path.resolve()}+{ckpt.adapter.path.resolve()}"
    return str(ckpt.path)


@contextmanager
def mergekit_lora_cache(plan: Any, out_dir: Path) -> Iterator[str | None]:
    """A scratch directory beside the output where mergekit writes each adapter merged into its
    base (whole models: the native methods avoid this), removed afterwards; None without adapters."""
    if not any(isinstance(m, AdapterCheckpoint) for m in plan.all_checkpoints()):
        yield None
        return
    cache = Path(tempfile.mkdtemp(prefix=".lora-merge-cache-", dir=out_dir.parent))
    try:
        yield str(cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Adapters in a PPO run (soupkit.rlhf.models)


def resolve_dir(ref: str, what: str) -> Path:
    """A model directory, or an adapter directory checked now (its config, factors and base), so
    a bad adapter fails before any weights load."""
    if is_adapter_dir(ref):
        read_adapter(ref, what)
        return Path(ref).expanduser()
    return resolve_model_dir(ref, what)


def base_dir(path: Path) -> Path:
    """The directory whose weights a model starts from: an adapter's base, else ``path`` itself."""
    return read_adapter(str(path)).base_path if is_adapter_dir(path) else path


def adapter_dir(path: Path) -> Path | None:
    return path if is_adapter_dir(path) else None


def tokenizer_dir(path: Path) -> Path:
    return read_adapter(str(path)).tokenizer_dir if is_adapter_dir(path) else path


def same_dir(a: Path, b: Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def is_adapter_on(path: Path, base: Path) -> bool:
    """Whether ``path`` is an adapter whose base is ``base``."""
    return is_adapter_dir(path) and same_dir(read_adapter(str(path)).base_path, base)


def merged_causal_lm(path: str | Path, dtype: Any, trust_remote_code: bool = False) -> Any:
    """An adapter (a directory or ``BASE+ADAPTER``) merged into its base by PEFT
    (``merge_and_unload``, in float32), then cast to ``dtype``: a separate full model, for a
    reference that cannot share the policy's base, or for the output diagnostics."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = read_adapter(str(path))
    base = AutoModelForCausalLM.from_pretrained(adapter.base_path, dtype=torch.float32,
                                                trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, adapter.path).merge_and_unload().to(dtype)


def lm_source(ckpt: Any) -> str | Path:
    """What to load a checkpoint's causal LM from: an adapter's own reference (its tensors' ``path``
    is where its tokenizer lives, possibly the base's), else the directory."""
    return ckpt.ref if isinstance(ckpt, AdapterCheckpoint) else ckpt.path


class AdapterReference:
    """A frozen adapter loaded beside a LoRA policy's trainable one, on the same copy of the base,
    and read by switching the active adapter for its forward pass: base + reference adapter (the
    adapter soup, or the policy's own start) with no second copy of the weights. TRL's
    adapter-disabled reference is the base, which is the right reference only when the policy's
    adapter starts at zero. Called like a model."""

    training = False

    def __init__(self, peft_model: Any, path: Path):
        self.model = peft_model
        self.name = f"frozen-{len(peft_model.peft_config)}"
        active = peft_model.active_adapter
        peft_model.load_adapter(str(path), adapter_name=self.name, is_trainable=False)
        peft_model.set_adapter(active)  # PEFT's set_adapter also restores which factors train

    def __call__(self, **kwargs: Any) -> Any:
        active = self.model.active_adapter
        self.model.set_adapter(self.name)
        try:
            return self.model(**kwargs)
        finally:
            self.model.set_adapter(active)


# ---------------------------------------------------------------------------------------------
# SFT runs that train adapters (soupkit.train)


def sft_lora_config(spec: Any, tokenizer: Any, where: str) -> Any:
    """PEFT's ``LoraConfig`` for an ``sft:`` run with ``lora_rank`` (None without). chatml on a
    vocabulary that lacks its tokens is refused: the new embedding rows would not be in the adapter."""
    if not spec.lora_rank:
        return None
    from peft import LoraConfig

    from soupkit.chat import CHATML_TOKENS

    if spec.chat_template == "chatml" and any(t not in tokenizer.get_vocab() for t in CHATML_TOKENS):
        raise SoupkitError(f"{where}: lora_rank with chat_template chatml needs a base whose vocabulary has "
                           f"{', '.join(CHATML_TOKENS)} (an adapter cannot carry new embedding rows)")
    return LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, target_modules=spec.lora_target_modules,
                      lora_dropout=0.0, task_type="CAUSAL_LM")


def pin_base(adapter_out: Path, base_ref: str) -> None:
    """Record the base in ``adapter_config.json`` as a user would name it: a local directory as an
    absolute path (PEFT writes the path it was given, relative to where training ran), a Hub id
    as the id (not the cache snapshot it was read from)."""
    file = adapter_out / ADAPTER_CONFIG
    config = json.loads(file.read_text())
    local = Path(base_ref).expanduser()
    config["base_model_name_or_path"] = str(local.resolve()) if local.is_dir() else base_ref
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
