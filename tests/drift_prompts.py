"""Two clearly different streams of prompts for drift tests: kitchen questions and Python
debugging questions, each varied from seeded templates."""

from __future__ import annotations

import random

_KITCHEN = (
    ["How long should I {v} {f} {m}?", "What goes well with {f} when I {v} it {m}?",
     "Can I {v} frozen {f} {m}, and does it change the taste?",
     "My {f} came out dry when I tried to {v} it {m}. What did I do wrong?",
     "Which spices suit {f} if I {v} it {m}?"],
    {"v": ["roast", "grill", "bake", "braise", "poach", "steam", "fry", "stew"],
     "f": ["chicken thighs", "salmon", "potatoes", "carrots", "lamb shoulder", "tofu",
           "aubergine", "pork belly", "mushrooms", "cauliflower", "beef brisket", "cod"],
     "m": ["in the oven", "on a cast iron pan", "for a family dinner", "over charcoal",
           "in a slow cooker", "with garlic and butter", "for meal prep", "at low heat"]})
_PYTHON = (
    ["Why does my Python {t} raise {e} when I {a}?",
     "How do I fix {e} in a {t} that tries to {a}?",
     "My {t} fails with {e} after I {a}. What is the cause?",
     "Is there a cleaner way to {a} in a {t} without getting {e}?",
     "What does {e} mean when a {t} tries to {a}?"],
    {"t": ["asyncio task", "list comprehension", "dataclass", "pandas script", "unit test",
           "Flask view", "generator function", "class method", "multiprocessing pool",
           "decorator", "context manager", "SQLAlchemy query"],
     "e": ["KeyError", "TypeError", "AttributeError", "RecursionError", "ImportError",
           "ValueError", "IndexError", "UnicodeDecodeError"],
     "a": ["read a JSON file", "iterate over a dict", "call a coroutine", "pickle an object",
           "import a module", "parse a date string", "sort a list of tuples",
           "open a database connection"]})


def prompts(kind: str, n: int, seed: int) -> list[str]:
    """`n` prompts of one kind (`kitchen` or `python`), the same for the same seed."""
    templates, words = _KITCHEN if kind == "kitchen" else _PYTHON
    rng = random.Random(seed)
    return [rng.choice(templates).format(**{k: rng.choice(v) for k, v in words.items()})
            for _ in range(n)]
