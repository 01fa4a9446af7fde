"""MMMU prompt building, answer parsing and scoring: the official/SGLang rules, quirks included."""

import random

import pytest

from stepserve.bench.mmmu_scoring import (build_prompt, eval_open, interleave_images, normalize, parse_multi_choice,
                                          parse_open, parse_options, score, strip_think)

LETTERS = {"A": "red apple", "B": "blue sky", "C": "green grass", "D": "yellow sun"}


@pytest.mark.parametrize("response, expected", [
    ("B", "B"),
    ("(C)", "C"),
    ("The answer is (A) not (D).", "D"),                # several bracketed letters: the last one mentioned
    ("(A) and B", "A"),                                 # a bracketed letter beats a bare one
    ("A, B", "B"),                                      # " A," is not a bare letter, " B " is
    ("Answer: C.", "C"),
    ("'B'", "B"),                                       # surrounding punctuation stripped
    ("I think the sky is blue sky clearly", "B"),       # > 5 words: the option's text counts
    ("green grass is nicer than a red apple today", "A"),  # several texts: the last one mentioned
])
def test_multi_choice_parsing(response, expected):
    assert parse_multi_choice(response, LETTERS, random.Random(0)) == expected


def test_multi_choice_guess_is_seeded():
    short = "no idea"                                    # <= 5 words, no letter: a seeded random letter
    guesses = {parse_multi_choice(short, LETTERS, random.Random("1:q7")) for _ in range(5)}
    assert len(guesses) == 1 and guesses <= set(LETTERS)
    assert parse_multi_choice("the sky is blue sky", LETTERS, random.Random(3)) in LETTERS   # too short for text


def test_normalize():
    assert normalize(" 1,234.567 ") == [1234.57]
    assert normalize("Paris") == ["paris"]
    assert normalize("C") == [" c", "c "]


@pytest.mark.parametrize("response, gold, correct", [
    ("The answer is 42.", "42", True),
    ("The answer is 42.", "41.999", True),              # numbers compare after rounding to 2 places
    ("The answer is 42.", "43", False),
    ("so the total = 1,234", "1234", True),
    ("so the total = 1,234", "234", True),              # "234" is also extracted from "1,234" (official quirk)
    ("It is Paris", "Paris", True),
    ("It is Paris", "Par", True),                       # string golds match as substrings
    ("It is Paris", "London", False),
    ("c", "C", True),
    ("abc", "C", False),                                # single characters only match as words
    ("First compute 3 + 4.\nThus the result is 7", "7", True),
    ("First compute 3 + 4.\nThus the result is 7", "4", False),
])
def test_open_answers(response, gold, correct):
    assert eval_open(gold, parse_open(response)) is correct


def test_open_key_phrases():
    assert sorted(parse_open("so the total = 1,234")) == [234.0, 1234.0]
    assert parse_open("answer is \nfoo") == ["is"]      # an empty tail is replaced by the next indicator's
    assert parse_open("no indicator here") == ["no indicator here"]


def test_prompts():
    prompt, letters = build_prompt("What is <image 1>?", ["cat", "dog"], "multiple-choice")
    assert prompt == ("What is <image 1>?\n(A) cat\n(B) dog\n\n"
                      "Answer with the option's letter from the given choices directly.")
    assert letters == {"A": "cat", "B": "dog"}
    assert build_prompt("How many?", [], "open") == ("How many?\nAnswer the question using a single word or phrase.", {})
    assert parse_options("['1', \"it's 2\"]") == ["1", "it's 2"]


def test_interleave_images():
    img = lambda n: {"type": "image_url", "image_url": {"url": f"u{n}"}}   # noqa: E731
    txt = lambda t: {"type": "text", "text": t}                           # noqa: E731
    assert interleave_images("Look <image 1> and <image 2> now", ["u1", "u2"]) == \
        [txt("Look "), img(1), txt(" and "), img(2), txt(" now")]
    assert interleave_images("<image 1> what?", ["u1"]) == [img(1), txt(" what?")]
    assert interleave_images("no tag", ["u1"]) == [txt("no tag"), img(1)]
    assert interleave_images("<image 1> <image 2>", ["u1"]) == [img(1), txt(" ")]


def test_strip_think():
    assert strip_think("<think>hmm (A)</think>\n\nB") == "B"
    assert strip_think("B") == "B" and strip_think(None) is None


def test_score_groups_by_subject_and_discipline():
    mc = lambda pred, gold: {"pred_ans": pred, "ground_truth": gold, "question_type": "multiple-choice"}  # noqa: E731
    answers = {
        "validation_Art_1": mc("A", "A"), "validation_Art_2": mc("B", "A"), "validation_Art_3": mc("C", "C"),
        "validation_Art_Theory_1": mc("D", "D"),
        "validation_Math_1": {"pred_ans": "x = 7", "ground_truth": "7", "question_type": "open"},
        "validation_Math_2": {"pred_ans": "8", "ground_truth": "7", "question_type": "open"},
        "validation_Unknown_1": mc("A", "A"),
    }
    results = score(answers)
    assert results["Art"] == {"num": 3, "acc": 0.667}
    assert results["Art_Theory"] == {"num": 1, "acc": 1.0}
    assert results["Math"] == {"num": 2, "acc": 0.5}
    assert results["Overall-Art and Design"] == {"num": 4, "acc": 0.75}
    assert results["Overall-Science"] == {"num": 2, "acc": 0.5}
    assert results["Overall-Business"] == {"num": 0, "acc": 0}
    assert results["Overall"] == {"num": 6, "acc": 0.667}    # unknown subjects are not counted
    assert "Unknown" not in results
    assert answers["validation_Art_2"]["judge"] == "Wrong" and answers["validation_Math_1"]["judge"] == "Correct"
