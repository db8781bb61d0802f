"""Built-in instruction task: questions about the synthetic world, and small arithmetic.

    python -m fmray.data.instructions --out data/instructions     # train.jsonl + heldout.jsonl
    python -c "from fmray.data.instructions import build_task; print(build_task().train[:3])"

The world is the one the pretraining corpus describes (`fmray.data.corpus.build_world`): asked
"Where does Alice live?", the model should answer "Alice lives in Paris.", and "What is 17 plus
25?" gets "17 plus 25 is 42.". Answers are the corpus's own sentences on purpose: a pretrained
model knows them token for token, so fine-tuning only has to teach it to turn a question into the
statement, and held-out questions measure whether pretraining knowledge carries over (a bare
"Paris" right after the chat header tokenizes differently from " Paris" in running text, and a
tiny model does not bridge that from a few hundred examples). Every answer has ground truth, so
exact match on the held-out split measures what fine-tuning bought. The split is by fact, not by
phrasing: a held-out fact is never asked in training under any wording.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmray.data.corpus import Person, build_world, person_sentences
from fmray.data.split import in_holdout

# fact -> question phrasings, in the order of corpus.person_sentences; every phrasing of a fact
# lands on the same side of the split
QUESTIONS: dict[str, list[str]] = {
    "city": ["Where does {name} live?", "In which city does {name} live?"],
    "job": ["What is {name}'s job?", "What does {name} work as?"],
    "pet": ["What pet does {name} have?", "What colour is the pet of {name}?"],
    "age": ["How old is {name}?", "What is the age of {name}?"],
}


@dataclass(frozen=True)
class Example:
    """One single-turn instruction with its ground-truth answer."""

    prompt: str
    response: str
    key: str
    """Identity of the underlying fact: decides the split, shared by all phrasings."""

    def messages(self) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.response},
        ]


@dataclass(frozen=True)
class InstructionTask:
    train: list[Example]
    heldout: list[Example]


def world_examples(world: list[Person]) -> list[Example]:
    """Every phrasing of every (person, fact) question, answered by the corpus sentence."""
    examples = []
    for person in world:
        facts = zip(QUESTIONS.items(), person_sentences(person), strict=True)
        for (fact, phrasings), sentence in facts:
            for phrasing in phrasings:
                prompt = phrasing.format(name=person.name)
                examples.append(Example(prompt, sentence, f"{person.name}:{fact}"))
    return examples


def arithmetic_examples(num_examples: int, rng: random.Random) -> list[Example]:
    """Distinct sums and differences of numbers up to 50 (as in the corpus sentences)."""
    examples: dict[str, Example] = {}
    while len(examples) < num_examples:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        if rng.random() < 0.5:
            question, answer = f"{a} plus {b}", a + b
        else:
            question, answer = f"{max(a, b)} minus {min(a, b)}", max(a, b) - min(a, b)
        prompt = f"What is {question}?"
        examples[prompt] = Example(prompt, f"{question} is {answer}.", prompt)
    return list(examples.values())


def build_task(
    seed: int = 0, num_arithmetic: int = 150, heldout_fraction: float = 0.2
) -> InstructionTask:
    """The task for world `seed`: identical for identical arguments, shuffled by the seed."""
    rng = random.Random(f"instructions-{seed}")
    examples = world_examples(build_world(seed)) + arithmetic_examples(num_arithmetic, rng)
    rng.shuffle(examples)
    train = [e for e in examples if not in_holdout(e.key, heldout_fraction)]
    heldout = [e for e in examples if in_holdout(e.key, heldout_fraction)]
    return InstructionTask(train=train, heldout=heldout)


def write_jsonl(examples: list[Example], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for example in examples:
            record: dict[str, Any] = {"messages": example.messages()}
            f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write the built-in instruction task as jsonl")
    parser.add_argument("--out", default="data/instructions", help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-arithmetic", type=int, default=150)
    args = parser.parse_args(argv)
    task = build_task(args.seed, args.num_arithmetic)
    out = Path(args.out)
    write_jsonl(task.train, out / "train.jsonl")
    write_jsonl(task.heldout, out / "heldout.jsonl")
    print(f"[fmray] {len(task.train)} train / {len(task.heldout)} held-out examples -> {out}")


if __name__ == "__main__":
    main()
