"""The repository speaks of the product only: no tracked text file (docs, comments, messages,
test names) tells how the project was developed. This file holds the word list and is the one
file allowed to contain it."""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Case-insensitive. Each pattern names a way text tells the project's history instead of what
# the product does; words the product uses in its own sense ("pytest session", "rounding",
# "the previous checkpoint") are not matched.
PATTERNS = [
    r"(?<!scope=\")\bsessions?\b",
    r"\blent\b|\bborrow(ed|ing)?\b|\bloans?\b",
    r"\bissues?\b|\btickets?\b|\bpull requests?\b",
    r"\breview(s|ed|er|ers)?\b|\bmends?\b",
    r"\b(previous|earlier|last|next|first|second|third|fourth|fifth|sixth) (round|submission)s?\b",
    r"\brounds? of (work|review)\b",
    r"\blanded\b",
    r"\bhelpers?\b",
    r"\bthe lead\b",
    r"\bpreviously\b|\bnow fixed\b|\bno longer\b",
    r"\bwork ?logs?\b|\bthrowaway\b|\bworkplace\b",
    r"\bagents?\b",
]
WORDS = re.compile("|".join(f"(?:{p})" for p in PATTERNS), re.IGNORECASE)


def tracked_text_files() -> list[str]:
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    return [n.decode() for n in names if n]


def hits(text: str) -> list[tuple[int, str]]:
    return [
        (number, match.group(0))
        for number, line in enumerate(text.splitlines(), 1)
        for match in WORDS.finditer(line)
    ]


@pytest.mark.parametrize(
    "line, found",
    [
        ("A review of the change found it.", ["review"]),
        ("No GPU was lent to this session.", ["lent", "session"]),
        ("the issue's target is two minutes", ["issue"]),
        ("as the previous round did", ["previous round"]),
        ("guided runs amplify rounding; a round trip", []),
        ('@pytest.fixture(scope="session")', []),
        ("a kill leaves the previous checkpoint whole", []),
    ],
)
def test_the_word_list_catches_history_and_spares_product_words(line, found):
    assert [word.lower() for _, word in hits(line)] == found


def test_no_tracked_text_tells_how_the_project_was_developed():
    own = os.path.relpath(__file__, ROOT)
    found = []
    for name in tracked_text_files():
        if name == own or not os.path.isfile(os.path.join(ROOT, name)):
            continue
        with open(os.path.join(ROOT, name), "rb") as f:
            data = f.read()
        if b"\0" in data:
            continue  # binary (weights, images)
        text = data.decode("utf-8", errors="replace")
        found += [f"{name}:{number}: {word}" for number, word in hits(text)]
    assert not found, "development history in the repository:\n" + "\n".join(found)
