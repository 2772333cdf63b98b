"""``soupkit inspect``: check the inputs, measure, and write the JSON report and plots.

Order of work: every check that can fail on bad input (checkpoints, architecture, vocabulary,
tensor names, prompts file, reward, outputs) runs before any weight is read; the weight-space pass
streams the checkpoints; the output-space and path passes load the models with transformers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from soupkit.adapters import lm_source
from soupkit.chat import checked_setting, render, use_template
from soupkit.errors import SoupkitError
from soupkit.formats import Prompt
from soupkit.merge.preflight import (
    check_same_architecture,
    check_same_tensors,
    check_same_vocabulary,
    open_ingredient,
)
from soupkit.modeldir import Checkpoint
from soupkit.storage import check_output_free

Progress = Callable[[str, int, int], None]
PAIR_KEYS = ("l2", "relative_l2", "cosine", "task_norm_a", "task_norm_b", "task_cosine", "sign_conflict")


@dataclass
class Inputs:
    """Checked inputs. ``order`` is the computation order: the soup (if any) first."""

    refs: list[str]
    ckpts: list[Checkpoint]
    base: Checkpoint | None
    names: list[str]
    texts: list[Prompt] | None
    soup: int | None
    reward: Any
    """A reward function, a checked reward-model directory (loaded for the path), or None."""
    chat_template: str = "auto"
    sampling: Any = None
    """How the path's completions are drawn (``soupkit.evaluation.sampling.Sampling``)."""

    @property
    def order(self) -> list[int]:
        rest = [i for i in range(len(self.refs)) if i != self.soup]
        return ([self.soup] if self.soup is not None else []) + rest

    @property
    def ingredients(self) -> list[int]:
        return [i for i in range(len(self.refs)) if i != self.soup]

    def close(self) -> None:
        for ckpt in self.ckpts + ([self.base] if self.base else []):
            ckpt.close()


def recipe_ingredients(ckpt: Checkpoint) -> list[Path]:
    """Resolved ingredient paths from a soup's ``soupkit_recipe.yaml``, or [] if not a soup."""
    import yaml

    path = ckpt.path / "soupkit_recipe.yaml"
    if not path.is_file():
        return []
    try:
        models = (yaml.safe_load(path.read_text()) or {}).get("merge", {}).get("models", [])
    except (yaml.YAMLError, AttributeError):
        return []
    refs = [m.get("model") if isinstance(m, dict) else m for m in models]
    return [Path(r).resolve() for r in refs if isinstance(r, str)]


def find_soup(ckpts: Sequence[Checkpoint], soup: str | None) -> int | None:
    """Index of the soup: the one named, else one whose recipe lists two or more of the others."""
    resolved = [c.path.resolve() for c in ckpts]
    if soup is not None:
        target = Path(soup).resolve()
        if target not in resolved:
            raise SoupkitError(f"--soup {soup!r} is not one of the models given")
        return resolved.index(target)
    for i, ckpt in enumerate(ckpts):
        found = set(recipe_ingredients(ckpt)) & (set(resolved) - {resolved[i]})
        if len(found) >= 2:
            return i
    return None


def prepare(models: Sequence[str], base: str | None, prompts: str | Path | None, path: bool,
            reward: str | None, points: int, soup: str | None, allow_pickle: bool,
            chat_template: str = "auto", prompt_split: str = "train", sampling: Any = None) -> Inputs:
    """Open and check everything; raises ``SoupkitError`` before any weight is read."""
    from soupkit.diagnostics.texts import read_texts

    if len(models) < 2:
        raise SoupkitError("inspect needs at least two models")
    if (path or reward) and prompts is None:
        raise SoupkitError("--path and --reward need --prompts (the texts the loss is measured on)")
    if reward and not path:
        raise SoupkitError("--reward scores samples along the interpolation path; add --path")
    if points < 2:
        raise SoupkitError(f"--points {points}: need at least 2 points on the path")
    ckpts = [open_ingredient(m, f"model {i + 1}", allow_pickle) for i, m in enumerate(models)]
    base_ckpt = open_ingredient(base, "--base", allow_pickle) if base else None
    everyone = ckpts + ([base_ckpt] if base_ckpt else [])
    check_same_architecture(everyone)
    check_same_vocabulary(everyone)
    names = check_same_tensors(everyone)
    texts = read_texts(prompts, prompt_split) if prompts is not None else None
    reward_fn = _reward(reward)
    template = checked_setting(chat_template, "--chat-template")
    if reward and sampling is None:
        from soupkit.evaluation.sampling import default_sampling

        sampling = default_sampling(chat_template=template)
    return Inputs(list(models), ckpts, base_ckpt, names, texts, find_soup(ckpts, soup), reward_fn, template, sampling)


def _reward(spec: str | None) -> Any:
    """The reward function, or the reward model's directory checked from its files (loaded later,
    with the policy's tokenizer, as training loads it)."""
    if spec is None:
        return None
    from soupkit.rlhf.reward import is_function_ref, load_reward_fn, reward_model_dir

    if is_function_ref(spec):
        return load_reward_fn(spec)
    if Path(spec).is_dir():
        return reward_model_dir(spec)
    raise SoupkitError(f"--reward {spec!r}: neither a reward-model directory nor module:function")


def weight_pairs(inp: Inputs, progress: Progress | None) -> list[dict[str, Any]]:
    """Weight-space stats of every pair, ``a`` before ``b`` in computation order."""
    from soupkit.diagnostics.weights import weight_stats

    order = inp.order
    stats = weight_stats([inp.ckpts[i] for i in order], inp.base, inp.names, progress)
    pairs = []
    for (i, j), s in zip(combinations(order, 2), stats):
        pairs.append({"a": inp.refs[i], "b": inp.refs[j], **{k: s[k] for k in PAIR_KEYS if k in s},
                      "layers": s["layers"], "modules": s["modules"]})
    return pairs


def output_pass(inp: Inputs, pairs: list[dict[str, Any]], want_path: bool, points: int,
                progress: Progress | None) -> dict[str, Any] | None:
    """Output-space stats into ``pairs`` (in place); returns the path section if asked for."""
    from soupkit.diagnostics.outputs import output_stats
    from soupkit.diagnostics.texts import encode, pad_id
    from soupkit.loading import causal_lm, load_tokenizer

    tok = load_tokenizer(inp.ckpts[inp.order[0]].path, "model")
    template = use_template(tok, inp.chat_template, f"model {inp.refs[inp.order[0]]}")
    texts = render(tok, inp.texts or [], template, "--prompts")
    ids = encode(tok, texts, special_tokens=template is None)  # a template writes its own special tokens
    lms = {i: causal_lm(lm_source(inp.ckpts[i]), f"model {i + 1}") for i in inp.order}
    stats, _ = output_stats([lms[i] for i in inp.order], ids, pad_id(tok), progress)
    for pair, s in zip(pairs, stats):
        pair.update(s)
    if not want_path:
        return None
    return path_pass(inp, lms, tok, ids, points, progress)


def path_pass(inp: Inputs, lms: dict[int, Any], tok: Any, ids: list[list[int]], points: int,
              progress: Progress | None) -> dict[str, Any]:
    """Line between the first two ingredients; plane when there are exactly three."""
    from soupkit.diagnostics import path as P
    from soupkit.diagnostics.texts import pad_id
    from soupkit.loading import causal_lm

    corners = inp.ingredients[:3]
    sources = [P.snapshot(lms[i]) for i in corners]
    work = causal_lm(lm_source(inp.ckpts[corners[0]]), "model")
    score = path_reward(inp, inp.ckpts[corners[0]].path) if inp.reward is not None else None
    out = {"a": inp.refs[corners[0]], "b": inp.refs[corners[1]],
           **P.line(work, sources[:2], ids, pad_id(tok), points, score, progress)}
    if len(inp.ingredients) == 3:
        plane = P.plane(work, sources, ids, pad_id(tok), points, score, progress)
        out["plane"] = {"models": [inp.refs[i] for i in corners], **plane}
    return out


def path_reward(inp: Inputs, model_dir: Path) -> Callable[[Any], float]:
    """``model -> mean reward`` at a point of the path, by eval's protocol (``soupkit.evaluation.
    sampling``): the policy's chat set-up from ``model_dir``, the same seed at every point."""
    from soupkit.chat import policy_chat
    from soupkit.evaluation.sampling import mean_score
    from soupkit.rlhf.models import reward_model

    chat = policy_chat(model_dir, inp.sampling.chat_template, f"model {model_dir}")
    scorer = reward_model(inp.reward, chat.tokenizer, "cpu") if isinstance(inp.reward, Path) else inp.reward
    return lambda model: mean_score(model, inp.texts or [], chat, inp.sampling, scorer)


def report(models: Sequence[str], *, base: str | None = None, prompts: str | Path | None = None,
           path: bool = False, reward: str | None = None, points: int = 9, soup: str | None = None,
           allow_pickle: bool = False, chat_template: str = "auto", prompt_split: str = "train",
           sampling: Any = None, progress: Progress | None = None) -> dict[str, Any]:
    """Measure ``models`` (paths or Hub ids) and return the JSON-ready report.

    ``{"models": [...], "pairs": [{"a", "b", "l2", "relative_l2", "cosine", "task_cosine",
    "sign_conflict", "kl", "kl_reverse", "js", "top1_agreement", "layers": [...], ...}],
    "path": {...}}``; keys are absent when not computed. A soup's pairs put the soup as ``a``.
    The path's reward samples with ``sampling`` (``soupkit.evaluation.sampling.Sampling``; default:
    an align run's defaults).
    """
    inp = prepare(models, base, prompts, path, reward, points, soup, allow_pickle, chat_template, prompt_split,
                  sampling)
    try:
        pairs = weight_pairs(inp, progress)
        result: dict[str, Any] = {"models": inp.refs, "pairs": pairs}
        if inp.texts is not None:
            path_section = output_pass(inp, pairs, path, points, progress)
            if path_section is not None:
                result["path"] = path_section
    finally:
        inp.close()
    return drop_none(result)


def drop_none(value: Any) -> Any:
    """The report with every None-valued key removed (undefined: a zero norm, nothing changed)."""
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_none(v) for v in value]
    return value


def check_outputs(json_out: str | Path | None, plots: str | Path | None, force: bool) -> None:
    """Refuse to overwrite an existing report or plots directory without ``force``."""
    if json_out is not None and Path(json_out).exists() and not force:
        raise SoupkitError(f"--json {json_out} already exists; pass --force to replace it")
    if json_out is not None and Path(json_out).is_dir():
        raise SoupkitError(f"--json {json_out} is a directory; give a file name")
    if plots is not None:
        check_output_free(Path(plots), force)


def write_json(result: dict[str, Any], out: str | Path) -> None:
    """Write the report atomically (temporary sibling, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)


def run_inspect(models: Sequence[str], *, json_out: str | Path | None = None,
                plots: str | Path | None = None, force: bool = False, **kw: Any) -> dict[str, Any]:
    """``report(models, **kw)``, then the JSON file and plots; outputs are checked first, and
    locked from then until written so a second inspect cannot replace them (``soupkit.locking``)."""
    from soupkit.locking import check_not_being_written, writing

    with writing([p for p in (json_out, plots) if p is not None]):
        check_outputs(json_out, plots, force)
        check_not_being_written([*models, kw["base"]] if kw.get("base") else models, "model")
        result = report(models, **kw)
        if plots is not None:
            from soupkit.diagnostics.plots import write_plots

            write_plots(result, Path(plots), force)
        if json_out is not None:
            write_json(result, json_out)
    return result
