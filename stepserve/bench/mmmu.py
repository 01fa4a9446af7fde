"""`stepserve eval mmmu`: MMMU accuracy through the OpenAI chat API, scored like SGLang's benchmark/mmmu.

    stepserve eval mmmu --port 30000 --concurrency 64

Data (`--dataset-path`, default the hub id MMMU/MMMU):
  * a local copy of the hub dataset: `<dir>/<Subject>/<split>-*.parquet` (needs pyarrow or pandas), or
  * the same rows as JSON lines: `<dir>/<Subject>/<split>.jsonl`, one object per question with the dataset's
    columns (id, question, options, answer, question_type, image_1..image_7, ...), each image null or
    {"bytes": "<base64>"} or {"path": "<file, relative to the .jsonl>"}, or
  * a hub id, read with the `datasets` package (`pip install 'stepserve[eval]'`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import pprint
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image
from tqdm import tqdm

from stepserve.bench import mmmu_scoring as scoring
from stepserve.bench.client import fetch_model_id, make_async_client, resolve_base_url

MAX_IMAGES = 7


@dataclass
class Sample:
    id: str
    question_type: str
    answer: Any
    prompt: str
    letters: dict[str, str]
    image_urls: list[str]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stepserve eval mmmu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="server URL; overrides --host/--port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--dataset-path", default="MMMU/MMMU", help="local directory or hub dataset id")
    p.add_argument("--split", default="validation")
    p.add_argument("--subjects", default=None, help="comma-separated subset, e.g. Art,Math (default: all 30)")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions per subject")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=30)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--extra-request-body", "--extra-body", dest="extra_request_body", default=None,
                   metavar="JSON", help="merged into every request body")
    p.add_argument("--response-answer-regex", default="(.*)",
                   help="group 1 of its first match in the reply is the answer (default: the first line)")
    p.add_argument("--image-pixels-limit", type=int, default=-1, help="skip questions with a larger image")
    p.add_argument("--seed", type=int, default=1, help="seeds the letter guessed for unparsable answers")
    p.add_argument("--answer-file", default="./answer_stepserve.json")
    p.add_argument("--result-filename", default="./val_stepserve.json")
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        try:
            import pandas as pd
        except ImportError:
            raise SystemExit(f"reading {path} needs pyarrow or pandas; or convert it to <split>.jsonl") from None
        return pd.read_parquet(path).to_dict("records")
    return pq.read_table(path).to_pylist()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_rows(dataset_path: str, split: str, subject: str) -> tuple[list[dict[str, Any]], Path | None]:
    """One subject's rows, and the directory that relative image paths are read from."""
    root = Path(dataset_path)
    if root.is_dir():
        sub = root / subject
        parquet = sorted(sub.glob(f"{split}-*.parquet"))
        if parquet:
            return [row for f in parquet for row in _read_parquet(f)], sub
        if (sub / f"{split}.jsonl").exists():
            return _read_jsonl(sub / f"{split}.jsonl"), sub
        print(f"Warning: no {split} data for subject '{subject}' under {root}")
        return [], None
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit(f"{dataset_path!r} is not a directory; reading it from the hub needs the `datasets` "
                         "package (pip install 'stepserve[eval]')") from None
    return list(load_dataset(dataset_path, subject, split=split)), None


def _image_bytes(value: Any, base_dir: Path | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    if value.get("bytes"):
        raw = value["bytes"]
        return base64.b64decode(raw) if isinstance(raw, str) else bytes(raw)
    if value.get("path") and base_dir is not None:
        return (base_dir / value["path"]).read_bytes()
    return None


def make_sample(row: dict[str, Any], base_dir: Path | None, pixels_limit: int) -> Sample | None:
    """The prompt and data: URLs of one question; None when an image is over `pixels_limit` (if > 0)."""
    urls = []
    for k in range(1, MAX_IMAGES + 1):
        data = _image_bytes(row.get(f"image_{k}"), base_dir)
        if data is None:
            continue
        with Image.open(io.BytesIO(data)) as img:
            if 0 < pixels_limit <= img.width * img.height:
                return None
            mime = Image.MIME.get(img.format or "", "image/png")
        urls.append(f"data:{mime};base64,{base64.b64encode(data).decode()}")
    options = scoring.parse_options(row["options"])
    prompt, letters = scoring.build_prompt(row["question"], options, row["question_type"])
    return Sample(row["id"], row["question_type"], row["answer"], prompt, letters, urls)


def load_samples(args: argparse.Namespace) -> tuple[list[Sample], int]:
    """Questions in subject order, and how many were skipped for large images."""
    subjects = args.subjects.split(",") if args.subjects else scoring.SUBJECTS
    unknown = [s for s in subjects if s not in scoring.SUBJECTS]
    if unknown:
        raise SystemExit(f"unknown MMMU subjects {unknown}; choose from {scoring.SUBJECTS}")
    samples, skipped = [], 0
    for subject in subjects:
        rows, base_dir = load_rows(args.dataset_path, args.split, subject)
        for row in rows[:args.limit]:
            sample = make_sample(row, base_dir, args.image_pixels_limit)
            if sample is None:
                skipped += 1
            else:
                samples.append(sample)
    return samples, skipped


def request_body(sample: Sample, model: str, args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    content = scoring.interleave_images(sample.prompt, sample.image_urls)
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "temperature": args.temperature, "max_tokens": args.max_new_tokens, **extra}


async def ask(client: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> str | None:
    """The reply text (its reasoning when there is no content), None if the request failed."""
    try:
        async with client.post(url, json=body) as resp:
            resp.raise_for_status()
            message = (await resp.json())["choices"][0]["message"]
    except (aiohttp.ClientError, KeyError, IndexError, ValueError) as exc:
        print(f"request failed: {exc!r}")
        return None
    content = message.get("content")
    return content if content is not None else message.get("reasoning_content")


def record_answer(sample: Sample, response: str, args: argparse.Namespace) -> dict[str, Any]:
    text = scoring.strip_think(response) or ""
    match = re.search(args.response_answer_regex, text)
    answer = match.group(1).strip() if match else text
    if sample.question_type == "multiple-choice":
        # Seeded per question so the guess for an unparsable reply does not depend on completion order.
        pred = scoring.parse_multi_choice(answer, sample.letters, random.Random(f"{args.seed}:{sample.id}"))
    else:
        pred = answer
    return {"pred_ans": pred, "original_response": response, "ground_truth": sample.answer,
            "question_type": sample.question_type}


async def run(samples: list[Sample], args: argparse.Namespace, url: str, model: str) -> dict[str, dict[str, Any]]:
    extra = json.loads(args.extra_request_body) if args.extra_request_body else {}
    extra = {**{k: v for k, v in extra.items() if k != "extra_body"}, **extra.get("extra_body", {})}
    sem = asyncio.Semaphore(max(1, args.concurrency))
    answers: dict[str, dict[str, Any]] = {}
    async with make_async_client() as client:
        async def one(sample: Sample) -> tuple[Sample, str | None]:
            async with sem:
                return sample, await ask(client, url, request_body(sample, model, args, extra))

        tasks = [asyncio.create_task(one(s)) for s in samples]
        for next_done in tqdm(asyncio.as_completed(tasks), total=len(tasks), disable=args.disable_tqdm):
            sample, response = await next_done
            if response is not None:
                answers[sample.id] = record_answer(sample, response, args)
    # Saved in dataset order, not completion order, so runs diff cleanly.
    return {s.id: answers[s.id] for s in samples if s.id in answers}


def save_json(path: str, data: Any) -> None:
    print(f"answers saved to: {path}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=4)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base_url = resolve_base_url(args.host, args.port, args.base_url)
    model = args.model or fetch_model_id(base_url) or "default"
    samples, skipped = load_samples(args)
    if skipped:
        print(f"Skipping {skipped} samples with large images")
    if not samples:
        raise SystemExit("no MMMU questions to ask")

    start = time.perf_counter()
    answers = asyncio.run(run(samples, args, f"{base_url}/v1/chat/completions", model))
    print(f"Benchmark time: {time.perf_counter() - start}")
    if len(answers) < len(samples):
        print(f"Warning: {len(samples) - len(answers)} of {len(samples)} questions got no answer and are not scored")
    save_json(args.answer_file, answers)
    print("Evaluating...")
    results = scoring.score(answers)
    save_json(args.answer_file, answers)
    pprint.pprint(results)
    with open(args.result_filename, "w") as f:
        json.dump(results, f)
    print(f"eval out saved to {args.result_filename}")
    print(f"Overall accuracy: {results['Overall']['acc']}")
    return 0 if answers else 1
