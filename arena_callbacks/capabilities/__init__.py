"""Built-in capability probe sets: held-out, deterministic, made by this project's own code.

Each set stands for one ability of a pretrained model (DESIGN.md §2) and is returned as a list
of probe rows in the formats of :mod:`arena_callbacks.probes`:

* ``general_text`` (text): English prose paragraphs from the standard library's
  ``pydoc_data/topics.py``;
* ``python_code`` (text): functions and classes cut from standard-library ``.py`` sources;
* ``world_knowledge`` (multiple choice): simple facts written for this module (capitals,
  science, geography, everyday knowledge) with three distractors each, after two worked
  questions;
* ``arithmetic`` (completion): generated sums and products of one-digit numbers after a
  fixed three-example prefix (``3 + 4 = 7``);
* ``instruction_following`` (completion): short verifiable instructions ("Repeat exactly:
  ...", "Reply with only the word ...") in the model's own chat format, scored on the exact
  reply followed by the end-of-turn marker.

Sets are *held out*: the text and code sets draw only from a fixed ``probe`` split of their
sources (by pydoc topic, by stdlib module), and :func:`text_passages` / :func:`code_passages`
give the disjoint ``train`` split to code that needs training text. They are *deterministic*:
the same ``seed`` (and Python version, for the stdlib-derived sets) gives the same rows; a
different seed draws another sample and order. Passages are 120-300 characters and at most
64 tokens for SmolLM2's tokenizer (see ``MAX_PIECES``).

Example:
    >>> rows = build_capability("arithmetic", n=2, seed=0)
    >>> sorted(rows[0])
    ['completion', 'operation', 'prompt']
    >>> sets = build_capabilities(["general_text", "world_knowledge"], n=8)
    >>> {name: len(rows) for name, rows in sets.items()}
    {'general_text': 8, 'world_knowledge': 8}
"""

from __future__ import annotations

import hashlib
import random
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "CAPABILITIES",
    "Capability",
    "build_capabilities",
    "build_capability",
    "code_passages",
    "text_passages",
]

Split = Literal["probe", "train"]
Row = dict[str, Any]

MIN_CHARS = 120
MAX_CHARS = 300
# Passages are also kept within MAX_PIECES (see _pieces): a tokenizer-free estimate of the
# token count that keeps every passage within 64 SmolLM2 tokens.
MAX_PIECES = 55


@dataclass(frozen=True)
class Capability:
    """One built-in capability set: what it measures, where it comes from, how big it is.

    Attributes:
        name: Registry key, also a valid probe name.
        kind: Probe kind of its rows (``text``, ``multiple_choice`` or ``completion``).
        description: What ability the set stands for.
        provenance: Where the rows come from.
        license: License of the row contents.
        default_size: Rows built when ``n`` is not given.
        uses_tokenizer: The rows depend on the tokenizer (its chat template).
    """

    name: str
    kind: str
    description: str
    provenance: str
    license: str
    default_size: int
    builder: Callable[[random.Random, int, Any], list[Row]]
    uses_tokenizer: bool = False

    def available(self) -> int | None:
        """How many distinct rows the set can give (``None``: effectively unlimited)."""
        return _POOL_SIZES[self.name]()


def build_capability(name: str, *, n: int | None = None, seed: int = 0, tokenizer: Any = None) -> list[Row]:
    """Rows of one built-in capability set.

    Args:
        name: A key of :data:`CAPABILITIES`.
        n: Rows to build (default: the set's ``default_size``).
        seed: Chooses the sample and its order; the same seed gives the same rows.
        tokenizer: Used by ``instruction_following`` for the model's chat template (without
            one, a plain ``User:``/``Assistant:`` format); ignored by the other sets.

    Raises:
        KeyError: Unknown ``name`` (the message lists the known ones).
        ValueError: ``n`` is not positive or larger than the set can give.
    """
    cap = CAPABILITIES.get(name)
    if cap is None:
        raise KeyError(f"capability {name!r} is not built in; known: {sorted(CAPABILITIES)}")
    n = cap.default_size if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"capability {name!r}: n must be a positive integer, got {n!r}")
    limit = cap.available()
    if limit is not None and n > limit:
        raise ValueError(f"capability {name!r}: n={n} is more than the {limit} distinct rows it has")
    rng = random.Random(f"arena-callbacks/{name}/{seed}")  # str seeds are stable across runs
    return cap.builder(rng, n, tokenizer)


def build_capabilities(
    names: Iterable[str] | None = None, *, n: int | None = None, seed: int = 0, tokenizer: Any = None
) -> dict[str, list[Row]]:
    """Several built-in sets at once, ``{name: rows}``: all of them when ``names`` is ``None``.

    The result can be passed as ``ForgettingMonitor(probes=...)``.
    """
    names = list(CAPABILITIES) if names is None else list(names)
    return {name: build_capability(name, n=n, seed=seed, tokenizer=tokenizer) for name in names}


# --------------------------------------------------------------------------------------
# general_text: English prose from pydoc_data.topics
# --------------------------------------------------------------------------------------


def _split_of(key: str) -> Split:
    """A stable split by source name: a third of the sources are held out for probes."""
    return "probe" if hashlib.sha256(key.encode()).digest()[0] % 3 == 0 else "train"


_PIECE = re.compile(r"[A-Za-z]+|\d|\n[ \t]*|[^\sA-Za-z\d]")


def _pieces(text: str) -> int:
    """An estimate of the token count that depends on no tokenizer.

    Counts single digits, line breaks (with their indentation), other symbols, and words as one
    piece per six letters (long identifiers split into several tokens). SmolLM2's tokenizer
    gives 0.6-1.15 tokens per piece on these passages.
    """
    return sum(-(-len(p) // 6) if p[0].isalpha() else 1 for p in _PIECE.findall(text))


def _fits(text: str) -> bool:
    return len(text) <= MAX_CHARS and _pieces(text) <= MAX_PIECES


def _clip(text: str) -> str | None:
    """``text`` if short enough, else its longest prefix of whole sentences that fits."""
    if _fits(text):
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", text[: MAX_CHARS + 1])]
    fitting = [e for e in ends if _fits(text[:e])]
    return text[: fitting[-1]] if fitting else None


def _prose_paragraphs(doc: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.strip("\n").splitlines()
        # Prose only: no indented code or grammar, headings, tables or bullet lists.
        if not lines or any(line.startswith((" ", "\t", "*", "+", "-", "=", ">")) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        if not text[:1].isupper() or "::=" in text or not text.endswith((".", "!", "?")):
            continue
        text = _clip(text)
        if text and len(text) >= MIN_CHARS:
            out.append(text)
    return out


@lru_cache(maxsize=2)
def text_passages(split: Split = "probe") -> tuple[str, ...]:
    """English prose passages from ``pydoc_data.topics``, in a stable order, without duplicates.

    ``probe`` passages come from a fixed third of the topics (chosen by a hash of the topic
    name); ``train`` from the rest, less any paragraph that a probe topic has too.
    """
    from pydoc_data.topics import topics

    # Some paragraphs appear under several topics: the train split never repeats a probe one.
    seen: set[str] = set(text_passages("probe")) if split == "train" else set()
    out = []
    for key in sorted(topics):
        if _split_of(key) != split:
            continue
        for text in _prose_paragraphs(topics[key]):
            if text not in seen:
                seen.add(text)
                out.append(text)
    return tuple(out)


def _build_general_text(rng: random.Random, n: int, tokenizer: Any) -> list[Row]:
    return [{"text": t} for t in rng.sample(text_passages("probe"), n)]


# --------------------------------------------------------------------------------------
# python_code: functions and classes from standard-library sources
# --------------------------------------------------------------------------------------

# Probe modules: plain-Python, stable across 3.10-3.14. Every other top-level stdlib module is
# the train split.
CODE_PROBE_MODULES: tuple[str, ...] = (
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "difflib.py",
    "fnmatch.py",
    "fractions.py",
    "heapq.py",
    "shlex.py",
    "statistics.py",
    "textwrap.py",
)

_DEF = re.compile(r"^( {0,4})(def |class |async def )")


def _code_chunks(source: str) -> list[str]:
    """Chunks that start at a (method) definition and end at a line break within the limit."""
    lines = source.splitlines()
    out = []
    free = 0  # chunks never overlap: the next one starts after the last one ended
    for i, line in enumerate(lines):
        m = _DEF.match(line)
        if i < free or not m:
            continue
        indent = len(m.group(1))
        chunk: list[str] = []
        for nxt in lines[i:]:
            if not _fits("\n".join([*chunk, nxt])):
                break
            chunk.append(nxt)
        while chunk and not chunk[-1].strip():
            chunk.pop()
        text = "\n".join(c[indent:] if c[:indent].isspace() else c for c in chunk)
        if len(text) >= MIN_CHARS and len(chunk) >= 3:
            out.append(text)
            free = i + len(chunk)
    return out


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=2)
def code_passages(split: Split = "probe") -> tuple[str, ...]:
    """Python code passages from the standard library, in a stable order, without duplicates.

    ``probe`` chunks come from :data:`CODE_PROBE_MODULES`, ``train`` chunks from the other
    top-level stdlib modules (less any chunk identical to a probe one).
    """
    root = _stdlib()
    if split == "probe":
        files = [root / name for name in CODE_PROBE_MODULES]
    else:
        files = sorted(p for p in root.glob("*.py") if p.name not in CODE_PROBE_MODULES)
    seen: set[str] = set(code_passages("probe")) if split == "train" else set()
    out = []
    for path in files:
        if not path.is_file():
            continue
        for chunk in _code_chunks(path.read_text(encoding="utf-8", errors="replace")):
            if chunk not in seen:
                seen.add(chunk)
                out.append(chunk)
    return tuple(out)


def _build_python_code(rng: random.Random, n: int, tokenizer: Any) -> list[Row]:
    return [{"text": t} for t in rng.sample(code_passages("probe"), n)]


# --------------------------------------------------------------------------------------
# world_knowledge: curated facts, four choices each
# --------------------------------------------------------------------------------------

# (category, question, correct answer, three distractors). Written for this project.
FACTS: tuple[tuple[str, str, str, tuple[str, str, str]], ...] = (
    # Capitals
    ("capitals", "What is the capital of France?", "Paris", ("Lyon", "Marseille", "Nice")),
    ("capitals", "What is the capital of Germany?", "Berlin", ("Munich", "Hamburg", "Frankfurt")),
    ("capitals", "What is the capital of Italy?", "Rome", ("Milan", "Naples", "Venice")),
    ("capitals", "What is the capital of Spain?", "Madrid", ("Barcelona", "Seville", "Valencia")),
    ("capitals", "What is the capital of Japan?", "Tokyo", ("Osaka", "Kyoto", "Hiroshima")),
    ("capitals", "What is the capital of the United Kingdom?", "London", ("Manchester", "Liverpool", "Birmingham")),
    ("capitals", "What is the capital of Russia?", "Moscow", ("Saint Petersburg", "Kazan", "Novosibirsk")),
    ("capitals", "What is the capital of China?", "Beijing", ("Shanghai", "Guangzhou", "Shenzhen")),
    ("capitals", "What is the capital of Egypt?", "Cairo", ("Alexandria", "Luxor", "Giza")),
    ("capitals", "What is the capital of Canada?", "Ottawa", ("Toronto", "Vancouver", "Montreal")),
    ("capitals", "What is the capital of Australia?", "Canberra", ("Sydney", "Melbourne", "Perth")),
    ("capitals", "What is the capital of the United States?", "Washington, D.C.",
     ("New York", "Los Angeles", "Chicago")),
    ("capitals", "What is the capital of India?", "New Delhi", ("Mumbai", "Kolkata", "Bangalore")),
    ("capitals", "What is the capital of Brazil?", "Brasília", ("Rio de Janeiro", "São Paulo", "Salvador")),
    ("capitals", "What is the capital of Argentina?", "Buenos Aires", ("Córdoba", "Rosario", "Mendoza")),
    ("capitals", "What is the capital of Mexico?", "Mexico City", ("Guadalajara", "Monterrey", "Cancún")),
    ("capitals", "What is the capital of Greece?", "Athens", ("Thessaloniki", "Sparta", "Patras")),
    ("capitals", "What is the capital of Portugal?", "Lisbon", ("Porto", "Braga", "Faro")),
    ("capitals", "What is the capital of Ireland?", "Dublin", ("Cork", "Galway", "Limerick")),
    ("capitals", "What is the capital of Norway?", "Oslo", ("Bergen", "Trondheim", "Stavanger")),
    ("capitals", "What is the capital of Sweden?", "Stockholm", ("Gothenburg", "Malmö", "Uppsala")),
    ("capitals", "What is the capital of Turkey?", "Ankara", ("Istanbul", "Izmir", "Antalya")),
    ("capitals", "What is the capital of South Korea?", "Seoul", ("Busan", "Incheon", "Daegu")),
    ("capitals", "What is the capital of Kenya?", "Nairobi", ("Mombasa", "Kisumu", "Nakuru")),
    ("capitals", "What is the capital of the Netherlands?", "Amsterdam", ("Rotterdam", "Utrecht", "Eindhoven")),
    ("capitals", "What is the capital of Austria?", "Vienna", ("Salzburg", "Graz", "Innsbruck")),
    ("capitals", "What is the capital of Poland?", "Warsaw", ("Kraków", "Gdańsk", "Wrocław")),
    ("capitals", "What is the capital of Switzerland?", "Bern", ("Zurich", "Geneva", "Basel")),
    ("capitals", "What is the capital of Belgium?", "Brussels", ("Antwerp", "Ghent", "Bruges")),
    ("capitals", "What is the capital of Denmark?", "Copenhagen", ("Aarhus", "Odense", "Aalborg")),
    ("capitals", "What is the capital of Finland?", "Helsinki", ("Tampere", "Turku", "Oulu")),
    ("capitals", "What is the capital of Thailand?", "Bangkok", ("Chiang Mai", "Phuket", "Pattaya")),
    ("capitals", "What is the capital of Peru?", "Lima", ("Cusco", "Arequipa", "Trujillo")),
    ("capitals", "What is the capital of Cuba?", "Havana", ("Santiago de Cuba", "Varadero", "Camagüey")),
    ("capitals", "What is the capital of Hungary?", "Budapest", ("Debrecen", "Szeged", "Pécs")),
    ("capitals", "What is the capital of the Czech Republic?", "Prague", ("Brno", "Ostrava", "Plzeň")),
    ("capitals", "What is the capital of Vietnam?", "Hanoi", ("Ho Chi Minh City", "Da Nang", "Hue")),
    ("capitals", "What is the capital of Morocco?", "Rabat", ("Casablanca", "Marrakesh", "Fez")),
    ("capitals", "What is the capital of Nigeria?", "Abuja", ("Lagos", "Kano", "Ibadan")),
    ("capitals", "What is the capital of Chile?", "Santiago", ("Valparaíso", "Concepción", "Antofagasta")),
    ("capitals", "What is the capital of Colombia?", "Bogotá", ("Medellín", "Cali", "Cartagena")),
    ("capitals", "What is the capital of New Zealand?", "Wellington", ("Auckland", "Christchurch", "Queenstown")),
    # Science
    ("science", "What is the chemical formula of water?", "H2O", ("CO2", "O2", "NaCl")),
    ("science", "What is the chemical symbol for gold?", "Au", ("Ag", "Gd", "Go")),
    ("science", "What is the chemical symbol for oxygen?", "O", ("N", "H", "C")),
    ("science", "Which planet is closest to the Sun?", "Mercury", ("Venus", "Earth", "Mars")),
    ("science", "What is the largest planet in the solar system?", "Jupiter", ("Saturn", "Neptune", "Earth")),
    ("science", "Which planet is known as the Red Planet?", "Mars", ("Venus", "Jupiter", "Mercury")),
    ("science", "Which gas do plants take in from the air to make food?", "carbon dioxide",
     ("oxygen", "nitrogen", "helium")),
    ("science", "Which gas do people need to breathe to stay alive?", "oxygen",
     ("carbon dioxide", "helium", "hydrogen")),
    ("science", "At what temperature in degrees Celsius does water boil at sea level?", "100", ("50", "0", "200")),
    ("science", "At what temperature in degrees Celsius does water freeze?", "0", ("100", "50", "25")),
    ("science", "At what temperature in degrees Fahrenheit does water freeze?", "32", ("0", "100", "212")),
    ("science", "How many legs does a spider have?", "eight", ("six", "four", "ten")),
    ("science", "How many legs does an insect have?", "six", ("eight", "four", "ten")),
    ("science", "What is the hardest natural material?", "diamond", ("gold", "iron", "glass")),
    ("science", "Which force pulls objects toward the ground?", "gravity", ("magnetism", "friction", "electricity")),
    ("science", "What is the center of an atom called?", "the nucleus", ("the electron", "the shell", "the orbit")),
    ("science", "Which organ pumps blood through the body?", "the heart", ("the liver", "the lungs", "the brain")),
    ("science", "Which organs do people breathe with?", "the lungs", ("the heart", "the stomach", "the kidneys")),
    ("science", "Which organ do people think with?", "the brain", ("the heart", "the liver", "the stomach")),
    ("science", "What is the star at the center of our solar system?", "the Sun", ("Sirius", "Polaris", "the Moon")),
    ("science", "What is the largest mammal?", "the blue whale", ("the elephant", "the giraffe", "the hippopotamus")),
    ("science", "What do bees make?", "honey", ("milk", "silk", "cheese")),
    ("science", "Which metal is liquid at room temperature?", "mercury", ("iron", "copper", "silver")),
    ("science", "What are animals that eat only plants called?", "herbivores",
     ("carnivores", "predators", "scavengers")),
    ("science", "How many days does it take the Earth to go around the Sun?", "365", ("30", "100", "1000")),
    ("science", "What natural satellite orbits the Earth?", "the Moon", ("the Sun", "Mars", "Venus")),
    ("science", "What part of a plant takes in water from the soil?", "the roots",
     ("the leaves", "the flowers", "the seeds")),
    ("science", "What is frozen water called?", "ice", ("steam", "sand", "glass")),
    ("science", "What is water vapor from boiling water called?", "steam", ("ice", "smoke", "dust")),
    # Geography
    ("geography", "What is the largest ocean on Earth?", "the Pacific Ocean",
     ("the Atlantic Ocean", "the Indian Ocean", "the Arctic Ocean")),
    ("geography", "What is the highest mountain in the world?", "Mount Everest",
     ("Mont Blanc", "Mount Fuji", "Mount Kilimanjaro")),
    ("geography", "What is the largest hot desert in the world?", "the Sahara",
     ("the Gobi", "the Kalahari", "the Mojave")),
    ("geography", "On which continent is Egypt?", "Africa", ("Europe", "Asia", "South America")),
    ("geography", "On which continent is Brazil?", "South America", ("Africa", "Asia", "Europe")),
    ("geography", "On which continent is Japan?", "Asia", ("Europe", "Africa", "South America")),
    ("geography", "On which continent is France?", "Europe", ("Asia", "Africa", "North America")),
    ("geography", "On which continent is Kenya?", "Africa", ("Asia", "Europe", "Australia")),
    ("geography", "What is the largest country by area?", "Russia", ("Canada", "China", "Brazil")),
    ("geography", "What is the largest continent?", "Asia", ("Africa", "Europe", "North America")),
    ("geography", "On which continent is the South Pole?", "Antarctica",
     ("Europe", "Asia", "Australia")),
    ("geography", "Which river flows through London?", "the Thames", ("the Seine", "the Rhine", "the Danube")),
    ("geography", "Which river flows through Paris?", "the Seine", ("the Thames", "the Rhine", "the Nile")),
    ("geography", "Which river flows through Cairo?", "the Nile", ("the Amazon", "the Thames", "the Danube")),
    ("geography", "Which ocean lies between Europe and North America?", "the Atlantic Ocean",
     ("the Pacific Ocean", "the Indian Ocean", "the Arctic Ocean")),
    ("geography", "In which country are the pyramids of Giza?", "Egypt", ("Mexico", "Greece", "India")),
    ("geography", "In which country is the Eiffel Tower?", "France", ("Italy", "Spain", "Germany")),
    ("geography", "In which city is the Colosseum?", "Rome", ("Athens", "Paris", "Madrid")),
    ("geography", "In which country is the Great Wall?", "China", ("Japan", "India", "Egypt")),
    ("geography", "Which country is shaped like a boot?", "Italy", ("Spain", "Greece", "Portugal")),
    ("geography", "In which country do wild kangaroos live?", "Australia", ("Brazil", "Canada", "India")),
    ("geography", "In which country is Mount Fuji?", "Japan", ("China", "Nepal", "Chile")),
    ("geography", "In which country is the Statue of Liberty?", "the United States",
     ("France", "Canada", "England")),
    ("geography", "In which country is the Taj Mahal?", "India", ("Egypt", "Iran", "Thailand")),
    ("geography", "Which language is mainly spoken in Brazil?", "Portuguese", ("Spanish", "French", "English")),
    ("geography", "Which language is mainly spoken in Mexico?", "Spanish", ("Portuguese", "French", "English")),
    ("geography", "What currency is used in Japan?", "the yen", ("the euro", "the dollar", "the peso")),
    # Everyday knowledge
    ("everyday", "How many days are in a week?", "seven", ("five", "six", "ten")),
    ("everyday", "How many months are in a year?", "twelve", ("ten", "eleven", "thirteen")),
    ("everyday", "How many hours are in a day?", "24", ("12", "60", "100")),
    ("everyday", "How many minutes are in an hour?", "60", ("100", "30", "24")),
    ("everyday", "How many days are in a leap year?", "366", ("365", "364", "360")),
    ("everyday", "What color do you get by mixing blue and yellow?", "green", ("purple", "orange", "red")),
    ("everyday", "What color do you get by mixing red and white?", "pink", ("green", "blue", "black")),
    ("everyday", "What color is a ripe banana?", "yellow", ("blue", "purple", "white")),
    ("everyday", "What color is grass?", "green", ("red", "blue", "white")),
    ("everyday", "What is the first month of the year?", "January", ("March", "June", "December")),
    ("everyday", "What is the last month of the year?", "December", ("January", "July", "October")),
    ("everyday", "How many sides does a triangle have?", "three", ("four", "five", "six")),
    ("everyday", "How many sides does a square have?", "four", ("three", "five", "eight")),
    ("everyday", "How many sides does a hexagon have?", "six", ("five", "seven", "eight")),
    ("everyday", "What does a caterpillar turn into?", "a butterfly", ("a spider", "a frog", "a bee")),
    ("everyday", "What is a baby dog called?", "a puppy", ("a kitten", "a calf", "a foal")),
    ("everyday", "What is a baby cat called?", "a kitten", ("a puppy", "a lamb", "a calf")),
    ("everyday", "What is a baby cow called?", "a calf", ("a lamb", "a foal", "a piglet")),
    ("everyday", "Which animal has a long trunk?", "the elephant", ("the horse", "the lion", "the zebra")),
    ("everyday", "Which animal says moo?", "the cow", ("the dog", "the cat", "the duck")),
    ("everyday", "Which animal barks?", "the dog", ("the cow", "the cat", "the sheep")),
    ("everyday", "Who wrote Romeo and Juliet?", "William Shakespeare",
     ("Charles Dickens", "Mark Twain", "Jane Austen")),
    ("everyday", "Who painted the Mona Lisa?", "Leonardo da Vinci",
     ("Pablo Picasso", "Vincent van Gogh", "Claude Monet")),
    ("everyday", "How many continents are there?", "seven", ("five", "six", "nine")),
    ("everyday", "How many players does a soccer team have on the field?", "eleven", ("nine", "seven", "fifteen")),
    ("everyday", "Which instrument has black and white keys?", "the piano", ("the guitar", "the drum", "the violin")),
    ("everyday", "Which holiday is celebrated on December 25?", "Christmas", ("Easter", "Halloween", "Thanksgiving")),
    ("everyday", "What shape has every point the same distance from its center?", "a circle",
     ("a square", "a triangle", "a rectangle")),
    ("everyday", "What is the opposite of hot?", "cold", ("warm", "big", "fast")),
    ("everyday", "What do people use to see?", "their eyes", ("their ears", "their hands", "their feet")),
    ("everyday", "What do people use to hear?", "their ears", ("their eyes", "their nose", "their hands")),
)


# Two worked questions before each one set the answer format (facts not in FACTS). On
# SmolLM2-135M they lift accuracy from about 0.61 to 0.82 and cut the answer NLL from ~4.7 to ~1.3.
WORLD_KNOWLEDGE_SHOTS: tuple[tuple[str, str], ...] = (
    ("How many wheels does a bicycle have?", "two"),
    ("What is the capital of Scotland?", "Edinburgh"),
)


def _build_world_knowledge(rng: random.Random, n: int, tokenizer: Any) -> list[Row]:
    prefix = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in WORLD_KNOWLEDGE_SHOTS)
    rows = []
    for category, question, answer, distractors in rng.sample(FACTS, n):
        choices = [answer, *distractors]
        rng.shuffle(choices)
        rows.append({
            "context": f"{prefix}Question: {question}\nAnswer:",
            "choices": [f" {c}" for c in choices],
            "answer": choices.index(answer),
            "category": category,
        })
    return rows


# --------------------------------------------------------------------------------------
# arithmetic: generated sums and products of one-digit numbers
# --------------------------------------------------------------------------------------

# A fixed few-shot prefix sets the answer format; its problems are never asked.
ARITHMETIC_SHOTS: tuple[tuple[int, str, int], ...] = ((3, "+", 4), (9, "-", 5), (2, "x", 6))
_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                              "x": lambda a, b: a * b}


def _arithmetic_problems() -> list[tuple[int, str, int]]:
    """Every problem the set draws from: sums and products of two one-digit numbers.

    Subtraction is left out: SmolLM2-135M gets a third of one-digit differences right and
    almost none with a borrow, too little to watch for forgetting.
    """
    shots = set(ARITHMETIC_SHOTS)
    problems = [(a, op, b) for op in ("+", "x") for a in range(1, 10) for b in range(1, 10)]
    return [p for p in problems if p not in shots]


def _build_arithmetic(rng: random.Random, n: int, tokenizer: Any) -> list[Row]:
    prefix = "".join(f"{a} {op} {b} = {_OPS[op](a, b)}\n" for a, op, b in ARITHMETIC_SHOTS)
    return [
        {"prompt": f"{prefix}{a} {op} {b} =", "completion": f" {_OPS[op](a, b)}", "operation": op}
        for a, op, b in rng.sample(_arithmetic_problems(), n)
    ]


# --------------------------------------------------------------------------------------
# instruction_following: verifiable instructions in the model's chat format
# --------------------------------------------------------------------------------------

_SUBJECTS = ("The cat", "My friend", "The teacher", "A small dog", "The old man", "Our neighbor", "The girl",
             "The farmer")
_VERBS = ("likes", "paints", "sells", "finds", "cleans", "buys", "draws", "carries")
_OBJECTS = ("red apples", "the blue door", "a wooden chair", "green boxes", "the new car", "warm bread",
            "old books", "a small boat")
_WORDS = ("apple", "river", "garden", "window", "orange", "pencil", "yellow", "silver", "planet", "forest",
          "rabbit", "candle", "bridge", "summer", "guitar", "castle", "tiger", "flower", "ocean", "basket")


def _instruction_pool() -> list[tuple[str, str, str]]:
    """(family, instruction, exact reply)."""
    pool = []
    for s in _SUBJECTS:
        for v in _VERBS:
            for o in _OBJECTS:
                sentence = f"{s} {v} {o}."
                pool.append(("repeat", f"Repeat exactly: {sentence}", sentence))
    for w in _WORDS:
        pool.append(("only_word", f"Reply with only the word {w}.", w))
        pool.append(("uppercase", f"Write the word {w} in capital letters.", w.upper()))
    return pool


# One worked example per family, shown as an earlier chat turn; never a question itself.
_DEMOS: dict[str, tuple[str, str]] = {
    "repeat": ("Repeat exactly: The boy reads a long letter.", "The boy reads a long letter."),
    "only_word": ("Reply with only the word table.", "table"),
    "uppercase": ("Write the word table in capital letters.", "TABLE"),
}


def _end_of_turn(tokenizer: Any) -> str:
    """What the chat template writes after an assistant reply (e.g. ``<|im_end|>``), stripped."""
    marker = "\x00REPLY\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    return text.split(marker, 1)[1].strip() if marker in text else ""


def _chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n" for m in messages]
    return "".join(turns) + "Assistant:"


def _build_instruction_following(rng: random.Random, n: int, tokenizer: Any) -> list[Row]:
    chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    end = _end_of_turn(tokenizer) if chat else ""
    rows = []
    for family, instruction, reply in _sample_balanced(rng, _instruction_pool(), n):
        demo_q, demo_a = _DEMOS[family]
        messages = [{"role": "user", "content": demo_q}, {"role": "assistant", "content": demo_a},
                    {"role": "user", "content": instruction}]
        prompt = _chat_prompt(tokenizer, messages)
        completion = reply + end if chat else f" {reply}\n"
        rows.append({"prompt": prompt, "completion": completion, "instruction": family})
    return rows


def _sample_balanced(rng: random.Random, pool: Sequence[tuple[str, str, str]], n: int) -> list[tuple[str, str, str]]:
    """``n`` items, as even across families as their sizes allow, in a seeded order."""
    families: dict[str, list[tuple[str, str, str]]] = {}
    for item in pool:
        families.setdefault(item[0], []).append(item)
    for items in families.values():
        rng.shuffle(items)
    chosen: list[tuple[str, str, str]] = []
    while len(chosen) < n:
        for items in families.values():
            if items and len(chosen) < n:
                chosen.append(items.pop())
    rng.shuffle(chosen)
    return chosen


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

_PY = f"Python {sys.version_info.major}.{sys.version_info.minor}"

CAPABILITIES: dict[str, Capability] = {
    c.name: c
    for c in (
        Capability(
            name="general_text",
            kind="text",
            description="English technical prose: mean token NLL on held-out documentation paragraphs",
            provenance=f"standard library pydoc_data/topics.py ({_PY}); prose paragraphs of the third of "
            "topics in the probe split, 120-300 characters",
            license="PSF-2.0 (Python documentation)",
            default_size=64,
            builder=_build_general_text,
        ),
        Capability(
            name="python_code",
            kind="text",
            description="Python source code: mean token NLL on functions and classes of held-out stdlib modules",
            provenance=f"standard library sources ({_PY}): " + ", ".join(CODE_PROBE_MODULES)
            + "; non-overlapping chunks starting at a def/class line, 120-300 characters",
            license="PSF-2.0 (Python standard library)",
            default_size=64,
            builder=_build_python_code,
        ),
        Capability(
            name="world_knowledge",
            kind="multiple_choice",
            description="Simple facts (capitals, science, geography, everyday) after two worked questions: "
            "four-way log-likelihood ranking",
            provenance="written for arena-callbacks (capabilities.FACTS)",
            license="Apache-2.0 (this project)",
            default_size=64,
            builder=_build_world_knowledge,
        ),
        Capability(
            name="arithmetic",
            kind="completion",
            description="Sums and products of one-digit numbers after a three-example prefix: "
            "exact match of the answer",
            provenance="generated by arena-callbacks (capabilities.ARITHMETIC_SHOTS and _arithmetic_problems)",
            license="Apache-2.0 (this project)",
            default_size=64,
            builder=_build_arithmetic,
        ),
        Capability(
            name="instruction_following",
            kind="completion",
            description="Verifiable chat instructions (repeat a sentence, reply with only a word, write a word in "
            "capitals) after one worked example: exact reply and end of turn",
            provenance="generated by arena-callbacks (capabilities._instruction_pool), in the tokenizer's chat "
            "template",
            license="Apache-2.0 (this project)",
            default_size=48,
            builder=_build_instruction_following,
            uses_tokenizer=True,
        ),
    )
}

_POOL_SIZES: dict[str, Callable[[], int | None]] = {
    "general_text": lambda: len(text_passages("probe")),
    "python_code": lambda: len(code_passages("probe")),
    "world_knowledge": lambda: len(FACTS),
    "arithmetic": lambda: len(_arithmetic_problems()),
    "instruction_following": lambda: len(_instruction_pool()),
}
