"""Tests of the offline NDP table builder (``datamodules/ndp_tables.py``; spec ``ndp.md`` sections 3, 4, 10, 11)."""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict

import numpy as np
import pytest

from datamodules import ndp_tables
from datamodules.ndp_tables import FORMAT_VERSION, NDPTables, build_tables

BACKENDS = ("hash128", "trie")
PROMPT = [1, 30, 31, 32]  # bos + prompt tokens, answers start at index 4
SPEC5_IDS = [PROMPT + [4, 5, 6, 7], PROMPT + [4, 8, 6, 7]]
SPEC5_SPANS = [[(4, 8)], [(4, 8)]]


def reference(input_ids, spans, min_prefix=0, mono_docs=(), mono_max_prefix=-1):
    """Brute-force tables with tuple keys: per example, a list of (sup_row, clm_row), row = [(tok, cnt), ...]."""
    sup: dict[tuple, Counter] = defaultdict(Counter)
    clm: dict[tuple, Counter] = defaultdict(Counter)
    for x, sp in zip(input_ids, spans, strict=True):
        for s, e in sp:
            for t in range(s - 1, e - 1):
                sup[tuple(x[:t + 1])][x[t + 1]] += 1
                if t - s + 1 >= min_prefix:
                    clm[tuple(x[s:t + 1])][x[t + 1]] += 1
    bound = max((len(x) for x in input_ids), default=0) + 5 if mono_max_prefix == -1 else mono_max_prefix
    for d in mono_docs:
        for ell in range(len(d)):
            if min_prefix <= ell <= bound:
                clm[tuple(d[:ell])][d[ell]] += 1
    out = []
    for x, sp in zip(input_ids, spans, strict=True):
        rows = []
        for s, e in sp:
            for t in range(s - 1, e - 1):
                srow = sorted(sup[tuple(x[:t + 1])].items())
                a = tuple(x[s:t + 1])
                crow = sorted(clm[a].items()) if t - s + 1 >= min_prefix and clm.get(a) else srow
                rows.append((srow, crow))
        out.append(rows)
    return out


def rows_of(tables: NDPTables, i: int) -> list[tuple[list, list]]:
    """Example i's rows in the reference format."""
    r = tables.example_rows(i)
    out = []
    for p in range(len(r["sup_ptr"]) - 1):
        rows = []
        for table in ("sup", "clm"):
            a, b = r[f"{table}_ptr"][p], r[f"{table}_ptr"][p + 1]
            rows.append(list(zip(r[f"{table}_tok"][a:b].tolist(), r[f"{table}_cnt"][a:b].tolist(), strict=True)))
        out.append(tuple(rows))
    return out


def random_corpus(n, seed, vocab=12, n_prompts=6, max_turns=3):
    """Multi-turn examples sharing prompts from a small pool (so prefixes collide); spans are the answer turns."""
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, vocab) for _ in range(rng.randint(0, 5))] for _ in range(n_prompts)]
    ids, spans = [], []
    for _ in range(n):
        x = list(rng.choice(prompts))
        sp = []
        for turn in range(rng.randint(1, max_turns)):
            if turn:
                x += [2] + [rng.randrange(3, vocab) for _ in range(rng.randint(0, 3))]
            start = len(x)
            x += [rng.randrange(3, 3 + rng.randint(1, vocab - 3)) for _ in range(rng.randint(1, 8))]
            sp.append((start, len(x)))
        ids.append(x)
        spans.append(sp)
    return ids, spans


def assert_same_arrays(a: NDPTables, b: NDPTables) -> None:
    for name, arr in a.arrays().items():
        other = b.arrays()[name]
        assert arr.dtype == other.dtype, name
        np.testing.assert_array_equal(arr, other, err_msg=name)


# ------------------------------------------------------------------------------------------------- semantics
def test_spec_test5_table_semantics():
    by_backend = {}
    for backend in BACKENDS:
        t = build_tables(SPEC5_IDS, SPEC5_SPANS, vocab_size=50, backend=backend)
        by_backend[backend] = t
        assert t.example_ptr.tolist() == [0, 4, 8]
        for i in range(2):
            rows = rows_of(t, i)
            assert [r[0] for r in rows] == [[(4, 2)], [(5, 1), (8, 1)], [(6, 1)], [(7, 1)]]
            # CLM (min_prefix 0): [] -> {4: 2}; [4] -> every training continuation of 4; [4, 5]/[4, 8] -> {6: 1}
            assert [r[1] for r in rows] == [[(4, 2)], [(5, 1), (8, 1)], [(6, 1)], [(7, 1)]]
        assert t.stats["sup_keys"] == 6 and t.stats["clm_keys"] == 6  # [..4] [..4 5] [..4 8] [..4 5 6] [..4 8 6]
        assert t.stats["frac_multi_sup"] == 0.25 and t.stats["frac_multi_clm"] == 0.25
    assert_same_arrays(by_backend["hash128"], by_backend["trie"])

    # a third example with another prompt: its sup row after [4] is {9}, the CLM row keyed [4] pools {5, 8, 9}
    ids = SPEC5_IDS + [[1, 40, 4, 9]]
    spans = SPEC5_SPANS + [[(2, 4)]]
    for backend in BACKENDS:
        rows = rows_of(build_tables(ids, spans, vocab_size=50, backend=backend), 2)
        assert rows == [([(4, 1)], [(4, 3)]), ([(9, 1)], [(5, 1), (8, 1), (9, 1)])]

    # min_prefix 2: positions with L < 2 (the first two of each answer) fall back to the sup row
    for backend in BACKENDS:
        t = build_tables(ids, spans, vocab_size=50, min_prefix=2, backend=backend)
        assert rows_of(t, 0) == [([(4, 2)], [(4, 2)]), ([(5, 1), (8, 1)], [(5, 1), (8, 1)]),
                                 ([(6, 1)], [(6, 1)]), ([(7, 1)], [(7, 1)])]
        assert rows_of(t, 2) == [([(4, 1)], [(4, 1)]), ([(9, 1)], [(9, 1)])]
        assert t.stats["clm_keys"] == 4  # [4 5] [4 8] [4 5 6] [4 8 6]
        assert t.stats["min_prefix"] == 2


def test_unique_prompts_give_singleton_sup_rows():
    ids = [[1, 100 + i, 5, 6, 5 + i % 3, 7] for i in range(20)]
    spans = [[(2, 6)]] * 20
    for backend in BACKENDS:
        t = build_tables(ids, spans, vocab_size=200, min_prefix=1, backend=backend)
        assert np.all(np.diff(t.sup_ptr) == 1)
        assert t.stats["frac_multi_sup"] == 0.0
        assert t.sup_cnt.tolist() == [1] * 80
        # answer-prefix [5, 6] pools the third answer token {5, 6, 7} over the 20 examples (counts 7, 7, 6)
        assert rows_of(t, 0)[2][1] == [(5, 7), (6, 7), (7, 6)]
        # pitfall 5: min_prefix 0 pools the empty prefix, but here every answer starts with 5 -> still {5: 20}
        t0 = build_tables(ids, spans, vocab_size=200, min_prefix=0, backend=backend)
        assert rows_of(t0, 3)[0][1] == [(5, 20)]


def test_min_prefix0_pools_empty_prefix_across_examples_and_turns():
    ids = [[1, 9, 4, 5, 2, 9, 6, 5], [1, 10, 4, 7]]
    spans = [[(2, 4), (6, 8)], [(2, 4)]]
    for backend in BACKENDS:
        t = build_tables(ids, spans, vocab_size=20, min_prefix=0, backend=backend)
        rows = [rows_of(t, 0), rows_of(t, 1)]
        empty_row = [(4, 2), (6, 1)]  # first answer tokens of all three regions
        assert rows[0][0] == ([(4, 1)], empty_row)  # first turn of example 0
        assert rows[0][2] == ([(6, 1)], empty_row)  # second turn restarts the answer prefix
        assert rows[1][0] == ([(4, 1)], empty_row)
        assert rows[0][1] == ([(5, 1)], [(5, 1), (7, 1)])  # answer prefix [4]
        assert rows[0][3] == ([(5, 1)], [(5, 1)])  # answer prefix [6]
        assert t.stats["frac_multi_sup"] == 0.0 and t.stats["frac_multi_clm"] == 5 / 6  # all but answer prefix [6]
        t1 = build_tables(ids, spans, vocab_size=20, min_prefix=1, backend=backend)
        assert rows_of(t1, 0)[0] == ([(4, 1)], [(4, 1)])  # L = 0 < 1 falls back


def test_mono_corpus_adds_clm_counts():
    mono = [[4, 5, 6, 7, 8], [4, 8], np.array([3])]
    for backend in BACKENDS:
        t = build_tables(SPEC5_IDS, SPEC5_SPANS, vocab_size=50, mono_docs=iter(mono), backend=backend)
        rows = rows_of(t, 0)
        assert rows[0][1] == [(3, 1), (4, 4)]  # empty prefix: 2 training + 2 mono, plus doc [3]
        assert rows[1][1] == [(5, 2), (8, 2)]
        assert rows[2][1] == [(6, 2)]
        assert [r[0] for r in rows] == [[(4, 2)], [(5, 1), (8, 1)], [(6, 1)], [(7, 1)]]  # sup untouched
        assert t.stats["mono_docs"] == 3 and t.stats["mono_tokens"] == 8 and t.stats["mono_entries"] == 8
        assert t.stats["mono_max_prefix"] == 13  # longest example (8) + 5
        # bound: prefixes up to length 1 only; min_prefix 1 drops the empty prefix
        t = build_tables(SPEC5_IDS, SPEC5_SPANS, vocab_size=50, mono_docs=mono, mono_max_prefix=1, min_prefix=1,
                         backend=backend)
        rows = rows_of(t, 0)
        assert rows[0][1] == [(4, 2)]  # L = 0 falls back to sup
        assert rows[1][1] == [(5, 2), (8, 2)]
        assert rows[2][1] == [(6, 1)]  # the mono [4, 5] -> 6 entry is beyond the bound
        assert t.stats["mono_entries"] == 2


def test_alignment_and_reference_on_random_multiturn_examples():
    ids, spans = random_corpus(60, seed=1)
    for min_prefix in (0, 2):
        mono = [random_corpus(1, seed=100 + k)[0][0] for k in range(10)]
        ref = reference(ids, spans, min_prefix, mono)
        for backend in BACKENDS:
            t = build_tables(ids, spans, vocab_size=12, min_prefix=min_prefix, mono_docs=mono, backend=backend)
            # right-padded batch: labels = ids outside spans masked to -100; rows follow labels[:, 1:] != -100
            width = max(len(x) for x in ids) + 3
            labels = np.full((len(ids), width), -100)
            for i, (x, sp) in enumerate(zip(ids, spans, strict=True)):
                for s, e in sp:
                    labels[i, s:e] = x[s:e]
            mask = labels[:, 1:] != -100
            assert np.array_equal(np.diff(t.example_ptr), mask.sum(1))
            true_next = labels[:, 1:][mask]  # row-major = position order
            assert len(true_next) == t.n_positions
            for p, tok in enumerate(true_next.tolist()):
                assert tok in t.sup_tok[t.sup_ptr[p]:t.sup_ptr[p + 1]].tolist()
            assert [rows_of(t, i) for i in range(len(ids))] == ref
    assert t.stats["frac_multi_sup"] > 0  # the shared prompts make some sup rows non-singleton


def test_backends_identical_on_random_corpus():
    ids, spans = random_corpus(200, seed=7, vocab=40, n_prompts=20)
    mono = [random_corpus(1, seed=1000 + k, vocab=40)[0][0] for k in range(30)]
    for min_prefix in (0, 1, 3):
        h = build_tables(ids, spans, vocab_size=40, min_prefix=min_prefix, mono_docs=mono, backend="hash128")
        tr = build_tables(ids, spans, vocab_size=40, min_prefix=min_prefix, mono_docs=mono, backend="trie")
        assert_same_arrays(h, tr)
        for key in ("sup_keys", "clm_keys", "sup_entries", "clm_entries", "frac_multi_sup", "frac_multi_clm",
                    "n_positions", "mono_entries"):
            assert h.stats[key] == tr.stats[key], key
        assert tr.stats["trie_nodes"] > h.stats["sup_keys"]


def test_hash128_long_tail_examples_share_keys_with_chunked_ones(monkeypatch):
    """hash128 hashes full chunks column-wise with numpy and the few longest examples per token with Python ints;
    both must give the same keys (a shared prompt/answer prefix must land in the same rows as with the trie)."""
    monkeypatch.setattr(ndp_tables, "_CHUNK_CELLS", 16 * 20)  # small chunks, a short tail
    calls = []
    scalar = ndp_tables._hash_example_py
    monkeypatch.setattr(ndp_tables, "_hash_example_py", lambda x, sp: calls.append(len(x)) or scalar(x, sp))
    ids, spans = random_corpus(40, seed=5, n_prompts=2)
    for k in range(3):  # 3 long examples (hashed one by one) reusing prompts and answer prefixes of short ones
        x = ids[k] + [2] + [4] * (50 + k) + ids[k + 3][spans[k + 3][0][0]:]
        ids.append(x)
        spans.append(spans[k] + [(len(x) - len(ids[k + 3][spans[k + 3][0][0]:]), len(x))])
    mono = [ids[0][spans[0][0][0]:], ids[50 % len(ids)]]
    h = build_tables(ids, spans, vocab_size=12, mono_docs=mono, backend="hash128")
    tr = build_tables(ids, spans, vocab_size=12, mono_docs=mono, backend="trie")
    assert_same_arrays(h, tr)
    assert [rows_of(h, i) for i in range(len(ids))] == reference(ids, spans, 0, mono)
    assert 3 <= len(calls) < 12 and max(calls) == max(map(len, ids))  # the long tail, the rest chunked


def test_examples_without_positions_and_empty_corpus():
    for backend in BACKENDS:
        t = build_tables([[1, 2, 3], [1, 4, 5]], [[], [(2, 2), (2, 3)]], vocab_size=10, backend=backend)
        assert t.example_ptr.tolist() == [0, 0, 1]
        assert rows_of(t, 0) == [] and rows_of(t, 1) == [([(5, 1)], [(5, 1)])]
        e = build_tables([], [], vocab_size=10, backend=backend)
        assert e.example_ptr.tolist() == [0] and e.sup_ptr.tolist() == [0] and e.stats["n_positions"] == 0


def test_throughput_20k_tokens():
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 49152, size=int(n)).tolist() for n in rng.integers(60, 140, size=200)]
    spans = [[(len(x) // 2, len(x))] for x in ids]
    assert sum(map(len, ids)) >= 20_000
    for backend in BACKENDS:
        t0 = time.perf_counter()
        t = build_tables(ids, spans, vocab_size=49152, backend=backend)
        assert time.perf_counter() - t0 < 5.0, backend
        assert t.stats["tokens_per_s_count"] > 0 and t.stats["peak_rss_mb"] > 0


# --------------------------------------------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path):
    ids, spans = random_corpus(30, seed=3)
    t = build_tables(ids, spans, vocab_size=12, min_prefix=1)
    meta = {"tokenizer": "smollm2-135m-instruct", "vocab_size": 12, "max_length": 256, "template_sha256": "ab" * 32}
    t.save(tmp_path / "tables", meta)
    doc = json.loads((tmp_path / "tables" / "meta.json").read_text())
    assert doc["format_version"] == FORMAT_VERSION and doc["tokenizer"] == "smollm2-135m-instruct"
    assert doc["stats"]["sup_entries"] == t.stats["sup_entries"]
    loaded = NDPTables.load(tmp_path / "tables", expected={"tokenizer": "smollm2-135m-instruct", "max_length": 256,
                                                           "min_prefix": 1}, vocab_size=12)
    assert_same_arrays(t, loaded)
    assert loaded.stats == t.stats and loaded.meta == meta
    for i in (0, 29):
        for k, v in t.example_rows(i).items():
            np.testing.assert_array_equal(loaded.example_rows(i)[k], v)
    assert not [p.name for p in (tmp_path / "tables").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="reserved"):
        t.save(tmp_path / "x", {"stats": 1})


def test_meta_mismatch_names_field_and_both_values(tmp_path):
    t = build_tables(SPEC5_IDS, SPEC5_SPANS, vocab_size=50)
    t.save(tmp_path, {"tokenizer": "a", "vocab_size": 50})
    with pytest.raises(ValueError, match=r"built with tokenizer='a' but this run uses tokenizer='b'"):
        NDPTables.load(tmp_path, expected={"tokenizer": "b"})
    with pytest.raises(ValueError, match=r"min_prefix=0 but this run uses min_prefix=2"):
        NDPTables.load(tmp_path, expected={"min_prefix": 2})  # found in stats
    with pytest.raises(ValueError, match=r"lack the field 'train_sha256'"):
        NDPTables.load(tmp_path, expected={"train_sha256": "x"})
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=8\).*example 0"):
        NDPTables.load(tmp_path, vocab_size=8)  # the model's vocab is smaller than the tables' token ids
    doc = json.loads((tmp_path / "meta.json").read_text())
    doc["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "meta.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="format_version"):
        NDPTables.load(tmp_path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.*scripts/build_ndp_tables.py"):
        NDPTables.load(tmp_path / "nope")
    t = build_tables(SPEC5_IDS, SPEC5_SPANS, vocab_size=50)
    t.save(tmp_path, {"tokenizer": "a"})
    npz = tmp_path / "targets.npz"
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"targets\.npz.*corrupt or truncated"):
        NDPTables.load(tmp_path)
    arrays = t.arrays()
    del arrays["clm_cnt"]
    np.savez(npz, **arrays)
    with pytest.raises(ValueError, match=r"targets\.npz: missing arrays \['clm_cnt'\]"):
        NDPTables.load(tmp_path)
    np.savez(npz, **{**t.arrays(), "sup_cnt": t.sup_cnt.astype(np.float32)})
    with pytest.raises(ValueError, match=r"targets\.npz: array 'sup_cnt' must be 1-D int32"):
        NDPTables.load(tmp_path)
    np.savez(npz, **{**t.arrays(), "clm_ptr": t.clm_ptr[:-1]})
    with pytest.raises(ValueError, match=r"clm_ptr has 8 entries but example_ptr ends at 8 positions"):
        NDPTables.load(tmp_path)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"meta\.json"):
        NDPTables.load(tmp_path)


def _corrupted(tmp_path, **changes) -> None:
    t = build_tables(SPEC5_IDS, SPEC5_SPANS, vocab_size=50)
    t.save(tmp_path, {"vocab_size": 50})
    np.savez(tmp_path / "targets.npz", **{**t.arrays(), **changes})


def test_decreasing_ptr_zero_count_and_big_token_errors(tmp_path):
    t = build_tables(SPEC5_IDS, SPEC5_SPANS, vocab_size=50)
    ptr = t.sup_ptr.copy()
    ptr[6] = ptr[5] - 1  # position 5 belongs to example 1
    _corrupted(tmp_path, sup_ptr=ptr)
    with pytest.raises(ValueError, match=r"sup_ptr decreases at position 5 \(example 1\)"):
        NDPTables.load(tmp_path)
    cnt = t.clm_cnt.copy()
    cnt[-1] = 0
    _corrupted(tmp_path, clm_cnt=cnt)
    with pytest.raises(ValueError, match=r"clm_cnt has count 0 <= 0 at entry 9 \(example 1\)"):
        NDPTables.load(tmp_path)
    tok = t.sup_tok.copy()
    tok[0] = 50
    _corrupted(tmp_path, sup_tok=tok)
    with pytest.raises(ValueError, match=r"token id 50 outside \[0, vocab_size=50\) at entry 0 \(example 0\)"):
        NDPTables.load(tmp_path)
    ex = t.example_ptr.copy()
    ex[1] = 9
    with pytest.raises(ValueError, match=r"example_ptr decreases at example 1"):
        NDPTables(**{**t.arrays(), "example_ptr": ex}).validate()


def test_bad_build_inputs():
    with pytest.raises(ValueError, match=r"example 1: token id 50 outside \[0, vocab_size=50\)"):
        build_tables([[1, 2, 3], [1, 50, 3]], [[(1, 3)], [(1, 3)]], vocab_size=50)
    with pytest.raises(ValueError, match=r"mono document 1: token id 99"):
        build_tables(SPEC5_IDS, SPEC5_SPANS, vocab_size=50, mono_docs=[[1], [99]])
    with pytest.raises(ValueError, match=r"example 0: span 1 = \[2, 4\)"):
        build_tables([[1, 2, 3, 4, 5]], [[(2, 4), (2, 4)]], vocab_size=50)  # overlapping
    with pytest.raises(ValueError, match=r"example 0: span 0 = \[0, 2\)"):
        build_tables([[1, 2, 3]], [[(0, 2)]], vocab_size=50)
    with pytest.raises(ValueError, match=r"example 0: span 0 = \[1, 4\)"):
        build_tables([[1, 2, 3]], [[(1, 4)]], vocab_size=50)
    with pytest.raises(ValueError, match=r"backend='bloom' is not one of \['hash128', 'trie'\]"):
        build_tables(SPEC5_IDS, SPEC5_SPANS, vocab_size=50, backend="bloom")
    with pytest.raises(ValueError, match=r"min_prefix must be an integer >= 0, got -1"):
        build_tables(SPEC5_IDS, SPEC5_SPANS, vocab_size=50, min_prefix=-1)
    with pytest.raises(ValueError, match=r"mono_max_prefix must be an integer >= -1"):
        build_tables(SPEC5_IDS, SPEC5_SPANS, vocab_size=50, mono_max_prefix=-2)
    with pytest.raises(ValueError, match=r"input_ids has 2 examples but spans has 1"):
        build_tables(SPEC5_IDS, SPEC5_SPANS[:1], vocab_size=50)
    with pytest.raises(IndexError):
        build_tables(SPEC5_IDS, SPEC5_SPANS, vocab_size=50).example_rows(2)
