"""Chat templates: one setting for every stage, rendering prompts, and where a turn ends.

``chat_template`` (a recipe key in every stage, ``--chat-template`` on align, eval and inspect):

- ``auto`` (default): use the tokenizer's own template when it has one; without one, string
  prompts are fed as plain text and conversational data is an error that says what to set;
- ``always``: the tokenizer's template, and an error when it has none;
- ``never``: plain text (conversational data is then an error);
- ``chatml``: the ChatML template (``<|im_start|>role ... <|im_end|>``), for base models that
  have none; the two markers become special tokens when the vocabulary lacks them;
- a path to a ``.jinja`` file: that template.

A prompt is rendered with the generation prompt (the opening of the assistant's turn), a string
prompt being one user turn, so the policy answers instead of continuing the user's text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError
from soupkit.formats import Prompt, as_conversation

SETTINGS = ("auto", "always", "never", "chatml")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def check_setting(value: str) -> str:
    """Validate a ``chat_template`` value (recipe validators call this)."""
    if value in SETTINGS or value.endswith(".jinja"):
        return value
    raise ValueError(f"expected auto, always, never, chatml or a path to a .jinja file, got {value!r}")


def checked_setting(value: str, where: str) -> str:
    """``check_setting`` for values that do not come through a recipe: a one-line user error."""
    try:
        return check_setting(value)
    except ValueError as exc:
        raise SoupkitError(f"{where}: {exc}") from None


def template_text(setting: str, own: str | None, where: str) -> str | None:
    """The template a setting selects, given the tokenizer's own (``None``: plain text)."""
    if setting == "auto":
        return own
    if setting == "never":
        return None
    if setting == "always":
        if own is None:
            raise SoupkitError(f"{where}: chat_template always, but the tokenizer has no chat template; "
                               "set chat_template: chatml or a .jinja file")
        return own
    if setting == "chatml":
        return CHATML
    path = Path(setting).expanduser()
    if not path.is_file():
        raise SoupkitError(f"{where}: chat_template file {path} not found")
    return path.read_text(encoding="utf-8")


def own_template(tokenizer: Any) -> str | None:
    """The tokenizer's default template (a named set picks ``default``), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def use_template(tokenizer: Any, setting: str, where: str, model: Any = None) -> str | None:
    """Install the template ``setting`` selects on ``tokenizer`` (it is saved with the tokenizer)
    and return it. ``chatml`` on a vocabulary without its markers adds them as special tokens,
    makes ``<|im_end|>`` the EOS, and grows ``model``'s embeddings to match."""
    template = template_text(setting, own_template(tokenizer), where)
    if template is not None:
        tokenizer.chat_template = template
    if setting == "chatml" and any(t not in tokenizer.get_vocab() for t in CHATML_TOKENS):
        if model is None:
            raise SoupkitError(f"{where}: chat_template chatml needs the tokens {', '.join(CHATML_TOKENS)}, which "
                               "the vocabulary lacks; add them in the SFT stage (chat_template: chatml there)")
        tokenizer.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS)})
        model.resize_token_embeddings(len(tokenizer))
    if setting == "chatml":
        _end_turns_with(tokenizer, model, CHATML_TOKENS[1])
    return template


def _end_turns_with(tokenizer: Any, model: Any, token: str) -> None:
    """Make ``token`` the EOS of the tokenizer and of the model's configs, so generation stops there."""
    tokenizer.eos_token = token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = token
    if model is not None:
        model.config.eos_token_id = tokenizer.eos_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def render(tokenizer: Any, prompts: Sequence[Prompt], template: str | None, where: str) -> list[str]:
    """The text each prompt is fed as: templated with the generation prompt, or plain."""
    if template is None:
        for number, prompt in enumerate(prompts, start=1):
            if not isinstance(prompt, str):
                raise SoupkitError(f"{where}: prompt {number} is a conversation but no chat template is in use; "
                                   "set chat_template (auto with a tokenizer that has one, chatml, or a .jinja file)")
        return list(prompts)
    try:
        return [tokenizer.apply_chat_template(as_conversation(p), chat_template=template, tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    except Exception as exc:  # noqa: BLE001 - a template that fails on the data is the user's input
        raise SoupkitError(f"{where}: the chat template fails on the prompts ({type(exc).__name__}: {exc})") from None


def render_conversation(tokenizer: Any, conv: list[dict[str, str]], template: str) -> list[int]:
    """Token ids of a whole conversation, as TRL's RewardTrainer tokenises a conversational pair."""
    return list(tokenizer.apply_chat_template(conv, chat_template=template, tokenize=True,
                                              return_dict=True)["input_ids"])


def stop_ids(tokenizer: Any, model_dir: Path | None = None) -> list[int]:
    """Every token that ends a turn: the tokenizer's EOS and all ``eos_token_id`` of the model's
    generation config (e.g. Llama 3's ``<|eot_id|>`` beside ``<|end_of_text|>``), EOS first."""
    ids = [tokenizer.eos_token_id]
    if model_dir is not None:
        ids += _generation_eos(Path(model_dir))
    return list(dict.fromkeys(i for i in ids if isinstance(i, int) and i < len(tokenizer)))


def _generation_eos(model_dir: Path) -> list[int]:
    import json

    path = model_dir / "generation_config.json"
    try:
        value = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return []
    return value if isinstance(value, list) else [value] if isinstance(value, int) else []


@dataclass(frozen=True)
class Chat:
    """A policy's tokenizer set up as in training, the template its prompts are rendered with
    (None: plain text) and the tokens that end its turn."""

    tokenizer: Any
    template: str | None
    stops: list[int]


def policy_chat(model_dir: Path, setting: str, where: str, trust_remote_code: bool = False) -> Chat:
    """The ``Chat`` of the policy in ``model_dir`` under the ``chat_template`` ``setting``:
    training, evaluation and reports read prompts and responses through this one set-up."""
    from soupkit.loading import generation_tokenizer

    tokenizer = generation_tokenizer(Path(model_dir), "policy", trust_remote_code)
    template = use_template(tokenizer, setting, where)
    return Chat(tokenizer, template, stop_ids(tokenizer, Path(model_dir)))
