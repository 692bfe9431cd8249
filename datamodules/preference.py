"""Preference data for DPO-style alignment: TRL-style JSONL pairs, per-user selection, and CLaP's one-to-many groups.

Contents:

- :func:`read_preference_file`: reads TRL-style preference JSONL (errors name the file and line).
- :class:`PreferenceDataModule`: tokenises through the tokenizer's chat template, truncates, and serves

  - ``mode="pairs"`` (Latent DPO, LoRA-DPO): batches of (prompt, chosen, rejected) of one user (or all);
  - ``mode="one2many"`` (CLaP): one prompt with ``group_size`` responses per batch (rows of identical prompts, the
    contrastive loss needs them);
  - ``predict``/``test``: left-padded prompts with ``meta`` for generation.

Accepted files (only read, never modified):

- pairs: one JSON object per line ``{"prompt", "chosen", "rejected"}`` plus optional ``"user"`` and ``"id"`` (any
  other field is kept in ``meta``). TRL's conversational form is accepted too: ``prompt`` a list of ``{"role",
  "content"}`` messages and ``chosen``/``rejected`` lists holding the assistant message.
- one-to-many (CLaP): ``{"prompt", "responses": [str, ...]}`` rows, or plain instruction records ``{"prompt",
  "response"}`` / ``{"messages"}`` grouped by identical prompt; read with
  :func:`datamodules.instruction.read_instruction_file`.

Tokenisation (``chat_template=True``): the prompt is ``apply_chat_template([user], add_generation_prompt=True)``,
the response the tokens that the full conversation adds after it, up to and including the first end-of-turn token
(``<|im_end|>`` for ChatML). The template writes the only BOS-like token (``<|im_start|>``) and the response ends with
exactly one EOS (the end-of-turn token), so nothing is added twice. Without the chat template: ``[bos]`` (if the
tokenizer has one and does not add it itself) + prompt tokens, response tokens + ``[eos]``. Prompts are
**left-truncated** to ``max_prompt_len`` (the end of the prompt, with the generation prompt, is kept) and responses
left-truncated to ``max_response_len`` (their endings, e.g. the demo's ``#### N`` and the EOS, are kept).

Batch layouts (long tensors; ``B`` pairs; right padding except ``prompt_*``, which is LEFT-padded):

    pairs       prompt_ids [B, Tp], prompt_mask [B, Tp],
                chosen_input_ids / chosen_attention_mask / chosen_labels [B, Tc]  (prompt + chosen; labels -100 on
                rejected_input_ids / rejected_attention_mask / rejected_labels [B, Tr]   prompt and padding), meta
    one2many    input_ids / attention_mask / labels [K, T] (one prompt + K responses), prompt_ids / prompt_mask [K, Tp],
                group [K] (prompt index: all equal), meta
    generation  input_ids [B, T], attention_mask [B, T] (left padding), prompt_ids / prompt_mask (the same), meta
                (predict: one row per distinct prompt)

Test batches are laid out like validation batches (pairs, or one2many groups).

Resume is epoch-granular (a restarted epoch re-shuffles from its seed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader, Dataset

from datamodules.instruction import END_OF_TURN_TOKENS, IGNORE_INDEX, read_instruction_file
from datamodules.jsonl import iter_jsonl

__all__ = ["PreferenceDataModule", "collate_generation_prompts", "collate_one2many", "collate_pairs",
           "read_preference_file"]

_KEYS = {"train": "data.init_args.train_path", "validation": "data.init_args.val_path",
         "test": "data.init_args.test_path", "predict": "data.init_args.predict_path"}


# ====================================================================== reading
def _message_text(value: Any, field: str, where: str, role: str | None) -> str | list[dict[str, str]]:
    """A str field, or a TRL conversational list of messages (validated)."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: field {field!r} is empty")
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value):
        if role is not None and not any(m["role"] == role for m in value):
            raise ValueError(f"{where}: field {field!r} holds no {role!r} message")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise ValueError(f"{where}: field {field!r} must be a string or a list of {{role, content}} messages")


def read_preference_file(path: str | Path) -> list[dict[str, Any]]:
    """Read TRL-style preference JSONL (``prompt``, ``chosen``, ``rejected``, optional ``user``/``id``).

    Returns:
        Records ``{"id", "user" (None when absent), "prompt", "chosen", "rejected", "extra", "where"}``; ``prompt`` is
        a string or a list of messages, ``chosen``/``rejected`` strings (the assistant content of a conversational
        record).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: ``line N of <file>: ...``: not JSON, not an object, a missing field (``missing field 'chosen'``),
            an empty or ill-typed field, ``chosen == rejected``, an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference file not found: {path}")
    records = []
    for lineno, where, obj in iter_jsonl(path, lambda p, n: f"line {n} of {p}"):
        for field in ("prompt", "chosen", "rejected"):
            if field not in obj:
                raise ValueError(f"{where}: missing field {field!r}")
        prompt = _message_text(obj["prompt"], "prompt", where, None)
        pair = []
        for field in ("chosen", "rejected"):
            value = _message_text(obj[field], field, where, "assistant")
            if isinstance(value, list):
                value = [m for m in value if m["role"] == "assistant"][-1]["content"]
            pair.append(value)
        if pair[0] == pair[1]:
            raise ValueError(f"{where}: chosen and rejected are identical")
        user = obj.get("user")
        if user is not None and not isinstance(user, str):
            raise ValueError(f"{where}: field 'user' must be a string")
        rid = obj.get("id")
        records.append({
            "id": str(rid) if rid is not None else f"{path.name}:{lineno}", "user": user, "prompt": prompt,
            "chosen": pair[0], "rejected": pair[1], "where": where,
            "extra": {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected", "user", "id")},
        })
    if not records:
        raise ValueError(f"{path}: empty file, no records")
    return records


def _read_one2many(path: Path) -> list[dict[str, Any]]:
    """Rows ``{"prompt", "responses"}`` or instruction records, grouped by prompt (first-seen order)."""
    groups: dict[str, dict[str, Any]] = {}
    for rec in read_instruction_file(path, "auto", require_response=False):
        responses = rec["extra"].get("responses")
        if rec["response"] is not None:
            responses = [rec["response"]]
        if not isinstance(responses, list) or not responses or not all(isinstance(r, str) and r.strip()
                                                                       for r in responses):
            raise ValueError(f"{rec['where']}: needs 'response' (a string) or 'responses' (a non-empty list of "
                             "non-empty strings)")
        key = json.dumps(rec["messages"][:-1] if rec["messages"] else rec["prompt"], ensure_ascii=False)
        group = groups.setdefault(key, {"id": rec["id"], "prompt": rec["prompt"], "responses": [],
                                        "where": rec["where"], "user": rec["extra"].get("user")})
        group["responses"].extend(responses)
    return list(groups.values())


# ====================================================================== collate
def _pad(rows: Sequence[Sequence[int]], pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(list(r), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def _joined(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad: int) -> dict[str, torch.Tensor]:
    ids, mask = _pad([list(p) + list(r) for p, r in zip(prompts, responses)], pad)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        labels[i, len(p):len(p) + len(r)] = torch.tensor(list(r), dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Pairs batch (module docstring) from items ``{"prompt", "chosen", "rejected", "meta"}`` (token id lists)."""
    out: dict[str, Any] = {}
    out["prompt_ids"], out["prompt_mask"] = _pad([it["prompt"] for it in items], pad_id, left=True)
    for side in ("chosen", "rejected"):
        joined = _joined([it["prompt"] for it in items], [it[side] for it in items], pad_id)
        out.update({f"{side}_{k}": v for k, v in joined.items()})
    out["meta"] = [dict(it["meta"]) for it in items]
    return out


def collate_one2many(prompt: Sequence[int], responses: Sequence[Sequence[int]], pad_id: int, index: int,
                     meta: dict[str, Any]) -> dict[str, Any]:
    """One-to-many batch: one prompt with K responses (module docstring)."""
    k = len(responses)
    out: dict[str, Any] = _joined([prompt] * k, responses, pad_id)
    out["prompt_ids"], out["prompt_mask"] = _pad([prompt] * k, pad_id, left=True)
    out["group"] = torch.full((k,), index, dtype=torch.long)
    out["meta"] = [dict(meta) for _ in range(k)]
    return out


def collate_generation_prompts(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Left-padded prompts: ``input_ids``/``attention_mask`` (= ``prompt_ids``/``prompt_mask``) [B, T] and meta."""
    ids, mask = _pad([it["prompt"] for it in items], pad_id, left=True)
    return {"input_ids": ids, "attention_mask": mask, "prompt_ids": ids, "prompt_mask": mask,
            "meta": [dict(it["meta"]) for it in items]}


class _Collate:
    """Picklable collate function."""

    def __init__(self, kind: str, pad_id: int) -> None:
        self.kind, self.pad_id = kind, pad_id

    def __call__(self, items: Any) -> dict[str, Any]:
        if self.kind == "pairs":
            return collate_pairs(items, self.pad_id)
        if self.kind == "generation":
            return collate_generation_prompts(items, self.pad_id)
        return collate_one2many(items["prompt"], items["responses"], self.pad_id, items["index"], items["meta"])


class _ListDataset(Dataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class OneToManyDataset(Dataset):
    """One item per prompt: the prompt ids and ``group_size`` response id lists (a prompt with fewer responses is
    topped up by sampling its responses with replacement, one with more gets a random subset; seeded by (seed, epoch,
    index))."""

    def __init__(self, groups: list[dict[str, Any]], group_size: int, seed: int) -> None:
        self.groups, self.group_size, self.seed, self.epoch = groups, group_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict[str, Any]:
        g = self.groups[index]
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(self.epoch, index)))
        n, k = len(g["responses"]), self.group_size
        pick = list(range(n)) if n == k else (rng.choice(n, k, replace=False).tolist() if n > k
                                              else list(range(n)) + rng.choice(n, k - n, replace=True).tolist())
        return {"prompt": g["prompt_ids"], "responses": [g["responses"][j] for j in pick], "index": index,
                "meta": {"id": g["id"], "prompt": g["prompt"]}}


@rank_zero_only
def _print0(msg: str) -> None:
    print(msg, flush=True)


# ====================================================================== data module
class PreferenceDataModule(LightningDataModule):
    """Preference pairs (``mode="pairs"``) or one-to-many groups (``mode="one2many"``) for latent preference
    alignment and DPO (layouts and rules: module docstring).

    Args:
        tokenizer: name or path for :func:`lit_models.hf.load_tokenizer` (``smollm2-135m``, ``llama-tiny``, ...);
            linked into the model by the CLI.
        train_path, val_path, test_path: JSONL files (pairs, or one-to-many rows in ``one2many`` mode).
        predict_path: prompts to answer in ``predict`` (a pairs or prompt file; default ``test_path``, else
            ``val_path``); one generation per distinct prompt.
        user: keep only rows whose ``user`` equals it (None: all rows). Applies to every split.
        val_fraction: when ``val_path`` is not given, hold out this share of the training prompts (whole prompts,
            seeded) as validation.
        mode: ``pairs`` or ``one2many``.
        group_size: K responses per one-to-many batch.
        max_prompt_len, max_response_len: token limits (left truncation, see above).
        chat_template: render through the tokenizer's chat template.
        system_prompt: system message for the chat template (None: the template's default).
        batch_size: pairs per training batch (one2many: always one prompt with K responses).
        eval_batch_size: pairs / prompts per validation, test and predict batch.
        num_workers: DataLoader workers.
        seed: shuffling and top-up seed.
        demo: ``mgsm_preferences`` builds the offline demo (:func:`datamodules.demo.preferences.
            build_preference_demo`) into ``<data_dir>/mgsm_preferences``; unset paths then default to its files
            (``pairs/`` or ``one2many/`` by ``mode``).
        demo_kwargs: keyword arguments of the demo builder (``users``, ``max_problems``, ...).
        data_dir: root of the demo output.

    Raises:
        ValueError: bad sizes or literals (named by config key), a ``user`` matching no row (lists the users
            present), chosen == rejected or an empty response after truncation (names file and line), errors of
            :func:`read_preference_file`.
        FileNotFoundError: a needed split has no file (names the config key).
    """

    def __init__(
        self,
        tokenizer: str = "smollm2-135m",
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        predict_path: str | None = None,
        user: str | None = None,
        val_fraction: float = 0.0,
        mode: Literal["pairs", "one2many"] = "pairs",
        group_size: int = 8,
        max_prompt_len: int = 128,
        max_response_len: int = 48,
        chat_template: bool = True,
        system_prompt: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        demo: Literal["none", "mgsm_preferences"] = "none",
        demo_kwargs: dict[str, Any] = {},  # noqa: B006
        data_dir: str = "data/preference",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, value, allowed in (("mode", mode, ("pairs", "one2many")), ("demo", demo, ("none", "mgsm_preferences"))):
            if value not in allowed:
                raise ValueError(f"data.init_args.{name} must be one of {list(allowed)}, got {value!r}")
        for name, value, low in (("group_size", group_size, 2 if mode == "one2many" else 1),
                                 ("max_prompt_len", max_prompt_len, 1), ("max_response_len", max_response_len, 1),
                                 ("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1)):
            if value < low:
                raise ValueError(f"data.init_args.{name} must be >= {low}, got {value}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.init_args.val_fraction must be in [0, 1), got {val_fraction}")
        if num_workers < 0:
            raise ValueError(f"data.init_args.num_workers must be >= 0, got {num_workers}")
        from lit_models.hf import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer)
        if chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {tokenizer!r} has no chat template: set data.init_args.chat_template=false")
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer!r} has no EOS token: responses could not be terminated")
        self.tokenizer_name = tokenizer
        self.mode, self.user, self.val_fraction = mode, user, val_fraction
        self.group_size, self.max_prompt_len, self.max_response_len = group_size, max_prompt_len, max_response_len
        self.chat_template, self.system_prompt = chat_template, system_prompt
        self.batch_size, self.eval_batch_size, self.num_workers, self.seed = batch_size, eval_batch_size, num_workers, seed
        self.demo, self.demo_kwargs, self.data_dir = demo, dict(demo_kwargs), Path(data_dir)
        self.paths: dict[str, str | None] = {"train": train_path, "validation": val_path, "test": test_path,
                                             "predict": predict_path}
        if demo != "none":
            sub = self.data_dir / demo / ("pairs" if mode == "pairs" else "one2many")
            for split, name in (("train", "train"), ("validation", "validation"), ("test", "test")):
                if self.paths[split] is None:
                    self.paths[split] = str(sub / f"{name}.jsonl")
            if self.paths["predict"] is None:
                self.paths["predict"] = str(self.data_dir / demo / "pairs" / "test.jsonl")
        vocab = self.tokenizer.get_added_vocab()
        self.eot_ids = {int(self.tokenizer.eos_token_id)} | {int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab}
        self._demo_built = False
        self._data: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------ demo
    def prepare_data(self) -> None:
        """Build the demo (``demo``) once; otherwise nothing."""
        self._ensure_demo()

    def _ensure_demo(self) -> None:
        if self.demo == "none" or self._demo_built:
            return
        from datamodules.demo.preferences import build_preference_demo

        try:
            build_preference_demo(self.data_dir / self.demo, verbose=rank_zero_only.rank == 0, **self.demo_kwargs)
        except TypeError as exc:
            raise ValueError(f"data.init_args.demo_kwargs does not fit the {self.demo!r} builder: {exc}") from exc
        self._demo_built = True

    # ------------------------------------------------------------------ tokenisation
    def _conv(self, prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
        conv = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        if self.system_prompt is not None and conv[0]["role"] != "system":
            conv.insert(0, {"role": "system", "content": self.system_prompt})
        return conv

    def prompt_ids(self, prompts: Sequence[str | list[dict[str, str]]]) -> list[list[int]]:
        """Token ids of prompts (with the generation prompt), left-truncated to ``max_prompt_len``."""
        if not prompts:
            return []
        if self.chat_template:
            out = self.tokenizer.apply_chat_template([self._conv(p) for p in prompts], add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
            ids = [list(x) for x in out]
        else:
            texts = [p if isinstance(p, str) else "\n".join(m["content"] for m in p) for p in prompts]
            ids = [list(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
            bos = self.tokenizer.bos_token_id
            if bos is not None:
                ids = [x if x[:1] == [bos] else [bos, *x] for x in ids]
        return [x[-self.max_prompt_len:] for x in ids]

    def response_ids(self, prompts: Sequence[str | list[dict[str, str]]], responses: Sequence[str],
                     wheres: Sequence[str]) -> list[list[int]]:
        """Token ids of responses (ending with one EOS / end-of-turn token), left-truncated to ``max_response_len``.

        Raises:
            ValueError: the template does not render the prompt as a prefix, or a response renders to no token
                (names the record).
        """
        if not responses:
            return []
        out: list[list[int]] = []
        if self.chat_template:
            convs = [self._conv(p) for p in prompts]
            heads = self.tokenizer.apply_chat_template(convs, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)
            fulls = self.tokenizer.apply_chat_template([c + [{"role": "assistant", "content": r}]
                                                        for c, r in zip(convs, responses)], tokenize=True,
                                                       return_dict=False)
            for head, full, where in zip(heads, fulls, wheres):
                head, full = list(head), list(full)
                if full[:len(head)] != head:
                    raise ValueError(f"{where}: the chat template does not render the prompt as a token prefix of "
                                     "the conversation; set data.init_args.chat_template=false")
                tail = full[len(head):]
                end = next((i for i, t in enumerate(tail) if t in self.eot_ids), None)
                if end is None:
                    raise ValueError(f"{where}: no end-of-turn token after the response in the chat template")
                out.append(tail[:end + 1])
        else:
            eos = int(self.tokenizer.eos_token_id)
            for ids in self.tokenizer(list(responses), add_special_tokens=False)["input_ids"]:
                ids = list(ids)
                out.append(ids if ids[-1:] == [eos] else [*ids, eos])
        result = []
        for ids, where in zip(out, wheres):
            if len(ids) <= 1:
                raise ValueError(f"{where}: empty response (no token before the end of turn)")
            result.append(ids[-self.max_response_len:])
        return result

    # ------------------------------------------------------------------ splits
    def setup(self, stage: str | None = None) -> None:
        """Read and tokenise the splits ``stage`` needs (fit: train (+ validation); validate; test; predict)."""
        self._ensure_demo()
        needed = {"fit": ["train", "validation"], "validate": ["validation"], "test": ["test"],
                  "predict": ["predict"]}.get(stage or "", ["train", "validation"])
        for split in needed:
            if split == "validation" and self.paths["validation"] is None and self.val_fraction == 0:
                continue
            self.dataset(split)

    def _path(self, split: str) -> Path:
        path = self.paths[split]
        if split == "predict" and path is None:
            path = self.paths["test"] or self.paths["validation"]
        if path is None:
            raise FileNotFoundError(f"no {split} data: set {_KEYS[split]} (or data.init_args.demo)")
        if not Path(path).is_file():
            raise FileNotFoundError(f"{_KEYS[split]}: {path} does not exist")
        return Path(path)

    def _select_user(self, records: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
        if self.user is None:
            return records
        kept = [r for r in records if r.get("user") == self.user]
        if not kept:
            if all(r.get("user") is None for r in records):
                raise ValueError(f"data.init_args.user={self.user!r} but {path} has no 'user' field: set "
                                 "--data.init_args.user null to use every row")
            present = sorted({str(r.get("user")) for r in records})
            raise ValueError(f"data.init_args.user={self.user!r} matches no row of {path}; users present: {present}")
        return kept

    def _records(self, split: str) -> list[dict[str, Any]]:
        held_out = split == "validation" and self.paths["validation"] is None
        path = self._path("train" if held_out else split)
        if split == "predict":
            try:
                recs = read_preference_file(path)
            except ValueError:
                recs = [{**r, "user": r["extra"].get("user")} for r in read_instruction_file(path, "auto", False)]
            return self._select_user(recs, path)
        recs = _read_one2many(path) if self.mode == "one2many" else read_preference_file(path)
        recs = self._select_user(recs, path)
        if held_out:
            return [r for r in recs if self._is_val(r)]
        if split == "train" and self.paths["validation"] is None and self.val_fraction > 0:
            recs = [r for r in recs if not self._is_val(r)]
            if not recs:
                raise ValueError(f"data.init_args.val_fraction={self.val_fraction} leaves no training prompt")
        return recs

    def _is_val(self, rec: dict[str, Any]) -> bool:
        key = json.dumps(rec["prompt"], ensure_ascii=False, sort_keys=True)
        import hashlib

        h = int(hashlib.sha256(f"{self.seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        return h < self.val_fraction

    def dataset(self, split: str) -> Dataset:
        """The tokenised dataset of ``split``, built on first use."""
        if split not in self._data:
            self._data[split] = self._build(split)
        return self._data[split]

    def _build(self, split: str) -> Dataset:
        if split == "train" or split == "validation":
            source = self._records(split)
            if not source:
                raise ValueError(f"the {split} split is empty (user={self.user!r})")
        else:
            source = self._records(split)
        if split == "predict":
            seen: dict[str, dict[str, Any]] = {}
            for r in source:
                seen.setdefault(json.dumps(r["prompt"], ensure_ascii=False), r)
            uniq = list(seen.values())
            ids = self.prompt_ids([r["prompt"] for r in uniq])
            items = [{"prompt": p, "meta": {"id": r["id"], "user": r.get("user"), "prompt": r["prompt"],
                                            **({"chosen": r["chosen"]} if "chosen" in r else {}),
                                            **r.get("extra", {})}}
                     for p, r in zip(ids, uniq)]
            _print0(f"[litlab] {split}: {len(items)} prompts for generation (user={self.user!r})")
            return _ListDataset(items)
        prompts = self.prompt_ids([r["prompt"] for r in source])
        if self.mode == "one2many":
            flat = [(i, resp) for i, r in enumerate(source) for resp in r["responses"]]
            resp_ids = self.response_ids([source[i]["prompt"] for i, _ in flat], [x for _, x in flat],
                                         [source[i]["where"] for i, _ in flat])
            groups = [{"id": r["id"], "prompt": r["prompt"], "prompt_ids": p, "responses": []}
                      for r, p in zip(source, prompts)]
            for (i, _), ids in zip(flat, resp_ids):
                groups[i]["responses"].append(ids)
            _print0(f"[litlab] {split}: {len(groups)} prompts x {self.group_size} responses (one2many)")
            self.stats[f"data/{split}_prompts"] = len(groups)
            return OneToManyDataset(groups, self.group_size, self.seed)
        wheres = [r["where"] for r in source]
        chosen = self.response_ids([r["prompt"] for r in source], [r["chosen"] for r in source], wheres)
        rejected = self.response_ids([r["prompt"] for r in source], [r["rejected"] for r in source], wheres)
        items = []
        for r, p, c, j in zip(source, prompts, chosen, rejected):
            if c == j:
                raise ValueError(f"{r['where']}: chosen and rejected are identical after truncation to "
                                 f"max_response_len={self.max_response_len} tokens")
            items.append({"prompt": p, "chosen": c, "rejected": j,
                          "meta": {"id": r["id"], "user": r["user"], **r["extra"]}})
        users = sorted({str(r["user"]) for r in source})
        _print0(f"[litlab] {split}: {len(items)} pairs (users {', '.join(users)})")
        self.stats[f"data/{split}_pairs"] = len(items)
        return _ListDataset(items)

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, shuffle: bool, kind: str, batch_size: int | None) -> DataLoader:
        ds = self.dataset(split)
        gen = torch.Generator().manual_seed(self.seed)
        if isinstance(ds, OneToManyDataset) and self.trainer is not None:
            ds.set_epoch(self.trainer.current_epoch)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen if shuffle else None,
                          collate_fn=_Collate(kind, self.pad_token_id), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled pairs batches, or one prompt with K responses per batch (``one2many``)."""
        if self.mode == "one2many":
            return self._loader("train", True, "one2many", None)
        return self._loader("train", True, "pairs", self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order; ``[]`` without validation data."""
        if self.paths["validation"] is None and self.val_fraction == 0:
            return []
        if self.mode == "one2many":
            return self._loader("validation", False, "one2many", None)
        return self._loader("validation", False, "pairs", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test batches in file order, laid out like validation (pairs, or one prompt with K responses)."""
        if self.mode == "one2many":
            return self._loader("test", False, "one2many", None)
        return self._loader("test", False, "pairs", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """Left-padded distinct prompts of ``predict_path`` (default: the test file) with ``meta``."""
        return self._loader("predict", False, "generation", self.eval_batch_size)

    def summary(self) -> None:
        rank_zero_info(f"[litlab] PreferenceDataModule {self.stats}")
