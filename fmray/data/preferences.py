"""Built-in preference pairs: the instruction task's correct answers over plausible wrong ones.

    python -m fmray.data.preferences --out data/preferences     # train.jsonl + heldout.jsonl
    python -c "from fmray.data.preferences import build_pairs; print(build_pairs()[0][:2])"

Every question of `fmray.data.instructions` yields two pairs whose chosen reply is its correct
answer, one against each kind of wrong reply:
  - a well-formed sentence with a wrong fact: another person's city, job or pet, an age off by
    a few years, a sum or difference off by a few;
  - a malformed reply: the sentence cut short, its words shuffled, or a word repeated.
The split is the instruction task's, by fact: pairs about a held-out fact never appear in
training, so held-out accuracy measures what a reward model or DPO learned, not what it saw.
Records are written in the TRL / OpenRLHF format: {"prompt", "chosen", "rejected"}.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from fmray.data.corpus import Person, build_world, person_sentences
from fmray.data.instructions import QUESTIONS, Example, build_task

FACT_INDEX = {fact: index for index, fact in enumerate(QUESTIONS)}


@dataclass(frozen=True)
class BuiltinPair:
    prompt: str
    chosen: str
    rejected: str
    kind: str
    """wrong_fact or malformed."""

    def record(self) -> dict[str, str]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


def wrong_fact(example: Example, world: dict[str, Person], rng: random.Random) -> str:
    """The example's answer with its fact replaced by a plausible wrong one."""
    name, sep, fact = example.key.partition(":")
    if not sep:  # arithmetic: "17 plus 25 is 42." -> off by 1-5, never negative
        statement, _, number = example.response.rstrip(".").rpartition(" is ")
        value = int(number)
        wrong = value + rng.choice(
            [d for d in (-5, -4, -3, -2, -1, 1, 2, 3, 4, 5) if value + d >= 0]
        )
        return f"{statement} is {wrong}."
    person = world[name]
    others = [p for p in world.values() if p.name != name]
    if fact == "age":
        changed = replace(person, age=person.age + rng.choice([-7, -5, -3, -2, 2, 3, 5, 7]))
    elif fact == "pet":
        other = rng.choice([p for p in others if (p.pet, p.colour) != (person.pet, person.colour)])
        field = rng.choice(["pet", "colour"]) if other.pet != person.pet else "colour"
        if getattr(other, field) == getattr(person, field):
            field = "pet" if field == "colour" else "colour"
        changed = replace(person, **{field: getattr(other, field)})
    else:  # city or job: another person's
        other = rng.choice([p for p in others if getattr(p, fact) != getattr(person, fact)])
        changed = replace(person, **{fact: getattr(other, fact)})
    return person_sentences(changed)[FACT_INDEX[fact]]


def malformed(answer: str, rng: random.Random) -> str:
    """The answer cut short, its words shuffled, or a word repeated."""
    words = answer.rstrip(".").split()
    kind = rng.choice(["cut", "shuffle", "repeat"])
    if kind == "cut":
        return " ".join(words[: rng.randint(1, len(words) - 1)])
    if kind == "shuffle":
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        return " ".join(shuffled) + "."
    at = rng.randrange(len(words))
    return " ".join(words[: at + 1] + [words[at]] * rng.randint(1, 2) + words[at + 1 :]) + "."


def pairs_of(
    examples: list[Example], world: dict[str, Person], rng: random.Random
) -> list[BuiltinPair]:
    pairs = []
    for example in examples:
        answer = example.response
        pairs.append(
            BuiltinPair(example.prompt, answer, wrong_fact(example, world, rng), "wrong_fact")
        )
        pairs.append(BuiltinPair(example.prompt, answer, malformed(answer, rng), "malformed"))
    return pairs


def build_pairs(
    seed: int = 0, num_arithmetic: int = 150, heldout_fraction: float = 0.2
) -> tuple[list[BuiltinPair], list[BuiltinPair]]:
    """(train, held-out) pairs for world `seed`, split by fact as the instruction task is."""
    task = build_task(seed, num_arithmetic, heldout_fraction)
    world = {person.name: person for person in build_world(seed)}
    rng = random.Random(f"preferences-{seed}")
    return pairs_of(task.train, world, rng), pairs_of(task.heldout, world, rng)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write the built-in preference pairs as jsonl")
    parser.add_argument("--out", default="data/preferences", help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-arithmetic", type=int, default=150)
    args = parser.parse_args(argv)
    train, heldout = build_pairs(args.seed, args.num_arithmetic)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, pairs in (("train", train), ("heldout", heldout)):
        lines = [json.dumps(pair.record()) + "\n" for pair in pairs]
        (out / f"{name}.jsonl").write_text("".join(lines))
    print(f"[fmray] {len(train)} train / {len(heldout)} held-out preference pairs -> {out}")


if __name__ == "__main__":
    main()
