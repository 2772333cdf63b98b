"""Checks that run before any weight is read, from configs and safetensors headers only.

Each failure is one ``SoupkitError`` naming the model, tensor or key (mergekit reports several of
these only after downloading and reading weights: arcee-ai/mergekit#527).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soupkit import adapters
from soupkit.errors import SoupkitError
from soupkit.loading import tokenizer_vocab, vocab_difference, vocab_size
from soupkit.merge import weights as W
from soupkit.merge.methods import TaskRoles
from soupkit.modeldir import Checkpoint, TensorInfo, open_checkpoint
from soupkit.recipe import NATIVE_METHODS, TASK_METHODS, MergeSpec
from soupkit.storage import check_output_free

ARCH_KEYS = ("architectures", "model_type")
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


@dataclass
class MergePlan:
    """Everything the engine needs, resolved: open checkpoints, tensor order and weights."""

    spec: MergeSpec
    output: Path
    models: list[Checkpoint]
    base: Checkpoint | None
    names: list[str]
    num_layers: int
    weights: dict[str, list[float]]
    chat_template: str | None = None
    """The soup's chat template: ``merge.chat_template``, else the one its ingredients share."""
    task_roles: TaskRoles | None = None
    """For a native task-vector method: the ingredients merged onto the base, and their settings."""
    greedy: Any = None
    """For ``method: greedy``: the search's ``GreedyResult`` once it has run."""

    @property
    def source(self) -> Checkpoint:
        """Where config, tokenizer and generation config come from: the base, else model 0."""
        return self.base or self.models[0]

    @property
    def native(self) -> bool:
        """soupkit's engine writes the tensors (else mergekit does)."""
        return self.spec.method in NATIVE_METHODS or is_native_task(self.spec)

    def close(self) -> None:
        for ckpt in self.all_checkpoints():
            ckpt.close()

    def all_checkpoints(self) -> list[Checkpoint]:
        return self.models + ([self.base] if self.base else [])


def preflight(spec: MergeSpec, output: Path, force: bool = False, allow_pickle: bool = False) -> MergePlan:
    """Open every ingredient lazily and check they can be merged as ``spec`` says."""
    check_output_free(output, force)
    models = [open_ingredient(ing.model, f"merge.models[{i}]", allow_pickle) for i, ing in enumerate(spec.models)]
    base = open_ingredient(spec.base, "merge.base", allow_pickle) if spec.base else None
    everyone = models + ([base] if base else [])
    adapters.check_same_bases(models)
    if spec.output_format == "adapter":
        adapters.check_adapter_soup(models)
    check_same_architecture(everyone)
    check_same_vocabulary(everyone)
    names = check_same_tensors(everyone)
    template = soup_template(models, spec.chat_template)
    num_layers = W.count_layers(models[0].config, names)
    weights = {}
    if spec.method in NATIVE_METHODS:
        per_model = [ing.weight for ing in spec.models]
        weights = {name: W.tensor_weights(per_model, name, num_layers) for name in names}
        _check_mergeable_dtypes(models, names)
    task_roles = None
    if is_native_task(spec):
        from soupkit.merge import methods

        task_roles = methods.roles(spec)
        _check_mergeable_dtypes(everyone, names)
    return MergePlan(spec, output, models, base, names, num_layers, weights, template, task_roles)


def is_native_task(spec: MergeSpec) -> bool:
    """A task-vector method that soupkit's engine runs (not sent to mergekit with ``backend: mergekit``)."""
    return spec.method in TASK_METHODS and spec.backend == "auto"


def open_ingredient(ref: str, where: str, allow_pickle: bool) -> Checkpoint:
    """``open_checkpoint`` with OS errors (permissions, I/O) turned into a named SoupkitError; a
    LoRA adapter (or ``BASE+ADAPTER``) opens as its base with the adapter applied (issue #19)."""
    try:
        if adapters.is_adapter_ref(ref):
            return adapters.open_adapter(ref, where)
        return open_checkpoint(ref, allow_pickle=allow_pickle, what=where)
    except SoupkitError:
        raise
    except OSError as exc:
        raise SoupkitError(f"{where} {ref!r}: cannot read ({exc.strerror or exc})") from None


def check_same_architecture(ckpts: list[Checkpoint]) -> None:
    """Same ``architectures``/``model_type`` and the same core shape settings."""
    first = ckpts[0]
    for other in ckpts[1:]:
        for key in ARCH_KEYS + SHAPE_KEYS:
            a, b = first.config.get(key), other.config.get(key)
            if a != b:
                raise SoupkitError(
                    f"architecture mismatch: {first.ref} has {key}={a!r} but {other.ref} has {key}={b!r}"
                )


def check_same_vocabulary(ckpts: list[Checkpoint]) -> None:
    """Same ``vocab_size`` and, where both ship ``tokenizer.json``, the same token ids (a file
    byte-identical to the first one's is not parsed again: ~0.06 s for a 2 MB one)."""
    first = ckpts[0]
    vocab0 = tokenizer_vocab(first.path)
    file0 = first.path / "tokenizer.json"
    bytes0 = file0.read_bytes() if vocab0 is not None else None
    for other in ckpts[1:]:
        a, b = vocab_size(first.config), vocab_size(other.config)
        if a != b:
            raise SoupkitError(
                f"vocabulary mismatch: {first.ref} has vocab_size={a} but {other.ref} has {b}; "
                "rows of the embeddings would not line up"
            )
        theirs = other.path / "tokenizer.json"
        if bytes0 is not None and theirs.is_file() and theirs.stat().st_size == len(bytes0) \
                and theirs.read_bytes() == bytes0:
            continue
        vocab = tokenizer_vocab(other.path)
        difference = vocab_difference(vocab0, vocab) if vocab0 is not None and vocab is not None else None
        if difference:
            raise SoupkitError(
                f"vocabulary mismatch: the tokenizers of {first.ref} and {other.ref} differ ({difference})"
            )


def soup_template(models: list[Checkpoint], setting: str | None) -> str | None:
    """``setting``'s template, else the ingredients' common one; ingredients whose templates
    differ are refused (a soup's prompts would be rendered one way for half its parents)."""
    from soupkit.chat import CHATML_TOKENS, template_text

    if setting is not None:
        vocab = tokenizer_vocab(models[0].path)
        if setting == "chatml" and vocab is not None and any(t not in vocab for t in CHATML_TOKENS):
            raise SoupkitError(f"merge.chat_template chatml: {models[0].ref} has no {CHATML_TOKENS[1]} token; "
                               "give the SFT stage chat_template: chatml so the ingredients learn it")
        return template_text(setting, None, "merge")
    templates = [read_template(m.path) for m in models]
    for model, template in zip(models[1:], templates[1:]):
        if template != templates[0]:
            raise SoupkitError(f"chat template mismatch: {models[0].ref} and {model.ref} render conversations "
                               "differently; set merge.chat_template (chatml or a .jinja file) to choose the soup's")
    return templates[0]


def read_template(model_dir: Path) -> str | None:
    """A checkpoint's chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    try:
        value = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    except json.JSONDecodeError:
        raise SoupkitError(f"{config}: invalid JSON") from None
    return value if isinstance(value, str) else None


def check_same_tensors(ckpts: list[Checkpoint]) -> list[str]:
    """Identical tensor names and shapes; returns names in the first model's storage order."""
    first = ckpts[0]
    for other in ckpts[1:]:
        missing = [n for n in first.tensors if n not in other.tensors]
        extra = [n for n in other.tensors if n not in first.tensors]
        if missing or extra:
            name, owner, lacking = (missing[0], first, other) if missing else (extra[0], other, first)
            more = len(missing) + len(extra) - 1
            raise SoupkitError(
                f"tensor name mismatch: {name!r} is in {owner.ref} but not in {lacking.ref}"
                + (f" ({more} more)" if more else "")
            )
        for name, info in first.tensors.items():
            if other.tensors[name].shape != info.shape:
                raise SoupkitError(
                    f"tensor shape mismatch: {name!r} is {list(info.shape)} in {first.ref} "
                    f"but {list(other.tensors[name].shape)} in {other.ref}"
                )
    return sorted(first.tensors, key=lambda n: _storage_order(first.tensors[n]))


def _storage_order(info: TensorInfo) -> tuple[str, int]:
    return (str(info.file), info.start)


def _check_mergeable_dtypes(models: list[Checkpoint], names: list[str]) -> None:
    for name in names:
        infos = [m.tensors[name] for m in models]
        floats = {info.is_float for info in infos}
        if len(floats) > 1:
            raise SoupkitError(f"tensor {name!r} is floating point in some models but not in others")
        fp8 = [m.ref for m, info in zip(models, infos) if info.dtype.startswith("F8")]
        if fp8:
            raise SoupkitError(f"tensor {name!r} in {fp8[0]} is fp8; dequantise before merging")
