"""`stepserve eval mmmu` end to end: a synthetic sample in the dataset's format, answered by the fake server."""

import base64
import io
import json
import pprint
import re

import pytest
from PIL import Image

from fake_openai_server import FakeOpenAIServer
from stepserve.bench.mmmu import main


def png(w, h, color):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def b64(data):
    return {"bytes": base64.b64encode(data).decode()}


def row(qid, question, options, answer, qtype="multiple-choice", **images):
    r = {"id": qid, "question": question, "options": options, "explanation": "", "answer": answer,
         "img_type": "['Diagrams']", "topic_difficulty": "Easy", "question_type": qtype, "subfield": "x"}
    r.update({f"image_{k}": None for k in range(1, 8)})
    r.update(images)
    return r


ROWS = {
    "Art": [
        row("validation_Art_1", "Which color is <image 1>? [q:art1]", "['red', 'blue', 'green']", "B",
            image_1=b64(png(8, 8, "blue"))),
        row("validation_Art_2", "Compare <image 1> and <image 2> [q:art2]", "['same', 'different']", "A",
            image_1=b64(png(8, 8, "red")), image_2=b64(png(16, 8, "red"))),
        row("validation_Art_3", "[q:art3] pick one", "['w', 'x', 'y', 'z']", "C"),
    ],
    "Math": [
        row("validation_Math_1", "Compute <image 1> [q:math1]", "[]", "12", "open", image_1=b64(png(8, 8, "white"))),
        row("validation_Math_2", "Half of 7? [q:math2]", "[]", "3.5", "open"),
    ],
    "Accounting": [
        row("validation_Accounting_1", "<image 1> balance? [q:acc1]", "['yes', 'no']", "A",
            image_1={"path": "img.png"}),
    ],
}
REPLIES = {
    "art1": "B",
    "art2": "<think>maybe (B)</think>\n(A)",       # reasoning dropped before parsing
    "art3": "D\nbecause C is wrong",               # the default regex keeps the first line only
    "math1": "The result is 12",
    "math2": "4",
    "acc1": "A",
}
EXPECTED = {
    "Accounting": {"acc": 1.0, "num": 1}, "Art": {"acc": 0.667, "num": 3}, "Math": {"acc": 0.5, "num": 2},
    "Overall": {"acc": 0.667, "num": 6},
    "Overall-Art and Design": {"acc": 0.667, "num": 3}, "Overall-Business": {"acc": 1.0, "num": 1},
    "Overall-Health and Medicine": {"acc": 0, "num": 0},
    "Overall-Humanities and Social Science": {"acc": 0, "num": 0},
    "Overall-Science": {"acc": 0.5, "num": 2}, "Overall-Tech and Engineering": {"acc": 0, "num": 0},
}


def reply(body):
    text = "".join(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
    return REPLIES[re.search(r"\[q:(\w+)\]", text).group(1)]


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "MMMU"
    for subject, rows in ROWS.items():
        (root / subject).mkdir(parents=True)
        with open(root / subject / "validation.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    (root / "Accounting" / "img.png").write_bytes(png(4, 4, "green"))
    return root


def test_seed_command_end_to_end(dataset, tmp_path, capsys):
    answers, evals = tmp_path / "out" / "answers.json", tmp_path / "val.json"
    with FakeOpenAIServer(reply=reply) as server:
        rc = main(["--port", str(server.port), "--concurrency", "64", "--dataset-path", str(dataset),
                   "--answer-file", str(answers), "--result-filename", str(evals), "--disable-tqdm"])
        bodies = {re.search(r"\[q:(\w+)\]", json.dumps(b)).group(1): b for b in server.requests}
    assert rc == 0
    out = capsys.readouterr().out
    tail = out[out.index("Benchmark time: "):]
    expected_tail = (f"answers saved to: {answers}\nEvaluating...\nanswers saved to: {answers}\n"
                     f"{pprint.pformat(EXPECTED)}\neval out saved to {evals}\nOverall accuracy: 0.667\n")
    assert re.fullmatch(r"Benchmark time: \d+\.\d+\n", tail[:len(tail) - len(expected_tail)])
    assert tail.endswith(expected_tail)
    assert json.loads(evals.read_text()) == EXPECTED

    saved = json.loads(answers.read_text())
    assert list(saved) == ["validation_Accounting_1", "validation_Art_1", "validation_Art_2", "validation_Art_3",
                           "validation_Math_1", "validation_Math_2"]
    assert saved["validation_Art_2"] == {"pred_ans": "A", "original_response": REPLIES["art2"],
                                         "ground_truth": "A", "question_type": "multiple-choice",
                                         "judge": "Correct"}
    assert saved["validation_Art_3"]["pred_ans"] == "D" and saved["validation_Art_3"]["judge"] == "Wrong"
    assert saved["validation_Math_1"]["pred_ans"] == "The result is 12"

    body = bodies["art2"]
    assert body["model"] == server.model and body["max_tokens"] == 30 and body["temperature"] == 0.0
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert parts[0]["text"] == "Compare " and parts[2]["text"] == " and "
    assert parts[4]["text"] == (" [q:art2]\n(A) same\n(B) different\n\n"
                                "Answer with the option's letter from the given choices directly.")
    second = parts[3]["image_url"]["url"]
    assert second.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(second.split(",", 1)[1]))).size == (16, 8)
    assert [p["type"] for p in bodies["art3"]["messages"][0]["content"]] == ["text"]
    acc_parts = bodies["acc1"]["messages"][0]["content"]
    assert acc_parts[0]["type"] == "image_url"              # read from the row's relative path
    assert bodies["math2"]["messages"][0]["content"][0]["text"] == (
        "Half of 7? [q:math2]\nAnswer the question using a single word or phrase.")


def test_subjects_limit_and_pixel_limit(dataset, tmp_path, capsys):
    with FakeOpenAIServer(reply=reply) as server:
        rc = main(["--base-url", server.base_url, "--model", server.model, "--dataset-path", str(dataset),
                   "--subjects", "Art,Math", "--limit", "2", "--image-pixels-limit", "100",
                   "--max-tokens", "5", "--extra-body", '{"top_k": -1}',
                   "--answer-file", str(tmp_path / "a.json"), "--result-filename", str(tmp_path / "v.json"),
                   "--disable-tqdm"])
        asked = sorted(re.search(r"\[q:(\w+)\]", json.dumps(b)).group(1) for b in server.requests)
        bodies = list(server.requests)
    assert rc == 0
    assert "Skipping 1 samples with large images" in capsys.readouterr().out   # art2's 16x8 image
    assert asked == ["art1", "math1", "math2"]
    assert all(b["max_tokens"] == 5 and b["top_k"] == -1 for b in bodies)
    assert json.loads((tmp_path / "v.json").read_text())["Overall"] == {"acc": 0.667, "num": 3}


def test_unknown_subject_is_rejected(dataset):
    with pytest.raises(SystemExit, match="unknown MMMU subjects"):
        main(["--dataset-path", str(dataset), "--subjects", "Astrology", "--model", "m"])


def test_parquet_layout(dataset, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [dict(r, image_1={"bytes": base64.b64decode(r["image_1"]["bytes"]), "path": None})
            for r in ROWS["Art"][:1]]
    target = tmp_path / "MMMU_pq" / "Art"
    target.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), target / "validation-00000-of-00001.parquet")
    with FakeOpenAIServer(reply=reply) as server:
        rc = main(["--port", str(server.port), "--dataset-path", str(tmp_path / "MMMU_pq"), "--subjects", "Art",
                   "--answer-file", str(tmp_path / "a.json"), "--result-filename", str(tmp_path / "v.json")])
    assert rc == 0
    assert json.loads((tmp_path / "v.json").read_text())["Art"] == {"acc": 1.0, "num": 1}
