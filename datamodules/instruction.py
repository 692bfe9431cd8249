"""Instruction-tuning data for causal LMs: JSONL ``{prompt, response}`` or chat ``{messages}``, loss on responses only.

Contents:

- :class:`InstructionDataModule`: reads JSONL (or a ``.json`` list), renders examples through the tokenizer's chat
  template, masks everything but the response tokens, applies the length rule, and serves length-grouped, random or
  packed training batches (exact mid-epoch resume, DDP sharding), teacher-forced validation batches and left-padded
  generation batches for test/predict. Demo data: ``mgsm_symbolic`` (:mod:`datamodules.demo.mgsm_symbolic`) and
  ``bible_translation`` (:mod:`datamodules.demo.bible_instructions`).
- :func:`read_instruction_file`: the record reader (errors name file and line).
- :class:`InstructionBatchSampler`, :func:`pack_examples`: batching.
- :func:`collate_supervised`, :func:`collate_packed`, :func:`collate_generation`: batch layouts.

Batch layouts (all tensors ``torch.long``; ``B`` rows, ``T`` padded length)::

    training / validation (padded)      input_ids [B, T], attention_mask [B, T], labels [B, T]     right padding
    training (batching="packed")        input_ids [B, T], labels [B, T], position_ids [B, T]      no attention_mask
    test / predict (generation)         input_ids [B, T], attention_mask [B, T], meta: list[dict]  left padding

``labels`` equal ``input_ids`` on response tokens (the end-of-turn/EOS token that closes each response included) and
are -100 on prompt tokens, template tokens and padding; models shift them internally (Hugging Face convention).
Padding uses ``tokenizer.pad_token_id``.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from datamodules.batching import ResumableBatchSampler
from datamodules.resumable import ResumableDataLoader, shard_context, trainer_progress

__all__ = [
    "GenerationCollator",
    "InstructionBatchSampler",
    "InstructionDataModule",
    "PackedCollator",
    "SupervisedCollator",
    "collate_generation",
    "collate_packed",
    "collate_supervised",
    "pack_examples",
    "read_instruction_file",
]

IGNORE_INDEX = -100
#: Records without a ``lang`` field belong to this group.
DEFAULT_LANG = "all"
#: Length-grouped batching sorts mega-batches of this many batches (Hugging Face's ``LengthGroupedSampler`` uses 50).
MEGA_BATCH_FACTOR = 50
#: Tokens that end an assistant turn in common chat templates (the tokenizer's EOS token always counts too).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
_ROLES = ("system", "user", "assistant")
_SPLIT_KEYS = {
    "train": "data.init_args.train_files",
    "validation": "data.init_args.val_files",
    "test": "data.init_args.test_files",
    "predict": "data.init_args.predict_files",
}


@rank_zero_only
def _print0(msg: str) -> None:
    print(msg, flush=True)


# ====================================================================== reading
def _where(path: Path, index: int, jsonl: bool) -> str:
    return f"{path} line {index}" if jsonl else f"{path} record {index}"


def _check_str(value: Any, name: str, where: str, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name!r} must be a string, got {type(value).__name__}")  # noqa: TRY004
    if not value.strip():
        raise ValueError(f"{where}: {name!r} is empty")
    return value


def _record_format(obj: dict[str, Any], where: str) -> str:
    if "messages" in obj:
        return "messages"
    if "prompt" in obj or "response" in obj:
        return "prompt_response"
    raise ValueError(
        f"{where}: cannot tell the record format from its keys {sorted(obj)}; expected {{prompt, response}} "
        "or {messages: [{role, content}, ...]}"
    )


def read_instruction_file(
    path: str | Path,
    data_format: Literal["auto", "prompt_response", "messages"] = "auto",
    require_response: bool = True,
) -> list[dict[str, Any]]:
    """Read and validate the instruction records of one file (only read, never modified).

    Accepted files: JSON Lines (one object per line, blank lines skipped) or a ``.json`` file holding a list of
    objects. Record forms:

    - ``{"prompt": str, "response": str}`` plus optional ``id``, ``lang``, ``system`` and any other fields (kept as
      metadata, e.g. ``answer``, ``references``);
    - ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` plus optional ``id``, ``lang``,
      ``system`` and extra fields; every assistant turn is supervised, each must follow a user turn.

    ``auto`` takes the format from the first record's keys; later records must have the same form.

    Args:
        path: the file.
        data_format: ``auto``, ``prompt_response`` or ``messages``.
        require_response: False for prediction inputs, where ``response`` may be missing or null and a chat may end
            with a user turn.

    Returns:
        Normalised records: ``id`` (the record's, else ``<file name>:<line>``), ``lang`` (default ``"all"``),
        ``prompt``/``response`` (text; for chats the last user turn before the last assistant turn and that
        assistant turn), ``system``, ``messages`` (None for prompt/response records), ``extra`` (every other field)
        and ``where`` (``<file> line <n>`` for error messages).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the file and line (record index for ``.json`` lists): not JSON, not an object, missing or
            empty ``prompt``/``response``/``messages``, non-string values, unknown role, a chat without an assistant
            turn (when required), a record of another form than the file's first, an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    items: list[tuple[int, Any]] = []
    jsonl = not (path.suffix == ".json" and text.lstrip().startswith("["))
    if jsonl:
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                items.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from exc
        items = list(enumerate(rows, start=1))
    if not items:
        raise ValueError(f"{path}: empty file, no records")

    records: list[dict[str, Any]] = []
    file_format: str | None = None if data_format == "auto" else data_format
    for index, obj in items:
        where = _where(path, index, jsonl)
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004
        form = _record_format(obj, where)
        if file_format is None:
            file_format = form
        if form != file_format:
            raise ValueError(
                f"{where}: a {form} record (keys {sorted(obj)}) in a file of {file_format} records "
                f"(data_format={data_format!r})"
            )
        rid = obj.get("id")
        if rid is not None and not isinstance(rid, (str, int)):
            raise ValueError(f"{where}: 'id' must be a string or an integer, got {type(rid).__name__}")
        lang = _check_str(obj.get("lang", DEFAULT_LANG), "lang", where)
        system = _check_str(obj.get("system"), "system", where, allow_none=True)
        record: dict[str, Any] = {
            "id": str(rid) if rid is not None else f"{path.name}:{index}",
            "lang": lang,
            "system": system,
            "where": where,
        }
        if form == "prompt_response":
            if "prompt" not in obj:
                raise ValueError(f"{where}: missing 'prompt' (keys found: {sorted(obj)})")
            if require_response and "response" not in obj:
                raise ValueError(f"{where}: missing 'response' (keys found: {sorted(obj)})")
            record["prompt"] = _check_str(obj["prompt"], "prompt", where)
            record["response"] = _check_str(obj.get("response"), "response", where, allow_none=not require_response)
            record["messages"] = None
            reserved = {"prompt", "response", "id", "lang", "system"}
        else:
            record.update(_read_messages(obj["messages"], where, require_response))
            reserved = {"messages", "id", "lang", "system"}
        record["extra"] = {k: v for k, v in obj.items() if k not in reserved}
        records.append(record)
    return records


def _read_messages(messages: Any, where: str, require_response: bool) -> dict[str, Any]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    clean: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"{where}: messages[{i}] must be an object with 'role' and 'content', got {msg!r:.80}")
        if msg["role"] not in _ROLES:
            raise ValueError(f"{where}: messages[{i}] has unknown role {msg['role']!r}; allowed: {list(_ROLES)}")
        content = _check_str(msg["content"], f"messages[{i}].content", where)
        if msg["role"] == "system" and i != 0:
            raise ValueError(f"{where}: messages[{i}] is a system message; only the first message may be one")
        if msg["role"] == "assistant" and (not clean or clean[-1]["role"] != "user"):
            raise ValueError(f"{where}: messages[{i}] is an assistant turn that does not follow a user turn")
        clean.append({"role": msg["role"], "content": content})
    assistants = [i for i, m in enumerate(clean) if m["role"] == "assistant"]
    if require_response and not assistants:
        raise ValueError(f"{where}: 'messages' has no assistant turn to supervise")
    if clean[-1]["role"] == "assistant":
        response = clean[-1]["content"]
        context = clean[:-1]
    else:
        if clean[-1]["role"] != "user":
            raise ValueError(f"{where}: a chat to answer must end with a user turn")
        response, context = None, clean
    users = [m["content"] for m in context if m["role"] == "user"]
    if not users:
        raise ValueError(f"{where}: 'messages' has no user turn")
    return {"messages": clean, "prompt": users[-1], "response": response}


# ====================================================================== datasets
class SupervisedDataset(Dataset):
    """Tokenised examples with supervised spans; ``dataset[i]`` is ``{"input_ids": list[int], "labels": list[int]}``.

    Args:
        input_ids: token ids per example (prompt and response).
        spans: per example, the ``[start, end)`` ranges of supervised (response) positions.
        ids: record ids (diagnostics).
        langs: record ``lang`` groups.
    """

    def __init__(
        self, input_ids: list[list[int]], spans: list[list[tuple[int, int]]], ids: list[str], langs: list[str]
    ) -> None:
        self.input_ids = input_ids
        self.spans = spans
        self.ids = ids
        self.langs = langs
        self.lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))

    def __len__(self) -> int:
        return len(self.input_ids)

    def labels(self, index: int) -> list[int]:
        """Labels of example ``index``: its ids on supervised spans, -100 elsewhere."""
        ids = self.input_ids[index]
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in self.spans[index]:
            labels[start:end] = ids[start:end]
        return labels

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[index], "labels": self.labels(index)}


class PackedDataset(Dataset):
    """Rows of whole examples (see :func:`pack_examples`); ``dataset[r]`` is the list of row ``r``'s examples."""

    def __init__(self, base: SupervisedDataset, rows: list[list[int]]) -> None:
        self.base = base
        self.rows = rows
        self.lengths = np.array([int(base.lengths[row].sum()) for row in rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[dict[str, list[int]]]:
        return [self.base[i] for i in self.rows[index]]


class GenerationDataset(Dataset):
    """Prompt-only examples; ``dataset[i]`` is ``{"input_ids": list[int], "meta": dict}``."""

    def __init__(self, input_ids: list[list[int]], meta: list[dict[str, Any]]) -> None:
        self.input_ids = input_ids
        self.meta = meta
        self.lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[index], "meta": self.meta[index]}


# ====================================================================== collate
def collate_supervised(samples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``{"input_ids", "labels"}`` items: ``input_ids``, ``attention_mask``, ``labels``, each [B, T] long."""
    n = len(samples)
    width = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        k = len(s["input_ids"])
        input_ids[i, :k] = torch.tensor(s["input_ids"], dtype=torch.long)
        attention_mask[i, :k] = 1
        labels[i, :k] = torch.tensor(s["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(rows: Sequence[Sequence[dict[str, list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples: ``input_ids``, ``labels``, ``position_ids`` [B, T] long, no attention mask.

    ``position_ids`` restart at 0 for every example; transformers (5.x, eager/sdpa/flex attention) derives a
    block-diagonal causal mask from them when ``attention_mask`` is None and no cache is used (call the model with
    ``use_cache=False``), so no example attends to another. The first token of every example is never a label
    target (a prompt token anyway), so no loss crosses an example boundary. Row padding (right) has label -100 and
    its own positions from 0, i.e. it forms a separate dummy segment.
    """
    n = len(rows)
    joined = []
    for row in rows:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for ex in row:
            ids.extend(ex["input_ids"])
            ex_labels = list(ex["labels"])
            ex_labels[0] = IGNORE_INDEX
            labels.extend(ex_labels)
            positions.extend(range(len(ex["input_ids"])))
        joined.append((ids, labels, positions))
    width = max(len(j[0]) for j in joined)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels_t = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, labels, positions) in enumerate(joined):
        k = len(ids)
        input_ids[i, :k] = torch.tensor(ids, dtype=torch.long)
        labels_t[i, :k] = torch.tensor(labels, dtype=torch.long)
        position_ids[i, :k] = torch.tensor(positions, dtype=torch.long)
        position_ids[i, k:] = torch.arange(width - k, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels_t, "position_ids": position_ids}


def collate_generation(samples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Left-pad prompts: ``input_ids`` [B, T], ``attention_mask`` [B, T] (long) and ``meta`` (list of dicts)."""
    n = len(samples)
    width = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(samples):
        k = len(s["input_ids"])
        input_ids[i, width - k :] = torch.tensor(s["input_ids"], dtype=torch.long)
        attention_mask[i, width - k :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "meta": [dict(s["meta"]) for s in samples]}


class SupervisedCollator:
    """Picklable ``collate_fn`` for :func:`collate_supervised`."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return collate_supervised(samples, self.pad_id)


class PackedCollator(SupervisedCollator):
    """Picklable ``collate_fn`` for :func:`collate_packed`."""

    def __call__(self, samples: Sequence[Sequence[dict[str, list[int]]]]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return collate_packed(samples, self.pad_id)


class GenerationCollator(SupervisedCollator):
    """Picklable ``collate_fn`` for :func:`collate_generation`."""

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:  # type: ignore[override]
        return collate_generation(samples, self.pad_id)


# ====================================================================== batching
def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


def pack_examples(lengths: Sequence[int] | np.ndarray, max_length: int, seed: int = 0) -> list[list[int]]:
    """Pack whole examples into rows of at most ``max_length`` tokens (best fit, in a seeded shuffled order).

    Examples are visited in a random order drawn from ``seed``; each goes to the open row with the least room that
    still fits it, or opens a new row. Rows list example indices in insertion order.

    Raises:
        ValueError: an example longer than ``max_length`` (the message gives its index).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = _rng(seed, 0).permutation(len(lengths))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, row index) of rows that can still take an example
    for idx in order.tolist():
        size = int(lengths[idx])
        if size > max_length:
            raise ValueError(f"example {idx} has {size} tokens, more than max_length={max_length}")
        pos = bisect.bisect_left(room, (size, -1))
        if pos < len(room):
            free, r = room.pop(pos)
            rows[r].append(idx)
            free -= size
        else:
            r = len(rows)
            rows.append([idx])
            free = max_length - size
        if free > 0:
            bisect.insort(room, (free, r))
    return rows


class InstructionBatchSampler(ResumableBatchSampler):
    """Batches of example indices for instruction data: length-grouped, random, sorted or sequential; resumable.

    Modes (``B`` = ``batch_size``):

    - ``length_grouped`` (training): shuffle all indices with (seed, epoch), cut the permutation into mega-batches of
      ``50 * B``, sort each by length (longest first, stable), cut into batches of ``B``, then shuffle the batch
      order with the same generator. Padding drops sharply compared with ``random`` while batches stay random.
    - ``random``: shuffle with (seed, epoch), cut into batches of ``B``.
    - ``sorted`` (validation): length-sorted, longest first, same every epoch.
    - ``sequential`` (test/predict): file order.

    Every mode yields every index exactly once per epoch (before DDP padding) in ``ceil(N / B)`` batches, so
    ``len()`` is the same every epoch. Sharding and resume follow :class:`datamodules.batching.ResumableBatchSampler`:
    with ``even_shards`` the epoch's batch list wraps around to a multiple of ``num_replicas`` and rank ``r`` takes
    ``batches[r::num_replicas]``; ``start_batch`` skips that many of this rank's batches in the next iteration only;
    ``set_epoch`` (also reachable as ``sampler.set_epoch``, where Lightning calls it) changes the shuffle.

    Args:
        lengths: token count of every example (shape [N]).
        batch_size: examples per batch.
        mode: ``length_grouped``, ``random``, ``sorted`` or ``sequential``.
        seed: base seed; the epoch's order depends only on (seed, epoch).
        epoch: initial epoch.
        num_replicas: number of DDP ranks.
        rank: this process's rank.
        start_batch: batches to skip once (exact mid-epoch resume).
        even_shards: wrap around so that every rank gets the same number of batches (training).

    Raises:
        ValueError: ``batch_size < 1``, unknown mode, ``rank`` outside ``[0, num_replicas)``, negative ``start_batch``.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        mode: Literal["length_grouped", "random", "sorted", "sequential"] = "length_grouped",
        seed: int = 0,
        epoch: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        start_batch: int = 0,
        even_shards: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mode not in ("length_grouped", "random", "sorted", "sequential"):
            raise ValueError(f"mode must be length_grouped, random, sorted or sequential; got {mode!r}")
        super().__init__(seed, epoch, num_replicas, rank, start_batch, even_shards)
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        self.batch_size = int(batch_size)
        self.mode = mode

    def _chunks(self, order: np.ndarray) -> list[list[int]]:
        b = self.batch_size
        return [order[i : i + b].tolist() for i in range(0, len(order), b)]

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches (every rank's) of ``epoch`` (default: the current one), before sharding."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = len(self.lengths)
        if self.mode == "sequential":
            return self._chunks(np.arange(n))
        if self.mode == "sorted":
            return self._chunks(np.argsort(-self.lengths, kind="stable"))
        rng = _rng(self.seed, 1, epoch)
        perm = rng.permutation(n)
        if self.mode == "random":
            return self._chunks(perm)
        mega = MEGA_BATCH_FACTOR * self.batch_size
        batches: list[list[int]] = []
        for start in range(0, n, mega):
            chunk = perm[start : start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(self._chunks(chunk))
        return [batches[i] for i in rng.permutation(len(batches)).tolist()]

    def num_batches(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


# ====================================================================== data module
class InstructionDataModule(LightningDataModule):
    """Instruction tuning data for causal LMs: loss on response tokens only, length-grouped or packed batches.

    The tokenizer is loaded in the constructor (:attr:`tokenizer`, via :func:`lit_models.hf.load_tokenizer`), so
    LightningCLI can link ``data.tokenizer`` into the model. ``prepare_data`` builds the demo data (if ``demo``);
    ``setup(stage)`` reads and tokenises only the splits the stage needs (fit: train + validation when given;
    validate: validation; test: test; predict: predict, else test) once, prints the per-split statistics and keeps
    them in :attr:`stats`. Input files are only read.

    **Tokenisation.** With ``use_chat_template`` each example is rendered by ``tokenizer.apply_chat_template``: the
    prompt as ``[system?, user]`` with ``add_generation_prompt=True``, the full example with the assistant turn
    appended. The response ids are the full ids after the prompt ids (the prompt must be a token prefix of the full
    rendering, else ``ValueError``) up to and including the first end-of-turn token (the EOS token or one of
    :data:`END_OF_TURN_TOKENS`); what the template appends after it (SmolLM2: a newline) is dropped. The system text
    is the chat's own system message, else the record's ``system`` field, else ``system_prompt``, else whatever the
    template does without one (SmolLM2 inserts its default system prompt). Chats with several assistant turns
    supervise each of them, every prefix rendered by the template the same way. Without the chat template:
    ``tokenizer(prompt)`` (BOS only if the tokenizer adds one, a tokenizer-added EOS removed) +
    ``tokenizer(response, add_special_tokens=False)`` + ``[eos]``; prompt and response are joined at token level,
    so the prompt should end with the separator it needs (e.g. a newline). Chats need the chat template.

    **Length rule** (``L`` = ``max_length``; counts printed per split, e.g. ``[litlab] train: 3 of 880 examples
    longer than max_length=512 dropped``):

    - training and validation, ``overflow="drop"``: an example with more than ``L`` tokens (prompt + response + EOS)
      is dropped;
    - ``overflow="truncate"``: the prompt is kept whole and the response cut to end at ``L`` tokens (the cut response
      has no EOS); an example whose prompt alone is longer than ``L - 1`` tokens leaves no room for a response
      token and is dropped;
    - test and predict: prompts are never dropped or cut (generation needs every item); those longer than ``L`` are
      counted and printed.

    ``max_train_samples``/``max_eval_samples`` (validation and test, not predict) keep the first N records of each
    ``lang`` group in file order, before the length rule, so that every language stays represented.

    **Batches** (layouts in the module docstring). Training: ``length_grouped`` (mega-batches of ``50 *
    batch_size`` sorted by length, see :class:`InstructionBatchSampler`), ``random``, or ``packed``: whole examples
    packed once (best fit in a ``seed``-shuffled order, :func:`pack_examples`) into rows of at most ``max_length``
    tokens, ``batch_size`` rows per batch, row order reshuffled every epoch; packed batches carry ``position_ids``
    and no ``attention_mask`` (the model must pass ``position_ids`` and ``use_cache=False``, see
    :func:`collate_packed`). Validation: padded teacher-forced batches in length order (also in packed mode). Test
    and predict: left-padded prompts in file order with ``meta`` (``id``, ``lang``, ``prompt``, ``response`` or
    None, and every extra field of the record, e.g. ``answer``, ``references``).

    **Resume and DDP.** Under a Trainer the training loader is a
    :class:`~datamodules.resumable.ResumableDataLoader`, whose position Lightning stores in checkpoints and restores
    (exact mid-epoch resume; ``_resume_batch`` sets the skip by hand outside Lightning). The batch sampler shards
    across ranks itself (equal shards for training, no duplicates for evaluation: de-duplicate predictions by
    ``meta["id"]``), so multi-device runs need ``trainer.use_distributed_sampler: false``.

    Args:
        tokenizer: tokenizer name or path for :func:`lit_models.hf.load_tokenizer` (``smollm2-135m``, a tiny model
            name such as ``llama-tiny``, a local directory, or a cached hub name).
        train_files: training JSONL/JSON files (concatenated in order).
        val_files: validation files (teacher-forced ``val/loss``).
        test_files: test files (generation batches).
        predict_files: files to answer with ``predict`` (``response`` optional); default: ``test_files``.
        data_format: ``auto`` (from each file's first record), ``prompt_response`` or ``messages``.
        demo: ``mgsm_symbolic`` (11-language GSM8K problems, :func:`~datamodules.demo.mgsm_symbolic.build_mgsm_sft`)
            or ``bible_translation`` (:func:`~datamodules.demo.bible_instructions.build_bible_translation_instructions`)
            or ``bible_multiref`` (German verses with two English answers, WEB and KJV:
            :func:`~datamodules.demo.bible_multiref.build_bible_multiref`)
            builds the demo into ``<data_dir>/<demo>``; empty split lists then default to its files.
        demo_kwargs: keyword arguments of the demo builder (e.g. ``{"languages": ["en", "de"]}`` or
            ``{"max_train": 2000, "max_eval": 100}``).
        data_dir: root of the demo outputs.
        use_chat_template: render examples with the tokenizer's chat template (see above).
        system_prompt: system message for records without one (chat template only).
        max_length: longest training/validation example in tokens (see the length rule).
        overflow: ``drop`` or ``truncate`` over-long training/validation examples.
        batching: ``length_grouped``, ``packed`` or ``random`` training batches.
        batch_size: training examples per batch (packed: rows of up to ``max_length`` tokens), per device.
        eval_batch_size: validation/test/predict examples per batch, per device.
        max_train_samples: keep the first N training records per ``lang`` (None: all).
        max_eval_samples: keep the first N validation and test records per ``lang`` (None: all).
        num_workers: DataLoader worker processes (``persistent_workers`` when > 0).
        seed: seed of shuffling and packing (the order depends only on seed and epoch).

    Raises:
        ValueError: bad sizes, ``system_prompt`` without the chat template, a tokenizer without a chat template while
            ``use_chat_template`` is set, unknown literal values; errors of :func:`read_instruction_file`.
    """

    def __init__(
        self,
        tokenizer: str = "smollm2-135m",
        train_files: list[str] = [],  # noqa: B006
        val_files: list[str] = [],  # noqa: B006
        test_files: list[str] = [],  # noqa: B006
        predict_files: list[str] = [],  # noqa: B006
        data_format: Literal["auto", "prompt_response", "messages"] = "auto",
        demo: Literal["none", "mgsm_symbolic", "bible_translation", "bible_multiref"] = "none",
        demo_kwargs: dict[str, Any] = {},  # noqa: B006
        data_dir: str = "data/instruction",
        use_chat_template: bool = True,
        system_prompt: str | None = None,
        max_length: int = 512,
        overflow: Literal["drop", "truncate"] = "drop",
        batching: Literal["length_grouped", "packed", "random"] = "length_grouped",
        batch_size: int = 8,
        eval_batch_size: int = 8,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, value, allowed in (
            ("data_format", data_format, ("auto", "prompt_response", "messages")),
            ("demo", demo, ("none", "mgsm_symbolic", "bible_translation", "bible_multiref")),
            ("overflow", overflow, ("drop", "truncate")),
            ("batching", batching, ("length_grouped", "packed", "random")),
        ):
            if value not in allowed:
                raise ValueError(f"data.init_args.{name} must be one of {list(allowed)}, got {value!r}")
        for name, value in (("max_length", max_length), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1 or (name == "max_length" and value < 2):
                raise ValueError(f"data.init_args.{name} must be >= {2 if name == 'max_length' else 1}, got {value}")
        for name, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
            if value is not None and value < 1:
                raise ValueError(f"data.init_args.{name} must be >= 1 or null, got {value}")
        if num_workers < 0:
            raise ValueError(f"data.init_args.num_workers must be >= 0, got {num_workers}")
        if system_prompt is not None and not use_chat_template:
            raise ValueError("data.init_args.system_prompt needs use_chat_template=true (a plain prompt has no system turn)")

        from lit_models.hf import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer)
        if use_chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {tokenizer!r} has no chat template while data.init_args.use_chat_template=true; "
                "set use_chat_template=false (plain prompt + response + EOS) or use a chat tokenizer"
            )
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer!r} has no EOS token: responses could not be terminated")
        self.tokenizer_name = tokenizer
        self.data_format = data_format
        self.demo = demo
        self.demo_kwargs = dict(demo_kwargs)
        self.data_dir = Path(data_dir)
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.overflow = overflow
        self.batching = batching
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.num_workers = num_workers
        self.seed = seed
        self.files: dict[str, list[str]] = {
            "train": list(train_files),
            "validation": list(val_files),
            "test": list(test_files),
            "predict": list(predict_files),
        }
        self.demo_dir: Path | None = None
        if demo != "none":
            self.demo_dir = self.data_dir / demo
            built = {"train": "train", "validation": "validation", "test": "test", "predict": "test"}
            for split, base in built.items():
                if not self.files[split]:
                    self.files[split] = [str(self.demo_dir / f"{base}.jsonl")]
        self.eot_ids = self._end_of_turn_ids()
        self._demo_built = False
        self._datasets: dict[str, Any] = {}
        self._resume_batch = 0
        self.stats: dict[str, float] = {}

    # ------------------------------------------------------------------ tokenizer facts
    @property
    def pad_token_id(self) -> int:
        """Padding id (``tokenizer.pad_token_id``)."""
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_token_id(self) -> int:
        """EOS id (``tokenizer.eos_token_id``)."""
        return int(self.tokenizer.eos_token_id)

    @property
    def vocab_size(self) -> int:
        """Number of token ids of the tokenizer (``len(tokenizer)``, added tokens included)."""
        return len(self.tokenizer)

    def _end_of_turn_ids(self) -> set[int]:
        ids = {int(self.tokenizer.eos_token_id)}
        vocab = self.tokenizer.get_added_vocab()
        ids.update(int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab)
        return ids

    # ------------------------------------------------------------------ demo
    def prepare_data(self) -> None:
        """Build the demo data (``demo``), idempotent and locked against concurrent builds; otherwise nothing."""
        self._ensure_demo()

    def _ensure_demo(self) -> None:
        if self.demo == "none" or self._demo_built:
            return
        assert self.demo_dir is not None
        if self.demo == "mgsm_symbolic":
            from datamodules.demo.mgsm_symbolic import build_mgsm_sft as builder
        elif self.demo == "bible_multiref":
            from datamodules.demo.bible_multiref import build_bible_multiref as builder
        else:
            from datamodules.demo.bible_instructions import build_bible_translation_instructions as builder
        kwargs = {"verbose": rank_zero_only.rank == 0, **self.demo_kwargs}
        try:
            builder(self.demo_dir, **kwargs)
        except TypeError as exc:
            raise ValueError(f"data.init_args.demo_kwargs does not fit the {self.demo!r} builder: {exc}") from exc
        self._demo_built = True

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Read and tokenise the splits ``stage`` needs (fit, validate, test, predict; None: all available).

        Raises:
            FileNotFoundError: a needed split has no file (names the config key, e.g. ``data.init_args.test_files``)
                or a listed file does not exist.
        """
        self._ensure_demo()
        needed = {
            "fit": ["train", "validation"],
            "validate": ["validation"],
            "test": ["test"],
            "predict": ["predict"],
        }.get(stage or "", [s for s in ("train", "validation", "test") if self.files[s]])
        for split in needed:
            if split == "validation" and stage == "fit" and not self.files["validation"]:
                _print0("[litlab] validation: no val_files given, fit runs without validation")
                continue
            self.dataset(split)

    def _split_files(self, split: str) -> list[Path]:
        files = self.files[split] or (self.files["test"] if split == "predict" else [])
        key = _SPLIT_KEYS[split]
        if not files:
            hint = " (or test_files)" if split == "predict" else ""
            raise FileNotFoundError(
                f"no {split} data: set {key}{hint} to JSONL files with prompt/response or messages records, "
                "or choose a demo (data.init_args.demo)"
            )
        paths = [Path(f) for f in files]
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"{key}: {path} does not exist")
        return paths

    def dataset(self, split: str) -> Any:
        """The tokenised dataset of ``split`` (``train``/``validation``: :class:`SupervisedDataset`;
        ``test``/``predict``: :class:`GenerationDataset`), built on first use."""
        if split not in _SPLIT_KEYS:
            raise ValueError(f"split must be one of {list(_SPLIT_KEYS)}, got {split!r}")
        if split not in self._datasets:
            self._datasets[split] = self._load(split)
        return self._datasets[split]

    def _read(self, split: str) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        seen: dict[str, str] = {}
        for path in self._split_files(split):
            for rec in read_instruction_file(path, self.data_format, require_response=split != "predict"):
                if rec["messages"] is not None and not self.use_chat_template:
                    raise ValueError(
                        f"{rec['where']}: chat (messages) records need use_chat_template=true; "
                        "chat strings are never built by concatenation"
                    )
                if rec["system"] is not None and not self.use_chat_template:
                    raise ValueError(f"{rec['where']}: a 'system' field needs use_chat_template=true")
                if rec["id"] in seen:
                    raise ValueError(f"{rec['where']}: duplicate id {rec['id']!r} (first at {seen[rec['id']]})")
                seen[rec["id"]] = rec["where"]
                records.append(rec)
        limit = self.max_train_samples if split == "train" else self.max_eval_samples if split != "predict" else None
        if limit is not None:
            taken: dict[str, int] = {}
            kept = []
            for rec in records:
                if taken.get(rec["lang"], 0) < limit:
                    taken[rec["lang"]] = taken.get(rec["lang"], 0) + 1
                    kept.append(rec)
            records = kept
        return records

    def _load(self, split: str) -> Any:
        t0 = time.perf_counter()
        records = self._read(split)
        if split in ("train", "validation"):
            ids, spans = self._tokenize_supervised(records)
            dataset = self._apply_length_rule(split, records, ids, spans)
        else:
            prompts = self._tokenize_prompts(records)
            too_long = sum(len(p) > self.max_length for p in prompts)
            meta = [
                {"id": r["id"], "lang": r["lang"], "prompt": r["prompt"], "response": r["response"], **r["extra"]}
                for r in records
            ]
            dataset = GenerationDataset(prompts, meta)
            self.stats[f"data/{split}_prompts_over_max_length"] = too_long
            _print0(
                f"[litlab] {split}: {too_long} of {len(records)} prompts longer than max_length={self.max_length} "
                "(kept: generation needs every item)"
            )
        lengths = dataset.lengths
        supervised = (
            sum(e - s for spans_i in dataset.spans for s, e in spans_i) if isinstance(dataset, SupervisedDataset) else 0
        )
        names = dataset.langs if isinstance(dataset, SupervisedDataset) else [r["lang"] for r in records]
        langs = sorted(set(names))
        self.stats[f"data/{split}_examples"] = len(dataset)
        self.stats[f"data/{split}_tokens"] = int(lengths.sum())
        _print0(
            f"[litlab] {split}: {len(dataset)} examples, {int(lengths.sum())} tokens"
            + (f" ({supervised} supervised)" if supervised else "")
            + f", length mean {float(lengths.mean()) if len(lengths) else 0.0:.1f} max "
            f"{int(lengths.max()) if len(lengths) else 0}, languages {','.join(langs)} "
            f"({time.perf_counter() - t0:.1f}s)"
        )
        return dataset

    # ------------------------------------------------------------------ tokenisation
    def _conversation(self, rec: dict[str, Any]) -> list[dict[str, str]]:
        """The chat of a record up to its last assistant turn (or all of it when it ends with a user turn)."""
        if rec["messages"] is not None:
            conv = [dict(m) for m in rec["messages"]]
        else:
            conv = [{"role": "user", "content": rec["prompt"]}]
            if rec["response"] is not None:
                conv.append({"role": "assistant", "content": rec["response"]})
        system = rec["system"] if rec["system"] is not None else self.system_prompt
        if system is not None and conv[0]["role"] != "system":
            conv.insert(0, {"role": "system", "content": system})
        return conv

    def _chat_ids(self, conversations: list[list[dict[str, str]]], add_generation_prompt: bool) -> list[list[int]]:
        if not conversations:
            return []
        out = self.tokenizer.apply_chat_template(
            conversations, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        return [list(x) for x in out]

    def _plain_prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        if not prompts:
            return []
        ids = self.tokenizer(prompts)["input_ids"]
        eos = self.eos_token_id
        # A tokenizer whose post-processor appends EOS: the response follows the prompt, so the EOS goes.
        adds_eos = self.tokenizer("a")["input_ids"][-1:] == [eos] and self.tokenizer("a", add_special_tokens=False)[
            "input_ids"
        ][-1:] != [eos]
        return [list(x[:-1]) if adds_eos and x and x[-1] == eos else list(x) for x in ids]

    def _tokenize_supervised(self, records: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Token ids and supervised ``[start, end)`` spans of every record (see the class docstring)."""
        if not self.use_chat_template:
            prompts = self._plain_prompt_ids([r["prompt"] for r in records])
            responses = self.tokenizer([r["response"] for r in records], add_special_tokens=False)["input_ids"] if records else []
            all_ids, all_spans = [], []
            for p, r in zip(prompts, responses):
                ids = p + list(r) + [self.eos_token_id]
                all_ids.append(ids)
                all_spans.append([(len(p), len(ids))])
            return all_ids, all_spans

        conversations = [self._conversation(r) for r in records]
        fulls = self._chat_ids(conversations, add_generation_prompt=False)
        prefix_convs: list[list[dict[str, str]]] = []
        owners: list[int] = []
        for i, conv in enumerate(conversations):
            for j, msg in enumerate(conv):
                if msg["role"] == "assistant":
                    prefix_convs.append(conv[:j])
                    owners.append(i)
        prefixes = self._chat_ids(prefix_convs, add_generation_prompt=True)
        spans: list[list[tuple[int, int]]] = [[] for _ in records]
        for owner, prefix in zip(owners, prefixes):
            full = fulls[owner]
            rec = records[owner]
            turn = len(spans[owner]) + 1
            if full[: len(prefix)] != prefix:
                raise ValueError(
                    f"{rec['where']}: the chat template of tokenizer {self.tokenizer_name!r} does not render the prompt "
                    f"of assistant turn {turn} as a token prefix of the whole conversation, so the response tokens "
                    "cannot be located; set use_chat_template=false or use another tokenizer"
                )
            start = len(prefix)
            end = next((k for k in range(start, len(full)) if full[k] in self.eot_ids), None)
            if end is None:
                raise ValueError(
                    f"{rec['where']}: no end-of-turn token (EOS or one of {list(END_OF_TURN_TOKENS)}) after the "
                    f"response of assistant turn {turn} in the chat template's rendering"
                )
            if end == start:
                raise ValueError(f"{rec['where']}: assistant turn {turn} renders to no token before its end of turn")
            spans[owner].append((start, end + 1))
        ids = [full[: sp[-1][1]] for full, sp in zip(fulls, spans)]
        return ids, spans

    def _tokenize_prompts(self, records: list[dict[str, Any]]) -> list[list[int]]:
        """Prompt ids for generation: the chat up to the assistant turn to produce, plus the generation prompt."""
        if not self.use_chat_template:
            return self._plain_prompt_ids([r["prompt"] for r in records])
        contexts = []
        for rec in records:
            conv = self._conversation(rec)
            if conv[-1]["role"] == "assistant":
                conv = conv[:-1]
            contexts.append(conv)
        return self._chat_ids(contexts, add_generation_prompt=True)

    def _apply_length_rule(
        self,
        split: str,
        records: list[dict[str, Any]],
        ids: list[list[int]],
        spans: list[list[tuple[int, int]]],
    ) -> SupervisedDataset:
        limit = self.max_length
        kept_ids: list[list[int]] = []
        kept_spans: list[list[tuple[int, int]]] = []
        kept_names: list[str] = []
        kept_langs: list[str] = []
        over = no_room = 0
        over_by_lang: dict[str, int] = {}
        total_by_lang: dict[str, int] = {}
        kept_by_lang: dict[str, int] = {}
        for rec, x, sp in zip(records, ids, spans):
            lang = rec["lang"]
            total_by_lang[lang] = total_by_lang.get(lang, 0) + 1
            if len(x) <= limit:
                kept_ids.append(x)
                kept_spans.append(sp)
                kept_names.append(rec["id"])
                kept_langs.append(lang)
                kept_by_lang[lang] = kept_by_lang.get(lang, 0) + 1
                continue
            over += 1
            over_by_lang[lang] = over_by_lang.get(lang, 0) + 1
            if self.overflow == "drop" or sp[0][0] > limit - 1:
                no_room += self.overflow == "truncate"
                continue
            kept_by_lang[lang] = kept_by_lang.get(lang, 0) + 1
            kept_ids.append(x[:limit])
            kept_spans.append([(s, min(e, limit)) for s, e in sp if s < limit])
            kept_names.append(rec["id"])
            kept_langs.append(lang)
        if not kept_ids and records:
            raise ValueError(
                f"the {split} split is empty after the length rule: all {len(records)} examples are longer than "
                f"max_length={limit} (overflow={self.overflow!r}); raise data.init_args.max_length"
            )
        if self.overflow == "drop":
            msg = f"{over} of {len(records)} examples longer than max_length={limit} dropped"
        else:
            msg = (
                f"{over} of {len(records)} examples longer than max_length={limit}: {over - no_room} truncated "
                f"(response cut), {no_room} dropped (prompt longer than max_length - 1)"
            )
        if over and len(total_by_lang) > 1:
            worst = sorted(over_by_lang.items(), key=lambda kv: (-kv[1], kv[0]))
            msg += " (by lang: " + ", ".join(f"{lang} {n}/{total_by_lang[lang]}" for lang, n in worst) + ")"
        _print0(f"[litlab] {split}: {msg}")
        emptied = sorted(lang for lang in total_by_lang if not kept_by_lang.get(lang))
        if emptied and kept_ids:
            _print0(
                f"[litlab] warning: {split} keeps no example of lang {', '.join(emptied)} at max_length={limit}; "
                "raise data.init_args.max_length or use overflow=truncate"
            )
        self.stats[f"data/{split}_over_max_length"] = over
        self.stats[f"data/{split}_dropped_too_long"] = over if self.overflow == "drop" else no_room
        return SupervisedDataset(kept_ids, kept_spans, kept_names, kept_langs)

    # ------------------------------------------------------------------ loaders
    def _replicas(self) -> tuple[int, int, int]:
        return shard_context(self.trainer, "InstructionDataModule")

    def _loader_kwargs(self, collate: Any) -> dict[str, Any]:
        return {"collate_fn": collate, "num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}

    def train_dataloader(self) -> DataLoader:
        """Training batches (``batching``), this rank's shard, resumed at ``_resume_batch``; resumable under a Trainer."""
        base = self.dataset("train")
        replicas, rank, epoch = self._replicas()
        if self.batching == "packed":
            dataset: Dataset = PackedDataset(base, pack_examples(base.lengths, self.max_length, self.seed))
            lengths, mode, collate = dataset.lengths, "random", PackedCollator(self.pad_token_id)
        else:
            dataset, lengths, mode = base, base.lengths, self.batching
            collate = SupervisedCollator(self.pad_token_id)
        sampler = InstructionBatchSampler(
            lengths,
            self.batch_size,
            mode=mode,
            seed=self.seed,
            epoch=epoch,
            num_replicas=replicas,
            rank=rank,
            start_batch=self._resume_batch,
            even_shards=True,
        )
        self._resume_batch = 0
        dataset, collate = self._with_targets("train", dataset, collate)
        kwargs = self._loader_kwargs(collate)
        if self.trainer is not None:
            return ResumableDataLoader(dataset, batch_sampler=sampler, progress=trainer_progress(self.trainer), **kwargs)
        return DataLoader(dataset, batch_sampler=sampler, **kwargs)

    def _eval_loader(self, split: str, mode: Literal["sorted", "sequential"], collate: Any) -> DataLoader:
        dataset = self.dataset(split)
        replicas, rank, _ = self._replicas()
        sampler = InstructionBatchSampler(
            dataset.lengths, self.eval_batch_size, mode=mode, num_replicas=replicas, rank=rank, even_shards=False
        )
        dataset, collate = self._with_targets(split, dataset, collate)
        return DataLoader(dataset, batch_sampler=sampler, **self._loader_kwargs(collate))

    def _with_targets(self, split: str, dataset: Dataset, collate: Any) -> tuple[Dataset, Any]:
        """Hook for subclasses that add per-example training targets to batches (NDP's count rows): the dataset
        and collate function of ``split``'s loader. The sampler (and so the batch order) never changes."""
        return dataset, collate

    def val_dataloader(self) -> DataLoader | list:
        """Teacher-forced padded batches of the validation split, longest first; ``[]`` when no ``val_files``."""
        if not self.files["validation"]:
            return []
        return self._eval_loader("validation", "sorted", SupervisedCollator(self.pad_token_id))

    def test_dataloader(self) -> DataLoader:
        """Left-padded prompt batches of the test split in file order, with ``meta``."""
        return self._eval_loader("test", "sequential", GenerationCollator(self.pad_token_id))

    def predict_dataloader(self) -> DataLoader:
        """Left-padded prompt batches of ``predict_files`` (default ``test_files``) in file order, with ``meta``."""
        return self._eval_loader("predict", "sequential", GenerationCollator(self.pad_token_id))
