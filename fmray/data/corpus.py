"""Deterministic synthetic pretraining corpus about a small world of people and numbers.

    python -c "from fmray.data.corpus import generate_corpus; print(generate_corpus(3)[0])"

Each person has fixed facts (city, job, pet, colour, age), so the text is predictable from
context: a model that learns the world drives its loss far below the unigram entropy. Later
stages (SFT questions, reward pairs) ask about the same world, so pretraining knowledge carries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = [
    "Alice",
    "Bruno",
    "Chloe",
    "Daniel",
    "Emma",
    "Felix",
    "Grace",
    "Hugo",
    "Iris",
    "Jonas",
    "Kira",
    "Liam",
    "Maya",
    "Nora",
    "Oscar",
    "Paula",
    "Quinn",
    "Rosa",
    "Simon",
    "Tara",
    "Umar",
    "Vera",
    "Walter",
    "Xenia",
    "Yusuf",
    "Zoe",
    "Anton",
    "Bella",
    "Carl",
    "Dora",
]
CITIES = [
    "Paris",
    "Lima",
    "Oslo",
    "Cairo",
    "Tokyo",
    "Quito",
    "Rome",
    "Dakar",
    "Hanoi",
    "Perth",
    "Berlin",
    "Madrid",
]
JOBS = ["baker", "doctor", "pilot", "farmer", "teacher", "painter", "sailor", "miner", "singer"]
ANIMALS = ["cat", "dog", "horse", "parrot", "rabbit", "turtle", "goat", "owl"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    pet: str
    colour: str
    age: int


def build_world(seed: int = 0) -> list[Person]:
    """The fixed world: every person's facts, a pure function of the seed."""
    rng = random.Random(f"world-{seed}")
    return [
        Person(
            name=name,
            city=rng.choice(CITIES),
            job=rng.choice(JOBS),
            pet=rng.choice(ANIMALS),
            colour=rng.choice(COLOURS),
            age=rng.randint(18, 80),
        )
        for name in NAMES
    ]


def person_sentences(person: Person) -> list[str]:
    return [
        f"{person.name} lives in {person.city}.",
        f"{person.name} works as a {person.job}.",
        f"{person.name} has a {person.colour} {person.pet}.",
        f"{person.name} is {person.age} years old.",
    ]


def arithmetic_sentence(rng: random.Random) -> str:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    if rng.random() < 0.5:
        return f"{a} plus {b} is {a + b}."
    hi, lo = max(a, b), min(a, b)
    return f"{hi} minus {lo} is {hi - lo}."


def counting_sentence(rng: random.Random) -> str:
    start = rng.randint(0, 5)
    return "Counting: " + " ".join(NUMBER_WORDS[start : start + rng.randint(3, 5)]) + "."


def generate_document(world: list[Person], rng: random.Random) -> str:
    """A few paragraphs: facts about 1-3 people in shuffled order, sums and counting."""
    sentences: list[str] = []
    for person in rng.sample(world, rng.randint(1, 3)):
        facts = person_sentences(person)
        rng.shuffle(facts)
        sentences.extend(facts[: rng.randint(2, 4)])
    for _ in range(rng.randint(1, 3)):
        sentences.append(arithmetic_sentence(rng))
    if rng.random() < 0.3:
        sentences.append(counting_sentence(rng))
    return " ".join(sentences)


def generate_corpus(num_documents: int, seed: int = 0) -> list[str]:
    """`num_documents` documents; identical for identical (num_documents, seed)."""
    world = build_world(seed)
    rng = random.Random(f"corpus-{seed}")
    return [generate_document(world, rng) for _ in range(num_documents)]
