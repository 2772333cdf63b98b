"""LLM judges: a local HF chat model run in-process, or an OpenAI-compatible endpoint; and the
on-disk cache that keeps every judgment, so an interrupted or repeated eval judges only what is new.

The endpoint client speaks the chat-completions API (https://platform.openai.com/docs/api-reference/chat)
that vLLM and llama.cpp's server also serve, with the standard library alone. An API key is read
from the environment variable the recipe names, sent in the Authorization header and nowhere else:
it is not part of the judge's name, the cache, an error message or any file written.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from soupkit.errors import SoupkitError

Messages = list[dict[str, str]]
RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)


class Judge(Protocol):
    """What the protocols need: a stable name (the cache key) and replies to a batch of chats."""

    name: str

    def complete(self, chats: Sequence[Messages]) -> list[str]: ...


@dataclass
class EndpointJudge:
    """An OpenAI-compatible ``/chat/completions`` server; failed requests retry with doubling waits."""

    endpoint: str
    model: str
    api_key_env: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    timeout: float = 120.0
    retries: int = 4
    backoff: float = 2.0
    workers: int = 8
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise SoupkitError(f"eval.judge.api_key_env: the environment variable {self.api_key_env} is not set")

    @property
    def name(self) -> str:
        return f"endpoint {self.endpoint} model {self.model} temperature {self.temperature:g} max_tokens {self.max_tokens}"

    def complete(self, chats: Sequence[Messages]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self._one, chats))

    def _one(self, chat: Messages) -> str:
        body = json.dumps({"model": self.model, "messages": chat, "max_tokens": self.max_tokens,
                           "temperature": self.temperature}).encode()
        for attempt in range(self.retries + 1):
            try:
                return _reply(self._post(body))
            except _Retry as exc:
                if attempt == self.retries:
                    raise SoupkitError(f"eval.judge: {self.endpoint}/chat/completions failed {self.retries + 1} "
                                       f"times, last: {exc}") from None
                self.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        request = urllib.request.Request(f"{self.endpoint}/chat/completions", body, headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in RETRY_STATUS:
                raise _Retry(f"HTTP {exc.code}") from None
            raise SoupkitError(f"eval.judge: {self.endpoint}/chat/completions answered HTTP {exc.code} "
                               f"({exc.reason}); check endpoint, model and api_key_env") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            raise _Retry(type(exc).__name__ + (f" ({exc.reason})" if isinstance(exc, urllib.error.URLError) else "")) from None


class _Retry(Exception):
    """A failure worth retrying: the server may answer next time."""


def _reply(raw: bytes) -> str:
    """The message text of a chat-completions response; a malformed response is retried."""
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Retry("a response that is not a chat completion") from None
    if content is not None and not isinstance(content, str):
        raise _Retry("a response whose message content is not text")
    return content or ""  # no text (a refusal, say) is a reply without a verdict: counted as unparsed


class LocalJudge:
    """An HF chat model directory, its own chat template, greedy (or sampled) decoding, in batches."""

    def __init__(self, model_dir: str, *, max_tokens: int = 512, temperature: float = 0.0, device: str = "auto",
                 dtype: str | None = None, batch_size: int = 8):
        path = Path(model_dir).expanduser()
        if not (path / "config.json").is_file():
            raise SoupkitError(f"eval.judge.model: {path} is not a model directory (no config.json); for a server "
                               "give endpoint: too")
        self.path, self.max_tokens, self.temperature, self.batch_size = path.resolve(), max_tokens, temperature, batch_size
        self.device, self.dtype = device, dtype
        self._model: Any = None
        self._tok = self._tokenizer()  # cheap, and a judge without a chat template fails now, not after eval

    def _tokenizer(self) -> Any:
        from soupkit.loading import load_tokenizer

        tok = load_tokenizer(self.path, "eval.judge.model")
        if not getattr(tok, "chat_template", None):
            raise SoupkitError(f"eval.judge.model: {self.path} has no chat template; a judge must be a chat model")
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    @property
    def name(self) -> str:
        return f"local {self.path} temperature {self.temperature:g} max_tokens {self.max_tokens}"

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            import torch

            from soupkit.evaluation.judging import device as resolve
            from soupkit.loading import causal_lm

            device = resolve(self.device)
            dtype = getattr(torch, self.dtype) if self.dtype else (torch.bfloat16 if device != "cpu" else torch.float32)
            self._model = causal_lm(self.path, "eval.judge.model", dtype=dtype, device=device)
        return self._model, self._tok

    def complete(self, chats: Sequence[Messages]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(chats), self.batch_size):
            out += self._generate(chats[start:start + self.batch_size])
        return out

    def _generate(self, chats: Sequence[Messages]) -> list[str]:
        import torch

        model, tok = self._load()
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        sampled = ({"do_sample": True, "temperature": self.temperature, "top_p": 1.0, "top_k": 0}
                   if self.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=self.max_tokens, pad_token_id=tok.pad_token_id, **sampled)
        return tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def make_judge(spec: Any) -> Judge:
    """The judge an ``eval.judge`` section describes (checked before any heavy work)."""
    if spec.endpoint:
        return EndpointJudge(spec.endpoint, spec.model, spec.api_key_env, spec.max_tokens, spec.temperature,
                             spec.timeout, spec.retries, spec.backoff, spec.batch_size)
    return LocalJudge(spec.model, max_tokens=spec.max_tokens, temperature=spec.temperature, device=spec.device,
                      dtype=spec.dtype, batch_size=spec.batch_size)


class JudgmentCache:
    """Judgments on disk, one JSON line each, keyed by a digest of (judge, template, messages): the
    messages hold the question and the answers, so a changed answer is judged afresh. Lines are
    appended and flushed as replies arrive; a line torn by an interruption is skipped on reading."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.hits = self.misses = 0
        self._stored: dict[str, str] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self._stored[entry["key"]] = entry["reply"]
                except (ValueError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(judge: str, template: str, chat: Messages) -> str:
        return hashlib.sha256(json.dumps([judge, template, chat], sort_keys=True).encode()).hexdigest()

    def replies(self, judge: Judge, template: str, chats: Sequence[Messages], chunk: int = 64) -> list[str]:
        """The judge's reply to every chat, asking it only for those not yet stored."""
        keys = [self.key(judge.name, template, c) for c in chats]
        todo = list(dict.fromkeys(k for k in keys if k not in self._stored))
        self.hits += len(keys) - sum(1 for k in keys if k in todo)
        self.misses += len(todo)
        by_key = dict(zip(keys, chats))
        for start in range(0, len(todo), chunk):  # stored chunk by chunk: an interruption loses one chunk at most
            part = todo[start:start + chunk]
            self._store(dict(zip(part, judge.complete([by_key[k] for k in part]))))
        return [self._stored[k] for k in keys]

    def _store(self, new: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self.path.is_file() and self.path.stat().st_size and _last_byte(self.path) != b"\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n" if torn else "")
            f.writelines(json.dumps({"key": k, "reply": v}) + "\n" for k, v in new.items())
            f.flush()
            os.fsync(f.fileno())
        self._stored.update(new)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)
