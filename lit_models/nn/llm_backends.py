"""Chat-LLM backends for prompting methods (constrained translation and any other): one call = one user message.

- :class:`HFChatBackend`: a transformers causal LM (loaded offline through :func:`lit_models.hf.load_causal_lm`,
  e.g. ``smollm2-135m`` or a local directory); prompts rendered with the tokenizer's chat template
  (``apply_chat_template(..., add_generation_prompt=True)``), left-padded batches, greedy decoding, stopping at EOS
  and at the template's end-of-turn token (``<|im_end|>`` for ChatML).
- :class:`OpenAICompatBackend`: ``POST {api_base}/chat/completions`` (OpenAI-compatible servers: vLLM, llama.cpp,
  TGI, Ollama, ...) with ``temperature=0``, ``top_p=1``, ``max_tokens``; timeouts, connection errors, HTTP 429 and
  5xx are retried ``max_retries`` times with exponential back-off, then the request is returned as failed
  (``text=None`` and the error), so the caller records it and goes on. Non-loopback hosts are refused unless
  ``allow_remote``. The API key is read from the environment variable ``api_key_env`` (never from a config).
- :class:`ScriptedBackend`: a deterministic fake LLM for tests and demos (policies below); it sees the prompt text
  and the structured request.

Every backend maps a list of :class:`LLMRequest` to a list of :class:`LLMResponse` of the same length and order.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import torch

__all__ = [
    "SCRIPTED_POLICIES",
    "HFChatBackend",
    "LLMBackend",
    "LLMRequest",
    "LLMResponse",
    "OpenAICompatBackend",
    "ScriptedBackend",
    "is_loopback_url",
]

#: End-of-turn tokens of common chat templates, used as extra stop ids when present in the vocabulary.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass
class LLMRequest:
    """One call: the user-message ``prompt`` plus what a scripted fake may need.

    ``item``: the data item (``id``, ``index``, ``source``, ``reference``, ``constraints``); ``round``: 0 for the
    first translation, r >= 1 for the r-th revision; ``unmet``: the checker's unmet units of ``previous`` (objects with
    ``kind``, ``index``, ``message``); ``previous``: the translation being revised (None in round 0).
    """

    prompt: str
    item: dict[str, Any] = field(default_factory=dict)
    round: int = 0
    unmet: list[Any] = field(default_factory=list)
    previous: str | None = None


@dataclass
class LLMResponse:
    """``text`` is None when the call failed (``error`` says why); ``rendered`` is what was sent (the chat-rendered
    prompt for ``hf``, the JSON messages for ``openai``); ``attempts`` counts HTTP attempts."""

    text: str | None
    rendered: str
    error: str | None = None
    attempts: int = 1


class LLMBackend:
    """Interface: :meth:`generate` maps requests to responses (same length and order)."""

    #: The torch module to register with a LightningModule (moved to its device), or None.
    module: torch.nn.Module | None = None

    def generate(self, requests: Sequence[LLMRequest]) -> list[LLMResponse]:  # pragma: no cover - interface
        raise NotImplementedError


def _messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


class HFChatBackend(LLMBackend):
    """Greedy chat generation with a transformers causal LM (see module docstring).

    Args:
        model: a loaded ``PreTrainedModel`` (generation happens on its device).
        tokenizer: its tokenizer; must have a chat template.
        max_new_tokens: generation limit per call.
        system_prompt: optional system message (None: the template's own default, e.g. SmolLM2's).

    Raises:
        ValueError: the tokenizer has no chat template, or ``max_new_tokens < 1``.
    """

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 256, system_prompt: str | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template: backend 'hf' "
                "needs a chat (instruct) model"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model, self.module = model, model
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = system_prompt
        vocab = tokenizer.get_vocab()
        stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stops += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
        self.stop_ids = sorted(set(stops))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def from_name(cls, name_or_path: str, *, dtype: str = "float32", config_overrides: dict[str, Any] | None = None,
                  tokenizer: Any = None, max_new_tokens: int = 256, system_prompt: str | None = None) -> HFChatBackend:
        """Load ``name_or_path`` offline with :func:`lit_models.hf.load_causal_lm` (and its tokenizer unless given).

        Raises:
            FileNotFoundError: the model path (or the embedded model's package) is missing.
            ValueError, OSError: as :func:`lit_models.hf.load_causal_lm`; no chat template.
        """
        from lit_models.hf import load_causal_lm, load_tokenizer

        path = os.path.expanduser(str(name_or_path))
        if path.startswith((".", "/", "~")) and not os.path.isdir(path):
            raise FileNotFoundError(f"model.init_args.model_path: {name_or_path} does not exist (downloads are off)")
        if tokenizer is None:
            tokenizer = load_tokenizer(name_or_path)
        model = load_causal_lm(name_or_path, dtype, config_overrides=config_overrides)
        return cls(model, tokenizer, max_new_tokens=max_new_tokens, system_prompt=system_prompt)

    def render(self, prompt: str) -> str:
        """The chat-rendered prompt text (with the generation prompt appended)."""
        return self.tokenizer.apply_chat_template(
            _messages(prompt, self.system_prompt), add_generation_prompt=True, tokenize=False
        )

    @torch.no_grad()
    def generate(self, requests: Sequence[LLMRequest]) -> list[LLMResponse]:
        if not requests:
            return []
        rendered = [self.render(r.prompt) for r in requests]
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(rendered, add_special_tokens=False, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        if was_training:
            self.model.train()
        texts = tok.batch_decode(out[:, enc["input_ids"].size(1):], skip_special_tokens=True)
        return [LLMResponse(text=t, rendered=r) for t, r in zip(texts, rendered, strict=True)]


def is_loopback_url(url: str) -> bool:
    """True when ``url``'s host is ``localhost`` or a loopback IP address."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpenAICompatBackend(LLMBackend):
    """An OpenAI-compatible chat-completions endpoint, with bounded retries (see module docstring).

    Args:
        api_base: e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended).
        api_model: the ``model`` field of the request.
        api_key_env: environment variable holding the key (sent as ``Authorization: Bearer``; absent: no header).
        allow_remote: allow a non-loopback host.
        timeout_s: per-attempt timeout (connect and read).
        max_retries: retries after the first attempt for timeouts, connection errors, HTTP 429 and 5xx.
        backoff_s: first back-off delay, doubled per retry.
        max_new_tokens: ``max_tokens`` of the request.
        concurrency: requests in flight at once (a thread pool); 1 sends them one by one.
        system_prompt: optional system message.

    Raises:
        ValueError: missing ``api_base``/``api_model``, a non-HTTP URL, a remote host without ``allow_remote``,
            negative ``max_retries``, non-positive ``timeout_s``/``concurrency``.
    """

    def __init__(self, api_base: str | None, api_model: str | None, *, api_key_env: str = "OPENAI_API_KEY",
                 allow_remote: bool = False, timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 1.0,
                 max_new_tokens: int = 256, concurrency: int = 4, system_prompt: str | None = None) -> None:
        if not api_base or not api_model:
            raise ValueError("backend 'openai' needs model.init_args.api_base (e.g. http://127.0.0.1:8000/v1) and "
                             "model.init_args.api_model")
        if urlparse(api_base).scheme not in ("http", "https"):
            raise ValueError(f"model.init_args.api_base must be an http(s) URL, got {api_base!r}")
        if not allow_remote and not is_loopback_url(api_base):
            raise ValueError(f"model.init_args.api_base={api_base!r} is not a loopback address; set "
                             "model.init_args.allow_remote=true to send the test data to that host")
        if max_retries < 0 or timeout_s <= 0 or concurrency < 1:
            raise ValueError(f"need max_retries >= 0, request_timeout_s > 0 and concurrency >= 1; got {max_retries}, "
                             f"{timeout_s}, {concurrency}")
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.api_model, self.api_key_env = api_model, api_key_env
        self.timeout_s, self.max_retries, self.backoff_s = float(timeout_s), int(max_retries), float(backoff_s)
        self.max_new_tokens, self.concurrency, self.system_prompt = int(max_new_tokens), int(concurrency), system_prompt

    def _payload(self, prompt: str) -> dict[str, Any]:
        return {"model": self.api_model, "messages": _messages(prompt, self.system_prompt), "temperature": 0,
                "top_p": 1, "max_tokens": self.max_new_tokens}

    def _call(self, prompt: str) -> LLMResponse:
        import requests

        payload = self._payload(prompt)
        rendered = json.dumps(payload["messages"], ensure_ascii=False)
        key = os.environ.get(self.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        error = ""
        for attempt in range(1, self.max_retries + 2):
            try:
                resp = requests.post(self.url, json=payload, headers=headers, timeout=self.timeout_s)
            except (requests.Timeout, requests.ConnectionError) as err:
                error = f"{type(err).__name__}: {err}"
            else:
                if resp.status_code == 200:
                    try:
                        text = resp.json()["choices"][0]["message"]["content"]
                        if not isinstance(text, str):
                            raise TypeError(f"content is {type(text).__name__}")
                        return LLMResponse(text=text, rendered=rendered, attempts=attempt)
                    except (ValueError, KeyError, IndexError, TypeError) as err:
                        return LLMResponse(None, rendered, f"malformed response ({type(err).__name__}: {err}): "
                                                           f"{resp.text[:200]!r}", attempt)
                error = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
                if resp.status_code != 429 and resp.status_code < 500:
                    return LLMResponse(None, rendered, error, attempt)  # a client error: retrying cannot help
            if attempt <= self.max_retries and self.backoff_s > 0:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        return LLMResponse(None, rendered, f"failed after {self.max_retries + 1} attempts: {error}",
                           self.max_retries + 1)

    def generate(self, requests: Sequence[LLMRequest]) -> list[LLMResponse]:
        if not requests:
            return []
        if self.concurrency == 1 or len(requests) == 1:
            return [self._call(r.prompt) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(lambda r: self._call(r.prompt), requests))


#: Scripted policies (see :class:`ScriptedBackend`).
SCRIPTED_POLICIES = ("fix_one_per_round", "ignore_revisions", "break_other", "echo_source")


class ScriptedBackend(LLMBackend):
    """A deterministic fake LLM (spec section 10) for tests and the seconds-long demo.

    First pass (round 0), for item ``i = item["index"]``: the reference with every lexical target replaced by a
    wrong word (``{wrong_word}{j}`` for constraint ``j``) when ``i % 5 == 0``, only the first when ``i % 5 == 1``,
    and the reference itself otherwise (no reference: the source). Revisions, by ``policy["name"]``:

    - ``fix_one_per_round``: restores exactly the first unmet lexical constraint listed in the request;
    - ``ignore_revisions``: returns the previous output unchanged;
    - ``break_other``: when ``(i + round)`` is even fixes the first unmet constraint, otherwise breaks the first
      satisfied one (and fixes nothing), so an item's satisfied count can drop (a regression);
    - ``echo_source``: every call (round 0 too) returns the source.

    Every revision **asserts** that each unmet target string and the previous output appear in the prompt text.
    ``calls`` records ``(item id, round)`` of every request.

    Raises:
        ValueError: an unknown policy name.
    """

    def __init__(self, policy: dict[str, Any] | None) -> None:
        if not policy or policy.get("name") not in SCRIPTED_POLICIES:
            raise ValueError(f"backend 'scripted' needs model.init_args.scripted_policy with name in "
                             f"{list(SCRIPTED_POLICIES)}, got {policy!r}")
        self.name = policy["name"]
        self.wrong = str(policy.get("wrong_word", "zzwrong"))
        self.calls: list[tuple[Any, int]] = []

    @staticmethod
    def _alts(c: dict[str, Any]) -> list[str]:
        return [c["tgt"]] if isinstance(c["tgt"], str) else list(c["tgt"])

    def _break(self, text: str, j: int, c: dict[str, Any]) -> str:
        for t in self._alts(c):
            if t in text:
                return text.replace(t, f"{self.wrong}{j}", 1)
        return text

    def _fix(self, text: str, j: int, c: dict[str, Any]) -> str:
        marker = f"{self.wrong}{j}"
        if marker in text:
            return text.replace(marker, self._alts(c)[0], 1)
        return f"{text} {self._alts(c)[0]}"

    def _one(self, req: LLMRequest) -> str:
        item = req.item
        self.calls.append((item.get("id"), req.round))
        cons = item.get("constraints", [])
        i = int(item.get("index", 0))
        if self.name == "echo_source":
            return item["source"]
        if req.round == 0:
            text = item.get("reference") or item["source"]
            broken = range(len(cons)) if i % 5 == 0 else range(min(1, len(cons))) if i % 5 == 1 else range(0)
            for j in broken:
                text = self._break(text, j, cons[j])
            return text
        previous = req.previous or ""
        lexical = [u for u in req.unmet if getattr(u, "kind", None) == "lexical"]
        missing = [t for u in lexical for t in self._alts(cons[u.index]) if t not in req.prompt]
        if previous not in req.prompt or missing:
            raise AssertionError(f"scripted LLM: revise prompt of {item.get('id')!r} lacks the previous output or "
                                 f"unmet targets {missing}: {req.prompt!r}")
        if self.name == "ignore_revisions" or not lexical:
            return previous
        if self.name == "break_other" and (i + req.round) % 2 == 1:
            unmet_idx = {u.index for u in lexical}
            met = [j for j in range(len(cons)) if j not in unmet_idx]
            return self._break(previous, met[0], cons[met[0]]) if met else previous
        j = lexical[0].index
        return self._fix(previous, j, cons[j])

    def generate(self, requests: Sequence[LLMRequest]) -> list[LLMResponse]:
        return [LLMResponse(text=self._one(r), rendered=r.prompt) for r in requests]
