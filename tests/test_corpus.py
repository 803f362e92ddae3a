"""Corpus reading and windowing: formats, provenance, budget, determinism, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scope import ScopeError
from scope.corpus import CorpusSpec, build_windows, parse_tokens

TEXTS = [
    "The river ran fast under the old stone bridge near the mill. " * 3,
    "Bees carry pollen from flower to flower in the warm spring light.",
    "A compiler turns source code into machine instructions, one pass at a time. " * 2,
]


def spec(*paths, **kw) -> CorpusSpec:
    return CorpusSpec(paths=tuple(str(p) for p in paths), **{"ctx": 16, **kw})


def test_windows_are_bos_first_with_provenance(tmp_path, tiny_model):
    tok = tiny_model.tokenizer
    for i, text in enumerate(TEXTS):
        (tmp_path / f"{i}.txt").write_text(text)
    w = build_windows(spec(tmp_path), tok)
    assert (w.tokens[:, 0] == tok.bos_token_id).all()
    assert w.doc_names == [str(tmp_path / f"{i}.txt") for i in range(3)]
    for i, text in enumerate(TEXTS):  # the windows of a document rebuild it exactly
        ids = tok(text, add_special_tokens=False)["input_ids"]
        rows = np.nonzero(w.doc == i)[0]
        assert [int(w.offset[r]) for r in rows] == list(range(0, len(ids), 15))
        rebuilt = np.concatenate([w.tokens[r, 1 : w.lengths[r]] for r in rows])
        assert rebuilt.tolist() == ids
    assert w.n_tokens == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)


def test_budget_and_determinism(tmp_path, tiny_model):
    for i, text in enumerate(TEXTS):
        (tmp_path / f"{i}.txt").write_text(text)
    a = build_windows(spec(tmp_path, max_tokens=40), tiny_model.tokenizer)
    b = build_windows(spec(tmp_path, max_tokens=40), tiny_model.tokenizer)
    assert a.n_tokens == 40 and a.fingerprint() == b.fingerprint()
    assert build_windows(spec(tmp_path), tiny_model.tokenizer).fingerprint() != a.fingerprint()


def test_jsonl_parquet_and_saved_dataset(tmp_path, tiny_model):
    tok = tiny_model.tokenizer
    with (tmp_path / "d.jsonl").open("w") as f:
        for t in TEXTS:
            f.write(json.dumps({"body": t, "n": 1}) + "\n")
    pq.write_table(pa.table({"content": TEXTS}), tmp_path / "d.parquet")
    ds = tmp_path / "saved"
    ds.mkdir()
    with pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink:
        table = pa.table({"text": TEXTS})
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (ds / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    (ds / "dataset_info.json").write_text("{}")
    reference = build_windows(spec(tmp_path / "d.jsonl", field="body"), tok)
    for source, field in ((tmp_path / "d.parquet", "content"), (ds, "text")):
        got = build_windows(spec(source, field=field), tok)
        assert got.fingerprint() == reference.fingerprint()
    assert reference.doc_names[1] == f"{tmp_path / 'd.jsonl'}:2"


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("empty_folder", r"has no text to record"),
        ("missing", r"corpus path .* does not exist"),
        ("jsonl_field", r"the first row has no field 'text' \(fields: body\): pass --field"),
        ("parquet_column", r"has no column 'text' \(columns: content\): pass --field"),
        ("only_binary", r"has no text to record \(1 .txt files that are not UTF-8 \(.*\.txt\)\)"),
    ],
)
def test_bad_corpus(tmp_path, tiny_model, case, pattern):
    path = tmp_path / "c"
    path.mkdir()
    if case == "jsonl_field":
        (path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    elif case == "parquet_column":
        pq.write_table(pa.table({"content": ["x"]}), path / "a.parquet")
    elif case == "only_binary":
        (path / "a.txt").write_bytes(b"\xff\xfe\x00bad \xc3\x28")
    elif case == "missing":
        path = tmp_path / "nope"
    with pytest.raises(ScopeError, match=pattern):
        build_windows(spec(path), tiny_model.tokenizer)


def test_undecodable_files_are_skipped_and_counted(tmp_path, tiny_model):
    (tmp_path / "good.txt").write_text(TEXTS[0])
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    (tmp_path / "rows.jsonl").write_bytes(b'{"text": "fine"}\nnot json\n{"other": 1}\n')
    w = build_windows(spec(tmp_path), tiny_model.tokenizer)
    assert w.report.documents == 2
    assert w.report.skipped == {
        ".txt files that are not UTF-8": 1,
        ".jsonl lines that are not JSON": 1,
        ".jsonl rows without 'text'": 1,
    }
    assert w.report.summary() == (  # the summary names what was skipped
        f"1 .txt files that are not UTF-8 ({tmp_path / 'bad.txt'}); "
        f"1 .jsonl lines that are not JSON ({tmp_path / 'rows.jsonl'}:2); "
        f"1 .jsonl rows without 'text' ({tmp_path / 'rows.jsonl'}:3)"
    )


def test_settings_validation():
    with pytest.raises(ScopeError, match="no corpus given"):
        CorpusSpec(paths=())
    with pytest.raises(ScopeError, match="--ctx 1 is too small"):
        CorpusSpec(paths=("x",), ctx=1)
    assert (
        parse_tokens("2M") == 2_000_000
        and parse_tokens("500k") == 500_000
        and parse_tokens("123") == 123
    )
    with pytest.raises(ScopeError, match="--tokens 'lots' is not a count"):
        parse_tokens("lots")


def test_streamed_windows_equal_the_whole(tmp_path, tiny_model, monkeypatch):
    """Blocks of a few documents at a time, written to disk and read back in any read size,
    give exactly the windows and batches of the whole corpus at once; window ids are
    (document << 20) | chunk."""
    import scope.corpus as corpus
    from scope.corpus import ReadReport, iter_windows
    from scope.record import windows as part_windows

    docs = [f"{TEXTS[i % 3]} Document {i}." for i in range(11)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = tiny_model.tokenizer
    everything = build_windows(spec(tmp_path / "c.jsonl"), tok).n_tokens
    budget = everything - 7  # the budget ends inside the last block
    whole = build_windows(spec(tmp_path / "c.jsonl", max_tokens=budget), tok)
    np.testing.assert_array_equal(whole.ids, (whole.doc.astype(np.int64) << 20) | chunks(whole))
    monkeypatch.setattr(corpus, "TOKENIZE_BATCH", 4)
    blocks = list(iter_windows(spec(tmp_path / "c.jsonl", max_tokens=budget), tok, ReadReport()))
    assert len(blocks) > 1
    np.testing.assert_array_equal(np.concatenate([b.tokens for b in blocks]), whole.tokens)
    monkeypatch.setattr(part_windows, "READ_ROWS", 3)
    written = part_windows.write_windows(
        spec(tmp_path / "c.jsonl", max_tokens=budget), tok, tmp_path / "out", 0
    )
    assert (
        written.fingerprint == whole.fingerprint() and written.n_tokens == whole.n_tokens == budget
    )
    np.testing.assert_array_equal(written.lengths, whole.lengths)
    for batch, start in [(4, 0), (2, 1), (5, 3)]:
        got = list(part_windows.read_batches(written.path, 0, batch, start))
        rows = np.arange(start, len(whole))
        assert [len(b.ids) for b in got] == [
            len(rows[i : i + batch]) for i in range(0, len(rows), batch)
        ]
        for b, i in zip(got, range(0, len(rows), batch), strict=True):
            sel = rows[i : i + batch]
            np.testing.assert_array_equal(b.ids, whole.ids[sel])
            width = int(whole.lengths[sel].max())
            expected = whole.tokens[sel, :width].copy()
            expected[np.arange(width) >= whole.lengths[sel][:, None]] = 0  # pad id given: 0
            np.testing.assert_array_equal(b.tokens, expected)


def chunks(w) -> np.ndarray:
    """Each window's chunk number within its document."""
    out = np.zeros(len(w), np.int64)
    for i in range(1, len(w)):
        out[i] = out[i - 1] + 1 if w.doc[i] == w.doc[i - 1] else 0
    return out


def test_a_shard_tokenizes_only_its_own_documents(tmp_path, tiny_model):
    """Shard i of N tokenizes documents i, i+N, ... only (no budget), numbers their windows as
    the whole corpus does, and fingerprints the corpus as every other shard does."""
    from scope.corpus import ReadReport, iter_windows

    docs = [f"{TEXTS[i % 3]} Document {i}." for i in range(9)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = tiny_model.tokenizer
    whole = build_windows(spec(tmp_path / "c.jsonl"), tok)
    seen: list[str] = []

    def counting(texts, **kw):
        seen.extend(texts)
        return tok(texts, **kw)

    counting.bos_token_id, counting.pad_token_id = tok.bos_token_id, tok.pad_token_id
    ids, prints = [], set()
    for i in range(3):
        seen.clear()
        report = ReadReport()
        blocks = list(iter_windows(spec(tmp_path / "c.jsonl"), counting, report, shard=(i, 3)))
        assert seen == docs[i::3]  # only its own documents were tokenized
        ids.append(np.concatenate([b.ids for b in blocks]))
        prints.add(report.text_hash.hexdigest())
    assert len(prints) == 1 and prints == {whole.fingerprint()}
    np.testing.assert_array_equal(np.sort(np.concatenate(ids)), whole.ids)
