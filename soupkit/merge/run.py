"""``soupkit.run_merge``: recipe -> preflight -> engine (or mergekit) -> provenance -> rename."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from soupkit import adapters
from soupkit.errors import SoupkitError
from soupkit.locking import check_not_being_written, writing
from soupkit.merge import engine, greedy, mergekit_backend, methods
from soupkit.merge.preflight import MergePlan, is_native_task, preflight
from soupkit.modeldir import CONFIG_DTYPE, DTYPE_NAMES
from soupkit.provenance import write_provenance
from soupkit.recipe import NATIVE_METHODS, MergeSpec, Recipe, load_recipe, to_plain, validate
from soupkit.shards import SUPPORT_FILES, copy_support_files, write_config
from soupkit.storage import atomic_output_dir, check_free_space, check_writable, write_errors

Progress = Callable[[int, int], None]


def load_merge_spec(recipe: str | Path | Mapping[str, Any] | Recipe | MergeSpec) -> MergeSpec:
    """The ``merge:`` section from a recipe path, a recipe dict, or a bare merge-section dict."""
    if isinstance(recipe, MergeSpec):
        return recipe
    if isinstance(recipe, Mapping) and "merge" not in recipe and "models" in recipe:
        return validate(MergeSpec, dict(recipe), "merge")
    loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    label = recipe if isinstance(recipe, (str, Path)) else "recipe"
    soups = loaded.soups()
    if not soups:
        raise SoupkitError(f"{label}: no merge: section")
    if len(soups) > 1:
        raise SoupkitError(f"{label}: merge: holds {len(soups)} soups ({', '.join(s.name for s in soups)}); "
                           f"soupkit merge makes one: run them with soupkit run {label} (--only NAME for one)")
    return soups[0].spec


def run_merge(
    recipe: str | Path | Mapping[str, Any] | Recipe | MergeSpec,
    *,
    out: str | Path | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Merge the ingredients of a recipe's ``merge:`` section; returns the output directory.

    All checks run before any weight is read, free space for the planned output included; the
    output appears only when complete (written to a temporary sibling, then renamed), and an
    existing non-empty output needs ``force``. The output is locked from before its first check
    until the rename, so a second merge into it fails at once instead of replacing this one
    (``soupkit.locking``).
    """
    spec = load_merge_spec(recipe)
    output = Path(out or spec.output or "")
    if not str(output) or output == Path():
        raise SoupkitError("merge.output: no output directory; set merge.output or pass --out")
    with writing([output]):  # before preflight's look at the output, until the rename (issue #16)
        if spec.method == "greedy":
            greedy.check(spec.parameters)
        if is_native_task(spec):
            methods.roles(spec)  # the parameters, before any file is opened
        elif spec.method not in NATIVE_METHODS:
            mergekit_backend.validate(spec)
        check_not_being_written(_ingredients(spec), "merge: ingredient")
        check_writable(output)
        plan = preflight(spec, output, force=force, allow_pickle=allow_pickle)
        try:
            check_free_space(output, planned_bytes(plan), f"the merge into {output}")
            if spec.method == "greedy":  # the search loads the models; the soup of the kept ones is written below
                plan.greedy = greedy.select(plan)
            with write_errors(output, f"{output} is unchanged"), atomic_output_dir(output, force) as tmp:
                _merge_into(plan, tmp, progress)
        finally:
            plan.close()
    return output


def _ingredients(spec: MergeSpec) -> list[str]:
    return [ing.model for ing in spec.models] + ([spec.base] if spec.base else [])


def planned_bytes(plan: MergePlan) -> int:
    """Bytes the output will take: the tensors in their output dtype (an estimate for mergekit
    methods, which write the same tensors) plus the support files copied from the source."""
    tensors = sum(t.nbytes for t in engine.planned_tensors(plan))
    support = sum((plan.source.path / name).stat().st_size for name in SUPPORT_FILES
                  if (plan.source.path / name).is_file())
    return tensors + support


def _merge_into(plan: MergePlan, tmp: Path, progress: Progress | None) -> None:
    dtype = DTYPE_NAMES[plan.spec.dtype] if plan.spec.dtype else engine.checkpoint_dtype(plan.models[0])
    if plan.spec.output_format == "adapter":  # the exact low-rank soup (issue #19)
        adapters.write_adapter_soup(plan, tmp)
    elif plan.native:
        engine.write_soup(kept_plan(plan), tmp, progress)
        write_config(tmp, plan.source.config, dtype)
    else:
        mergekit_backend.run(plan, tmp, CONFIG_DTYPE.get(dtype or "F32", "float32"))
    if not mergekit_backend.owns_tokenizer(plan.spec):
        copy_support_files(_tokenizer_source(plan).path, tmp)
    if plan.chat_template is not None:
        write_template(tmp, plan.chat_template)
    if plan.greedy is not None:
        refs = [ing.model for ing in plan.spec.models]
        (tmp / "greedy_soup.json").write_text(json.dumps(greedy.record(plan.greedy, refs), indent=2) + "\n")
    write_provenance(tmp, {"merge": resolved_spec(plan, dtype)}, model_card(plan, dtype))


def kept_plan(plan: MergePlan) -> MergePlan:
    """A greedy soup's plan: the kept ingredients, in the order the search added them (so the written
    soup is, bit for bit, the one it scored), at uniform weights; any other plan as it is."""
    if plan.greedy is None:
        return plan
    kept = plan.greedy.kept
    uniform = [1.0 / len(kept)] * len(kept)
    return dataclasses.replace(plan, models=[plan.models[i] for i in kept], weights=dict.fromkeys(plan.names, uniform))


def _tokenizer_source(plan: MergePlan) -> Any:
    """The checkpoint the tokenizer comes from: ``merge.tokenizer_source``, else the config's source."""
    refs = [ing.model for ing in plan.spec.models]
    return plan.models[refs.index(plan.spec.tokenizer_source)] if plan.spec.tokenizer_source else plan.source


def write_template(out: Path, template: str) -> None:
    """The soup's chat template as ``chat_template.jinja`` (what transformers reads first), and
    the same text in ``tokenizer_config.json`` when that file carries one too."""
    import json

    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    config = out / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if "chat_template" in data:
            data["chat_template"] = template
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def resolved_spec(plan: MergePlan, dtype: str | None) -> dict[str, Any]:
    """The merge section as run, loadable as a recipe: local paths made absolute, dtype filled in."""
    data = to_plain(plan.spec)
    data.update(method=plan.spec.method, output=str(plan.output.resolve()),
                dtype=plan.spec.dtype or CONFIG_DTYPE.get(dtype or "", None))
    for entry, ckpt in zip(data["models"], plan.models):
        entry["model"] = _portable(ckpt)
    if plan.base is not None:
        data["base"] = _portable(plan.base)
    return data


def _portable(ckpt: Any) -> str:
    """A local directory as an absolute path; a Hub id stays a Hub id."""
    return str(Path(ckpt.ref).resolve()) if Path(ckpt.ref).exists() else ckpt.ref


def model_card(plan: MergePlan, dtype: str | None) -> str:
    """A README model card: what was merged, how, and with which weights."""
    from soupkit import __version__

    spec = plan.spec
    refs = [ing.model for ing in spec.models]
    front = "\n".join(["---", "library_name: transformers", "tags: [soupkit, merge, model-soup]",
                       "base_model:", *[f"  - {r}" for r in refs], "---", ""])
    rows = [f"| {i} | `{ing.model}` | {_weight_text(plan, i)} |" for i, ing in enumerate(spec.models)]
    lines = [
        f"# {plan.output.name}", "",
        f"A `{spec.method}` merge of {len(refs)} models made with soupkit {__version__} on "
        f"{_dt.date.today().isoformat()}.", "",
        "| # | model | weight |", "|---|---|---|", *rows, "",
        f"- output dtype: {CONFIG_DTYPE.get(dtype or '', dtype)}",
        f"- base (config and tokenizer source): `{plan.source.ref}`",
        f"- tensors: {len(plan.names)}; decoder layers: {plan.num_layers}",
        "- the exact recipe is in `soupkit_recipe.yaml`", "",
    ]
    if plan.greedy is not None:
        lines += greedy.card_lines(plan.greedy, refs)
    return front + "\n".join(lines)


def _weight_text(plan: MergePlan, i: int) -> str:
    weight = plan.spec.models[i].weight
    if plan.greedy is not None:
        return f"{1 / len(plan.greedy.kept):.6g}" if i in plan.greedy.kept else "0 (not kept)"
    if plan.spec.method in NATIVE_METHODS and not isinstance(weight, (list, dict)):
        first = plan.weights[plan.names[0]][i] if plan.names else 0.0
        return f"{first:.6g} (normalised)"
    return f"`{weight}`" if weight is not None else "-"
