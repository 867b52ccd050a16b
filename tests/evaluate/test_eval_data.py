"""Data loaders and task specs: every format, clear errors naming file and line, zoo and Hub names."""

from __future__ import annotations

import gzip
import json

import pytest

from mergelab.errors import ConfigError, InputError
from mergelab.evaluate import data as data_module
from mergelab.evaluate import make_task
from mergelab.evaluate.data import load_rows, register_zoo_resolver
from mergelab.evaluate.tasks.base import parse_spec

QUESTIONS = [
    {"question": "one?", "choices": ["a", "b", "c", "d"], "answer": 2, "subject": "law"},
    {"question": "two?", "choices": ["e", "f", "g", "h"], "answer": "B", "subject": "law"},
]


def loaded_questions(spec: str):
    task = make_task(spec)
    task.load()
    return [(q.question, q.choices, q.answer, q.subject) for q in task.questions]


def test_jsonl_csv_parquet_and_mmlu_layouts_give_the_same_questions(tmp_path, jsonl):
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = [("one?", ("a", "b", "c", "d"), 2, "law"), ("two?", ("e", "f", "g", "h"), 1, "law")]
    assert loaded_questions(f"choice:{jsonl(tmp_path / 'q.jsonl', QUESTIONS)}") == expected
    csv_path = tmp_path / "q.csv"
    csv_path.write_text('question,A,B,C,D,answer,subject\none?,a,b,c,d,2,law\n"two?",e,f,g,h,B,law\n')
    assert loaded_questions(f"choice:{csv_path}") == expected
    table = pa.table({"question": ["one?", "two?"], "subject": ["law", "law"],
                      "choices": [["a", "b", "c", "d"], ["e", "f", "g", "h"]], "answer": [2, 1]})  # cais/mmlu layout
    pq.write_table(table, tmp_path / "q.parquet")
    assert loaded_questions(f"choice:{tmp_path / 'q.parquet'}") == expected
    (tmp_path / "q.json").write_text(json.dumps(QUESTIONS))
    assert loaded_questions(f"choice:{tmp_path / 'q.json'}") == expected
    with gzip.open(tmp_path / "q.csv.gz", "wt", encoding="utf-8") as handle:
        handle.write(csv_path.read_text())
    assert loaded_questions(f"choice:{tmp_path / 'q.csv.gz'}") == expected


UNICODE_QUESTIONS = [
    {"question": "Qu'est-ce qu'un café crème ?", "choices": ["«lait»", "水", "naïve – “quoted”", "🙂 emoji"],
     "answer": 1, "subject": "élève"},
    {"question": "Ποιο είναι;\nЧто это?", "choices": ["α", "β", "ж", "ß"], "answer": "D", "subject": "élève"},
]
UNICODE_EXPECTED = [(q["question"], tuple(q["choices"]), index, "élève")
                    for q, index in zip(UNICODE_QUESTIONS, (1, 3))]


def test_unicode_text_survives_every_text_format_with_or_without_a_byte_order_mark(tmp_path):
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["question", "A", "B", "C", "D", "answer", "subject"])
    for q in UNICODE_QUESTIONS:
        writer.writerow([q["question"], *q["choices"], q["answer"], q["subject"]])
    csv_text = buffer.getvalue()
    jsonl_text = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in UNICODE_QUESTIONS)
    for bom in (b"", b"\xef\xbb\xbf"):  # Excel and Notepad start UTF-8 files with a byte-order mark
        tag = "bom" if bom else "plain"
        files = {f"{tag}.csv": bom + csv_text.encode("utf-8"), f"{tag}.csv.gz": gzip.compress(bom + csv_text.encode("utf-8")),
                 f"{tag}.jsonl": bom + jsonl_text.encode("utf-8"), f"{tag}.jsonl.gz": gzip.compress(bom + jsonl_text.encode("utf-8"))}
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
            assert loaded_questions(f"choice:{tmp_path / name}") == UNICODE_EXPECTED, name
            assert list(load_rows(tmp_path / name).rows[0].fields)[0] == "question", name


def test_files_that_are_not_utf8_or_not_gzip_name_the_file(tmp_path):
    latin1 = "question,A,B,answer\ncaf\u00e9?,a,b,0\n".encode("latin-1")
    for name, data in (("bad.csv", latin1), ("bad.jsonl", b'{"text": "caf\xe9"}\n'), ("bad.json", b'[{"text": "caf\xe9"}]'),
                       ("bad.txt", b"caf\xe9"), ("bad.txt.gz", gzip.compress(b"caf\xe9")), ("bad.csv.gz", gzip.compress(latin1))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=rf"{name}: not UTF-8 text .*save the file as UTF-8"):
            load_rows(tmp_path / name)
    (tmp_path / "broken.jsonl.gz").write_bytes(b"this is not gzip")
    with pytest.raises(InputError, match=r"broken.jsonl.gz: not a readable gzip file"):
        load_rows(tmp_path / "broken.jsonl.gz")


def test_malformed_rows_name_the_file_and_line(tmp_path, jsonl, monkeypatch):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(QUESTIONS[0]) + "\n\n{not json\n")
    with pytest.raises(InputError, match=r"broken.jsonl:3: not valid JSON"):
        load_rows(broken)
    missing = jsonl(tmp_path / "missing.jsonl", [QUESTIONS[0], {"choices": ["a", "b"], "answer": 0}])
    with pytest.raises(InputError, match=r"missing.jsonl:2: missing field 'question'"):
        loaded_questions(f"choice:{missing}")
    out_of_range = jsonl(tmp_path / "range.jsonl", [{**QUESTIONS[0], "answer": 7}])
    with pytest.raises(InputError, match=r"range.jsonl:1: answer 7 is out of range for 4 options"):
        loaded_questions(f"choice:{out_of_range}")
    wrong_type = jsonl(tmp_path / "type.jsonl", [{"question": 3, "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(InputError, match=r"type.jsonl:1: field 'question' should be str"):
        loaded_questions(f"choice:{wrong_type}")
    many = jsonl(tmp_path / "many.jsonl", [{"question": "q", "choices": [str(i) for i in range(27)], "answer": 0}])
    with pytest.raises(InputError, match=r"many.jsonl:1: 27 options; at most 26 \(A-Z\)"):
        loaded_questions(f"choice:{many}")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("question,A,B,answer\nq,a,b,0\nq,a,b,0,extra\n")
    with pytest.raises(InputError, match=r"bad.csv:3: this row has more values"):
        load_rows(bad_csv)
    long_csv = tmp_path / "long.csv"
    long_csv.write_text("text,id\nshort,0\n" + "word " * 40_000 + ",1\n")  # 200 000 characters in one field
    assert len(load_rows(long_csv).rows[1]["text"]) == 200_000
    monkeypatch.setattr(data_module, "CSV_FIELD_LIMIT", 100_000)
    with pytest.raises(InputError, match=r"long.csv:3: not a readable CSV row \(field larger than field limit"):
        load_rows(long_csv)
    short_csv = tmp_path / "short.csv"
    short_csv.write_text("question,A,B,answer\nq,a,b,0\nq,a\n")
    with pytest.raises(InputError, match=r"short.csv:3: this row has fewer values than the header \(no 'B'\)"):
        load_rows(short_csv)
    (tmp_path / "q.xlsx").write_text("x")
    with pytest.raises(InputError, match="unknown data format"):
        load_rows(tmp_path / "q.xlsx")
    with pytest.raises(InputError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl")


def test_zoo_names_use_a_registered_resolver(tmp_path, jsonl, monkeypatch):
    monkeypatch.setattr(data_module, "_zoo_resolvers", [])
    with pytest.raises(InputError, match=r"zoo dataset 'zoo:tiny/caesar3:test'.*mergelab zoo build"):
        load_rows("zoo:tiny/caesar3:test")
    path = jsonl(tmp_path / "caesar3-test.jsonl", [{"prompt": "abc", "answer": "def"}])

    def resolver(name: str, split: str):
        if (name, split) != ("tiny/caesar3", "test"):
            raise InputError(f"no zoo dataset {name}:{split}")
        return path

    register_zoo_resolver(resolver)
    assert load_rows("zoo:tiny/caesar3:test").rows[0]["answer"] == "def"
    with pytest.raises(InputError, match="no zoo dataset tiny/other:dev"):
        load_rows("zoo:tiny/other:dev")


def test_hub_datasets_offline_give_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("the hub is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(InputError, match=r"cais/mmlu \(all\)\[test\].*pass that local \.jsonl file instead"):
        make_task("mmlu").load()


def test_task_specs():
    assert parse_spec("choice") == ("choice", {})
    assert parse_spec("choice:data/mmlu.jsonl") == ("choice", {"data": "data/mmlu.jsonl"})
    assert parse_spec("generate:zoo:tiny/caesar3:test") == ("generate", {"data": "zoo:tiny/caesar3:test"})
    assert parse_spec("humaneval:k=1,10,n=20") == ("humaneval", {"k": ["1", "10"], "n": "20"})
    assert parse_spec("refusal:zoo:tiny/safety:test,judge=llm,max_new_tokens=24") == (
        "refusal", {"data": "zoo:tiny/safety:test", "judge": "llm", "max_new_tokens": "24"})
    with pytest.raises(ConfigError, match="cannot read 'b.jsonl'"):
        parse_spec("choice:a.jsonl,b.jsonl")
    task = make_task("humaneval:k=1,10,n=20,temperature=0.2")
    assert (task.options.k, task.options.n, task.options.temperature) == ([1, 10], 20, 0.2)
    with pytest.raises(ConfigError, match="unknown task 'mmmlu'; known tasks: choice"):
        make_task("mmmlu")
    with pytest.raises(ConfigError, match="has no option 'shots'; its options are"):
        make_task("choice:data=x.jsonl,shots=5")
    with pytest.raises(ConfigError, match="option 'n' should be int, got 'many'"):
        make_task("humaneval:n=many")
    with pytest.raises(ConfigError, match="needs data"):
        make_task("perplexity").load()
