"""LongBench / LongBench-E evaluation data (and ReMamba fine-tuning data) for batch-size-1 long-context models.

:class:`LongBenchDataModule` reads LongBench JSONL files by path (THUDM/LongBench v1, ``pred.py`` protocol):

- **files**: ``<data_dir>/<task>.jsonl`` (``variant: longbench``) or ``<data_dir>/<task>_e.jsonl``
  (``longbench_e``), one object per line with ``input, context, answers, length, dataset, _id`` (required;
  ``answers`` a list of strings) and ``language, all_classes`` (optional). A missing field is a ``ValueError``
  naming the file, the line and the field.
- **prompt**: ``template.format(**sample)`` with the task's LongBench template (:data:`DATASET2PROMPT`, the
  official ``config/dataset2prompt.json``, commit ``8ae23fd``); ``prompt_config_dir`` may hold a
  ``dataset2prompt.json`` / ``dataset2maxlen.json`` pair that overrides and extends them. A task with no template
  is an error listing the known ones. No chat template unless ``chat_template: true``.
- **middle truncation** (:func:`truncate_prompt`): a prompt of more than ``max_length`` tokens keeps its first and
  last ``max_length // 2`` tokens; ``decode_reencode`` (official) decodes both halves with
  ``skip_special_tokens=True``, joins and re-encodes them (the count may move by a few tokens), ``ids`` keeps the
  ids exactly.
- **generation length**: the task's LongBench maximum (:data:`DATASET2MAXLEN`); samsum also stops at the newline
  token.

Test batches are single samples (batch size 1, no padding)::

    input_ids  [1, L]  long, the (truncated) prompt
    meta       dict: dataset, _id, answers, all_classes, length, language, max_new_tokens, stop_ids, bucket

**Training** (``fit``): ``train_files`` are JSONL with ``prompt``/``response``; the offline demo
(``demo: needle | verse | [needle, verse]``, :mod:`datamodules.demo.longbench_qa`) adds its train split with the
demo prompts, its validation split (teacher-forced loss) and its test split. A training sample is ``prompt +
response + EOS``; a prompt that does not fit ``train_max_length`` keeps its first ``train_keep_head`` tokens and as
many of its last tokens as fit (official ReMamba recipe). Train/validation batches::

    input_ids   [1, T]  long
    labels      [1, T]  long, -100 on the prompt
    prompt_len  int

Input files are only read.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.demo.longbench_qa import DEMO_MAXLEN, DEMO_PROMPTS, NEEDLE_TASK, VERSE_TASK, build_longbench_qa
from datamodules.jsonl import iter_jsonl
from lit_models.hf import load_tokenizer
from lit_models.nn.longbench_metrics import length_bucket

__all__ = [
    "DATASET2MAXLEN",
    "DATASET2PROMPT",
    "LONGBENCH_E_TASKS",
    "LongBenchDataModule",
    "middle_truncate",
    "read_longbench_jsonl",
    "truncate_prompt",
]

#: LongBench v1 prompt templates (THUDM/LongBench ``config/dataset2prompt.json``, commit 8ae23fd).
DATASET2PROMPT: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
    "question as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
    "{context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if "
    "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using "
    "a single phrase or sentence if possible. If the question cannot be answered based on the information in the "
    "article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
    "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the "
    "above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
    "answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, "
    "answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
    "question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: "
    "{input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，"
    "不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any "
    "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any "
    "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any "
    "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
    "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query "
    "in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
    "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}"
    "\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
    "{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other "
    "words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n"
    "{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
    "carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. "
    "In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
    "count of unique paragraphs after removing duplicates. The output format should only contain the number, such as "
    "1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
    "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the "
    "number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph "
    "2\", etc.\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个"
    "摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
    **DEMO_PROMPTS,
}

#: LongBench v1 maximum new tokens per task (``config/dataset2maxlen.json``), plus the demo tasks.
DATASET2MAXLEN: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
    **DEMO_MAXLEN,
}

#: The 13 English tasks of LongBench-E (the ReMamba paper's evaluation set).
LONGBENCH_E_TASKS = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa", "samsum",
    "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
_DEMO = {"needle": NEEDLE_TASK, "verse": VERSE_TASK}
_REQUIRED = ("input", "context", "answers", "length", "dataset", "_id")
_NEWLINE_STOP_TASKS = ("samsum",)


# ============================================================================================ reading, prompts
def read_longbench_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Samples of one LongBench JSONL file, validated.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line that is not a JSON object, lacks a required field (``input, context, answers, length,
            dataset, _id``), has ``answers`` that is not a list of strings, or a non-numeric ``length``; the message
            names the file, the line (1-based) and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LongBench file not found: {path}")
    samples = []
    for lineno, _, obj in iter_jsonl(path):
        for key in _REQUIRED:
            if key not in obj:
                raise ValueError(f"{path}:{lineno}: missing field {key!r} (LongBench needs {', '.join(_REQUIRED)})")
        answers = obj["answers"]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{path}:{lineno}: field 'answers' must be a list of strings; got {answers!r:.80}")
        if not isinstance(obj["length"], int | float) or isinstance(obj["length"], bool):
            raise ValueError(f"{path}:{lineno}: field 'length' must be a number; got {obj['length']!r:.40}")  # noqa: TRY004
        classes = obj.get("all_classes")
        if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise ValueError(f"{path}:{lineno}: field 'all_classes' must be null or a list of strings")
        samples.append(obj)
    return samples


def middle_truncate(ids: Sequence[int], max_length: int) -> list[int]:
    """``ids`` unchanged when they fit, else the first and the last ``max_length // 2`` of them."""
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    half = max_length // 2
    return ids[:half] + ids[len(ids) - half:]


def truncate_prompt(tokenizer: Any, prompt: str, max_length: int,
                    mode: Literal["decode_reencode", "ids"] = "decode_reencode") -> list[int]:
    """Token ids of ``prompt`` middle-truncated to ``max_length`` (see the module docstring)."""
    ids = tokenizer(prompt).input_ids
    if len(ids) <= max_length:
        return list(ids)
    if mode == "ids":
        return middle_truncate(ids, max_length)
    half = max_length // 2
    text = tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(ids[-half:],
                                                                                     skip_special_tokens=True)
    return list(tokenizer(text).input_ids)


def load_prompt_config(prompt_config_dir: str | Path | None) -> tuple[dict[str, str], dict[str, int]]:
    """Built-in templates and max lengths, overridden/extended by ``<dir>/dataset2prompt.json`` and
    ``<dir>/dataset2maxlen.json`` when a directory is given.

    Raises:
        FileNotFoundError: the directory or one of the two files is missing.
    """
    prompts, maxlen = dict(DATASET2PROMPT), dict(DATASET2MAXLEN)
    if prompt_config_dir is None:
        return prompts, maxlen
    root = Path(prompt_config_dir).expanduser()
    for name, table in (("dataset2prompt.json", prompts), ("dataset2maxlen.json", maxlen)):
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"data.init_args.prompt_config_dir: {path} not found")
        table.update(json.loads(path.read_text(encoding="utf-8")))
    return prompts, maxlen


# ============================================================================================ datasets
class _Items(Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def _identity(x: Any) -> Any:
    return x


class LongBenchDataModule(LightningDataModule):
    """LongBench / LongBench-E test data, JSONL fine-tuning data and the offline long-context QA demo.

    Args:
        data_dir: directory of the LongBench files (``<task>.jsonl`` or ``<task>_e.jsonl``); not needed with a demo.
        datasets: tasks to evaluate; default the 13 LongBench-E English tasks, or the demo tasks with a demo.
        variant: ``longbench_e`` (``<task>_e.jsonl``) or ``longbench``.
        prompt_config_dir: directory with LongBench's ``dataset2prompt.json`` and ``dataset2maxlen.json``
            (override the built-in ones).
        tokenizer: a :func:`lit_models.hf.load_tokenizer` name or a tokenizer object; linked into the model.
        max_length: prompt token budget of the middle truncation (LongBench/ReMamba: 5500).
        truncation: ``decode_reencode`` (official) or ``ids``.
        chat_template: wrap the prompt in the tokenizer's chat template (LongBench does for chat models only).
        train_files: JSONL files of ``{"prompt", "response"}`` for fine-tuning.
        train_max_length: token budget of a training sample (prompt + response + EOS).
        train_keep_head: prompt tokens always kept at the start when a training prompt is cut.
        demo: ``none``, ``needle``, ``verse`` or a list of them: the offline QA tasks
            (:mod:`datamodules.demo.longbench_qa`).
        demo_sizes: samples per demo split (``train``, ``validation``, ``test``).
        demo_needle_words: haystack length range of the needle task, in words.
        demo_verse_count: verses per context of the verse task.
        demo_cache_dir: cache root of the demo files (default ``$LITLAB_CACHE_DIR`` or ``~/.cache/litlab``).
        max_test_samples: keep only the first N test samples per task (quick runs).
        seed: demo sampling seed and training-order seed.
        num_workers: DataLoader workers.

    Raises:
        ValueError: a task without a prompt template (lists the known ones), ``max_length`` not above a task's
            maximum new tokens, an unknown ``demo``/``variant``/``truncation``, a bad JSONL line (file, line,
            field), a training sample whose response is empty after truncation (its index), no test data.
        FileNotFoundError: ``data_dir`` or a ``<task>.jsonl`` missing (with the path).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        datasets: list[str] | None = None,
        variant: Literal["longbench", "longbench_e"] = "longbench_e",
        prompt_config_dir: str | None = None,
        tokenizer: Any = "mamba-tiny",
        max_length: int = 5500,
        truncation: Literal["decode_reencode", "ids"] = "decode_reencode",
        chat_template: bool = False,
        train_files: list[str] | None = None,
        train_max_length: int = 6000,
        train_keep_head: int = 1000,
        demo: str | list[str] = "none",
        demo_sizes: dict[str, int] | None = None,
        demo_needle_words: tuple[int, int] = (300, 3000),
        demo_verse_count: tuple[int, int] = (10, 30),
        demo_cache_dir: str | None = None,
        max_test_samples: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        if variant not in ("longbench", "longbench_e"):
            raise ValueError(f"data.init_args.variant must be longbench or longbench_e; got {variant!r}")
        if truncation not in ("decode_reencode", "ids"):
            raise ValueError(f"data.init_args.truncation must be decode_reencode or ids; got {truncation!r}")
        demos = [demo] if isinstance(demo, str) else list(demo)
        demos = [d for d in demos if d != "none"]
        bad = [d for d in demos if d not in _DEMO]
        if bad:
            raise ValueError(f"data.init_args.demo: unknown {bad}; choose none, needle, verse or a list of them")
        self.demo_tasks = [_DEMO[d] for d in demos]
        self.prompts, self.maxlen = load_prompt_config(prompt_config_dir)
        self.tasks = list(datasets) if datasets else (list(self.demo_tasks) or list(LONGBENCH_E_TASKS))
        unknown = [t for t in self.tasks if t not in self.prompts]
        if unknown:
            raise ValueError(
                f"data.init_args.datasets: no prompt template for {unknown}; known tasks: {', '.join(self.prompts)} "
                "(or give data.init_args.prompt_config_dir with dataset2prompt.json / dataset2maxlen.json)"
            )
        no_len = [t for t in self.tasks if t not in self.maxlen]
        if no_len:
            raise ValueError(f"no maximum generation length for {no_len}: add them to dataset2maxlen.json")
        too_short = {t: self.maxlen[t] for t in self.tasks if max_length <= self.maxlen[t]}
        if too_short:
            raise ValueError(f"data.init_args.max_length={max_length} must exceed the tasks' max new tokens {too_short}")
        if train_keep_head >= train_max_length:
            raise ValueError(f"data.init_args.train_keep_head={train_keep_head} must be below train_max_length="
                             f"{train_max_length}")
        self.train_items: list[dict[str, Any]] = []
        self.val_items: list[dict[str, Any]] = []
        self.test_items: list[dict[str, Any]] = []
        self._demo_dir: Path | None = None

    # ---------------------------------------------------------------------------------------------- files
    def _demo_root(self) -> Path | None:
        if not self.demo_tasks:
            return None
        if self._demo_dir is None:
            hp = self.hparams
            self._demo_dir = build_longbench_qa(
                hp.demo_cache_dir, tasks=self.demo_tasks, sizes=hp.demo_sizes, needle_words=hp.demo_needle_words,
                verse_count=hp.demo_verse_count, seed=hp.seed,
            )
        return self._demo_dir

    def prepare_data(self) -> None:
        self._demo_root()

    def task_file(self, task: str) -> Path:
        """The JSONL file of ``task``: the demo's test split for demo tasks, else under ``data_dir``.

        Raises:
            FileNotFoundError: ``data_dir`` unset or missing, or no such file.
        """
        if task in self.demo_tasks:
            root = self._demo_root()
            assert root is not None
            return root / "test" / f"{task}.jsonl"
        if self.hparams.data_dir is None:
            raise FileNotFoundError(f"task {task!r} needs data.init_args.data_dir (a directory of LongBench JSONL)")
        root = Path(self.hparams.data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.init_args.data_dir not found: {root}")
        name = f"{task}_e.jsonl" if self.hparams.variant == "longbench_e" else f"{task}.jsonl"
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"LongBench file for task {task!r} not found: {path}")
        return path

    # ---------------------------------------------------------------------------------------------- samples
    def build_prompt(self, sample: dict[str, Any], task: str) -> str:
        """``template.format(**sample)`` (then the chat template when enabled)."""
        prompt = self.prompts[task].format(**sample)
        if self.hparams.chat_template:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)
        return prompt

    def _stop_ids(self, task: str) -> list[int]:
        stops = []
        if self.tokenizer.eos_token_id is not None:
            stops.append(int(self.tokenizer.eos_token_id))
        if task in _NEWLINE_STOP_TASKS:
            stops.append(int(self.tokenizer.encode("\n", add_special_tokens=False)[-1]))
        return stops

    def test_item(self, sample: dict[str, Any], task: str) -> dict[str, Any]:
        """The test batch of one LongBench sample (layout in the module docstring)."""
        ids = truncate_prompt(self.tokenizer, self.build_prompt(sample, task), self.hparams.max_length,
                              self.hparams.truncation)
        meta = {
            "dataset": task, "_id": sample["_id"], "answers": list(sample["answers"]),
            "all_classes": sample.get("all_classes"), "length": sample["length"],
            "language": sample.get("language", "en"), "max_new_tokens": self.maxlen[task],
            "stop_ids": self._stop_ids(task), "bucket": length_bucket(sample["length"]),
        }
        return {"input_ids": torch.tensor([ids], dtype=torch.long), "meta": meta}

    def train_item(self, prompt: str, response: str, index: int, where: str) -> dict[str, Any]:
        """``prompt + response + EOS`` with labels on the response and EOS, prompt cut to fit (see module docstring).

        Raises:
            ValueError: the response is empty after truncation (naming ``where`` and ``index``).
        """
        tok = self.tokenizer
        hp = self.hparams
        p_ids = list(tok(prompt).input_ids)
        r_ids = list(tok(response, add_special_tokens=False).input_ids)
        if tok.eos_token_id is not None:
            r_ids.append(int(tok.eos_token_id))
        r_ids = r_ids[:max(hp.train_max_length - hp.train_keep_head - 1, 0)]
        room = hp.train_max_length - len(r_ids)
        if len(p_ids) > room:
            tail = room - hp.train_keep_head
            p_ids = p_ids[:hp.train_keep_head] + (p_ids[len(p_ids) - tail:] if tail > 0 else [])
        if not r_ids or (tok.eos_token_id is not None and r_ids == [int(tok.eos_token_id)] and not response.strip()):
            raise ValueError(f"{where}: training sample {index} has an empty response after truncation")
        if len(p_ids) < 2:
            raise ValueError(f"{where}: training sample {index} has a prompt of {len(p_ids)} tokens (ReMamba needs 2)")
        ids = p_ids + r_ids
        labels = [-100] * len(p_ids) + r_ids
        return {"input_ids": torch.tensor([ids], dtype=torch.long), "labels": torch.tensor([labels], dtype=torch.long),
                "prompt_len": len(p_ids)}

    def _demo_train_items(self, split: str) -> list[dict[str, Any]]:
        root = self._demo_root()
        items = []
        if root is None:
            return items
        for task in self.demo_tasks:
            path = root / split / f"{task}.jsonl"
            for i, sample in enumerate(read_longbench_jsonl(path)):
                items.append(self.train_item(self.build_prompt(sample, task), sample["answers"][0], i, str(path)))
        return items

    def _file_train_items(self) -> list[dict[str, Any]]:
        items = []
        for name in self.hparams.train_files or []:
            path = Path(name).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"data.init_args.train_files: {path} not found")
            for lineno, _, obj in iter_jsonl(path):
                for key in ("prompt", "response"):
                    if not isinstance(obj.get(key), str):
                        raise ValueError(f"{path}:{lineno}: field {key!r} missing or not a string")  # noqa: TRY004
                items.append(self.train_item(obj["prompt"], obj["response"], lineno, str(path)))
        return items

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and not self.train_items:
            self.train_items = self._file_train_items() + self._demo_train_items("train")
            if not self.train_items:
                raise ValueError("fit needs training data: set data.init_args.train_files or data.init_args.demo")
            random.Random(self.hparams.seed).shuffle(self.train_items)
        if stage in ("fit", "validate", None) and not self.val_items:
            self.val_items = self._demo_train_items("validation")  # shuffled: limit_val_batches sees every task
            random.Random(self.hparams.seed + 1).shuffle(self.val_items)
        if stage in ("test", "predict", None) and not self.test_items:
            self.test_items = []
            for task in self.tasks:
                samples = read_longbench_jsonl(self.task_file(task))
                if self.hparams.max_test_samples is not None:
                    samples = samples[:self.hparams.max_test_samples]
                self.test_items += [self.test_item(s, task) for s in samples]

    # ---------------------------------------------------------------------------------------------- loaders
    def _loader(self, items: list[dict[str, Any]], shuffle: bool) -> DataLoader:
        return DataLoader(_Items(items), batch_size=None, shuffle=shuffle, collate_fn=_identity,
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_items, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_items, shuffle=False) if self.val_items else []

    def test_dataloader(self) -> DataLoader:
        if not self.test_items:
            raise ValueError("no test samples: set data.init_args.datasets and data_dir, or a demo")
        return self._loader(self.test_items, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
