"""``soupkit demo``: the whole SALSA experiment at toy scale, on a CPU, nothing downloaded.

Writes the tiny world's data and a randomly initialised tiny Llama with its tokenizer, then runs
``salsa-tiny.yaml`` (shipped as ``recipes/salsa-tiny.yaml``) through the pipeline, so a second
``soupkit demo`` skips what is already complete and an interrupted one picks up where it stopped.
``soupkit demo --model smollm2`` runs ``salsa-smollm2.yaml`` instead: the same experiment on a real
chat model (SmolLM2-135M-Instruct, ``soupkit.realmodel``) with the chat world's data
(``soupkit.demo.chat_world``), in about 7 minutes on two cores.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from soupkit.demo import world
from soupkit.errors import SoupkitError

RECIPE = Path(__file__).with_name("salsa-tiny.yaml")
RECIPES = {"toy": RECIPE, "smollm2": Path(__file__).with_name("salsa-smollm2.yaml")}
"""The demo's worlds: the toy one (the default), and the real chat model SmolLM2-135M-Instruct."""
PREFIX = "soupkit-demo"
SIZES = {"pretrain": 4000, "sft": 1000, "preferences": 2000, "prompts": 512, "heldout": 128}
# The reduced demo for CI: same pipeline, smaller data and runs, one seed.
SMALL = {"pretrain": 600, "sft": 200, "preferences": 200, "prompts": 64, "heldout": 24}
SMALL_OVERRIDES = ("align.steps=3", "align.seeds=[0]", "align.batch_size=8", "align.save_every=2",
                   "align.max_new_tokens=12", "eval.bootstrap=200", "eval.path.points=3")
SMALL_REAL = ("align.steps=2", "align.batch_size=4", "align.ppo_epochs=1", "align.save_every=0", "eval.bootstrap=200")


def demo_recipe(root: Path, overrides: Iterable[str] = (), model: str = "toy", base: Path | None = None) -> Any:
    """The shipped recipe of ``model`` with every ``soupkit-demo/`` path moved under ``root``
    (and the real model's ``SMOLLM2`` placeholder set to ``base``)."""
    from soupkit.recipe import Recipe, apply_override, read_yaml, validate

    data = _rebase(read_yaml(RECIPES[model]), str(root), str(base))
    for item in overrides:
        apply_override(data, item)
    return validate(Recipe, data, str(RECIPES[model]))


def _rebase(value: Any, root: str, base: str) -> Any:
    if value == "SMOLLM2":
        return base
    if isinstance(value, str) and value.startswith(PREFIX + "/"):
        return root + value[len(PREFIX):]
    if isinstance(value, dict):
        return {k: _rebase(v, root, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase(v, root, base) for v in value]
    return value


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def write_world(root: Path, sizes: dict[str, int]) -> None:
    """The data files and the initial model; each is skipped when it already exists."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {
        "pretrain.jsonl": lambda: [{"text": t} for t in world.pretraining_corpus(sizes["pretrain"], seed=0)],
        "sft.jsonl": lambda: world.sft_data(sizes["sft"], seed=1),
        "preferences.jsonl": lambda: world.preference_pairs(sizes["preferences"], seed=2),
        "prompts.jsonl": lambda: [{"prompt": p} for p in world.prompts(sizes["prompts"], seed=3)],
        "heldout.jsonl": lambda: [{"prompt": p} for p in world.prompts(sizes["heldout"], seed=4)],
    }
    for name, rows in files.items():
        if not (data / name).exists():
            _write_jsonl(data / name, rows())
    if not (root / "init" / "config.json").exists():
        _write_init(root / "init")


def _write_init(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from soupkit.demo.tokenizer import build_tokenizer
    from soupkit.storage import atomic_output_dir

    tok = build_tokenizer(world.words())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with atomic_output_dir(path, force=True) as tmp:
        LlamaForCausalLM(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)


def run_demo(out: Path, *, force: bool = False, small: bool = False, overrides: Iterable[str] = (),
             log: Callable[[str], None] = print, model: str = "toy") -> dict[str, Any]:
    """Run (or finish) the demo of ``model`` (``toy`` or ``smollm2``) under ``out``; returns the
    eval results. ``out`` is locked for the whole demo, so a second demo into it fails at once
    (``soupkit.locking``)."""
    from soupkit.locking import writing

    if model not in RECIPES:
        raise SoupkitError(f"--model {model!r}: expected one of {', '.join(RECIPES)}")
    out = Path(out)
    with writing([out]):
        return _run_demo(out, force, small, overrides, log, model)


def _run_demo(out: Path, force: bool, small: bool, overrides: Iterable[str], log: Callable[[str], None],
              model: str) -> dict[str, Any]:
    from soupkit.pipeline import run_pipeline

    if out.exists() and any(out.iterdir()) and not (out / "data").is_dir():
        if not force:
            raise SoupkitError(f"output {out} exists and is not a soupkit demo; pass --force to replace it")
    if force and out.exists():
        shutil.rmtree(out)
    base = None
    if model == "smollm2":
        base = _write_chat_world(out, log)
    else:
        write_world(out, SMALL if small else SIZES)
    small_overrides = SMALL_OVERRIDES if model == "toy" else SMALL_REAL
    recipe = demo_recipe(out, [*(small_overrides if small else ()), *overrides], model, base)
    (out / "recipe.yaml").write_text(_recipe_text(recipe))
    run_pipeline(recipe, log=log)
    return json.loads((Path(recipe.eval.output) / "results.json").read_text())


def _write_chat_world(root: Path, log: Callable[[str], None]) -> Path:
    """The real model (built once per machine) and the chat world's data; returns the model dir."""
    from soupkit.demo import chat_world
    from soupkit.realmodel import cache_dir, smollm2

    if not (cache_dir() / "smollm2-135m-instruct" / "config.json").is_file():
        log(f"building SmolLM2-135M-Instruct under {cache_dir()} (once per machine, about a minute)")
    base = smollm2()
    if not (root / "data" / "heldout.jsonl").is_file():
        chat_world.write_data(root / "data")
    return base


def _recipe_text(recipe: Any) -> str:
    import yaml

    from soupkit.recipe import to_plain

    head = "# The recipe `soupkit demo` ran (salsa-tiny.yaml with its paths under this directory).\n"
    return head + yaml.safe_dump(to_plain(recipe), sort_keys=False)
