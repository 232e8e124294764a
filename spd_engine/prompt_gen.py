"""Seeded prompts for self-distillation in the domains SPD is evaluated on: chat and writing, maths word problems,
code (completion, writing, explanation), and passages of local text.

Prompt ``i`` of seed ``s`` in mixture ``m`` depends on (m, s, i) alone, so any shard of a data set is rebuilt
exactly and independently. Sources are templates with slot lists written here, Python's own standard library (signatures,
docstrings and short function sources, read with :mod:`inspect`), and optional plain-text corpora. No
evaluation set is read or imitated from its data: the templates are generic task shapes.

Self-instruct (``domain == "self_instruct"``) prompts ask the target to *write* a request (greedily in mix v1,
sampled with a per-prompt seed in v2); the data builder then lets the target answer it greedily as a new
conversation (see :mod:`spd_engine.distill_data`).
"""
from __future__ import annotations

import importlib
import inspect
import random
import textwrap
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Mixtures of domains, by name. "v1" built bench/data/distill_v4 and must keep rebuilding it exactly: the eval is
# one third chat, one third maths, one third code, so each gets a third, the chat share split between templated
# asks, self-instruct and corpus passages. "v2" answers the domain gap measured on v1 data (a PDM's acceptance at
# fill 1: 0.42 on held-out v1 conversations, 0.24 on the eval sets): templates repeat a few task shapes, so most
# v2 prompts are requests the target writes itself, *sampled*, across the kinds of requests an assistant gets
# (writing, roleplay, reasoning, maths, code, extraction, STEM, humanities), plus extraction and reasoning asks.
PROMPT_MIXES = {
    "v1": {"chat": 0.22, "self_instruct": 0.06, "passage": 0.05, "math": 0.33, "code": 0.34},
    "v2": {"chat": 0.12, "self_instruct": 0.45, "passage": 0.08, "math": 0.15, "code": 0.20},
}
# Temperature at which a v2 self-instruct request is written: sampled requests vary where greedy ones repeat
# the template's most likely question; below 1 to keep a 135M writer mostly coherent.
SELF_INSTRUCT_TEMPERATURE = 0.8


@dataclass(frozen=True)
class Prompt:
    id: str
    domain: str
    text: str
    # Self-instruct only: the temperature at which the target writes its request (0 = greedy, as in v1) and
    # the seed of that draw (fixed per prompt, so a shard rebuilds exactly).
    write_temperature: float = 0.0
    write_seed: int = 0


# ---------------------------------------------------------------------------------------------------- chat
TOPICS = (
    "climate change", "the history of the printing press", "renewable energy", "machine learning", "healthy sleep",
    "remote work", "the French Revolution", "photosynthesis", "black holes", "the stock market", "volcanoes",
    "ancient Rome", "electric cars", "learning a new language", "urban gardening", "the water cycle", "vaccines",
    "social media", "public libraries", "the Industrial Revolution", "quantum computing", "honey bees",
    "minimalism", "the Olympic Games", "coral reefs", "time management", "the human immune system",
    "cryptocurrency", "jazz music", "the Renaissance", "plate tectonics", "meditation", "space exploration",
    "recycling", "the internet", "chess", "coffee", "the Great Wall of China", "artificial intelligence ethics",
    "rainforests", "the moon landing", "nutrition", "public speaking", "photography", "democracy",
    "the theory of evolution", "inflation", "friendship", "video games", "dinosaurs", "the ocean tides",
    "marathon training", "budgeting", "the periodic table", "Shakespeare", "solar panels", "wildfires",
    "mountain climbing", "3D printing", "the Silk Road", "bread baking", "the human brain", "electricity",
    "DNA", "earthquakes", "job interviews", "bicycles", "tea ceremonies", "traffic congestion", "robots",
    "the Amazon river", "impressionist painting", "gravity", "small businesses", "online privacy",
    "the Cold War", "antibiotics", "recycling plastics", "classical music", "volunteering", "deserts",
)
AUDIENCES = ("a five-year-old", "a high school student", "a busy manager", "a beginner", "an expert",
             "a grandparent", "a new employee", "a tourist")
FORMATS = ("in three sentences", "in one paragraph", "as a bulleted list", "in simple words", "step by step",
           "with an example", "in about 100 words", "as a short dialogue")
ROLES = ("a pirate captain", "a tour guide in Paris", "a detective", "a medieval knight", "a personal trainer",
         "a chef", "a museum curator", "a spaceship engineer", "a kindergarten teacher", "a travel agent",
         "a librarian", "a startup founder", "a park ranger", "a news reporter")
PEOPLE = ("my manager", "a client", "my landlord", "a professor", "the school principal", "a colleague",
          "my neighbour", "the city council", "a customer", "my team")
SUBJECTS = ("a delayed project", "a new schedule", "a request for feedback", "a broken heater", "a job offer",
            "a missed deadline", "a team lunch", "a change of plans", "a thank-you for help", "a budget increase")
ACTIVITIES = ("staying focused", "saving money", "cooking at home", "running a meeting", "studying for exams",
              "travelling on a budget", "making friends in a new city", "writing clearly", "keeping plants alive",
              "starting to exercise", "reducing stress", "learning to code", "packing for a trip")
PAIRS = (("cats", "dogs"), ("trains", "planes"), ("books", "films"), ("city life", "country life"),
         ("tea", "coffee"), ("summer", "winter"), ("Python", "JavaScript"), ("renting", "buying a home"),
         ("solar power", "wind power"), ("paper books", "e-readers"), ("team sports", "solo sports"))
CHARACTERS = ("a shy robot", "an old lighthouse keeper", "a curious fox", "a young inventor", "a lost astronaut",
              "a retired teacher", "a talking tree", "a street musician", "a dragon who hates fire", "twin sisters")
EVENTS = ("finds a mysterious map", "learns to fly", "opens a bakery", "gets lost in a city", "wins a contest",
          "meets a stranger on a train", "discovers a secret door", "loses their memory", "plants a garden")
CHAT_TEMPLATES = (
    "Explain {topic} to {audience}.",
    "Explain {topic} {format}.",
    "What are the most important facts about {topic}?",
    "Write a blog post about {topic}.",
    "Write an engaging travel blog post about a trip to a place famous for {topic}.",
    "Give me {count} tips for {activity}.",
    "What are the pros and cons of {activity}?",
    "Compare {a} and {b}. Which would you recommend, and why?",
    "Draft a professional email to {person} about {subject}.",
    "Write a short story about {character} who {event}.",
    "Write a poem about {topic}.",
    "Pretend you are {role}. Describe a typical day.",
    "Imagine you are {role}. How would you explain {topic} to a visitor?",
    "Summarise the main arguments for and against {topic}.",
    "What are common misconceptions about {topic}?",
    "Describe how {topic} has changed over the last hundred years.",
    "Write a persuasive paragraph about why people should care about {topic}.",
    "Give a step-by-step plan for {activity}.",
    "What questions should I ask before {activity}?",
    "Create a short quiz with answers about {topic}.",
    "Write a product description for a gadget that helps with {activity}.",
    "What would happen if {topic} disappeared tomorrow?",
    "List {count} interesting facts about {topic}.",
    "Write a dialogue between {character} and {role} about {topic}.",
)
SELF_INSTRUCT_TEMPLATES = (
    "Write one question about {topic} that a curious student might ask. Write only the question.",
    "Write one realistic request a person might make to an assistant about {activity}. Write only the request.",
    "Write one short maths word problem about {item}. Write only the problem.",
    "Write one short programming task in Python about {code_topic}. Write only the task.",
)
# v2 adds requests of every kind an assistant is asked for; each is written by the target at
# SELF_INSTRUCT_TEMPERATURE, then answered greedily.
SELF_INSTRUCT_V2_TEMPLATES = (
    "Write one creative writing request (a story, a poem, a letter or a speech) about {topic}. "
    "Write only the request.",
    "Write one request in which a user asks an assistant to act as {role}. Write only the request.",
    "Write one logic puzzle or riddle that needs careful step-by-step reasoning. Write only the puzzle.",
    "Write one tricky reasoning question about {a} and {b}. Write only the question.",
    "Write one maths word problem about {name} and {item} that takes several steps to solve. "
    "Write only the problem.",
    "Write one maths question about {math_topic}. Write only the question.",
    "Write one Python programming task about {code_topic} for an intermediate programmer. Write only the task.",
    "Write one question a beginner might ask about an error they get in Python when using {code_topic}. "
    "Write only the question.",
    "Write a short paragraph about {topic} that mentions people, places, dates and numbers, followed by a "
    "request to extract some of them. Write only the paragraph and the request.",
    "Write one question about {stem_topic} that a university student might ask. Write only the question.",
    "Write one essay question about {topic} in history, economics, philosophy or society. "
    "Write only the question.",
    "Write one request for advice about {activity}. Write only the request.",
    "Write one question that compares {a} and {b}. Write only the question.",
    "Write one request to rewrite, shorten or improve a short text about {topic}, and include the text. "
    "Write only the request.",
)
STEM_TOPICS = ("thermodynamics", "cell biology", "electric circuits", "chemical bonds", "Newton's laws",
               "statistics", "genetics", "optics", "the structure of atoms", "ecosystems", "computer networks",
               "databases", "probability", "climate models", "organic chemistry", "relativity", "bridges",
               "batteries", "neurons", "algorithms", "operating systems", "fluid dynamics", "vaccines", "enzymes")
MATH_TOPICS = ("fractions", "percentages", "linear equations", "prime factorisation", "probability",
               "geometry of triangles", "areas and volumes", "sequences", "ratios", "quadratic equations",
               "averages", "unit conversion", "simple interest", "angles", "exponents")
# v2 chat asks that need reasoning or structure (v1's templates are kept alongside).
REASONING_TEMPLATES = (
    "{name} is taller than {other}, and {other} is taller than {third}. Who is the shortest? Explain your reasoning.",
    "If all {a} are {b}, and some {b} are expensive, must some {a} be expensive? Explain.",
    "I have {count} tasks today: {activity}, writing a report and calling {person}. In what order should I do "
    "them, and why?",
    "What is the next number in the sequence {seq}? Explain the pattern.",
    "A farmer has {count} fields and plants {item} in half of them. What questions would you ask before "
    "advising on the rest?",
    "Classify these as animals, plants or objects: {a}, {b}, a rose, a hammer, an eagle. Give the answer as JSON.",
    "Give three arguments for and three against {topic}, then a one-sentence conclusion.",
    "Write a table comparing {a} and {b} on cost, convenience and environmental impact.",
)

# ---------------------------------------------------------------------------------------------------- maths
NAMES = ("Alice", "Ben", "Carlos", "Dana", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wei", "Yusuf", "Zoe")
ITEMS = ("apples", "stickers", "pencils", "cookies", "marbles", "books", "eggs", "flowers", "cupcakes", "stamps",
         "toy cars", "oranges", "candles", "shells", "cards", "bottles of juice", "muffins", "balloons")
UNITS = ("dollars", "euros")


def _math_problem(rng: random.Random) -> str:
    """A multi-step word problem with small whole numbers, drawn from generic shapes (buy/sell, rates, shares,
    ages, work, percent). The numbers are chosen so every intermediate result is a whole number."""
    a, b = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    unit = rng.choice(UNITS)
    n1, n2, n3 = rng.randint(2, 12), rng.randint(2, 9), rng.randint(2, 30)
    price = rng.randint(2, 15)
    pct = rng.choice((10, 20, 25, 50))
    hours, rate = rng.randint(2, 10), rng.randint(8, 30)
    shapes = (
        f"{a} has {n1 * n2} {item}. {a} gives {n3 % (n1 * n2) or 1} of them to {b} and then shares the rest equally "
        f"among {n2} friends. How many {item} does each friend get, rounded down?",
        f"{a} buys {n1} packs of {item}. Each pack holds {n2} {item} and costs {price} {unit}. "
        f"How many {item} does {a} have, and how much did they cost in total?",
        f"{a} earns {rate} {unit} an hour and works {hours} hours a day for {n2} days. {a} spends {pct}% of the "
        f"money on rent. How much money is left?",
        f"{a} is {n1} years older than {b}. In {n2} years, {a} will be twice as old as {b} was {n1} years ago "
        f"plus {n3}. How old is {b} now? Show your reasoning.",
        f"A shop sells {item} for {price} {unit} each. On Saturday it sells {n3} of them and on Sunday {n1} more "
        f"than on Saturday. How much money does the shop make over the weekend?",
        f"{a} reads {n1 * 5} pages a day. The book has {n1 * 5 * n2 + n3} pages. How many days does {a} need to "
        f"finish the book?",
        f"A train travels at {rate * 5} km per hour for {hours} hours, then at {rate * 3} km per hour for {n2} "
        f"hours. How far does it travel in total?",
        f"{a} and {b} share {n1 * n2 * 10} {unit} in the ratio {n1}:{n2}. How much does each person get?",
        f"A recipe needs {n2} cups of flour for {n1 * 2} {item}. How many cups of flour are needed for "
        f"{n1 * 2 * n3} {item}?",
        f"{a} saves {price} {unit} every week. After {n3} weeks, {a} spends {pct}% of the savings on {item}. "
        f"How much is left?",
        f"There are {n3 + 10} students in a class. {pct}% of them walk to school and {n1} come by bus. The rest "
        f"ride bikes. How many ride bikes?",
        f"A rectangle is {n1 + 3} cm long and {n2 + 1} cm wide. What are its area and its perimeter?",
        f"{a} bought {n1} {item} at {price} {unit} each and sold them all for {price + n2} {unit} each. "
        f"What was the profit?",
        f"A tank holds {n3 * 10} litres of water. It loses {n2} litres every hour. After {hours} hours, "
        f"how many litres are left?",
        f"{a} runs {n1} km on Monday, twice as far on Tuesday, and {n2} km less than Tuesday on Wednesday. "
        f"How many km does {a} run in the three days?",
    )
    ask = rng.choice(("", " Explain step by step.", " Show your work.", " Think it through carefully."))
    return rng.choice(shapes) + ask


# ---------------------------------------------------------------------------------------------------- code
CODE_TOPICS = ("strings", "lists", "dictionaries", "sorting", "prime numbers", "dates", "files", "recursion",
               "classes", "sets", "matrices", "binary search", "stacks", "queues", "text parsing", "JSON")
CODE_TASKS = (
    "reverses the words in a sentence", "counts the vowels in a string", "checks whether a number is prime",
    "returns the n-th Fibonacci number", "removes duplicates from a list while keeping the order",
    "merges two sorted lists", "checks whether a string is a palindrome", "finds the largest element of a list",
    "computes the factorial of a number", "flattens a nested list", "counts word frequencies in a text",
    "converts Celsius to Fahrenheit", "returns the sum of the digits of a number", "finds the second largest number",
    "checks whether two strings are anagrams", "rotates a list by k positions", "computes the average of a list",
    "returns all even numbers from a list", "capitalises the first letter of every word",
    "finds the greatest common divisor of two numbers", "transposes a matrix", "validates an email address",
    "groups a list of words by their first letter", "returns the longest common prefix of a list of strings",
    "implements binary search on a sorted list", "counts how many times each character appears",
    "checks whether brackets in a string are balanced", "converts a number to Roman numerals",
    "returns the running total of a list", "finds the missing number in a range",
)


@lru_cache(maxsize=1)
def _stdlib_functions() -> tuple[tuple[str, str, str], ...]:
    """(qualified name, signature line + docstring, short source) of documented pure-Python stdlib functions,
    in a fixed order: the code prompts' local source."""
    found = []
    for module_name in ("textwrap", "string", "statistics", "fractions", "heapq", "bisect", "shlex", "fnmatch",
                        "colorsys", "calendar", "posixpath", "json.encoder", "html", "base64", "difflib", "random",
                        "functools", "itertools", "operator", "copy", "glob", "csv", "urllib.parse", "ipaddress",
                        "datetime", "decimal", "collections", "keyword", "ntpath", "gettext", "quopri", "uu"):
        try:
            module = importlib.import_module(module_name)
        except Exception:  # an optional stdlib module may be missing on some builds
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not inspect.isfunction(obj) or obj.__module__ != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            try:
                source = inspect.getsource(obj)
                signature = f"def {name}{inspect.signature(obj)}:"
            except (OSError, TypeError, ValueError):
                continue
            if not doc or len(doc) < 40 or len(source.splitlines()) > 40:
                continue
            stub = signature + '\n    """' + textwrap.indent(doc.split("\n\n")[0], "    ").lstrip() + '\n    """\n'
            found.append((f"{module_name}.{name}", stub, textwrap.dedent(source)))
    return tuple(found)


def _code_prompt(rng: random.Random) -> str:
    functions = _stdlib_functions()
    shape = rng.random()
    if functions and shape < 0.35:
        _, stub, _ = rng.choice(functions)
        return rng.choice(("Complete the code I provided.\n\n", "Complete the following Python function.\n\n",
                           "Implement this function.\n\n")) + stub
    if functions and shape < 0.55:
        _, _, source = rng.choice(functions)
        return rng.choice(("Explain what this Python code does.", "Explain this function line by line.",
                           "What does this function do? Give an example call.",
                           "Review this code and suggest improvements.")) + "\n\n```python\n" + source + "```"
    task = rng.choice(CODE_TASKS)
    return rng.choice((
        f"Write a Python function that {task}.",
        f"Write a Python function that {task}. Include a docstring and two examples.",
        f"Complete the code I provided.\n\ndef solve(data):\n    \"\"\"Return the result of a function that {task}.\n"
        f"    The input is given in data.\n    \"\"\"\n",
        f"How would you write a program that {task}? Explain your approach, then give the code.",
        f"Write a function that {task}, and write unit tests for it with pytest.",
        f"Explain how to {task.replace('returns', 'return').replace('checks', 'check').replace('finds', 'find')}"
        f" in Python, with code.",
    ))


# ---------------------------------------------------------------------------------------------------- passages
PASSAGE_ASKS = ("Summarise this passage.", "Continue this passage.", "Explain in plain English what happens here.",
                "What is the main idea of this passage?", "Write three questions about this passage, with answers.")
# v2 adds extraction and rewriting asks over the same passages.
PASSAGE_V2_ASKS = ("Extract every person's name in this passage as a JSON list.",
                   "List the key points of this passage as bullet points.",
                   "Rewrite this passage in modern, simple English.",
                   "What is the tone of this passage? Answer in one word, then explain.",
                   "Translate the first two sentences of this passage into French.",
                   "Write a title for this passage and a one-sentence summary.")


@lru_cache(maxsize=4)
def _passages(corpora: tuple[str, ...]) -> tuple[str, ...]:
    pieces = []
    for path in corpora:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        for paragraph in text.split("\n\n"):
            words = paragraph.split()
            if 40 <= len(words):
                pieces.append(" ".join(words[:150]))
    return tuple(pieces)


# ---------------------------------------------------------------------------------------------------- the mix
def make_prompt(seed: int, index: int, corpora: tuple[str, ...] = (), mix: str = "v2") -> Prompt:
    """Prompt ``index`` of ``seed`` in mixture ``mix`` (:data:`PROMPT_MIXES`): its domain drawn by the mix's
    weights (passages fall back to chat when no corpus is given), its text from that domain's generator, all from
    one RNG seeded by (mix, seed, index). v1's draws are never changed, so v1 data sets rebuild exactly."""
    weights = PROMPT_MIXES[mix]
    rng = random.Random(f"spd-prompts:{seed}:{index}" if mix == "v1" else f"spd-prompts-{mix}:{seed}:{index}")
    domain = rng.choices(list(weights), weights=list(weights.values()))[0]
    if domain == "passage" and not _passages(tuple(corpora)):
        domain = "chat"
    slots = {"topic": rng.choice(TOPICS), "audience": rng.choice(AUDIENCES), "format": rng.choice(FORMATS),
             "role": rng.choice(ROLES), "person": rng.choice(PEOPLE), "subject": rng.choice(SUBJECTS),
             "activity": rng.choice(ACTIVITIES), "count": rng.choice((3, 4, 5, 7, 10)),
             "character": rng.choice(CHARACTERS), "event": rng.choice(EVENTS), "item": rng.choice(ITEMS),
             "code_topic": rng.choice(CODE_TOPICS)}
    slots["a"], slots["b"] = rng.choice(PAIRS)
    if mix == "v1":
        return _v1_prompt(rng, f"{seed}-{index}", domain, slots, corpora)
    slots["name"], slots["other"], slots["third"] = rng.sample(NAMES, 3)
    slots["stem_topic"], slots["math_topic"] = rng.choice(STEM_TOPICS), rng.choice(MATH_TOPICS)
    start, step = rng.randint(1, 9), rng.randint(2, 7)
    slots["seq"] = ", ".join(str(start + step * k * (k + 1) // 2) for k in range(5))
    prompt_id = f"{mix}-{seed}-{index}"
    if domain == "self_instruct":
        return Prompt(prompt_id, domain, rng.choice(SELF_INSTRUCT_TEMPLATES + SELF_INSTRUCT_V2_TEMPLATES).format(
            **slots), SELF_INSTRUCT_TEMPERATURE, rng.getrandbits(63))
    if domain == "chat":
        return Prompt(prompt_id, domain, rng.choice(CHAT_TEMPLATES + REASONING_TEMPLATES).format(**slots))
    if domain == "passage":
        return Prompt(prompt_id, domain, rng.choice(PASSAGE_ASKS + PASSAGE_V2_ASKS) + "\n\n" +
                      rng.choice(_passages(tuple(corpora))))
    return _v1_prompt(rng, prompt_id, domain, slots, corpora)


def _v1_prompt(rng: random.Random, prompt_id: str, domain: str, slots: dict, corpora: tuple[str, ...]) -> Prompt:
    if domain == "chat":
        text = rng.choice(CHAT_TEMPLATES).format(**slots)
    elif domain == "self_instruct":
        text = rng.choice(SELF_INSTRUCT_TEMPLATES).format(**slots)
    elif domain == "passage":
        text = rng.choice(PASSAGE_ASKS) + "\n\n" + rng.choice(_passages(tuple(corpora)))
    elif domain == "math":
        text = _math_problem(rng)
    else:
        text = _code_prompt(rng)
    return Prompt(prompt_id, domain, text)
