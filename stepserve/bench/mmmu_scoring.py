"""MMMU prompt building, answer parsing and scoring, reproducing the rules of the official MMMU eval as SGLang's
benchmark/mmmu uses them, so accuracies are comparable with its published numbers."""

from __future__ import annotations

import ast
import random
import re
from typing import Any

DISCIPLINES: dict[str, list[str]] = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": ["Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": ["Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"],
}
SUBJECTS: list[str] = sorted(s for group in DISCIPLINES.values() for s in group)

MULTI_CHOICE_FORMAT = "{}\n{}\nAnswer with the option's letter from the given choices directly."
OPEN_FORMAT = "{}\nAnswer the question using a single word or phrase."
IMAGE_TAG = re.compile(r"<image\s*\d*>")


def parse_options(options: str | list[str]) -> list[str]:
    """The dataset stores options as the text of a Python list."""
    return list(options) if isinstance(options, list) else list(ast.literal_eval(options))


def build_prompt(question: str, options: list[str], question_type: str) -> tuple[str, dict[str, str]]:
    """The prompt text and, for multiple choice, the letter -> option map."""
    if question_type != "multiple-choice":
        return OPEN_FORMAT.format(question), {}
    letters = {chr(ord("A") + i): opt for i, opt in enumerate(options)}
    listing = "".join(f"({letter}) {opt}\n" for letter, opt in letters.items())
    return MULTI_CHOICE_FORMAT.format(question, listing), letters


def interleave_images(prompt: str, image_urls: list[str]) -> list[dict[str, Any]]:
    """Chat content parts: the prompt split at its `<image N>` tags, the i-th tag replaced by the i-th image.

    Images are attached in order of appearance; with no tag the (first) image follows the text.
    """
    parts: list[dict[str, Any]] = []
    for i, text in enumerate(IMAGE_TAG.split(prompt)):
        if text:
            parts.append({"type": "text", "text": text})
        if i < len(image_urls):
            parts.append({"type": "image_url", "image_url": {"url": image_urls[i]}})
    return parts


def strip_think(response: str | None) -> str | None:
    if response and "</think>" in response:
        return response.split("</think>")[-1].strip()
    return response


def parse_multi_choice(response: str, letters: dict[str, str], rng: random.Random) -> str:
    """The chosen letter: "(X)" marks, then a bare " X ", then (long answers only) an option's text; among
    several candidates the one mentioned last wins; nothing found -> a random letter from `rng`."""
    for ch in ",.!?;:'":
        response = response.strip(ch)
    padded = f" {response} "
    choices = list(letters)
    found = [c for c in choices if f"({c})" in padded]
    pattern = "({})" if found else " {} "
    if not found:
        found = [c for c in choices if f" {c} " in padded]
    by_content = False
    if not found and len(padded.split()) > 5:
        found = [c for c in choices if letters[c].lower() in padded.lower()]
        by_content = bool(found)
    if not found:
        return rng.choice(choices)
    if len(found) == 1:
        return found[0]
    if by_content:
        positions = [padded.lower().rfind(letters[c].lower()) for c in found]
    else:
        positions = [padded.rfind(pattern.format(c)) for c in found]
    return found[positions.index(max(positions))]


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize(text: str) -> list[str | float]:
    """A number becomes a float rounded to 2 places; other text is lower-cased, and a single character is
    padded with a space on either side so it only matches as a word."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


_NUMBER_PATTERNS = (
    r"-?\b\d{1,3}(?:,\d{3})+\b",                        # 1,234,567
    r"-?\d+(?:\.\d+)?[eE][+-]?\d+",                     # 1.5e-3
    r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])",  # 12, 3.5, .5
)


def extract_numbers(text: str) -> list[str]:
    return [m for pattern in _NUMBER_PATTERNS for m in re.findall(pattern, text)]


_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}


def _key_phrases(response: str) -> list[str]:
    """Per sentence, the shortest tail after an answer indicator ("is ", "so ", ...; "=" in the last one)."""
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for index, sentence in enumerate(sentences):
        indicators = _KEY_INDICATORS + (("=",) if index == len(sentences) - 1 else ())
        shortest = ""
        for ind in indicators:
            if ind in sentence:
                tail = sentence.split(ind)[-1].strip()
                # an empty tail never sticks: the next indicator's tail replaces it even if longer
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open(response: str) -> list[str | float]:
    """Candidate answers of an open question: key phrases and the numbers in them, normalized, deduplicated."""
    keys = _key_phrases(response)
    candidates = keys + [n for key in keys for n in extract_numbers(key)]
    return list({v: None for c in candidates for v in normalize(c)})


def eval_multi_choice(gold: str | list[str], pred: str) -> bool:
    return pred in gold if isinstance(gold, list) else pred == gold


def eval_open(gold: str | list[str], preds: list[str | float]) -> bool:
    """A number must equal a gold number; a string must contain a gold string."""
    answers = [v for g in (gold if isinstance(gold, list) else [gold]) for v in normalize(g)]
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(a, str) and a in pred for a in answers):
                return True
        elif pred in answers:
            return True
    return False


def subject_of(sample_id: str) -> str:
    """`validation_Art_Theory_12` -> `Art_Theory`."""
    return "_".join(sample_id.split("_")[1:-1])


def judge(record: dict[str, Any]) -> bool:
    """Whether one saved answer (`pred_ans`, `ground_truth`, `question_type`) is right."""
    if record["question_type"] == "multiple-choice":
        return eval_multi_choice(record["ground_truth"], record["pred_ans"])
    return eval_open(record["ground_truth"], parse_open(record["pred_ans"]))


def score(answers: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Accuracy per subject, per discipline (`Overall-<discipline>`) and `Overall`, each as {'acc', 'num'} with
    accuracies rounded to 3 places. Sets `judge` ('Correct' / 'Wrong') on each answer record."""
    per_subject: dict[str, list[bool]] = {}
    for sample_id, record in answers.items():
        ok = judge(record)
        record["judge"] = "Correct" if ok else "Wrong"
        per_subject.setdefault(subject_of(sample_id), []).append(ok)
    results: dict[str, dict[str, float | int]] = {}
    for discipline, subjects in DISCIPLINES.items():
        verdicts = [v for s in subjects for v in per_subject.get(s, [])]
        results[f"Overall-{discipline}"] = {"num": len(verdicts), "acc": _acc(verdicts)}
        for s in subjects:
            if s in per_subject:
                results[s] = {"num": len(per_subject[s]), "acc": _acc(per_subject[s])}
    known = [v for s, vs in per_subject.items() if s in SUBJECTS for v in vs]
    results["Overall"] = {"num": len(known), "acc": _acc(known)}
    return results


def _acc(verdicts: list[bool]) -> float:
    return round(sum(verdicts) / len(verdicts), 3) if verdicts else 0
