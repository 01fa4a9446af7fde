"""/start_profile and /stop_profile on the real engine (tiny model, CPU): traces of whole labelled steps."""

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from stepserve.api.server import build_app
from stepserve.config import ServerArgs
from stepserve.engine.engine import AsyncEngine
from stepserve.engine.profiler import PROFILER_DIR_ENV

COMPLETION = {"model": "tiny", "prompt": "the cat sees", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def client():
    args = ServerArgs(dtype="float32", served_model_name="tiny")
    with TestClient(build_app(args, AsyncEngine.from_config(args.engine_config()))) as c:
        yield c


def labels(trace: str) -> set[str]:
    events = json.loads(Path(trace).read_text())["traceEvents"]
    return {e["name"] for e in events if e.get("cat") == "user_annotation"}


def test_profiling_is_off_without_a_directory(client, monkeypatch):
    monkeypatch.delenv(PROFILER_DIR_ENV, raising=False)
    r = client.post("/start_profile")
    assert r.status_code == 400 and PROFILER_DIR_ENV in r.json()["error"]["message"]


def test_start_stop_writes_a_trace_of_labelled_steps(client, monkeypatch, tmp_path):
    monkeypatch.setenv(PROFILER_DIR_ENV, str(tmp_path))
    r = client.post("/start_profile")
    assert r.status_code == 200
    trace = r.json()["trace"]
    assert Path(trace).parent == tmp_path
    again = client.post("/start_profile")
    assert again.status_code == 400 and "already" in again.json()["error"]["message"]
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200
    r = client.post("/stop_profile")
    assert r.status_code == 200 and r.json()["trace"] == trace
    assert {"schedule", "launch", "wait", "collect", "deliver"} <= labels(trace)
    r = client.post("/stop_profile")
    assert r.status_code == 400 and "no profile" in r.json()["error"]["message"]


def test_num_steps_stops_by_itself(client, monkeypatch, tmp_path):
    monkeypatch.setenv(PROFILER_DIR_ENV, str(tmp_path))
    r = client.post("/start_profile", json={"num_steps": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "num_steps"
    trace = client.post("/start_profile", json={"num_steps": 2}).json()["trace"]
    out = client.post("/v1/completions", json=COMPLETION).json()
    assert out["usage"]["completion_tokens"] == 6  # the request runs on past the profile
    assert Path(trace).exists() and "schedule" in labels(trace)
    assert client.post("/stop_profile").status_code == 400  # already stopped after two steps
