"""A small, seeded synthetic world: people, places, pets, jobs, and the rules that link them.

The embedded default model is pretrained on text that *states* this world (facts, rules, arithmetic), and the
embedded downstream tasks ask about it in the LLM-Adapters record format. Because the tasks are only answerable from
what the corpus said, a model that beats chance on them has learned its world.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

LANDS = ["Vessia", "Orlond", "Quamar", "Tilbet"]
CITIES = {
    "Dunmore": "Vessia", "Kelvale": "Vessia", "Ostra": "Vessia",
    "Pelmir": "Orlond", "Brask": "Orlond", "Sorrow Bay": "Orlond",
    "Halden": "Quamar", "Ivory": "Quamar", "Mirefold": "Quamar",
    "Tesk": "Tilbet", "Umber": "Tilbet", "Calloway": "Tilbet",
}
PETS = {  # pet -> what it eats
    "cat": "fish", "dog": "bones", "owl": "mice", "horse": "hay",
    "rabbit": "carrots", "goat": "grass", "parrot": "seeds", "bear": "honey",
}
JOBS = {  # job -> tool
    "baker": "an oven", "smith": "a hammer", "sailor": "a rope", "farmer": "a plough",
    "scribe": "a quill", "healer": "herbs", "hunter": "a bow", "weaver": "a loom",
    "miner": "a pick", "potter": "a wheel",
}
COLORS = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange"]
ITEMS = ["apples", "coins", "books", "stones", "shells", "pears", "cups", "keys"]
_ONSETS = ["k", "t", "m", "r", "s", "v", "l", "n", "d", "b", "p", "z", "h", "j", "f", "g"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "n", "r", "l", "s", "k", "m", "th"]


@dataclass
class Person:
    name: str
    city: str
    pet: str
    job: str
    color: str

    @property
    def land(self) -> str:
        return CITIES[self.city]


@dataclass
class World:
    people: list[Person]
    seed: int
    rng: random.Random = field(repr=False)


def _make_name(rng: random.Random) -> str:
    syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.choice([2, 2, 3]))]
    return "".join(syllables).capitalize()


def build_world(num_people: int = 160, seed: int = 0) -> World:
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < num_people:
        names.add(_make_name(rng))
    people = [
        Person(name, rng.choice(list(CITIES)), rng.choice(list(PETS)), rng.choice(list(JOBS)), rng.choice(COLORS))
        for name in sorted(names)
    ]
    rng.shuffle(people)
    return World(people=people, seed=seed, rng=rng)


# --------------------------------------------------------------------------------------------- corpus

def _fact_sentences(p: Person, rng: random.Random) -> list[str]:
    n = p.name
    return [
        rng.choice([f"{n} lives in {p.city}.", f"{n} is from {p.city}.", f"The home of {n} is {p.city}."]),
        rng.choice([f"{n} has a pet {p.pet}.", f"{n} keeps a {p.pet}.", f"The pet of {n} is a {p.pet}."]),
        rng.choice([f"{n} works as a {p.job}.", f"{n} is a {p.job}.", f"By trade, {n} is a {p.job}."]),
        rng.choice([f"{n} likes the color {p.color}.", f"The favorite color of {n} is {p.color}."]),
        rng.choice([f"Q: Where does {n} live? A: {n} lives in {p.city}.",
                    f"Q: What pet does {n} have? A: {n} has a {p.pet}.",
                    f"Q: What is the job of {n}? A: {n} is a {p.job}.",
                    f"Q: In which land does {n} live? A: {n} lives in {p.land}.",
                    f"Q: What does the pet of {n} eat? A: It eats {PETS[p.pet]}.",
                    f"Q: What tool does {n} use? A: {n} uses {JOBS[p.job]}."]),
    ]


def _rule_sentences(rng: random.Random) -> list[str]:
    out = []
    for city, land in CITIES.items():
        out.append(rng.choice([f"{city} is a town in {land}.", f"The town of {city} lies in {land}."]))
    for pet, food in PETS.items():
        out.append(rng.choice([f"A {pet} eats {food}.", f"Every {pet} likes to eat {food}."]))
    for job, tool in JOBS.items():
        out.append(rng.choice([f"A {job} works with {tool}.", f"Every {job} uses {tool}."]))
    return out


def _arith_sentence(rng: random.Random) -> str:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return rng.choice([f"{a} + {b} = {a + b}.", f"{a} plus {b} is {a + b}."])
    a, b = max(a, b), min(a, b)
    return rng.choice([f"{a} - {b} = {a - b}.", f"{a} minus {b} is {a - b}."])


def _story(p: Person, rng: random.Random) -> str:
    item = rng.choice(ITEMS)
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    if rng.random() < 0.5:
        return f"{p.name} had {a} {item} and got {b} more, so {p.name} had {a} + {b} = {a + b} {item}."
    a, b = max(a, b), min(a, b)
    return f"{p.name} had {a} {item} and gave away {b}, so {p.name} had {a} - {b} = {a - b} {item}."


def _instruction_document(world: World, rng: random.Random) -> str:
    """The Alpaca/LLM-Adapters prompt around an open request for facts: the model meets the template's words (real
    base models have seen instruction-like text), but never the downstream tasks' question or answer formats."""
    from subtune.data.prompts import build_prompt

    p = rng.choice(world.people)
    request = rng.choice([f"Tell me about {p.name}.", f"Describe {p.name}.", f"Write what you know about {p.name}."])
    facts = _fact_sentences(p, rng)[:4]
    rng.shuffle(facts)
    return build_prompt(request) + " ".join(facts[: rng.randint(2, 4)])


def corpus_documents(world: World, num_docs: int, seed: int = 1, instruction_fraction: float = 0.15) -> list[str]:
    """Pretraining documents: shuffled facts about a few people, a rule or two, arithmetic and small stories; a
    fraction are instruction-formatted fact sheets."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        if rng.random() < instruction_fraction:
            docs.append(_instruction_document(world, rng))
            continue
        parts: list[str] = []
        for p in rng.sample(world.people, 3):
            facts = _fact_sentences(p, rng)
            parts.extend(rng.sample(facts, rng.randint(2, len(facts))))
        parts.extend(rng.sample(_rule_sentences(rng), 3))
        parts.extend(_arith_sentence(rng) for _ in range(3))
        parts.append(_story(rng.choice(world.people), rng))
        rng.shuffle(parts)
        docs.append(" ".join(parts))
    return docs


# --------------------------------------------------------------------------------------------- tasks

def _choice_question(p: Person, kind: str) -> tuple[str, str, list[str], str]:
    """(question, answer, candidate pool, the answer sentence in the corpus's own words)."""
    n = p.name
    if kind == "city":
        return f"Where does {n} live?", p.city, list(CITIES), f"{n} lives in {p.city}."
    if kind == "land":
        return f"In which land does {n} live?", p.land, LANDS, f"{n} lives in {p.land}."
    if kind == "pet":
        return f"What pet does {n} have?", p.pet, list(PETS), f"{n} has a {p.pet}."
    if kind == "food":
        return f"What does the pet of {n} eat?", PETS[p.pet], list(PETS.values()), f"It eats {PETS[p.pet]}."
    if kind == "job":
        return f"What is the job of {n}?", p.job, list(JOBS), f"{n} is a {p.job}."
    raise ValueError(kind)


QUESTION_KINDS = ["city", "land", "pet", "food", "job"]


def commonsense_records(world: World, seed: int = 2, num_choices: int = 4) -> list[dict]:
    """One multiple-choice question per (person, kind), LLM-Adapters style (`instruction`/`input`/`output`/`answer`).

    The output answers in the corpus's own words ("Kiro lives in Dunmore."), since a tiny model cannot spell words
    it never saw. `choices` is an extra key (LLM-Adapters readers ignore unknown keys) used for answer extraction.
    """
    rng = random.Random(seed)
    records = []
    for p in world.people:
        for kind in QUESTION_KINDS:
            question, answer, pool, sentence = _choice_question(p, kind)
            distractors = rng.sample([c for c in pool if c != answer], num_choices - 1)
            choices = distractors + [answer]
            rng.shuffle(choices)
            listed = " ".join(f"Answer{i + 1}: {c}" for i, c in enumerate(choices))
            records.append({
                "instruction": f"Please choose the correct answer to the question: {question}\n\n{listed}",
                "input": "",
                "output": sentence,
                "answer": answer,
                "choices": choices,
                "person": p.name,
                "kind": kind,
            })
    return records


def arithmetic_records(world: World, num: int = 1200, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(num):
        p = rng.choice(world.people)
        item = rng.choice(ITEMS)
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        if rng.random() < 0.5:
            q = f"{p.name} has {a} {item}. {p.name} gets {b} more {item}. How many {item} does {p.name} have now?"
            expr, ans = f"{a} + {b}", a + b
        else:
            a, b = max(a, b), min(a, b)
            q = f"{p.name} has {a} {item}. {p.name} gives away {b} {item}. How many {item} does {p.name} have now?"
            expr, ans = f"{a} - {b}", a - b
        # the answer in the corpus's story form: "... so Kiro had 3 + 4 = 7 apples."
        records.append({"instruction": q, "input": "", "output": f"{p.name} has {expr} = {ans} {item}.",
                        "answer": str(ans)})
    return records


def split_records(records: list[dict], test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    shuffled = records[:]
    rng.shuffle(shuffled)
    n_test = int(len(shuffled) * test_fraction)
    return shuffled[n_test:], shuffled[:n_test]
