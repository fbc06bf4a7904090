"""Write the built-in demo prompt set, ``garden/data/demo_prompts.jsonl``.

Four topics of 60 prompts each, every one with a short reference answer:

* ``capitals``: "What is the capital of Peru?" -> "The capital of Peru is Lima." (hand-written facts)
* ``units``: metric length, mass, volume and hours/minutes conversions, computed exactly with ``Decimal``
* ``arithmetic``: small ``+``, ``-`` and ``×`` sums drawn by a seeded RNG and computed here
* ``definitions``: one-line, hand-written definitions of common words and concepts

A seeded RNG then marks exactly 20 % of each topic ``heldout`` and the rest ``train``.

Deterministic and stdlib-only: re-running it rewrites the file byte for byte (``tests/test_demo_data.py``
checks that). Usage::

    python scripts/make_demo_prompts.py [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import random
from decimal import Decimal
from pathlib import Path

SEED = "garden-demo-prompts-v1"
HELDOUT_FRACTION = 0.2
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "garden" / "data" / "demo_prompts.jsonl"

# (name as used in a sentence, capital). Only capitals that are undisputed and not being moved.
CAPITALS: list[tuple[str, str]] = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("the United Kingdom", "London"),
    ("Ireland", "Dublin"),
    ("Belgium", "Brussels"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("the Czech Republic", "Prague"),
    ("Hungary", "Budapest"),
    ("Greece", "Athens"),
    ("Sweden", "Stockholm"),
    ("Norway", "Oslo"),
    ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"),
    ("Iceland", "Reykjavik"),
    ("Russia", "Moscow"),
    ("Ukraine", "Kyiv"),
    ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"),
    ("Slovakia", "Bratislava"),
    ("Slovenia", "Ljubljana"),
    ("Lithuania", "Vilnius"),
    ("Latvia", "Riga"),
    ("Estonia", "Tallinn"),
    ("Turkey", "Ankara"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Ethiopia", "Addis Ababa"),
    ("Nigeria", "Abuja"),
    ("Ghana", "Accra"),
    ("Morocco", "Rabat"),
    ("Senegal", "Dakar"),
    ("Uganda", "Kampala"),
    ("Zimbabwe", "Harare"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("South Korea", "Seoul"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("the Philippines", "Manila"),
    ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"),
    ("Nepal", "Kathmandu"),
    ("Iran", "Tehran"),
    ("Saudi Arabia", "Riyadh"),
    ("Australia", "Canberra"),
    ("New Zealand", "Wellington"),
    ("Canada", "Ottawa"),
    ("the United States", "Washington, D.C."),
    ("Mexico", "Mexico City"),
    ("Cuba", "Havana"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
]

# (prompt, reference): accurate, one sentence, at most 30 words.
DEFINITIONS: list[tuple[str, str]] = [
    (
        "What is photosynthesis?",
        "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide "
        "to make sugar and oxygen.",
    ),
    (
        "What is gravity?",
        "Gravity is the force that pulls objects with mass towards each other, which is why things fall to the ground.",
    ),
    (
        "What is an atom?",
        "An atom is the smallest unit of a chemical element, made of a nucleus of protons and neutrons "
        "surrounded by electrons.",
    ),
    ("What is a molecule?", "A molecule is a group of two or more atoms held together by chemical bonds."),
    ("What is evaporation?", "Evaporation is the process by which a liquid turns into a gas, such as water drying up."),
    (
        "What is condensation?",
        "Condensation is the process by which a gas, such as water vapour, cools and turns into a liquid.",
    ),
    ("What is a noun?", "A noun is a word that names a person, place, thing or idea."),
    ("What is a verb?", "A verb is a word that describes an action, state or event, such as run, be or happen."),
    ("What is an adjective?", "An adjective is a word that describes a noun, such as big, red or happy."),
    (
        "What is an adverb?",
        "An adverb is a word that describes a verb, an adjective or another adverb, such as quickly.",
    ),
    (
        "What is a synonym?",
        "A synonym is a word that means the same or nearly the same as another word, such as big and large.",
    ),
    ("What is an antonym?", "An antonym is a word with the opposite meaning of another word, such as hot and cold."),
    ("What is democracy?", "Democracy is a system of government in which the people choose their leaders by voting."),
    (
        "What is an election?",
        "An election is a formal process in which people vote to choose a leader or decide an issue.",
    ),
    ("What is a tax?", "A tax is money that people and businesses must pay to the government to fund public services."),
    ("What is a budget?", "A budget is a plan for how to spend and save money over a period of time."),
    (
        "What is inflation?",
        "Inflation is the general rise in prices over time, so the same money buys less than before.",
    ),
    (
        "What is a volcano?",
        "A volcano is an opening in the Earth's crust through which molten rock, ash and gases escape.",
    ),
    ("What is a planet?", "A planet is a large round body that orbits a star, as the Earth orbits the Sun."),
    (
        "What is an orbit?",
        "An orbit is the curved path that an object, such as a planet or moon, follows around another object in space.",
    ),
    (
        "What is a galaxy?",
        "A galaxy is a huge system of stars, gas and dust held together by gravity, such as the Milky Way.",
    ),
    (
        "What is an ecosystem?",
        "An ecosystem is a community of living things interacting with each other and with their environment.",
    ),
    ("What is a habitat?", "A habitat is the natural home or environment where an animal or plant lives."),
    ("What is a mammal?", "A mammal is a warm-blooded animal with hair or fur that feeds its young with milk."),
    ("What is a herbivore?", "A herbivore is an animal that eats only plants."),
    ("What is a carnivore?", "A carnivore is an animal that eats mainly meat."),
    (
        "What is a fossil?",
        "A fossil is the preserved remains or trace of a plant or animal that lived long ago, usually found in rock.",
    ),
    ("What is a cell in biology?", "A cell is the smallest basic unit of life; all living things are made of cells."),
    (
        "What is DNA?",
        "DNA is the molecule in cells that carries the genetic instructions for how a living thing grows and works.",
    ),
    (
        "What is a virus?",
        "A virus is a tiny infectious agent that can only multiply inside the living cells of another organism.",
    ),
    (
        "What are bacteria?",
        "Bacteria are tiny single-celled organisms found almost everywhere; some cause disease, but many are harmless "
        "or helpful.",
    ),
    (
        "What is a vaccine?",
        "A vaccine is a substance that trains the immune system to recognise and fight a specific disease.",
    ),
    ("What is oxygen?", "Oxygen is a colourless gas in the air that people and animals need to breathe."),
    ("What is erosion?", "Erosion is the gradual wearing away of rock or soil by wind, water or ice."),
    (
        "What is a continent?",
        "A continent is one of the very large land masses of the Earth, such as Africa or Asia.",
    ),
    ("What is an island?", "An island is a piece of land completely surrounded by water."),
    (
        "What is a river?",
        "A river is a large natural stream of fresh water flowing towards a sea, a lake or another river.",
    ),
    ("What is an ocean?", "An ocean is a very large body of salt water that covers much of the Earth's surface."),
    ("What is a desert?", "A desert is a region that receives very little rain, so few plants can grow there."),
    (
        "What is a glacier?",
        "A glacier is a large, slow-moving mass of ice formed from snow packed down over many years.",
    ),
    ("What is climate?", "Climate is the usual weather of a place, measured over a long period of time."),
    (
        "What is weather?",
        "Weather is the state of the atmosphere at a particular time and place, such as rain, sunshine or wind.",
    ),
    (
        "What is energy?",
        "Energy is the ability to do work or cause change, such as moving, heating or lighting something.",
    ),
    ("What is friction?", "Friction is the force that resists motion when two surfaces rub against each other."),
    (
        "What is electricity?",
        "Electricity is a form of energy carried by moving electric charges, used to power lights and machines.",
    ),
    ("What is a battery?", "A battery is a device that stores chemical energy and releases it as electricity."),
    (
        "What is a magnet?",
        "A magnet is an object that produces a magnetic field and attracts iron and some other metals.",
    ),
    ("What is a thermometer?", "A thermometer is an instrument used to measure temperature."),
    (
        "What is a computer?",
        "A computer is an electronic machine that stores and processes data by following instructions called programs.",
    ),
    (
        "What is the internet?",
        "The internet is a global network of connected computers that lets people share information and communicate.",
    ),
    (
        "What is an algorithm?",
        "An algorithm is a step-by-step set of instructions for solving a problem or completing a task.",
    ),
    (
        "What is a prime number?",
        "A prime number is a whole number greater than 1 that can only be divided evenly by 1 and itself.",
    ),
    (
        "What is a fraction?",
        "A fraction is a number that represents part of a whole, written as one number over another, such as 1/2.",
    ),
    ("What is a triangle?", "A triangle is a flat shape with three straight sides and three angles."),
    ("What is a square?", "A square is a flat shape with four equal straight sides and four right angles."),
    (
        "What is a circle?",
        "A circle is a round flat shape whose edge is everywhere the same distance from its centre.",
    ),
    ("What is a century?", "A century is a period of one hundred years."),
    (
        "What is a metaphor?",
        "A metaphor is a figure of speech that describes something by saying it is something else, "
        "such as 'time is a thief'.",
    ),
    (
        "What is a dictionary?",
        "A dictionary is a book or resource that lists words in alphabetical order with their meanings.",
    ),
    ("What is a recipe?", "A recipe is a set of instructions for preparing a dish, including the ingredients needed."),
]

# (from unit, to unit, op, factor, values): "How many <to> are in <value> <from>?" is value op factor, where op
# is "*" or "/"; units as (singular, plural). Every value is chosen so that the result is exact.
_CM = ("centimetre", "centimetres")
_M = ("metre", "metres")
_KM = ("kilometre", "kilometres")
_G = ("gram", "grams")
_KG = ("kilogram", "kilograms")
_MIN = ("minute", "minutes")
_H = ("hour", "hours")
_ML = ("millilitre", "millilitres")
_L = ("litre", "litres")
CONVERSIONS: list[tuple[tuple[str, str], tuple[str, str], str, int, list[str]]] = [
    (_M, _CM, "*", 100, ["1", "2", "3.5", "0.5", "8", "6"]),
    (_CM, _M, "/", 100, ["100", "250", "40", "600", "75", "900"]),
    (_KM, _M, "*", 1000, ["1", "3", "2.5", "0.2", "12", "0.5"]),
    (_M, _KM, "/", 1000, ["1000", "5000", "1500", "250", "7500", "2000"]),
    (_KG, _G, "*", 1000, ["1", "4", "1.5", "0.25", "10", "0.5"]),
    (_G, _KG, "/", 1000, ["1000", "3000", "500", "2500", "750", "200"]),
    (_H, _MIN, "*", 60, ["1", "2", "1.5", "0.25", "5", "3"]),
    (_MIN, _H, "/", 60, ["60", "180", "90", "30", "150", "45"]),
    (_L, _ML, "*", 1000, ["1", "2", "0.5", "3.5", "6", "0.25"]),
    (_ML, _L, "/", 1000, ["1000", "4000", "250", "1500", "500", "3000"]),
]

ARITHMETIC_PER_OP = 20


def fmt(number: Decimal) -> str:
    """A plain decimal, no exponent, no trailing zeros: 350, 0.25, 1.5."""
    text = format(number.normalize(), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def unit(names: tuple[str, str], amount: str) -> str:
    return names[0] if Decimal(amount) == 1 else names[1]


def capitals() -> list[tuple[str, str]]:
    return [
        (f"What is the capital of {country}?", f"The capital of {country} is {city}.") for country, city in CAPITALS
    ]


def units() -> list[tuple[str, str]]:
    rows = []
    for src, dst, op, factor, values in CONVERSIONS:
        for value in values:
            result = Decimal(value) * factor if op == "*" else Decimal(value) / factor
            # must come out exact: no recurring decimals such as 50 minutes = 0.8333... hours
            back = result / factor if op == "*" else result * factor
            assert back == Decimal(value) and len(fmt(result)) <= 8, (value, src, dst)
            result_text = fmt(result)
            rows.append(
                (
                    f"How many {dst[1]} are in {value} {unit(src, value)}?",
                    f"{value} {unit(src, value)} is {result_text} {unit(dst, result_text)}.",
                )
            )
    return rows


def arithmetic() -> list[tuple[str, str]]:
    rng = random.Random(f"{SEED}:arithmetic")
    rows: list[tuple[str, str]] = []
    seen: set[tuple[str, frozenset[int]]] = set()
    for op in ("+", "-", "×"):
        count = 0
        while count < ARITHMETIC_PER_OP:
            if op == "+":
                a, b = rng.randint(2, 99), rng.randint(2, 99)
                result = a + b
            elif op == "-":
                a = rng.randint(20, 99)
                b = rng.randint(2, a - 1)
                result = a - b
            else:
                a, b = rng.randint(2, 12), rng.randint(2, 12)
                result = a * b
            key = (op, frozenset((a, b)))  # 3 + 5 and 5 + 3 count as one sum
            if key in seen:
                continue
            seen.add(key)
            rows.append((f"What is {a} {op} {b}?", f"{a} {op} {b} = {result}."))
            count += 1
    return rows


def build() -> list[dict]:
    topics = {"capitals": capitals(), "units": units(), "arithmetic": arithmetic(), "definitions": list(DEFINITIONS)}
    out: list[dict] = []
    all_prompts: set[str] = set()
    for topic, pairs in topics.items():
        prompts = [prompt for prompt, _ in pairs]
        assert len(set(prompts)) == len(prompts), f"duplicate prompt in {topic}"
        assert not all_prompts & set(prompts), f"prompt of {topic} also in another topic"
        all_prompts |= set(prompts)
        k = round(len(prompts) * HELDOUT_FRACTION)
        heldout = set(random.Random(f"{SEED}:{topic}:heldout").sample(sorted(prompts), k))
        for prompt, reference in pairs:
            assert len(reference.split()) <= 30, reference
            split = "heldout" if prompt in heldout else "train"
            out.append({"prompt": prompt, "reference": reference, "meta": {"topic": topic, "split": split}})
    return out


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to write (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    rows = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(render(rows).encode("utf-8"))
    print(f"wrote {len(rows)} prompts to {args.out}")


if __name__ == "__main__":
    main()
