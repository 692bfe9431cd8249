"""Terminology-constrained translation test sets for :class:`lit_models.constrained_mt.ConstrainedTranslation`.

Every format is read into items (spec ``shared/methods/constrained_mt.md`` section 6)::

    {"id": str, "index": int, "source": str, "reference": str | None,
     "constraints": [{"src": str, "tgt": [str, ...]}], ...extra fields of the input record}

``tgt`` is a list of acceptable alternatives. Batches are plain lists of items (no tensors): the model renders the
prompts and tokenises with its own backend. Structural units (tags, placeholders) come from the source itself.

Formats (``data_format``; ``auto`` picks by suffix, directory or the first record's keys):

- ``jsonl`` (ours): one object per line, ``{"id"?, "source", "reference"? (or "target"), "constraints": [{"src",
  "tgt": str | [str, ...]}], ...}``; extra keys travel to the predictions file.
- ``wmt21_sgm``: the WMT21 terminology task's SGML (``<srcset>``/``<refset>`` -> ``<doc docid=...>`` -> ``<seg
  id=N>`` with inline ``<term id=.. type=.. src=.. tgt="a|b"> surface </term>``): ``test_file`` is the source
  ``.sgm``, ``ref_file`` the target-side one (optional). ``<term>`` wrappers are stripped (the surface is kept), one
  constraint per distinct term id per segment with ``tgt`` split on ``|``, segments paired by (docid, seg id).
- ``wmt23``: the WMT23 terminology task (github.com/wmt-terminology-task/data-2023): ``test_file`` is a directory with
  ``{pair}.{src}``, ``{pair}.{tgt}`` (line-aligned) and ``{pair}.term.{proper,random}`` (or ``.terminology.``), one
  JSON list of ``{lang: term}`` dicts per line; ``wmt23_pair`` is ``deen``, ``zhen`` or ``encs``; ``wmt23_terms``
  ``proper`` (terminology) or ``random`` (the control). A local JSON/JSONL export of the HF dataset
  ``zouharvi/wmt-terminology-2023`` (``src``, ``ref``, ``langs``, ``hints``) is accepted too; nothing is downloaded.

Demos (``demo``, used when no file is given): ``bible_freedict`` (Bible verses with FreeDict term constraints, built
at run time into ``data_dir``; see :mod:`datamodules.demo.terminology`) and ``synthetic`` (120 deterministic
English-German items for the scripted fake LLM).

``glossary_file`` (TSV ``src<TAB>tgt``, ``|`` alternatives) adds constraints to items that have none (blind test
sets): glossary sources found in the source, longest first, non-overlapping, with the checker's normaliser.
"""

from __future__ import annotations

import html
import json
import re
import warnings
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.demo.terminology import build_bible_terminology, synthetic_terminology
from datamodules.jsonl import iter_jsonl
from lit_models.nn.constraint_checker import ConstraintChecker, normalize, term_spans

__all__ = ["TerminologyDataModule", "collate_items", "read_glossary", "read_jsonl", "read_wmt21_sgm", "read_wmt23"]

FORMATS = ("auto", "jsonl", "wmt21_sgm", "wmt23")
DEMOS = ("none", "bible_freedict", "synthetic")
WMT23_PAIRS = {"deen": ("de", "en"), "zhen": ("zh", "en"), "encs": ("en", "cs")}


def _where(path: Path | str, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def _constraints(raw: Any, where: str) -> list[dict[str, Any]]:
    """Validated constraints: ``tgt`` as a non-empty list of non-empty strings.

    Raises:
        ValueError: not a list, an entry without ``src``/``tgt``, an empty side or alternative (naming ``where``).
    """
    if not isinstance(raw, list):
        kind = type(raw).__name__
        raise ValueError(f"{where}: 'constraints' must be a list of {{src, tgt}} objects, got {kind}")  # noqa: TRY004
    out = []
    for j, c in enumerate(raw):
        if not isinstance(c, dict) or "src" not in c or "tgt" not in c:
            raise ValueError(f"{where}: constraint {j} must be an object with 'src' and 'tgt', got {c!r}")
        src, tgt = c["src"], c["tgt"]
        tgts = [tgt] if isinstance(tgt, str) else tgt
        if not isinstance(src, str) or not src.strip():
            raise ValueError(f"{where}: constraint {j} has an empty 'src' ({c!r})")
        if not isinstance(tgts, list) or not tgts or not all(isinstance(t, str) and t.strip() for t in tgts):
            raise ValueError(f"{where}: constraint {j} has an empty 'tgt' or an empty alternative ({c!r})")
        out.append({**c, "src": src.strip(), "tgt": [t.strip() for t in tgts]})
    return out


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Our JSONL format (module docstring) -> items (``index`` and ``line`` added, ``id`` defaults to the line).

    Raises:
        FileNotFoundError: missing file.
        ValueError: malformed JSON, a record that is not an object, without a non-empty string ``source``, or with
            bad constraints (naming file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"terminology file not found: {path}")
    items = []
    for lineno, where, rec in iter_jsonl(path, _where):
        if not isinstance(rec.get("source"), str) or not rec["source"].strip():
            raise ValueError(f"{where}: the record has no non-empty string 'source'")
        ref = rec.get("reference", rec.get("target"))
        if ref is not None and not isinstance(ref, str):
            raise ValueError(f"{where}: 'reference' must be a string, got {type(ref).__name__}")
        item = {k: v for k, v in rec.items() if k != "target"}
        item.update(id=str(rec.get("id", f"{path.stem}-{lineno}")), source=rec["source"], reference=ref,
                    constraints=_constraints(rec.get("constraints", []), where), line=lineno)
        items.append(item)
    return items


# ------------------------------------------------------------------------------------------------ WMT21
_DOC = re.compile(r"<doc\b([^>]*)>(.*?)</doc>", re.DOTALL | re.IGNORECASE)
_SEG = re.compile(r"<seg\b([^>]*)>(.*?)</seg>", re.DOTALL | re.IGNORECASE)
_ATTR = re.compile(r"""([\w:-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_TERM = re.compile(r"<term\b([^>]*)>(.*?)</term>", re.DOTALL | re.IGNORECASE)


def _attrs(s: str) -> dict[str, str]:
    return {m.group(1).lower(): html.unescape(m.group(2) if m.group(2) is not None else m.group(3))
            for m in _ATTR.finditer(s)}


def _sgm_segments(path: Path) -> list[tuple[tuple[str, str], str, int]]:
    """((docid, seg id), inner text, line) of every segment of a WMT SGML file, in order."""
    if not path.is_file():
        raise FileNotFoundError(f"WMT21 file not found: {path}")
    text = path.read_text(encoding="utf-8")
    out = []
    for doc in _DOC.finditer(text):
        docid = _attrs(doc.group(1)).get("docid", "")
        for seg in _SEG.finditer(doc.group(2)):
            seg_id = _attrs(seg.group(1)).get("id", "")
            line = text.count("\n", 0, doc.start(2) + seg.start()) + 1
            out.append(((docid, seg_id), seg.group(2), line))
    if not out:
        raise ValueError(f"{path}: no <doc><seg> segments found (is it a WMT21 .sgm file?)")
    return out


def _strip_terms(seg: str) -> tuple[str, list[dict[str, Any]]]:
    """Segment text without ``<term>`` wrappers (surfaces kept, whitespace collapsed) and its constraints."""
    cons: dict[str, dict[str, Any]] = {}
    for m in _TERM.finditer(seg):
        a = _attrs(m.group(1))
        key = a.get("id", m.group(0))
        if key not in cons and a.get("src") and a.get("tgt"):
            cons[key] = {"src": a["src"], "tgt": [t for t in a["tgt"].split("|") if t.strip()],
                         "term_id": a.get("id"), "type": a.get("type")}
    text = _TERM.sub(lambda m: f" {m.group(2).strip()} ", seg)
    return html.unescape(" ".join(text.split())), list(cons.values())


def read_wmt21_sgm(src_file: str | Path, ref_file: str | Path | None = None) -> list[dict[str, Any]]:
    """WMT21 terminology SGML -> items (module docstring).

    Raises:
        FileNotFoundError: a missing file.
        ValueError: no segments; source and reference disagree on (docid, seg id) (naming the first mismatch);
            a term with an empty side (naming file and line).
    """
    src_path = Path(src_file)
    segs = _sgm_segments(src_path)
    refs = None
    if ref_file is not None:
        ref_segs = _sgm_segments(Path(ref_file))
        if len(ref_segs) != len(segs) or any(a[0] != b[0] for a, b in zip(segs, ref_segs)):
            first = next(((a[0], b[0]) for a, b in zip(segs, ref_segs) if a[0] != b[0]), None)
            raise ValueError(
                f"{src_path} and {ref_file} do not pair up: {len(segs)} vs {len(ref_segs)} segments; first mismatch "
                f"(docid, seg id): {first[0] if first else 'extra segments'} vs {first[1] if first else ''}"
            )
        refs = [_strip_terms(s[1])[0] for s in ref_segs]
    items = []
    for i, ((docid, seg_id), seg, line) in enumerate(segs):
        source, cons = _strip_terms(seg)
        items.append({"id": f"{docid}:{seg_id}", "source": source, "reference": refs[i] if refs else None,
                      "constraints": _constraints(cons, _where(src_path, line)), "docid": docid, "seg_id": seg_id,
                      "line": line})
    return items


# ------------------------------------------------------------------------------------------------ WMT23
def _wmt23_hints(raw: Any, src: str, tgt: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not all(isinstance(h, dict) for h in raw):
        raise ValueError(f"{where}: a term line must be a JSON list of {{language: term}} objects, got {raw!r}")
    out = []
    for h in raw:
        if src not in h or tgt not in h:
            raise ValueError(f"{where}: term {h!r} lacks the language {src!r} or {tgt!r}")
        out.append({"src": h[src], "tgt": h[tgt]})
    return _constraints(out, where)


def read_wmt23(path: str | Path, pair: str | None, terms: Literal["proper", "random"] = "proper"
               ) -> list[dict[str, Any]]:
    """WMT23 terminology files (a directory) or a local export of the HF dataset (a .json/.jsonl file) -> items.

    Raises:
        ValueError: unknown ``pair``/``terms``; line counts that differ (naming the files and counts); a term line
            that is not a JSON list of dicts (file:line).
        FileNotFoundError: missing files (naming both accepted term-file names).
    """
    if terms not in ("proper", "random"):
        raise ValueError(f"data.init_args.wmt23_terms must be 'proper' or 'random', got {terms!r}")
    path = Path(path)
    if path.is_file():
        return _read_wmt23_export(path, pair, terms)
    if pair not in WMT23_PAIRS:
        raise ValueError(f"data.init_args.wmt23_pair must be one of {list(WMT23_PAIRS)}, got {pair!r}")
    src, tgt = WMT23_PAIRS[pair]
    files = {lang: path / f"{pair}.{lang}" for lang in (src, tgt)}
    term_file = next((p for p in (path / f"{pair}.term.{terms}", path / f"{pair}.terminology.{terms}")
                      if p.is_file()), None)
    if not files[src].is_file() or term_file is None:
        raise FileNotFoundError(f"WMT23 data for {pair} not found in {path}: need {files[src].name} and "
                                f"{pair}.term.{terms} (or {pair}.terminology.{terms})")
    sources = files[src].read_text(encoding="utf-8").splitlines()
    refs = files[tgt].read_text(encoding="utf-8").splitlines() if files[tgt].is_file() else None
    hints = term_file.read_text(encoding="utf-8").splitlines()
    counts = {files[src].name: len(sources), term_file.name: len(hints)}
    if refs is not None:
        counts[files[tgt].name] = len(refs)
    if len(set(counts.values())) != 1:
        raise ValueError(f"WMT23 files in {path} have different line counts: {counts}")
    items = []
    for i, (s, h) in enumerate(zip(sources, hints)):
        where = _where(term_file, i + 1)
        try:
            raw = json.loads(h)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: malformed JSON ({err.msg})") from None
        items.append({"id": f"{pair}-{i}", "source": s, "reference": refs[i] if refs else None,
                      "constraints": _wmt23_hints(raw, src, tgt, where), "line": i + 1})
    return items


def _read_wmt23_export(path: Path, pair: str | None, terms: str) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
        if isinstance(records, dict):  # a JSONL file with a single record
            records = [records]
        lines = [None] * len(records) if isinstance(records, list) else None
    except json.JSONDecodeError:
        records, lines = [], []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
                lines.append(lineno)
    if not isinstance(records, list) or lines is None:
        raise ValueError(f"{path}: expected a JSON list or JSONL of records with src, ref, langs, hints")
    key = {"proper": "term", "random": "rand"}[terms]
    items = []
    for i, (rec, lineno) in enumerate(zip(records, lines)):
        where = _where(path, lineno if lineno is not None else None) + ("" if lineno else f" record {i}")
        if not isinstance(rec, dict) or not isinstance(rec.get("src"), str):
            raise ValueError(f"{where}: expected an object with a string 'src'")  # noqa: TRY004
        langs = str(rec.get("langs", "")).replace("_", "-").split("-")
        if len(langs) != 2:
            raise ValueError(f"{where}: 'langs' must look like 'de-en', got {rec.get('langs')!r}")
        if pair is not None and "".join(langs) != pair:
            continue
        hints = rec.get("hints") or {}
        raw = hints.get(key, []) if isinstance(hints, dict) else hints
        items.append({"id": str(rec.get("id", f"{path.stem}-{i}")), "source": rec["src"], "reference": rec.get("ref"),
                      "constraints": _wmt23_hints(raw or [], langs[0], langs[1], where), "langs": "-".join(langs)})
    return items


# ------------------------------------------------------------------------------------------------ glossary
def read_glossary(path: str | Path) -> list[dict[str, Any]]:
    """TSV ``src<TAB>tgt`` (``|`` separates alternatives; ``#`` lines and blank lines skipped) -> constraints.

    Raises:
        FileNotFoundError: missing file. ValueError: a line without exactly two non-empty columns (file:line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.init_args.glossary_file not found: {path}")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != 2 or not cols[0].strip() or not cols[1].strip():
            raise ValueError(f"{path}:{lineno}: expected 'src<TAB>tgt' with two non-empty columns, got {line!r}")
        out += _constraints([{"src": cols[0], "tgt": cols[1].split("|")}], _where(path, lineno))
    return out


def apply_glossary(source: str, glossary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Glossary entries whose ``src`` occurs in ``source`` (normalised, word boundaries), longest first, without
    overlapping an entry already taken."""
    norm = normalize(source)
    taken: list[tuple[int, int]] = []
    out = []
    for c in sorted(glossary, key=lambda c: -len(normalize(c["src"]))):
        for s, e in term_spans(normalize(c["src"]), norm):
            if all(e <= a or s >= b for a, b in taken):
                taken.append((s, e))
                out.append(c)
                break
    return out


# ------------------------------------------------------------------------------------------------ data module
class ItemDataset(Dataset):
    """A list of items (dicts)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def collate_items(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Batches are lists of items (no tensors)."""
    return list(batch)


class TerminologyDataModule(LightningDataModule):
    """Test and predict sets of constrained translation (see the module docstring).

    Args:
        test_file: the test set (a file, or a WMT23 directory); None with ``demo`` set uses the demo.
        predict_file: the set to translate with ``predict``; None falls back to ``test_file`` / the demo.
        data_format: ``auto``, ``jsonl``, ``wmt21_sgm`` or ``wmt23``.
        ref_file: WMT21: the target-side ``.sgm``.
        wmt23_pair: ``deen``, ``zhen`` or ``encs`` (WMT23 directory; filters an HF export when given).
        wmt23_terms: ``proper`` (terminology) or ``random`` (random word-alignment hints, a control).
        glossary_file: TSV glossary for items without constraints.
        demo: ``none``, ``bible_freedict`` or ``synthetic``.
        demo_direction: ``de-en`` (default: SmolLM2 writes English far better than German) or ``en-de``.
        demo_books: Bible books of the ``bible_freedict`` demo (Matthew = 40).
        data_dir: where the demo is built (cached; rebuilt only when its arguments change).
        max_items: demo: verses sampled with ``seed``; test files: the first ``max_items`` items; None keeps all.
            Predict sets are never truncated.
        max_terms_per_item, min_term_chars: ``bible_freedict`` filters (module :mod:`datamodules.demo.terminology`).
        strict_src: a constraint whose ``src`` does not occur in the source is an error (default: a warning; the
            model counts them as ``src_term_missing``).
        batch_size: items per batch (one batched generation per revision round).
        num_workers: DataLoader workers.
        seed: demo sampling seed.

    Raises:
        ValueError: an unknown format/demo/direction, no file and ``demo: none``, an unrecognised ``auto`` file,
            and the readers' errors (file and line); unbalanced source markup (file:line and item id).
        FileNotFoundError: missing files or demo resources (naming the package to install).
    """

    def __init__(
        self,
        test_file: str | None = None,
        predict_file: str | None = None,
        data_format: Literal["auto", "jsonl", "wmt21_sgm", "wmt23"] = "auto",
        ref_file: str | None = None,
        wmt23_pair: str | None = None,
        wmt23_terms: Literal["proper", "random"] = "proper",
        glossary_file: str | None = None,
        demo: Literal["none", "bible_freedict", "synthetic"] = "none",
        demo_direction: Literal["de-en", "en-de"] = "de-en",
        demo_books: list[int] = [40],  # noqa: B006 - jsonargparse needs a literal default
        data_dir: str = "data/terminology",
        max_items: int | None = 200,
        max_terms_per_item: int = 3,
        min_term_chars: int = 4,
        strict_src: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if data_format not in FORMATS:
            raise ValueError(f"data.init_args.data_format must be one of {list(FORMATS)}, got {data_format!r}")
        if demo not in DEMOS:
            raise ValueError(f"data.init_args.demo must be one of {list(DEMOS)}, got {demo!r}")
        if demo_direction not in ("de-en", "en-de"):
            raise ValueError(f"data.init_args.demo_direction must be 'de-en' or 'en-de', got {demo_direction!r}")
        if batch_size < 1 or (max_items is not None and max_items < 1):
            raise ValueError(f"data.init_args.batch_size and max_items must be >= 1; got {batch_size}, {max_items}")
        if test_file is None and predict_file is None and demo == "none":
            raise ValueError(
                "give data.init_args.test_file or predict_file (formats: jsonl, wmt21_sgm, wmt23) or a demo "
                f"(data.init_args.demo: one of {list(DEMOS[1:])})"
            )
        self.save_hyperparameters(logger=False)
        self.test_file, self.predict_file = test_file, predict_file
        self.data_format, self.ref_file = data_format, ref_file
        self.wmt23_pair, self.wmt23_terms, self.glossary_file = wmt23_pair, wmt23_terms, glossary_file
        self.demo, self.demo_direction, self.demo_books = demo, demo_direction, list(demo_books)
        self.data_dir, self.max_items = Path(data_dir), max_items
        self.max_terms_per_item, self.min_term_chars = max_terms_per_item, min_term_chars
        self.strict_src, self.batch_size, self.num_workers, self.seed = strict_src, batch_size, num_workers, seed
        #: No tokenizer: items are text; the model tokenises with its own backend (linked as None by the CLI).
        self.tokenizer = None
        self.datasets: dict[str, ItemDataset] = {}
        self.src_term_missing = 0

    # -------------------------------------------------------------- languages
    @property
    def languages(self) -> tuple[str, str] | None:
        """``(source, target)`` language names of the demo (None for files)."""
        if self.demo == "synthetic":
            return ("English", "German")
        if self.demo == "bible_freedict":
            return ("German", "English") if self.demo_direction == "de-en" else ("English", "German")
        return None

    # -------------------------------------------------------------- reading
    def _detect(self, path: Path) -> str:
        if self.data_format != "auto":
            return self.data_format
        if path.is_dir():
            return "wmt23"
        if path.suffix.lower() == ".sgm":
            return "wmt21_sgm"
        if path.suffix.lower() in (".jsonl", ".json") and path.is_file():
            with open(path, encoding="utf-8") as fh:
                first = next((line for line in fh if line.strip()), "")
            try:
                rec = json.loads(first)
            except json.JSONDecodeError:
                rec = None
            if isinstance(rec, dict) and "source" in rec:
                return "jsonl"
            if isinstance(rec, dict) and "src" in rec and "hints" in rec:
                return "wmt23"
            if first.lstrip().startswith("["):
                return "wmt23"
        if not path.exists():
            raise FileNotFoundError(f"terminology file not found: {path}")
        raise ValueError(f"cannot tell the format of {path}: set data.init_args.data_format to one of "
                         f"{list(FORMATS[1:])} (jsonl records need 'source'; WMT21 files end in .sgm; WMT23 is a "
                         "directory or an HF export with 'src' and 'hints')")

    def _read(self, file: str) -> list[dict[str, Any]]:
        path = Path(file)
        fmt = self._detect(path)
        if fmt == "jsonl":
            return read_jsonl(path)
        if fmt == "wmt21_sgm":
            return read_wmt21_sgm(path, self.ref_file)
        return read_wmt23(path, self.wmt23_pair, self.wmt23_terms)

    def _demo_items(self) -> list[dict[str, Any]]:
        if self.demo == "synthetic":
            items = synthetic_terminology()
            return items[: self.max_items] if self.max_items else items
        path = build_bible_terminology(
            self.data_dir, direction=self.demo_direction, books=self.demo_books, max_items=self.max_items,
            max_terms_per_item=self.max_terms_per_item, min_term_chars=self.min_term_chars, seed=self.seed,
        )
        return read_jsonl(path)

    def load(self, stage: str) -> list[dict[str, Any]]:
        """The validated items of ``stage`` (``test`` or ``predict``)."""
        file = self.test_file if stage == "test" else (self.predict_file or self.test_file)
        if file is not None:
            items = self._read(file)
            origin = file
            if stage == "test" and self.max_items is not None:
                items = items[: self.max_items]
        else:
            items = self._demo_items()
            origin = f"demo {self.demo}"
        if not items:
            raise ValueError(f"{origin}: no items")
        glossary = read_glossary(self.glossary_file) if self.glossary_file else None
        checker = ConstraintChecker()
        missing = 0
        seen: set[str] = set()
        for i, item in enumerate(items):
            item["index"] = i
            item.setdefault("reference", None)
            where = _where(origin, item.get("line"))
            if item["id"] in seen:
                raise ValueError(f"{where}: duplicate id {item['id']!r}")
            seen.add(item["id"])
            if glossary is not None and not item["constraints"]:
                item["constraints"] = [dict(c) for c in apply_glossary(item["source"], glossary)]
            try:
                checker.units(item["source"], item_id=item["id"])
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            found = checker.src_found(item["source"], item["constraints"])
            for c, ok in zip(item["constraints"], found):
                if not ok:
                    if self.strict_src:
                        raise ValueError(f"{where}: constraint source {c['src']!r} does not occur in the source of "
                                         f"item {item['id']!r} (data.init_args.strict_src is true)")
                    missing += 1
        self.src_term_missing = missing
        if missing:
            warnings.warn(f"{origin}: {missing} constraint source term(s) do not occur in their source sentence "
                          "(lemma-typed terms?); counted as src_term_missing", stacklevel=2)
        return items

    # -------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        if self.test_file is None and self.predict_file is None and self.demo == "bible_freedict":
            self._demo_items()  # build the cache once, on one process

    def setup(self, stage: str | None = None) -> None:
        if stage in ("test", "predict") and stage not in self.datasets:
            self.datasets[stage] = ItemDataset(self.load(stage))

    def _loader(self, stage: str) -> DataLoader:
        self.setup(stage)
        return DataLoader(self.datasets[stage], batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_items)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
