"""Bundled tasks for a real model, generated here: `python -m workloads.bundled.make_tasks` rewrites the files.

Four short tasks with verifiable answers, each as alpaca rows (`instruction`, `input`, `output`, plus the task's
own fields) in `<task>_{train,dev,test}.jsonl`:
- `json_extraction`: a sentence about a person -> `{"name": ..., "age": ...}` (strict JSON);
- `sentiment`: a short product review -> `positive` or `negative`;
- `word_problems`: a one-step word problem (add or take away) -> a worked line ending in the number;
- `addition`: two 2-digit numbers -> `a + b = s`.
`sentiment_preference_{train,test}.jsonl` holds the sentiment rows as preference pairs (the right label chosen, the
other rejected) for reward models and DPO. The splits share no entity (names, products, objects, operand pairs) and
no sentence template, so a few-shot demonstration or a fine-tune on train says nothing about a test item's
particulars.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SPLITS = {"train": 600, "dev": 100, "test": 200}
SEEDS = {"train": 0, "dev": 1, "test": 2}
TASKS = ("json_extraction", "sentiment", "word_problems", "addition")
INSTRUCTIONS = {
    "json_extraction": 'Extract the person\'s name and age from the text as JSON: {"name": "...", "age": N}.',
    "sentiment": "Is this review positive or negative? Answer with one word: positive or negative.",
    "word_problems": "Solve the problem.",
    "addition": "Add the two numbers.",
}

_FIRST = ["Maria", "James", "Aisha", "Lukas", "Chen", "Priya", "Diego", "Hannah", "Omar", "Sofia", "Kenji", "Elena",
          "Tomas", "Fatima", "Noah", "Ingrid", "Rafael", "Mei", "Samuel", "Zara", "Viktor", "Lucia", "Arjun", "Nora",
          "Mateo", "Amara", "Felix", "Yuki", "Hugo", "Leila", "Oscar", "Clara", "Idris", "Freya", "Marco", "Anya"]
_LAST = ["Lopez", "Carter", "Okafor", "Berg", "Wang", "Sharma", "Alvarez", "Fischer", "Haddad", "Rossi", "Tanaka",
         "Petrova", "Novak", "Rahman", "Walsh", "Larsen", "Costa", "Lin", "Mensah", "Khan", "Horvat", "Moreau",
         "Iyer", "Dalton", "Silva", "Nwosu", "Weber", "Sato", "Dubois", "Nasser", "Lund", "Meyer", "Bello", "Holm"]
_JOBS = ["teacher", "nurse", "baker", "pilot", "chemist", "carpenter", "librarian", "engineer", "florist", "lawyer",
         "plumber", "architect", "dentist", "farmer", "translator", "mechanic", "designer", "editor"]
_CITIES = ["Porto", "Leeds", "Osaka", "Lyon", "Cork", "Graz", "Malmo", "Quito", "Perth", "Accra", "Bergen", "Turin",
           "Austin", "Kyoto", "Riga", "Dakar", "Hobart", "Split"]
_PERSON_TEMPLATES = {
    "train": ["{name} is {age} years old and works as a {job} in {city}.",
              "Meet {name}, a {age}-year-old {job} from {city}.",
              "{name} turned {age} this year and still lives in {city}."],
    "dev": ["At {age}, {name} already runs a small shop in {city}.",
            "{name} ({age}) has been a {job} for most of their life."],
    "test": ["{name}, aged {age}, moved to {city} last spring to work as a {job}.",
             "Our new {job}, {name}, is {age} and grew up near {city}.",
             "Born {age} years ago in {city}, {name} now works as a {job}."],
}

_PRODUCTS = ["blender", "backpack", "desk lamp", "phone case", "kettle", "keyboard", "rain jacket", "water bottle",
             "toaster", "headphones", "yoga mat", "coffee grinder", "umbrella", "office chair", "frying pan", "charger",
             "sleeping bag", "alarm clock", "hair dryer", "notebook", "bike helmet", "suitcase", "desk fan", "mouse"]
_POSITIVE = ["works perfectly and feels sturdy", "exceeded my expectations", "is worth every penny",
             "arrived quickly and works great", "is the best purchase I made this year", "does exactly what I needed",
             "is beautifully made and easy to use", "still works like new after months"]
_NEGATIVE = ["broke after two days", "is a complete waste of money", "stopped working within a week",
             "feels cheap and flimsy", "arrived damaged and support never answered", "is far worse than described",
             "was so disappointing that I returned it", "makes an awful noise and overheats"]
_REVIEW_TEMPLATES = {
    "train": ["This {product} {phrase}.", "I bought the {product} last month and it {phrase}.",
              "Review of the {product}: it {phrase}.", "The {product} I ordered {phrase}."],
    "dev": ["My new {product} {phrase}!", "So, this {product} {phrase}."],
    "test": ["Honestly, the {product} {phrase}.", "Got this {product} as a gift; it {phrase}.",
             "Two words about the {product}: it {phrase}."],
}

_OBJECTS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells", "coins", "cards",
            "balloons", "candles", "buttons", "postcards", "oranges", "crayons", "tickets", "plums"]
_PROBLEM_TEMPLATES = {
    "train": [("add", "{name} has {a} {obj}. {name} gets {b} more. How many {obj} does {name} have now?"),
              ("sub", "{name} had {a} {obj} and gave {b} away. How many {obj} are left?")],
    "dev": [("add", "A box holds {a} {obj}. Someone adds {b}. How many {obj} are in the box?"),
            ("sub", "There were {a} {obj} on the table; {b} were taken. How many remain?")],
    "test": [("add", "{name} collected {a} {obj} on Monday and {b} on Tuesday. How many {obj} in total?"),
             ("sub", "{name} bought {a} {obj} and used {b} of them. How many {obj} does {name} still have?"),
             ("add", "In a jar there are {a} {obj}, and {name} puts in {b} more. How many {obj} are in the jar?")],
}


def _partition(items: list[str], seed: int) -> dict[str, list[str]]:
    """Split a pool three ways (train half, dev and test a quarter each) in a seeded order: no item in two splits."""
    shuffled = random.Random(seed).sample(items, len(items))
    quarter = len(items) // 4
    return {"train": shuffled[:2 * quarter], "dev": shuffled[2 * quarter:3 * quarter], "test": shuffled[3 * quarter:]}


def _person(rng: random.Random, split: str, pools: dict) -> dict:
    name = f"{rng.choice(pools['first'][split])} {rng.choice(pools['last'][split])}"
    age = rng.randrange(19, 86)
    text = rng.choice(_PERSON_TEMPLATES[split]).format(name=name, age=age, job=rng.choice(_JOBS),
                                                       city=rng.choice(_CITIES))
    answer = json.dumps({"name": name, "age": age})
    return {"input": text, "output": answer, "name": name, "age": age}


def _review(rng: random.Random, split: str, pools: dict) -> dict:
    label = rng.choice(["positive", "negative"])
    phrase = rng.choice(_POSITIVE if label == "positive" else _NEGATIVE)
    text = rng.choice(_REVIEW_TEMPLATES[split]).format(product=rng.choice(pools["products"][split]), phrase=phrase)
    return {"input": text, "output": label, "label": label}


def _problem(rng: random.Random, split: str, pools: dict) -> dict:
    op, template = rng.choice(_PROBLEM_TEMPLATES[split])
    a, b = rng.randrange(10, 90), rng.randrange(2, 40)
    if op == "sub":
        a, b = max(a, b + 1), min(a, b)
    answer = a + b if op == "add" else a - b
    name = rng.choice(pools["first"][split])
    text = template.format(name=name, a=a, b=b, obj=rng.choice(pools["objects"][split]))
    work = f"{a} + {b} = {answer}" if op == "add" else f"{a} - {b} = {answer}"
    return {"input": text, "output": f"{work}. The answer is {answer}.", "answer": answer}


def _additions(n: int, rng: random.Random, taken: set[tuple[int, int]]) -> list[dict]:
    rows = []
    while len(rows) < n:
        pair = (rng.randrange(10, 100), rng.randrange(10, 100))
        if pair not in taken:
            taken.add(pair)
            rows.append({"input": f"{pair[0]} + {pair[1]}", "output": f"{pair[0]} + {pair[1]} = {sum(pair)}",
                         "answer": sum(pair)})
    return rows


def generate() -> dict[str, dict[str, list[dict]]]:
    """Every task's rows per split, deterministic: the same call writes the same files."""
    pools = {"first": _partition(_FIRST, 10), "last": _partition(_LAST, 11), "products": _partition(_PRODUCTS, 12),
             "objects": _partition(_OBJECTS, 13)}
    makers = {"json_extraction": _person, "sentiment": _review, "word_problems": _problem}
    out: dict[str, dict[str, list[dict]]] = {task: {} for task in TASKS}
    taken: set[tuple[int, int]] = set()
    for split, n in SPLITS.items():
        rng = random.Random(SEEDS[split])
        for task, make in makers.items():
            rows, seen = [], set()
            while len(rows) < n:  # distinct inputs within a split
                row = make(rng, split, pools)
                if row["input"] not in seen:
                    seen.add(row["input"])
                    rows.append(row)
            out[task][split] = rows
        out["addition"][split] = _additions(n, rng, taken)
    for task in TASKS:
        for rows in out[task].values():
            for row in rows:
                row["instruction"] = INSTRUCTIONS[task]
    return out


def task_path(task: str, split: str) -> Path:
    return HERE / f"{task}_{split}.jsonl"


def preference_pairs(rows: list[dict]) -> list[dict]:
    """Sentiment rows as DPO / reward-model pairs: the question, the right label chosen, the other rejected."""
    other = {"positive": "negative", "negative": "positive"}
    return [{"prompt": [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}],
             "chosen": [{"role": "assistant", "content": r["label"]}],
             "rejected": [{"role": "assistant", "content": other[r["label"]]}]} for r in rows]


def preference_path(split: str) -> Path:
    return HERE / f"sentiment_preference_{split}.jsonl"


def main() -> None:
    for task, splits in generate().items():
        for split, rows in splits.items():
            lines = [json.dumps({"instruction": r["instruction"], **{k: v for k, v in r.items() if k != "instruction"}})
                     for r in rows]
            task_path(task, split).write_text("\n".join(lines) + "\n")
            print(f"{task_path(task, split).name}: {len(rows)} rows")
            if task == "sentiment" and split != "dev":
                pairs = preference_pairs(rows)
                preference_path(split).write_text("".join(json.dumps(p) + "\n" for p in pairs))
                print(f"{preference_path(split).name}: {len(pairs)} pairs")


if __name__ == "__main__":
    main()
