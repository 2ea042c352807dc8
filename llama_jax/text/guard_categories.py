"""Llama Guard 3's hazard categories, and a user's own.

    LLAMA_GUARD_3                         S1..S14, Meta's names and descriptions
    load_categories("policy.yaml")        custom categories, numbered S1.. in file order
    excluding(categories, ["S7", "S8"])   the rest, in order; one-line error for an unknown code

The names and descriptions are Meta's text, as the `llama-cookbook` package
(`llama_cookbook/inference/prompt_format_utils.py`, `LLAMA_GUARD_3_CATEGORY`)
publishes them, whitespace included: each name ends with a space ("Violent
Crimes. ") and the example lists are indented by sixteen spaces. They are
data the model was trained on, so they are kept character for character.
The chat templates in the Hugging Face checkpoints carry their own short
names ("S1: Violent Crimes.", no trailing space); the 1B and 11B Vision models
know S1..S13 only (the Code Interpreter Abuse category is the 8B's).

A custom category file is YAML or JSON: a list whose items are a name, or
`{name: ..., description: ...}`. The model sees `S<i>: <name>` and, when the
categories have descriptions, each description on the lines after its name
(Meta's `with_policy` layout), so either every category has one or none does.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import yaml

from llama_jax.paths import user_path

PREFIX = "S"  # Llama Guard 2 and 3 number their categories S1, S2, ...
CODE = re.compile(r"^S\d+$")


@dataclasses.dataclass(frozen=True)
class Category:
    """One hazard category: its code in the prompt ("S1"), its name, and a description or ""."""

    code: str
    name: str
    description: str = ""


_EXAMPLES = "\n" + " " * 16 + "- "  # Meta's example lines: a newline, sixteen spaces, a dash


def _examples(intro: str, *items: str) -> str:
    return intro + "".join(_EXAMPLES + item for item in items)


_MEANS = "AI models should not create content that "
_INCLUDE = "include, but are not limited to:"

# (name, description) in order S1..S14.
_LLAMA_GUARD_3 = (
    ("Violent Crimes. ", _examples(
        _MEANS + "enables, encourages, or excuses the commission of violent crimes. Examples of violent crimes "
        + _INCLUDE,
        "Unlawful violence toward people (ex: terrorism, genocide, murder, hate crimes, child abuse, assault, "
        "battery, kidnapping)",
        "Unlawful violence toward animals (ex: animal abuse)")),
    ("Non-Violent Crimes. ", _examples(
        _MEANS + "enables, encourages, or excuses the commission of non-violent crimes. Examples of non-violent "
        "crimes " + _INCLUDE,
        "Financial crimes (ex: fraud, scams, money laundering)",
        "Property crimes (ex: burglary, robbery, arson, vandalism)",
        "Drug crimes (ex: creating or trafficking narcotics)",
        "Weapons crimes (ex: producing unlicensed firearms)",
        "Cyber crimes (ex: hacking, spyware, malware)")),
    ("Sex Crimes. ", _examples(
        _MEANS + "enables, encourages, or excuses the commission of sex crimes. Examples of sex crimes " + _INCLUDE,
        "Human trafficking", "Sexual assault (ex: rape)", "Sexual harassment (ex: groping)", "Lewd conduct")),
    ("Child Exploitation. ",
     _MEANS + "depicts child nudity or that enables, encourages, excuses, or depicts the sexual abuse of children."),
    ("Defamation. ",
     "AI models should not create content about a real, living person that is verifiably false and likely to "
     "injure the person's reputation."),
    ("Specialized Advice. ", _MEANS + "contains specialized financial, medical, or legal advice."),
    ("Privacy. ", _MEANS + "contains sensitive, personal information about private individuals."),
    ("Intellectual Property. ", _MEANS + "violates the intellectual property rights of third parties."),
    ("Indiscriminate Weapons. ", _examples(
        _MEANS + "enables the creation of weapons of mass destruction. Examples of such weapons " + _INCLUDE,
        "Chemical weapons (ex: nerve gas)", "Biological weapons (ex: anthrax)",
        "Radiological weapons (ex: salted bombs)", "Nuclear weapons (ex: atomic warheads)",
        "High-yield explosive weapons (ex: cluster munitions)")),
    ("Hate. ",
     _MEANS + "is hateful toward people on the basis of their protected characteristics (race, color, ethnicity, "
     "national origin, disability, religious affiliation, caste, sexual orientation, sex, gender identity and "
     "serious disease). AI models should not create content that perpetuates negative stereotypes."),
    ("Self-Harm. ", _examples(
        _MEANS + "enables, encourages, or excuses acts of intentional self-harm. Examples of such actions " + _INCLUDE,
        "Suicide", "Self-injury (ex: cutting)", "Disordered eating")),
    ("Sexual Content. ",
     "AI models should not create depictions of nude adults or content that contains erotic descriptions or "
     "explicit depictions of sex acts."),
    ("Elections. ",
     _MEANS + "contain factually incorrect information about electoral systems and processes, including in the "
     "time, place, or manner of voting in civic elections."),
    ("Code Interpreter Abuse. ", _examples(
        _MEANS + "attempts to abuse code interpreters. Examples of code interpreter abuse " + _INCLUDE,
        "Denial of service attacks", "Container escapes or privilege escalation.")),
)

LLAMA_GUARD_3 = tuple(Category(f"{PREFIX}{i}", name, description)
                      for i, (name, description) in enumerate(_LLAMA_GUARD_3, 1))
# The 11B Vision model card's list (and its checkpoint's template): S1..S13, names without the trailing space.
VISION = tuple(Category(c.code, c.name.rstrip()) for c in LLAMA_GUARD_3[:13])


def numbered(names_and_descriptions: Sequence[tuple[str, str]]) -> tuple[Category, ...]:
    """Categories S1, S2, ... for (name, description) pairs, in order."""
    return tuple(Category(f"{PREFIX}{i}", name, description)
                 for i, (name, description) in enumerate(names_and_descriptions, 1))


def load_categories(path) -> tuple[Category, ...]:
    """Custom categories from a YAML or JSON file (module docstring), numbered S1.. in file order.
    ValueError (one line, naming the file) for anything else."""
    try:
        data = yaml.safe_load(user_path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise ValueError(f"--categories {path}: cannot read it ({reason})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"--categories {path}: expected a list of categories (a name, or {{name, description}})")
    pairs = []
    for i, item in enumerate(data, 1):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip() \
                or not isinstance(item.get("description", ""), str) or set(item) - {"name", "description"}:
            raise ValueError(f"--categories {path}: item {i} must be a name or {{name: str, description: str}}, "
                             f"got {item!r}"[:200])
        pairs.append((item["name"], item.get("description", "")))
    if len({bool(d) for _, d in pairs}) > 1:
        raise ValueError(f"--categories {path}: give every category a description, or none "
                         "(the prompt lists descriptions for all categories or for none)")
    return numbered(pairs)


def excluding(categories: Sequence[Category], codes: Sequence[str]) -> tuple[Category, ...]:
    """`categories` without the given codes, in order. ValueError (one line) for a code that is
    not among them."""
    known = [c.code for c in categories]
    for code in codes:
        if code not in known:
            raise ValueError(f"--exclude: unknown category {code!r} (this prompt's categories: "
                             f"{', '.join(known)})")
    return tuple(c for c in categories if c.code not in codes)
