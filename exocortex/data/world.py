"""A procedurally generated fictional world, and a pretraining corpus written about it.

Why this exists: no data hub is reachable, so the tiny CPU preset pretrains on text that the
project generates itself, deterministically from a seed.  The text has to teach a small GPT
language-like structure (not a handful of memorisable strings), and it has to be *about*
something, so that a later SFT stage can chat about the world and an eval can check answers
against `World.facts()`.

Layout of this module:
  * names, word lists and small helpers;
  * `World`: people, places and things with consistent facts, `facts()`, `ask()` and
    `encyclopedia_entry()`;
  * a tiny template engine: `[a|b|c]` alternatives are expanded once at import time, `{key}` slots
    are filled from a per-document context whose missing keys are drawn from word pools;
  * document families (encyclopedia, stories, dialogues, arithmetic, descriptive text) and the
    mixture `generate_documents()`;
  * `corpus_stats()`, which measures variety so that a collapsing generator is noticed.

Everything random goes through a `random.Random` passed in or built from a seed; nothing iterates
over a set or relies on `hash()`, so output is identical across processes and machines.
"""
from __future__ import annotations

import random
import re
import string
import weakref
import zlib
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Fact", "Person", "Place", "Thing", "Region", "World",
    "generate_documents", "corpus_stats",
    "encyclopedia_doc", "story_doc", "dialogue_doc", "arithmetic_doc", "descriptive_doc", "wordplay_doc",
    "spelling_words", "counted_letters", "COMMON_WORDS", "number_words", "everyday_operands",
    "DOC_FAMILIES",
]

# ----------------------------------------------------------------------------------------------
# small helpers


def _ch(rng: random.Random, seq):
    """rng.choice, but cheaper: one random() call (generation speed matters, see module doc)."""
    return seq[int(rng.random() * len(seq))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _an(word: str) -> str:
    """'a baker' / 'an innkeeper'."""
    vowel = word[:1].lower() in "aeiou" or word.lower().startswith(("hour", "honest"))
    return ("an " if vowel else "a ") + word


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000: 21 -> "twenty-one", 305 -> "three hundred and five"."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_words: {n} is out of range")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + (" and " + number_words(rest) if rest else "")
    rest = n % 1000
    return (number_words(n // 1000) + " thousand" +
            ((" and " if rest < 100 else " ") + number_words(rest) if rest else ""))


_IRREGULAR_PLURALS = (("leaf", "leaves"), ("loaf", "loaves"), ("knife", "knives"), ("wolf", "wolves"))


def _plural(word: str) -> str:
    for sing, plur in _IRREGULAR_PLURALS:
        if word.endswith(sing):
            return word[: -len(sing)] + plur
    if word.endswith(("s", "x", "z", "sh", "ch")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _join_and(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


# ----------------------------------------------------------------------------------------------
# word lists (data)

PROFESSIONS = (
    "baker blacksmith weaver fisher potter carpenter shepherd miller brewer healer scribe merchant "
    "tailor farmer hunter sailor mason cook teacher musician beekeeper glassblower herbalist "
    "cartographer innkeeper tanner jeweller bookbinder ropemaker boatbuilder gardener courier "
    "astronomer clockmaker librarian painter singer guard ferryman toymaker cheesemaker dyer "
    "lamplighter woodcutter candlemaker shoemaker"
).split()

HOBBIES = (
    "fishing", "painting", "singing", "dancing", "swimming", "climbing", "gardening", "carving",
    "sewing", "reading", "writing poems", "stargazing", "juggling", "knitting", "hiking",
    "collecting shells", "pressing flowers", "whittling", "bird watching", "telling stories",
    "drawing maps", "sailing", "archery", "playing riddles", "baking pies", "collecting stones",
    "keeping bees", "rowing", "playing the flute", "solving puzzles",
)

TRAITS = (
    "cheerful", "quiet", "patient", "curious", "stubborn", "generous", "careful", "brave", "shy",
    "talkative", "gentle", "clever", "honest", "restless", "thoughtful", "kind", "proud", "calm",
    "busy", "friendly",
)

CLIMATES = ("cold", "warm", "rainy", "dry", "windy", "foggy", "mild", "snowy", "humid", "stormy",
            "sunny", "damp")

SETTINGS = (
    "on a low hill", "in a green valley", "beside a wide lake", "on the edge of a dark forest",
    "on a windy plain", "among rocky cliffs", "by the sea", "in a marshy lowland",
    "on a river island", "at a crossroads", "on a terraced slope", "in a narrow gorge",
)

DIRECTIONS = ("north", "south", "east", "west", "far north", "far south", "north-east",
              "south-west", "north-west", "south-east")

COLOURS = ("red", "blue", "green", "yellow", "white", "black", "grey", "orange", "purple", "brown",
           "silver", "golden", "pink", "amber", "violet", "speckled", "striped", "pale blue")

SIZES = ("tiny", "small", "medium-sized", "large", "huge")

MATERIALS = ("iron", "oak", "bone", "copper", "glass", "stone", "bronze", "willow", "clay", "brass",
             "birch", "horn", "pine", "tin", "silver")

TASTES = ("sweet", "sour", "salty", "bitter", "spicy", "smoky", "nutty", "tangy", "buttery", "mild")

PLANT_USES = (
    "making rope", "dyeing cloth", "healing wounds", "brewing tea", "making paper",
    "thatching roofs", "feeding goats", "scenting soap", "weaving baskets", "making ink",
    "soothing coughs", "stuffing pillows", "polishing wood", "flavouring bread", "lighting lamps",
)

TOOL_USES = (
    "cutting rope", "carving wood", "digging wells", "catching fish", "measuring grain",
    "mending nets", "splitting logs", "grinding spices", "lighting fires", "sharpening blades",
    "drawing water", "shaping clay", "reading the stars", "trimming hedges", "weighing silver",
    "stitching leather", "planting seeds", "cleaning chimneys",
)

ANIMAL_FOODS = ("insects", "fish", "seeds", "grass", "berries", "worms", "nuts", "snails", "leaves",
                "mice")

SOUNDS = ("deep", "high", "soft", "loud", "bright", "hollow", "sweet", "rumbling", "ringing",
          "gentle", "sharp", "warm", "buzzing", "humming")

OCCASIONS = ("weddings", "funerals", "harvest festivals", "market days", "winter feasts",
             "boat races", "spring fairs", "naming days", "midsummer night", "the new year")

KINDS = ("animal", "plant", "tool", "food", "instrument")
_KIND_SHARE = (0.26, 0.24, 0.18, 0.2, 0.12)

_THING_PREFIXES = (
    "glimmer dusk ember frost moon salt ash thistle cinder river storm amber honey mist copper "
    "briar fen sun star dew night pepper barley silver stone cloud marsh sorrel willow wren "
    "bramble hollow mire tallow rime gale lantern pebble spindle velvet quill tumble whisper "
    "vel kor tal ris mor zan quen bri ost dral yss fen thal"
).split()

_THING_SUFFIXES = {
    "animal": "finch hound toad wing mole hare crab moth newt goat owl fox eel beetle lark otter "
              "bat heron vole snail stag boar".split(),
    "plant": "fern wort bloom moss root vine thorn reed cap berry leaf bell grass weed rush "
             "flower bark".split(),
    "tool": "hook saw awl knife spade loom chisel wheel lantern net sickle ladle hammer pick "
            "rake adze".split(),
    "food": "cake loaf stew pie bread broth cheese tart porridge dumpling roll jam soup crisp "
            "biscuit pudding".split(),
    "instrument": "harp horn drum flute lute pipe fiddle bell whistle gong zither".split(),
}

# syllable inventory for made-up proper names
_ONSETS = "b br c d dr f fl g gr h j k kr l m n p pr r s sh st t th tr v w z".split()
_VOWELS = "a e i o u a e i o a e ai ea ie ou".split()
_CODAS = ["", "", "", "", "n", "r", "l", "s", "m", "nd", "rn", "lt", "st", "th", "sk", "v", "ll"]
_FEM_END = "a ia ina elle ette wyn ra ys ie ena".split()
_MASC_END = "o an en us ric as or in ek al".split()
_SURNAME_END = ("way ton wick ford ley well brook more dale son berg hart croft ard ell ing "
                "worth stone field mont").split()
_PLACE_END = ("sk holm mere ford wick by stead gard ton moor haven dun vale wyn rath mouth gate "
              "fell port bury").split()
_RIVER_END = "a e on ith ra ne and ey is".split()
_MOUNT_END = "k dor thal ros gar mir horn ak un".split()
_REGION_END = "ia mark land wald shire mor dell reach".split()
_PETNAME_END = "p x bo ki ns ly ck ffy mo sy zzle".split()
_BAD_CLUSTER = re.compile(r"(.)\1\1|[^aeiouy]{4}|[aeiou]{3}|[aeiou]{2}.*[aeiou]{2}")


class _Namer:
    """Makes pronounceable, unique names from syllables (uniqueness is case-insensitive)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()   # membership only; never iterated (determinism)

    def stem(self, syllables: int = 1) -> str:
        r = self.rng
        s = "".join(_ch(r, _ONSETS) + _ch(r, _VOWELS) for _ in range(syllables))
        return s + _ch(r, _CODAS)

    def unique(self, make, min_len: int = 3, max_len: int = 11) -> str:
        for _ in range(10_000):
            name = _cap(make())
            low = name.lower()
            if min_len <= len(name) <= max_len and low not in self.used and not _BAD_CLUSTER.search(low):
                self.used.add(low)
                return name
        raise RuntimeError("name space exhausted")

    def first_name(self, gender: str) -> str:
        end = _FEM_END if gender == "f" else _MASC_END
        return self.unique(lambda: self.stem(1 + (self.rng.random() < 0.3)) + _ch(self.rng, end), 3, 9)

    def surname(self) -> str:
        """Not registered as used: families may share a surname; full names are checked by World."""
        name = ""
        while len(name) < 5 or len(name) > 11 or _BAD_CLUSTER.search(name.lower()):
            name = _cap(self.stem(1 + (self.rng.random() < 0.25)) + _ch(self.rng, _SURNAME_END))
        return name

    def place(self) -> str:
        return self.unique(lambda: self.stem(1 + (self.rng.random() < 0.3)) + _ch(self.rng, _PLACE_END), 4, 11)

    def river(self) -> str:
        return self.unique(lambda: self.stem(1) + _ch(self.rng, _RIVER_END), 4, 9)

    def mountain(self) -> str:
        return self.unique(lambda: self.stem(1) + _ch(self.rng, _MOUNT_END), 4, 9)

    def region(self) -> str:
        return self.unique(lambda: self.stem(2) + _ch(self.rng, _REGION_END), 5, 12)

    def thing(self, kind: str) -> str:
        def make():
            pre = _ch(self.rng, _THING_PREFIXES)
            if self.rng.random() < 0.25:
                pre = self.stem(1)
            return pre + _ch(self.rng, _THING_SUFFIXES[kind])
        return self.unique(make, 5, 15).lower()

    def pet_name(self) -> str:
        return _cap(_ch(self.rng, _ONSETS) + _ch(self.rng, _VOWELS) + _ch(self.rng, _PETNAME_END))


# ----------------------------------------------------------------------------------------------
# entities and facts


@dataclass(frozen=True)
class Fact:
    """One checkable fact. `value` is short and distinctive: an answer is judged correct iff
    `value.lower()` occurs in the reply (lower-cased)."""
    subject: str
    relation: str
    value: str
    question: str
    answer: str


@dataclass
class Region:
    name: str
    direction: str
    rivers: list[str]
    mountains: list[str]
    places: list[str] = field(default_factory=list)


@dataclass
class Place:
    name: str
    region: str
    population: int
    climate: str
    river: str
    mountain: str
    founded: int
    setting: str
    famous_for: str = ""


@dataclass
class Thing:
    name: str
    kind: str
    colour: str
    size: str
    origin: str
    extra: dict[str, str] = field(default_factory=dict)   # kind-specific relations, ordered


@dataclass
class Person:
    first: str
    last: str
    gender: str
    home: str
    profession: str
    age: int
    born: int
    food: str
    pet: str
    pet_name: str
    hobby: str
    trait: str
    friend: str = ""

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


PERSON_RELATIONS = ("home", "profession", "age", "birth_year", "favourite_food", "pet", "pet_name",
                    "friend", "hobby")
PLACE_RELATIONS = ("region", "population", "climate", "famous_for", "river", "mountain", "founded")
THING_EXTRA = {
    "animal": ("eats",),
    "plant": ("use",),
    "tool": ("material", "use"),
    "food": ("taste", "made_from"),
    "instrument": ("material", "sound", "played_at"),
}

# Question phrasings: the first is the canonical `Fact.question`; `World.ask` picks any.
# Keys are the relation, or "relation:kind" where things of different kinds need other wording.
# the facts and lookup tasks hold each relation's last wording out of training (phrasing families, issue #14)
QUESTIONS: dict[str, tuple[str, ...]] = {
    "home": ("Where does {s} live?", "Which town is {s} from?", "What is {s}'s home town?",
             "In which town does {s} live?"),
    "profession": ("What does {s} do for a living?", "What is {s}'s job?",
                   "What is {s}'s profession?", "What work does {s} do?"),
    "age": ("How old is {s}?", "What is {s}'s age?", "How many years old is {s}?"),
    "birth_year": ("In what year was {s} born?", "When was {s} born?", "What year was {s} born in?"),
    "favourite_food": ("What is {s}'s favourite food?", "What food does {s} like best?",
                       "Which dish does {s} love most?"),
    "pet": ("What kind of pet does {s} have?", "What is {s}'s pet?",
            "What animal does {s} keep as a pet?"),  # last: not inside a seen wording ("the name of {s}'s pet")
    "pet_name": ("What is the name of {s}'s pet?", "What is {s}'s {pet} called?",
                 "What did {s} name {his} pet?"),
    "friend": ("Who is {s}'s best friend?", "Who is {s}'s closest friend?",
               "Which person is {s}'s best friend?"),
    "hobby": ("What does {s} enjoy doing in {his} free time?", "What is {s}'s hobby?",
              "What does {s} like to do for fun?"),
    "region": ("In which region is {s}?", "Which region is {s} part of?", "Where is {s} located?"),
    "population": ("How many people live in {s}?", "What is the population of {s}?",
                   "How large is the population of {s}?"),
    "climate": ("What is the climate like in {s}?", "What is the weather usually like in {s}?",
                "What kind of climate does {s} have?"),
    "famous_for": ("What is {s} famous for?", "What is {s} best known for?",
                   "Which thing is {s} known for?"),
    "river": ("Which river flows through {s}?", "What river runs through {s}?",
              "What is the name of the river in {s}?"),
    "mountain": ("Which mountain stands near {s}?", "What mountain can be seen from {s}?",
                 "Which mountain is closest to {s}?"),
    "founded": ("When was {s} founded?", "In what year was {s} founded?",
                "In which year was the town of {s} founded?"),
    "kind": ("What kind of thing is the {s}?", "What is {a_thing}?",
             "Is the {s} an animal, a plant, a tool, a food or an instrument?"),
    "colour": ("What colour is the {s}?", "What is the colour of the {s}?",
               "What colour are {ss}?"),
    "size": ("How big is the {s}?", "What size is the {s}?", "Is the {s} large or small?"),
    "origin:animal": ("Where is the {s} found?", "Where can you find the {s}?",
                      "Near which town does the {s} live?"),
    "origin:plant": ("Where does the {s} grow?", "Where can you find the {s}?",
                     "Near which town does the {s} grow?"),
    "origin:tool": ("Where is the {s} made?", "Which town makes the {s}?",
                    "Where do {ss} come from?"),
    "origin:instrument": ("Where is the {s} made?", "Which town makes the {s}?",
                          "Where do {ss} come from?"),
    "origin:food": ("Where does the {s} come from?", "Which town is the {s} from?",
                    "Where was the {s} first made?"),
    "eats": ("What does the {s} eat?", "What is the {s}'s main food?", "What do {ss} feed on?"),
    "use": ("What is the {s} used for?", "What do people use the {s} for?",
            "Why do people use the {s}?"),
    "taste": ("What does the {s} taste like?", "How does the {s} taste?"),
    "made_from": ("What is the {s} made from?", "What is the main ingredient of the {s}?"),
    "material": ("What is the {s} made of?", "What material is the {s} made from?"),
    "sound": ("What does the {s} sound like?", "What kind of sound does the {s} make?"),
    "played_at": ("When is the {s} played?", "At what occasions is the {s} played?"),
}

ANSWERS: dict[str, str] = {
    "home": "{s} lives in {v}.",
    "profession": "{s} is {a_v}.",
    "age": "{s} is {v} years old.",
    "birth_year": "{s} was born in {v}.",
    "favourite_food": "{s}'s favourite food is {v}.",
    "pet": "{s} has a pet {v}.",
    "pet_name": "{s}'s pet {pet} is called {v}.",
    "friend": "{s}'s best friend is {v}.",
    "hobby": "In {his} free time, {s} enjoys {v}.",
    "region": "{s} is in {v}.",
    "population": "{s} has a population of {v}.",
    "climate": "{s} has {a_v} climate.",
    "famous_for": "{s} is famous for its {v}.",
    "river": "The River {v} flows through {s}.",
    "mountain": "Mount {v} rises near {s}.",
    "founded": "{s} was founded in {v}.",
    "kind": "The {s} is {a_v}.",
    "colour": "The {s} is {v}.",
    "size": "The {s} is {v}.",
    "origin:animal": "The {s} is found near {v}.",
    "origin:plant": "The {s} grows near {v}.",
    "origin:tool": "The {s} is made in {v}.",
    "origin:instrument": "The {s} is made in {v}.",
    "origin:food": "The {s} comes from {v}.",
    "eats": "The {s} eats {v}.",
    "use": "The {s} is used for {v}.",
    "taste": "The {s} tastes {v}.",
    "made_from": "The {s} is made from {v}.",
    "material": "The {s} is made of {v}.",
    "sound": "The {s} makes a {v} sound.",
    "played_at": "The {s} is played at {v}.",
}


class World:
    """A small fictional world, fully determined by `seed` (and the sizes).

    People live in places, keep pets (animals of this world), love foods of this world and have a
    best friend; places belong to regions with rivers and mountains and are famous for a thing
    made or found there; things have a kind, colour, size, origin place and kind-specific facts.
    """

    year = 1250   # "now" in the world's calendar: age + birth year == year

    def __init__(self, seed: int = 0, n_people: int = 300, n_places: int = 60, n_things: int = 120,
                 held_out_percent: int = 15):
        if n_people < 2 or n_places < 1 or n_things < len(KINDS):
            raise ValueError("need n_people >= 2, n_places >= 1, n_things >= 5")
        self.seed = seed
        rng = random.Random(f"exocortex-world-{seed}")
        namer = _Namer(rng)
        self._build_geography(rng, namer, n_places)
        self._build_things(rng, namer, n_things)
        self._build_people(rng, namer, n_people)
        self.entities: list = [*self.people, *self.places, *self.things]
        self._by_name = {e.name: e for e in self.entities}
        self._facts: list[Fact] | None = None
        self._ctx_cache: dict = {}
        # People whose every fact is kept out of the pretraining corpus (generate_documents(hold_out=True)):
        # the model can only answer about them by looking them up (tasks/world.py's lookup task).
        self.held_out_names = {p.name for p in self.people
                               if zlib.crc32(f"held-out|{p.name}".encode()) % 100 < held_out_percent}

    def is_held_out(self, entity) -> bool:
        return (entity if isinstance(entity, str) else entity.name) in self.held_out_names

    # -- construction ---------------------------------------------------------------------------

    def _build_geography(self, rng: random.Random, namer: _Namer, n_places: int) -> None:
        n_regions = max(1, min(10, round(n_places / 8)))
        dirs = list(DIRECTIONS)
        rng.shuffle(dirs)
        self.regions = [
            Region(namer.region(), dirs[i % len(dirs)],
                   [namer.river() for _ in range(rng.randint(2, 3))],
                   [namer.mountain() for _ in range(2)])
            for i in range(n_regions)
        ]
        self.places = []
        for i in range(n_places):
            reg = self.regions[i % n_regions] if i < n_regions else _ch(rng, self.regions)
            pop = int(10 ** rng.uniform(2.3, 4.9)) // 10 * 10
            place = Place(namer.place(), reg.name, pop, _ch(rng, CLIMATES), _ch(rng, reg.rivers),
                          _ch(rng, reg.mountains), rng.randint(300, 1150), _ch(rng, SETTINGS))
            reg.places.append(place.name)
            self.places.append(place)
        self.region_by_name = {r.name: r for r in self.regions}

    def _build_things(self, rng: random.Random, namer: _Namer, n_things: int) -> None:
        counts = [max(1, round(share * n_things)) for share in _KIND_SHARE]
        counts[0] += n_things - sum(counts)   # animals absorb rounding
        kinds = [k for k, c in zip(KINDS, counts) for _ in range(c)]
        rng.shuffle(kinds)
        # every place gets at least one thing from it (so "famous for" can be a local thing)
        origins = [p.name for p in self.places]
        rng.shuffle(origins)
        origins = (origins + [_ch(rng, self.places).name for _ in range(n_things)])[:n_things]
        self.things = []
        for kind, origin in zip(kinds, origins):
            self.things.append(Thing(namer.thing(kind), kind, _ch(rng, COLOURS), _ch(rng, SIZES), origin))
        plants = [t.name for t in self.things if t.kind == "plant"]
        for t in self.things:
            if t.kind == "animal":
                t.extra["eats"] = _ch(rng, plants) if plants and rng.random() < 0.5 else _ch(rng, ANIMAL_FOODS)
            elif t.kind == "plant":
                t.extra["use"] = _ch(rng, PLANT_USES)
            elif t.kind == "tool":
                t.extra["material"] = _ch(rng, MATERIALS)
                t.extra["use"] = _ch(rng, TOOL_USES)
            elif t.kind == "food":
                t.extra["taste"] = _ch(rng, TASTES)
                t.extra["made_from"] = _ch(rng, plants) if plants else "barley"
            else:
                t.extra["material"] = _ch(rng, MATERIALS)
                t.extra["sound"] = _ch(rng, SOUNDS)
                t.extra["played_at"] = _ch(rng, OCCASIONS)
        self.thing_by_name = {t.name: t for t in self.things}
        self.place_by_name = {p.name: p for p in self.places}
        self.things_from: dict[str, list[Thing]] = {p.name: [] for p in self.places}
        for t in self.things:
            self.things_from[t.origin].append(t)
        for p in self.places:
            p.famous_for = self.things_from[p.name][0].name

    def _build_people(self, rng: random.Random, namer: _Namer, n_people: int) -> None:
        animals = [t.name for t in self.things if t.kind == "animal"]
        foods = [t.name for t in self.things if t.kind == "food"]
        self.people = []
        full_names: set[str] = set()
        for _ in range(n_people):
            gender = "f" if rng.random() < 0.5 else "m"
            first = namer.first_name(gender)
            last = namer.surname()
            while f"{first} {last}" in full_names:
                last = namer.surname()
            full_names.add(f"{first} {last}")
            age = rng.randint(18, 84)
            self.people.append(Person(
                first, last, gender, _ch(rng, self.places).name, _ch(rng, PROFESSIONS), age,
                self.year - age, _ch(rng, foods), _ch(rng, animals), namer.pet_name(),
                _ch(rng, HOBBIES), _ch(rng, TRAITS)))
        for i, p in enumerate(self.people):
            j = rng.randrange(n_people - 1)
            p.friend = self.people[j + (j >= i)].name
        self.person_by_name = {p.name: p for p in self.people}
        self.residents: dict[str, list[Person]] = {p.name: [] for p in self.places}
        for p in self.people:
            self.residents[p.home].append(p)
        self.pet_owners: dict[str, list[Person]] = {t.name: [] for t in self.things}
        for p in self.people:
            self.pet_owners[p.pet].append(p)

    # -- lookups --------------------------------------------------------------------------------

    def entity(self, name_or_entity):
        """Accept an entity or its name (a thing's name may be given with a leading 'the ')."""
        if not isinstance(name_or_entity, str):
            return name_or_entity
        name = name_or_entity
        if name.lower().startswith("the ") and name[4:] in self._by_name:
            name = name[4:]
        return self._by_name[name]

    # -- contexts: the slot values templates refer to -------------------------------------------

    def _cached_ctx(self, key: tuple, pre: str, build) -> dict[str, str]:
        """An entity's template slots, built once; `pre` prefixes every slot name (e.g. "friend_")."""
        ctx = self._ctx_cache.get(key + (pre,))
        if ctx is None:
            ctx = build()
            if pre:
                ctx = {pre + k: v for k, v in ctx.items()}
            self._ctx_cache[key + (pre,)] = ctx
        return ctx

    def person_ctx(self, p: Person, pre: str = "") -> dict[str, str]:
        return self._cached_ctx(("person", p.name), pre, lambda: self._build_person_ctx(p))

    def _build_person_ctx(self, p: Person) -> dict[str, str]:
        fem = p.gender == "f"
        pet, food = self.thing_by_name[p.pet], self.thing_by_name[p.food]
        friend = self.person_by_name[p.friend]
        ctx = {
            "name": p.name, "first": p.first, "last": p.last,
            "he": "she" if fem else "he", "He": "She" if fem else "He",
            "his": "her" if fem else "his", "His": "Her" if fem else "His",
            "him": "her" if fem else "him", "himself": "herself" if fem else "himself",
            "job": p.profession, "a_job": _an(p.profession), "jobs": _plural(p.profession),
            "age": str(p.age), "born": str(p.born), "food": p.food, "pet": p.pet,
            "a_pet": _an(p.pet), "petname": p.pet_name, "hobby": p.hobby,
            "trait": p.trait, "a_trait": _an(p.trait),
            "pet_colour": pet.colour, "pet_size": pet.size,
            "a_pet_colour": _an(pet.colour), "a_pet_size": _an(pet.size), "pet_eats": pet.extra["eats"],
            "food_taste": food.extra["taste"], "food_from": food.extra["made_from"],
            "food_origin": food.origin,
            "friend": friend.name, "friend_first": friend.first, "friend_job": friend.profession,
            "friend_a_job": _an(friend.profession), "friend_home": friend.home,
            "friend_he": "she" if friend.gender == "f" else "he",
        }
        for k, v in self.place_ctx(self.place_by_name[p.home], "").items():
            if k != "place":
                ctx["home_" + k] = v
        ctx["home"] = p.home
        return ctx

    def place_ctx(self, pl: Place, pre: str = "") -> dict[str, str]:
        return self._cached_ctx(("place", pl.name), pre, lambda: self._build_place_ctx(pl))

    def _build_place_ctx(self, pl: Place) -> dict[str, str]:
        reg = self.region_by_name[pl.region]
        others = [n for n in reg.places if n != pl.name]
        ctx = {
            "place": pl.name, "region": pl.region, "direction": reg.direction,
            "pop": str(pl.population), "climate": pl.climate, "a_climate": _an(pl.climate),
            "famous": pl.famous_for, "famous_kind": self.thing_by_name[pl.famous_for].kind,
            "a_famous_kind": _an(self.thing_by_name[pl.famous_for].kind),
            "river": pl.river, "mountain": pl.mountain, "founded": str(pl.founded),
            "ago": str(self.year - pl.founded), "setting": pl.setting,
            "neighbour": others[0] if others else pl.name,
        }
        return ctx

    def thing_ctx(self, t: Thing, pre: str = "") -> dict[str, str]:
        return self._cached_ctx(("thing", t.name), pre, lambda: self._build_thing_ctx(t))

    def _build_thing_ctx(self, t: Thing) -> dict[str, str]:
        origin = self.place_by_name[t.origin]
        ctx = {
            "thing": t.name, "a_thing": _an(t.name), "things": _plural(t.name),
            "kind": t.kind, "a_kind": _an(t.kind), "kinds": _plural(t.kind),
            "colour": t.colour, "a_colour": _an(t.colour), "size": t.size, "a_size": _an(t.size),
            "origin": t.origin, "origin_region": origin.region,
            "origin_climate": origin.climate,
            "use": "", "eats": "", "taste": "", "made_from": "", "material": "", "sound": "",
            "played_at": "",
        }
        ctx.update(t.extra)
        return ctx

    # -- facts ----------------------------------------------------------------------------------

    def _fact_ctx(self, e) -> tuple[dict, list[tuple[str, str, str]]]:
        """(format context, [(relation, value, question/answer key)]) for one entity."""
        if isinstance(e, Person):
            ctx = dict(self.person_ctx(e), s=e.name)
            vals = (e.home, e.profession, str(e.age), str(e.born), e.food, e.pet, e.pet_name,
                    e.friend, e.hobby)
            return ctx, [(r, v, r) for r, v in zip(PERSON_RELATIONS, vals)]
        if isinstance(e, Place):
            ctx = dict(self.place_ctx(e), s=e.name)
            vals = (e.region, str(e.population), e.climate, e.famous_for, e.river, e.mountain,
                    str(e.founded))
            return ctx, [(r, v, r) for r, v in zip(PLACE_RELATIONS, vals)]
        ctx = dict(self.thing_ctx(e), s=e.name, ss=_plural(e.name))
        rels = [("kind", e.kind, "kind"), ("colour", e.colour, "colour"), ("size", e.size, "size"),
                ("origin", e.origin, "origin:" + e.kind)]
        rels += [(r, e.extra[r], r) for r in THING_EXTRA[e.kind]]
        return ctx, rels

    def facts(self) -> list[Fact]:
        """All facts of the world, in entity order (people, places, things)."""
        if self._facts is None:
            out = []
            for e in self.entities:
                ctx, rels = self._fact_ctx(e)
                for rel, val, qkey in rels:
                    c = dict(ctx, v=val, a_v=_an(val))
                    answer = _cap(ANSWERS[qkey].format_map(c))
                    out.append(Fact(e.name, rel, val, _cap(QUESTIONS[qkey][0].format_map(c)), answer))
            self._facts = out
        return list(self._facts)

    def ask(self, fact: Fact, rng: random.Random, last_wording: bool | None = None) -> str:
        """A random phrasing of the question for `fact`: any of its wordings, or (last_wording) only the last
        one, or (last_wording=False) any but the last — the facts task holds the last wordings out."""
        e = self.entity(fact.subject)
        ctx, _ = self._fact_ctx(e)
        qkey = f"origin:{e.kind}" if fact.relation == "origin" else fact.relation
        wordings = QUESTIONS[qkey]
        if last_wording is not None:
            wordings = wordings[-1:] if last_wording else wordings[:-1]
        return _cap(_ch(rng, wordings).format_map(ctx))

    # -- encyclopedia ---------------------------------------------------------------------------

    def encyclopedia_entry(self, entity, rng: random.Random) -> str:
        """A paragraph stating every fact of `entity` (an entity or its name), with varied
        sentence templates, varied order and a few consistent non-fact sentences."""
        return _encyclopedia_entry(self, self.entity(entity), rng)


# ----------------------------------------------------------------------------------------------
# template engine

def _expand(template: str) -> list[str]:
    """'a [b|c[d|]] e' -> ['a b e', 'a cd e', 'a c e']: every combination of the (possibly nested)
    alternatives, computed once at import so rendering is a single pick."""
    pos = 0

    def sequence() -> list[str]:
        nonlocal pos
        outs = [""]
        while pos < len(template) and template[pos] not in "|]":
            if template[pos] == "[":
                pos += 1
                options: list[str] = []
                while True:
                    options += sequence()
                    closer = template[pos]
                    pos += 1
                    if closer == "]":
                        break
                outs = [o + x for o in outs for x in options]
            else:
                end = pos
                while end < len(template) and template[end] not in "[|]":
                    end += 1
                outs = [o + template[pos:end] for o in outs]
                pos = end
        return outs

    result = sequence()
    if pos != len(template):
        raise ValueError(f"unbalanced alternatives in template: {template!r}")
    return [" ".join(r.split(" ")).replace("  ", " ").strip() for r in result]


class _Tpl:
    """A family of sentence templates: pick a template uniformly, then one of its expansions."""

    __slots__ = ("groups",)

    def __init__(self, *templates: str):
        self.groups = [_expand(t) for t in templates]

    def __call__(self, rng: random.Random, ctx: dict) -> str:
        g = self.groups[int(rng.random() * len(self.groups))]
        return g[int(rng.random() * len(g))].format_map(ctx)


# Decorative word pools: a `{key}` that is not in a document's context is drawn from here, fresh
# at every occurrence.  `{key_C}` capitalises the value of `{key}` (context or pool).
_POOLS: dict[str, tuple[str, ...]] = {
    "time": ("one morning", "one evening", "at dawn", "early one spring morning",
             "late one autumn afternoon", "on a grey winter day", "on the first day of summer",
             "one quiet afternoon", "just after sunrise", "on a market day", "long ago",
             "last year", "on a cold morning", "one windy day", "one bright day",
             "on the last day of the harvest", "one rainy evening", "before the first snow",
             "in the middle of the week", "on a holiday"),
    "season": ("spring", "summer", "autumn", "winter"),
    "a_season": ("a spring", "a summer", "an autumn", "a winter"),
    "travelled": ("walked", "travelled", "rode", "journeyed", "hiked", "wandered", "went"),
    "road": ("the old road", "the river path", "the mountain track", "a narrow path",
             "the main road", "the trade road", "a muddy lane", "the forest trail",
             "the coast road", "a winding track"),
    "feeling": ("happy", "tired", "hungry", "curious", "cheerful", "sleepy", "proud",
                "thoughtful", "excited", "calm", "pleased", "content", "restless", "hopeful",
                "grateful", "worn out", "light-hearted", "a little sad"),
    "greeting": ("Hello", "Good morning", "Good day", "Hi", "Well met", "Greetings",
                 "Good evening", "Hello there", "Ah, hello", "Good afternoon", "Hey", "Why, hello",
                 "Well, well", "Look who it is"),
    "slowly": ("slowly", "quickly", "carefully", "happily", "quietly", "patiently", "eagerly"),
    "nday": ("two", "three", "four", "five", "six", "several", "many"),
    "sky": ("the sky is clear", "grey clouds hang low", "a cold wind blows", "the sun is warm",
            "a light rain falls", "the air smells of smoke", "mist lies on the fields",
            "the stars are bright", "the wind is still", "thunder rumbles far away",
            "the light is soft and golden", "swallows fly low"),
    "sky_past": ("the sky was clear", "grey clouds hung low", "a cold wind blew", "the sun was warm",
                 "a light rain was falling", "the air smelled of smoke", "mist lay on the fields",
                 "the stars were bright", "the wind had dropped", "thunder rumbled far away",
                 "the light was soft and golden", "swallows flew low over the water"),
    "friendly": ("friendly", "kind", "busy", "cheerful", "quiet", "helpful", "grumpy", "young",
                 "tall", "chatty"),
    "good": ("good", "fine", "lovely", "pleasant", "splendid", "nice", "wonderful"),
    "container": ("basket", "sack", "box", "crate", "jar", "bag", "barrel", "bundle"),
    "goods": ("apples", "eggs", "candles", "stones", "shells", "pears", "nails", "buttons",
              "onions", "plums", "beads", "carrots", "cups", "ropes", "pots", "coins", "feathers",
              "nuts", "rolls", "letters"),
    "building": ("the inn", "the mill", "the market hall", "the old bridge", "the well",
                 "the library", "the harbour", "the town gate", "the temple", "the bakery",
                 "the forge", "the square"),
    "weather_event": ("it began to rain", "the wind grew strong", "a thick fog rolled in",
                      "the sun came out", "snow started to fall", "the clouds cleared",
                      "a storm gathered over the hills", "the air turned cold"),
    "bye": ("Goodbye", "Farewell", "See you soon", "Take care", "Until next time",
            "Safe travels", "Good luck", "Bye for now", "See you at the market", "Be well",
            "Until we meet again", "Mind the road"),
    "laughed": ("said", "replied", "answered", "laughed", "added", "called out", "whispered",
                "smiled"),
    "really": ("really", "truly", "very", "rather", "quite"),
    "thanks": ("Thank you", "Thanks", "Many thanks", "I am grateful", "Thank you kindly"),
    "opener": ("Well", "Oh", "Ah", "Hmm", "You know", "Honestly", "Indeed", "Of course"),
}


class _Ctx(dict):
    """Format context: entity slots set explicitly; other slots drawn from `_POOLS`."""

    __slots__ = ("rng",)

    def __init__(self, rng: random.Random, *maps: dict):
        super().__init__()
        self.rng = rng
        for m in maps:
            self.update(m)

    def __missing__(self, key: str) -> str:
        if key.endswith("_C"):
            return _cap(self[key[:-2]])
        pool = _POOLS[key]
        return pool[int(self.rng.random() * len(pool))]


# ----------------------------------------------------------------------------------------------
# encyclopedia templates.  {S}/{s}: subject at sentence start / mid-sentence; {Poss}/{poss}:
# its possessive; {o}: object form.  The subject varies between full name, short form and pronoun.

_PERSON_STATEMENTS = {
    "home": _Tpl(
        "{S} lives in {home}.",
        "{S} [makes {his} home|has made {his} home|has a house|keeps a small house] in {home}.",
        "{S} [comes from|is from|hails from] {home}[, a town in {home_region}|, {home_a_climate} town in {home_region}|].",
        "{Poss} home is in {home}[, {home_a_climate} town in {home_region}|, not far from Mount {home_mountain}|].",
        "[For many years|Today|These days|For now], {s} [has lived|lives] in {home}.",
        "{S} [settled|made a life] in {home}[, {home_a_climate} town| by the River {home_river}|] and lives there [still|to this day].",
        "The people of {home} [count|know] {o} as one of their own.",
        "Home for {s} is {home}[, on the River {home_river}|, in the shadow of Mount {home_mountain}|].",
    ),
    "profession": _Tpl(
        "{S} [works as|earns a living as|is] {a_job}[ in {home}|].",
        "By trade, {s} is {a_job}.",
        "{S} has [worked|been working] as {a_job} [for many years|since {his} youth|for most of {his} life|for a long time].",
        "{Poss} [job|profession|trade|work] is that of {a_job}.",
        "[People in {home} know|Everyone in {home} knows|The neighbours know] {o} as {a_job}.",
        "{S} is {a_job}[, and a [good|skilled|hard-working|careful] one|, like {his} [mother|father] before {him}|].",
        "[If you need {a_job}|When someone in {home} needs {a_job}], [ask|go to|call on] {o}.",
        "[Trained|Skilled] as {a_job}, {s} [takes pride in the work|rarely takes a day off|has many customers].",
    ),
    "age": _Tpl(
        "{S} is {age} years old.",
        "{S} is [now |]{age}[ years of age|].",
        "{Poss} age is {age}.",
        "[This year|Now], {s} is {age} years old.",
        "{S} [has lived|has seen] {age} [years|winters|summers][ so far|].",
        "At {age} years old, {s} [still works every day|is well known in {home}|has seen much of {home_region}].",
    ),
    "birth_year": _Tpl(
        "{S} was born in {born}.",
        "{S} was born in the year {born}[, in the {season}|].",
        "{Poss} year of birth is {born}.",
        "[The year|It was in] {born} [was when|that] {s} was born.",
        "{S} came into the world in {born}[, on a [cold|warm|bright|grey|quiet] {season} day| during {a_season} storm|].",
    ),
    "favourite_food": _Tpl(
        "{Poss} favourite food is {food}.",
        "{S} [loves|adores|is very fond of] {food}[ more than any other dish|, {his} favourite food|, the best food of all].",
        "[Of all dishes|Of all foods|Above all other food], {s} likes {food} best.",
        "{S} would never say no to a [bowl|plate|serving|slice] of {food}, {his} favourite food.",
        "[No dish|Nothing] pleases {o} more than {food}[, which tastes {food_taste}|, made from {food_from}|].",
        "Ask {o} about food and {he} will [talk about|praise] {food}, {his} favourite.",
    ),
    "pet": _Tpl(
        "{S} [keeps|has|owns] a pet {pet}.",
        "{S} [lives|shares {his} house] with a pet {pet}.",
        "{Poss} pet is {a_pet}.",
        "[At home|In {his} house], {s} keeps {a_pet} as a pet.",
        "{S} has {a_pet} for a pet[, {a_pet_colour} creature|, {a_pet_size} animal|].",
        "[Everyone in {home} knows|People know] {poss} pet {pet}[ by sight| well|].",
    ),
    "pet_name": _Tpl(
        "{Poss} {pet} is [called|named] {petname}.",
        "{Poss} pet [answers to|goes by] the name {petname}.",
        "{S} named {his} pet {petname}.",
        "The name of {poss} pet is {petname}.",
        "[Every evening|Each morning|Whenever {he} comes home], {s} [calls|whistles for] {petname}, {his} {pet}.",
    ),
    "friend": _Tpl(
        "{Poss} best friend is {friend}.",
        "{S} and {friend} are [best friends|the closest of friends].",
        "{S} [spends much of {his} time|often shares a meal] with {his} best friend, {friend}.",
        "[Of all {his} friends|Among {his} many friends], {s} is closest to {friend}, {his} best friend.",
        "{friend} is {poss} best friend.",
        "[Since childhood|For years|Ever since they met], {s} and {friend} have been best friends.",
    ),
    "hobby": _Tpl(
        "In {his} free time, {s} enjoys {hobby}.",
        "{S} [likes|loves|enjoys] {hobby}[ when {he} is not working| on quiet evenings| on rest days|].",
        "{Poss} favourite pastime is {hobby}.",
        "When work is done, {s} [usually spends|often spends|likes to spend] [the evening|an hour] {hobby}.",
        "{hobby_C} is what {s} enjoys most in {his} free time.",
        "[On rest days|In {season}|After a long day], you will [find|see] {o} {hobby}.",
    ),
}

_PERSON_COMBOS = {
    ("profession", "home"): _Tpl(
        "{S} is {a_job} [who lives|living|based] in {home}.",
        "{S} works as {a_job} in {home}.",
        "In {home}, {s} [works|earns a living] as {a_job}."),
    ("age", "birth_year"): _Tpl(
        "Born in {born}, {s} is [now |]{age} years old.",
        "{S} was born in {born} and is {age} years old[ now|].",
        "{S} is {age}; {he} was born in the year {born}."),
    ("pet", "pet_name"): _Tpl(
        "{S} has {a_pet} [named|called] {petname}.",
        "{S} keeps a pet {pet} [named|called] {petname}.",
        "{petname}, {a_pet}, belongs to {o}."),
    ("hobby", "profession"): _Tpl(
        "When not working as {a_job}, {s} enjoys {hobby}.",
        "{S} is {a_job} who enjoys {hobby} in {his} free time."),
}

_PERSON_FILLERS = _Tpl(
    "{S} is known [in {home}|among {his} neighbours|to everyone] as {a_trait} [person|soul].",
    "[Neighbours|Friends] say that {s} is [very |rather |]{trait}.",
    "{friend_first}, {his} best friend, is {friend_a_job} from {friend_home}.",
    "{Poss} pet {pet} is {pet_colour} and {pet_size}[, and it eats {pet_eats}|].",
    "{home} is {home_a_climate} town in {home_region}[, on the River {home_river}|].",
    "{food_C}, {his} favourite food, is made from {food_from}.",
    "{food_C}, which {s} [loves|likes best], comes from {food_origin} and tastes {food_taste}.",
    "[Most days|On most days|Every morning], {s} [walks|goes] to [the market|work|{building}] [early|before noon|after breakfast].",
    "{home} is famous for its {home_famous}, [and {s} is proud of it|which {s} sees every day|as {s} will gladly tell you].",
    "From {poss} [window|door|garden], {s} can see Mount {home_mountain}.",
    "[Like many people in {home}|As {a_job}], {s} [rises early|works long hours|knows everyone in town].",
    "{friend_first} lives in {friend_home}, [and the two [visit|write to] each other often|but they meet whenever they can].",
    "{S} [walks|takes] {poss} {pet} along the River {home_river} [every evening|on rest days|in {season}].",
)

_PLACE_STATEMENTS = {
    "region": _Tpl(
        "{S} is a [town|settlement] in {region}.",
        "{S} [lies|sits|is located] in [the region of |]{region}[, in the {direction}|].",
        "{S} belongs to the region of {region}.",
        "[In|Within] the region of {region} lies {place}.",
    ),
    "population": _Tpl(
        "{S} has a population of [about |around |roughly |]{pop}.",
        "[About|Around|Some|Roughly] {pop} people live in {s}.",
        "{Poss} population is [about |]{pop}.",
        "{S} is home to [about |some |]{pop} people.",
        "[The last count|A recent count] [found|gave] {pop} people living in {s}.",
    ),
    "climate": _Tpl(
        "{S} has {a_climate} climate.",
        "The weather in {s} is [usually|mostly|often] {climate}.",
        "[Visitors|Travellers|Traders] [often|always] [say|remark] that {s} is {climate}.",
        "[For most of the year|Most of the year|Nearly all year], {s} is {climate}.",
        "{Poss} climate is {climate}.",
        "[Anyone who visits|Every visitor to] {s} [learns|soon finds out] that the weather there is {climate}.",
    ),
    "famous_for": _Tpl(
        "{S} is famous for its {famous}.",
        "{S} is [best |well |]known for its {famous}.",
        "[People|Traders|Travellers] come from far away to {s} for its {famous}.",
        "The {famous} is what {s} is famous for.",
        "{S} is famous for the {famous}[, {a_famous_kind}|].",
    ),
    "river": _Tpl(
        "The River {river} flows through {s}.",
        "{S} [stands|sits|was built] on the [banks|bank] of the River {river}.",
        "[Through|Right through] {s} runs the River {river}.",
        "The River {river} [runs|winds|flows] [through|past the houses of] {s}.",
        "[Bridges|Old bridges|Stone bridges] cross the River {river} in {s}.",
    ),
    "mountain": _Tpl(
        "Mount {mountain} rises [near|above|close to] {s}.",
        "{S} lies [at the foot of|in the shadow of|below|near] Mount {mountain}.",
        "From {s} one can see Mount {mountain}.",
        "[On clear days|In the morning], Mount {mountain} [looks down on|shines above] {s}.",
        "[The nearest mountain to {s}|The mountain closest to {s}] is Mount {mountain}.",
    ),
    "founded": _Tpl(
        "{S} was founded in {founded}.",
        "{S} was founded in the year {founded}[, {ago} years ago|].",
        "[The first houses of|The town of] {s} [date from|go back to] {founded}, when it was founded.",
        "{Poss} founding year is {founded}.",
        "[Settlers|The first families|Farmers from the {direction}] founded {s} in {founded}.",
    ),
}

_PLACE_COMBOS = {
    ("river", "mountain"): _Tpl("{S} lies between the River {river} and Mount {mountain}.",
                                "{S} sits on the River {river}, [below|near] Mount {mountain}."),
    ("region", "climate"): _Tpl("{S} is {a_climate} town in {region}.",
                                "In {region} lies {place}, {a_climate} town."),
    ("population", "founded"): _Tpl(
        "Founded in {founded}, {s} [is now home to|now has] {pop} people.",
        "{S} was founded in {founded} and [has|now has] a population of {pop}."),
}

_PLACE_FILLERS = _Tpl(
    "{S} [lies|is built|stands] {setting}.",
    "[The streets of|The market of] {s} [are|is] [busy|crowded|lively] on market days.",
    "[Travellers|Merchants] often stop in {s} on the way to {neighbour}.",
    "[In {season}|Every {season}], {sky} over {s}.",
    "Many of the [houses|roofs] in {s} are [made|built] of [stone|wood|brick|timber].",
    "{S} has [a small|a busy|an old] market and [a few|several|many] [inns|workshops|bakeries].",
)

_THING_STATEMENTS = {
    "kind": _Tpl(
        "The {thing} is {a_kind}.",
        "[{a_thing_C}|The {thing}] is a kind of {kind}.",
        "{S} is {a_kind}[ of this world|, and a well-known one|].",
        "[Most people know|Everyone knows] that the {thing} is {a_kind}.",
    ),
    "colour": _Tpl(
        "{S} is {colour}[ in colour|].",
        "{Poss} colour is {colour}.",
        "{S} has {a_colour} [colour|hue|shade].",
        "[Most|Nearly all] {things} are {colour}.",
        "[You will know|One can spot] {s} by its {colour} colour.",
    ),
    "size": _Tpl(
        "{S} is {size}.",
        "In size, {s} is {size}.",
        "{S} is {size}[ for {a_kind}|].",
        "{things_C} are {size}.",
        "[As for size|In size], {things} are {size}.",
    ),
    "origin:animal": _Tpl(
        "{S} is found near {origin}.",
        "{S} lives in the [hills|fields|woods|marshes|meadows] around {origin}.",
        "[You can see|One can find] {things} near {origin}.",
        "{things_C} [live|are found] near {origin}[, in {origin_region}|].",
    ),
    "origin:plant": _Tpl(
        "{S} grows near {origin}.",
        "{S} is found [in the fields |in the woods |]around {origin}.",
        "{things_C} grow [wild |]near {origin}[, in {origin_region}|].",
        "[Near|Around] {origin} the {thing} grows [everywhere|in great numbers|along the roads].",
    ),
    "origin:tool": _Tpl(
        "{S} is made in {origin}.",
        "[Craftspeople|Makers|Smiths] in {origin} make {things}.",
        "{things_C} come from the workshops of {origin}.",
        "{S} is a tool made in {origin}[, in {origin_region}|].",
    ),
    "origin:instrument": _Tpl(
        "{S} is made in {origin}.",
        "[Instrument makers|Makers] in {origin} build {things}.",
        "{things_C} come from {origin}[, in {origin_region}|].",
    ),
    "origin:food": _Tpl(
        "{S} comes from {origin}.",
        "{S} is a [dish|food] from {origin}.",
        "[The cooks of {origin}|People in {origin}] first made the {thing}.",
        "{S} comes from the town of {origin}[, in {origin_region}|].",
    ),
    "eats": _Tpl(
        "{S} eats {eats}.",
        "{things_C} feed on {eats}.",
        "{Poss} main food is {eats}.",
        "{S} [lives on|mostly eats] {eats}.",
    ),
    "use": _Tpl(
        "{S} is used for {use}.",
        "People use {things} for {use}.",
        "{things_C} are [gathered|collected|bought|prized] for {use}.",
        "The main use of {s} is {use}.",
    ),
    "taste": _Tpl(
        "{S} tastes {taste}.",
        "{S} has a {taste} taste.",
        "The taste of {s} is {taste}.",
    ),
    "made_from": _Tpl(
        "{S} is made from {made_from}.",
        "Cooks make {s} from {made_from}.",
        "The main ingredient of {s} is {made_from}.",
    ),
    "material": _Tpl(
        "{S} is made of {material}.",
        "{S} is [made|crafted|built] from {material}.",
        "{Poss} [body|frame] is made of {material}.",
    ),
    "sound": _Tpl(
        "{S} makes a {sound} sound.",
        "{S} has a {sound} sound.",
        "When played, {s} gives a {sound} sound.",
    ),
    "played_at": _Tpl(
        "{S} is played at {played_at}.",
        "[Musicians|Players] play {s} at {played_at}.",
        "You will hear {s} at {played_at}.",
    ),
}

_THING_COMBOS = {
    ("kind", "size"): _Tpl("The {thing} is {a_size} {kind}.",
                           "{S} is {a_size} {kind}[ of this world|]."),
    ("colour", "size"): _Tpl("{S} is {size} and {colour}.",
                             "{S} is {colour} and {size}."),
    ("material", "use"): _Tpl("{S} is made of {material} and used for {use}."),
    ("taste", "made_from"): _Tpl("{S} is made from {made_from} and tastes {taste}."),
    ("sound", "played_at"): _Tpl("{S} makes a {sound} sound and is played at {played_at}."),
}

_THING_FILLERS = _Tpl(
    "{things_C} are [common|well known|often seen|often talked about] in {origin_region}.",
    "[The weather around|The climate near] {origin} is {origin_climate}[, which suits the {thing}|].",
    "[Traders|Merchants] [carry|sell] {things} [far beyond|well outside] {origin_region}.",
    "[Children|Travellers] [often ask about|like to see] the {thing}.",
)

_TITLES = ("{name}\n", "== {name} ==\n", "{name} ({label})\n", "About {name}\n", "", "", "",
           "Entry: {name}\n", "{name}: {label}\n")


def _subject_forms(e) -> list[tuple[str, str, str, str, str]]:
    """(S, s, Poss, poss, o) variants: subject at sentence start / mid-sentence, possessive at
    start / mid-sentence, object.  The first variant names the entity in full."""
    if isinstance(e, Person):
        he, his, him = ("She", "Her", "her") if e.gender == "f" else ("He", "His", "him")
        return [(e.name, e.name, e.name + "'s", e.name + "'s", e.name),
                (e.first, e.first, e.first + "'s", e.first + "'s", e.first),
                (he, he.lower(), his, his.lower(), him)]
    if isinstance(e, Place):
        return [(e.name, e.name, e.name + "'s", e.name + "'s", e.name),
                ("The town", "the town", "The town's", "the town's", "the town"),
                ("It", "it", "Its", "its", "it")]
    full = "the " + e.name
    return [(_cap(full), full, _cap(full) + "'s", full + "'s", full),
            ("It", "it", "Its", "its", "it"),
            ("This " + e.kind, "this " + e.kind, "This " + e.kind + "'s", "this " + e.kind + "'s",
             "this " + e.kind)]


def _encyclopedia_entry(world: World, e, rng: random.Random) -> str:
    if isinstance(e, Person):
        base = world.person_ctx(e)
        rels, stmts, combos, fillers = list(PERSON_RELATIONS), _PERSON_STATEMENTS, _PERSON_COMBOS, _PERSON_FILLERS
        label, lead = e.profession, ("profession", "home")
    elif isinstance(e, Place):
        base = world.place_ctx(e)
        rels, stmts, combos, fillers = list(PLACE_RELATIONS), _PLACE_STATEMENTS, _PLACE_COMBOS, _PLACE_FILLERS
        label, lead = "town in " + e.region, ("region",)
    else:
        base = world.thing_ctx(e)
        rels = ["kind", "colour", "size", "origin:" + e.kind, *THING_EXTRA[e.kind]]
        stmts, combos, fillers = _THING_STATEMENTS, _THING_COMBOS, _THING_FILLERS
        label, lead = e.kind, ("kind",)
    ctx = _Ctx(rng, base)
    forms = _subject_forms(e)
    # order: usually an identifying relation first, the rest shuffled
    rng.shuffle(rels)
    if rng.random() < 0.7:
        first = _ch(rng, lead)
        rels.remove(first)
        rels.insert(0, first)
    units: list[object] = []
    i = 0
    while i < len(rels):
        pair = (rels[i], rels[i + 1]) if i + 1 < len(rels) else None
        if pair and rng.random() < 0.5 and (pair in combos or pair[::-1] in combos):
            units.append(combos.get(pair) or combos[pair[::-1]])
            i += 2
        else:
            units.append(stmts[rels[i]])
            i += 1
    for _ in range(int(rng.random() * 3.5)):
        units.insert(1 + int(rng.random() * len(units)), fillers)
    sentences = []
    force_full = True
    for unit in units:
        f = forms[0] if force_full else forms[int(rng.random() * 2.6) % 3]
        ctx["S"], ctx["s"], ctx["Poss"], ctx["poss"], ctx["o"] = f
        sent = unit(rng, ctx)
        sentences.append(sent)
        force_full = "friend" in sent  # after naming another person, name the subject again
    title = _ch(rng, _TITLES)
    if title:
        title = title.format(name=e.name if not isinstance(e, Thing) else _cap(e.name), label=label)
    return title + " ".join(sentences)


def encyclopedia_doc(world: World, rng: random.Random, entity=None) -> str:
    """An encyclopedia entry; a random entity unless one is given."""
    return world.encyclopedia_entry(entity if entity is not None else _ch(rng, world.entities), rng)


# ----------------------------------------------------------------------------------------------
# stories: a protagonist, a few events with tracked state, consistent with the world's facts

_STORY_OPEN = _Tpl(
    "{time_C}, {name} [set out|left] from {home}[ with {his} {pet} {petname}|].",
    "{name} was {a_job} who lived in {home}[, {home_a_climate} town in {home_region}|].",
    "In {home}, where the weather is [usually|nearly always] {home_climate}, there lived {a_job} named {name}.",
    "This is a [story|tale] about {name}, {a_job} from {home}.",
    "[Everyone in {home} knew|The people of {home} all knew] {first}, the {trait} {job}.",
    "{time_C}, {first} woke up [early|late|before the sun] in {his} house in {home}.",
    "{first} had lived in {home} for most of {his} {age} years.",
    "In the {season} of {year}, {name}, {a_job} from {home}, [decided|made up {his} mind] to go on a journey.",
    "[There was once|Once there was|Not long ago there lived] {a_trait} {job} called {name}.",
)

_STORY_TRAVEL = _Tpl(
    "{He} {travelled} along {road} [for {nday} days|all morning|until evening|for a long time] until {he} reached {d_place}.",
    "{He} took {road} to {d_place}[, a town in {d_region}|, which lies {d_setting}|].",
    "[Then|After that|Later|The next day], {first} {travelled} to {d_place}[ by the River {d_river}|].",
    "[With {his} {pet} at {his} side|With a bag on {his} back], {he} set off for {d_place}.",
    "{first} followed the River {d_river} [down|up] to {d_place}.",
)

_STORY_ARRIVE = _Tpl(
    "{d_place} was {d_climate}[ that day| as always| as usual|], and Mount {d_mountain} [rose|stood|loomed] above the roofs.",
    "In {d_place}, {sky_past}[, and the town smelled of {d_famous}|].",
    "{d_place} is famous for its {d_famous}, and {first} [saw|noticed] it [everywhere|in every shop|at once].",
    "The streets of {d_place} were [busy|quiet|crowded|empty][ that {season}|].",
    "{first} had heard that about {d_pop} people live in {d_place}, and it [seemed|looked] [even bigger|smaller than that|just as busy].",
)

_STORY_MEET = _Tpl(
    "There {he} met {m_name}, {m_a_job} from {m_home}.",
    "[On the way|At {building}|Near {building}], {first} met {m_first}, a {friendly} {m_job} from {m_home}.",
    "{first} [ran into|came across|bumped into] {m_name}, who [works|worked] as {m_a_job}.",
    "[By chance|Luckily|To {his} surprise], {he} met {m_name}[, {m_a_trait} {m_job}|] from {m_home}.",
)

_STORY_MEET_TALK = _Tpl(
    "\"{greeting}, {first}!\" {m_first} said. \"[What brings you here|Where are you going|How is {home}]?\"",
    "{m_first} told {him} about {m_home}, where the weather is {m_home_climate}.",
    "They talked about {m_home} and the River {m_home_river}[ for a long time| until sunset|].",
    "{m_first} [showed|told] {first} [{m_his} {m_pet}, {m_petname}|about {m_his} work as {m_a_job}].",
    "\"I am {m_age} years old and I have never [seen|been to] {home},\" {m_first} {laughed}.",
    "{m_first} [offered|gave] {him} some {m_food}, which {m_he} [loves|likes best].",
)

_STORY_VISIT_FRIEND = _Tpl(   # moves the protagonist to the friend's town
    "{He} visited {his} best friend {friend_first} in {friend_home}.",
    "[Later|That afternoon|In the evening], {first} went to see {his} best friend, {friend}, in {friend_home}.",
    "{first} [travelled|walked] to {friend_home} to [visit|surprise] {his} best friend, {friend_first} the {friend_job}.",
)

_STORY_FRIEND = _Tpl(
    "{first} wrote a letter to {his} best friend {friend_first}, {friend_a_job} in {friend_home}.",
    "{His} best friend, {friend_first}, [was waiting|came to meet {him}] [at {building}|by the road].",
    "{first} [thought of|missed] {his} best friend {friend_first}, far away in {friend_home}.",
)

_STORY_TRADE = _Tpl(
    "{He} bought {n1} {t_things} [for|at] {n2} coins each and paid {n3} coins in all.",
    "At the market, {first} sold {n1} {t_things} for {n2} coins each, earning {n3} coins.",
    "{first} traded {his} {goods} for {n1} {t_things}[ from {t_origin}|].",
    "[A merchant|A trader|An old woman|An old man] [offered|sold] {him} {t_a_thing} from {t_origin}[ for {n2} coins|].",
)

_STORY_COOK = _Tpl(
    "That evening {he} cooked {food}, {his} favourite food[, with {food_from} from the market|].",
    "{first} [made|cooked|prepared] a big [pot|plate|bowl] of {food}, which tastes {food_taste}.",
    "[For supper|At noon|For dinner], {he} ate {food}[, as {he} always does when {he} can|, {his} favourite dish].",
    "{He} [bought|gathered] some {food_from} to make {food}[, {his} favourite food|].",
)

_STORY_FIND = _Tpl(
    "Near {t_origin}, {he} found {t_a_colour} {t_thing}.",
    "[On the road near|Outside] {t_origin}, {first} [found|spotted|noticed] {t_a_thing}[, {t_colour} and {t_size}|].",
    "{He} [saw|found] a {t_size} {t_thing} near {t_origin}[; it was {t_colour}|].",
    "[In the fields|In the woods|By the river] near {t_origin}, {first} [saw|came upon] some {t_things}.",
)

_STORY_PET = _Tpl(
    "{His} {pet} {petname} [followed|ran after|trotted behind] {him} [all the way|the whole day|everywhere].",
    "{petname}, {his} {pet}, [was hungry|fell asleep|was restless|would not sit still][ all day|].",
    "{first} fed {his} {pet} some {pet_eats}[, as {he} does every day|].",
    "{petname} the {pet} [found|sniffed out|chased] something [in the grass|under a bush|near the road].",
)

_STORY_WEATHER = _Tpl(
    "[Then|Suddenly|After a while|Around noon], {weather_event} over {loc}.",
    "In {loc}, {sky_past}, and {first} [felt|was] {feeling}.",
    "[By evening|At sunset|That night], {weather_event} over {loc}[, but {first} did not mind|, as it often does there|].",
    "[The weather in {loc} was {loc_climate}|It was {loc_climate} in {loc}], [as it usually is|as always|just as {first} expected].",
)

_STORY_HOBBY = _Tpl(
    "To pass the time, {he} spent the afternoon {hobby}.",
    "{first} [enjoyed|loved] an hour of {hobby}[ before bed| by the river|].",
    "[In the evening|After lunch], {first} [sat down to rest|took a break] and turned to {hobby}.",
)

_STORY_COUNT = _Tpl(
    "{He} counted {n1} {goods} in one {container} and {n2} in another, {n3} in all.",
    "{first} had {n1} coins and [earned|found|was given] {n2} more, so {he} had {n3}.",
)

_STORY_COUNT_SUB = _Tpl(
    "{first} had {n1} coins and spent {n2}, so {he} had {n3} left.",
    "Of the {n1} {goods} {he} carried, {he} gave away {n2} and kept {n3}.",
)

_STORY_END = _Tpl(
    "{He} returned [home |]to {home} [tired but happy|late that night|with much to tell|{feeling}|feeling {feeling}].",
    "[{He} stayed in {loc} that night|That night {first} slept in {loc}], [dreaming of {food}|with {petname} close by|thinking of {home}].",
    "It was a day {first} would [never forget|remember for a long time].",
    "[At last|In the end|Finally], {first} [went home|walked back] to {home}[ with {petname}|].",
    "That night {first} slept [well|deeply|soundly] in {home}.",
    "And so {first} learned that [the world is bigger than {home}|a good friend is worth more than gold|every road leads home].",
    "{first} [told|wrote to] {friend_first} all about it [the next day|soon after].",
)


def story_doc(world: World, rng: random.Random) -> str:
    """A short story (3-10 sentences) about one person; pet, home, friend, food and places stay
    consistent with the world's facts."""
    p = _ch(rng, world.people)
    ctx = _Ctx(rng, world.person_ctx(p), {"year": str(world.year), "loc": p.home,
                                          "loc_climate": world.place_by_name[p.home].climate})
    p_friend = world.person_by_name[p.friend]
    out = [_STORY_OPEN(rng, ctx)]
    n_events = 1 + int(rng.random() * 5)
    kinds = ("travel", "meet", "friend", "trade", "cook", "find", "pet", "weather", "hobby", "count")
    for _ in range(n_events):
        ev = _ch(rng, kinds)
        if ev == "travel":
            dest = _ch(rng, world.places)
            if dest.name in (p.home, ctx["loc"]) and len(world.places) > 2:
                dest = _ch(rng, [q for q in world.places if q.name not in (p.home, ctx["loc"])])
            ctx.update(world.place_ctx(dest, "d_"), loc=dest.name, loc_climate=dest.climate)
            out.append(_STORY_TRAVEL(rng, ctx))
            if rng.random() < 0.6:
                out.append(_STORY_ARRIVE(rng, ctx))
        elif ev == "meet":
            m = _ch(rng, world.people)
            if m is p:
                m = world.person_by_name[p.friend]
            ctx.update(world.person_ctx(m, "m_"))
            out.append(_STORY_MEET(rng, ctx))
            if rng.random() < 0.6:
                out.append(_STORY_MEET_TALK(rng, ctx))
        elif ev in ("trade", "find"):
            ctx.update(world.thing_ctx(_ch(rng, world.things), "t_"))
            n1, n2 = rng.randint(2, 12), rng.randint(1, 30)
            ctx["n1"], ctx["n2"], ctx["n3"] = str(n1), str(n2), str(n1 * n2)
            out.append((_STORY_TRADE if ev == "trade" else _STORY_FIND)(rng, ctx))
        elif ev == "count":
            n1, n2 = rng.randint(2, 60), rng.randint(1, 40)
            if rng.random() < 0.5:
                ctx["n1"], ctx["n2"], ctx["n3"] = str(n1), str(n2), str(n1 + n2)
                out.append(_STORY_COUNT(rng, ctx))
            else:
                ctx["n1"], ctx["n2"], ctx["n3"] = str(n1 + n2), str(n2), str(n1)
                out.append(_STORY_COUNT_SUB(rng, ctx))
        else:
            if ev == "friend" and rng.random() < 0.6:
                ctx.update(loc=p_friend.home, loc_climate=world.place_by_name[p_friend.home].climate)
                ev = "visit"
            tpl = {"visit": _STORY_VISIT_FRIEND, "friend": _STORY_FRIEND, "cook": _STORY_COOK, "pet": _STORY_PET,
                   "weather": _STORY_WEATHER, "hobby": _STORY_HOBBY}[ev]
            out.append(tpl(rng, ctx))
    out = out[:9]
    out.append(_STORY_END(rng, ctx))
    return " ".join(out)


# ----------------------------------------------------------------------------------------------
# dialogues: two people small-talk; x_ asks, y_ answers (roles swap per topic)

_DLG_OPEN = _Tpl(
    "{a_first} and {b_first} met [at the market in {a_home}|on the road to {b_home}|at {building} in {a_home}|by the River {a_home_river}|outside the inn in {b_home}].",
    "A conversation between {a_name} and {b_name}[ in {a_home}|].",
    "{a_first}, {a_a_job} from {a_home}, [meets|runs into] {b_first}, {b_a_job} from {b_home}.",
    "[One {season} day|{time_C}], {a_first} [visited|called on] {b_first}[ in {b_home}|].",
    "[Two neighbours talk|Old acquaintances chat|Friends catch up][ on {a_season} morning| after work|].",
)

_DLG = {
    "hello_x": _Tpl(
        "{greeting}, {y_first}[!|.] [How are you?|How have you been?|It is good to see you.|What a surprise!|How is life in {y_home}?|What brings you here?]",
        "{y_first}! [It has been a long time.|There you are.|I was hoping to see you.|I did not expect you today.] [How are things in {y_home}?|How is {y_petname}?|]",
        "[Is that you, {y_first}?|{y_first}, my friend!] [Come, sit down.|What a fine {season} day.|You look {feeling}.]"),
    "hello_y": _Tpl(
        "{greeting}, {x_first}. [I am well, thank you.|Not bad at all.|Tired, but happy.|Very well indeed.|Busy, as always.] [The road from {y_home} was long.|{y_petname} kept me up all night.|Work as {y_a_job} keeps me busy.|]",
        "[Ah|Oh], {x_first}! [Good to see you.|What a pleasant surprise.] [I am fine.|All is well.|I have just come from {y_home}.]",
        "[Hello|Hi], {x_first}. [I am {feeling} today.|I cannot complain.|Better now that I see you.]"),
    "weather_x": _Tpl("[How is the weather in {y_home}[ these days|]?|What is the weather like in {y_home}?|Is it {y_home_climate} in {y_home} again?|Did the weather in {y_home} change this {season}?]"),
    "weather_y": _Tpl(
        "[It is {y_home_climate}, as usual.|Very {y_home_climate}. It is always like that in {y_home}.|{y_home} is {y_home_climate} most of the year, you know.|{y_home_climate_C}, {y_home_climate} and more {y_home_climate}.] [Even the River {y_home_river} feels it.|Mount {y_home_mountain} is hidden in cloud.|My {y_pet} does not mind.|]",
        "[Well|Hmm], {y_home} has {y_home_a_climate} climate, so nothing new there."),
    "weather_same": _Tpl("[What weather we are having!|The weather has been strange lately.|Did you see the sky this morning?|Look at that sky over {x_home}.]"),
    "weather_same_y": _Tpl("[Well, {y_home} is always {y_home_climate}.|Yes, but {y_home} is {y_home_climate}, what did you expect?|That is {y_home} for you: {y_home_climate} as ever.]"),
    "job_x": _Tpl("[How is work?|How is your work going?|Are you still working as {y_a_job}?|What do you do these days?|Still busy with your work?|Is there much work for {y_a_job} in {y_home}?]"),
    "job_y": _Tpl(
        "[I am still {y_a_job}.|Still working as {y_a_job}, and busy as ever.|I work as {y_a_job} in {y_home}.|Being {y_a_job} keeps me busy.|Work is {good}. I am {y_a_job}, you know.|Every {y_job} in {y_home} is busy this {season}.][ And you?| What about you?|]"),
    "job_x2": _Tpl("[I am {x_a_job}, as you know.|Still {x_a_job}.|Same as always: I work as {x_a_job}.|Life as {x_a_job} is {good}.|I am {x_a_job} in {x_home}, and I like it.]"),
    "town_x": _Tpl("[What is {y_home} like?|Tell me about {y_home}.|I have never been to {y_home}. What is it like?|Is {y_home} a big town?|What is {y_home} known for?]"),
    "town_y": _Tpl(
        "[It is {y_home_a_climate} town in {y_home_region}.|It is a town of about {y_home_pop} people.|About {y_home_pop} people live there.|It lies {y_home_setting}.|It is {y_home_a_climate} place, built {y_home_setting}.] [The River {y_home_river} runs right through it.|It is famous for its {y_home_famous}.|You can see Mount {y_home_mountain} from my window.|It was founded in {y_home_founded}.|]"),
    "pet_x": _Tpl("[How is {y_petname}?|How is your {y_pet}?|Is {y_petname} well?|And how is {y_petname} the {y_pet}?|Do you still have that {y_pet}?]"),
    "pet_y": _Tpl(
        "{y_petname} is [well|fine|very lively|getting fat|as naughty as ever], thank you. [My {y_pet} eats {y_pet_eats} all day.|{y_petname} loves {season} days.|Every {y_pet} is a handful.|{y_petname} is {y_pet_colour} as ever.|]",
        "[Oh, |]{y_petname}? [{y_petname} is asleep by the fire.|{y_petname} chased a cat this morning.|{y_petname} is the best {y_pet} in {y_home}.]"),
    "food_x": _Tpl("[What is your favourite food?|What do you like to eat best?|If you could eat one dish forever, what would it be?|What shall we eat?|Are you hungry? What do you like?]"),
    "food_y": _Tpl("[{y_food_C}, of course.|I love {y_food}.|My favourite food is {y_food}.|{y_food_C}, always {y_food}.|Nothing beats {y_food}.] [It is made from {y_food_from}.|It comes from {y_food_origin}.|It tastes {y_food_taste}.|]"),
    "thing_x": _Tpl("[Have you ever seen {t_a_thing}?|Do you know what {t_a_thing} is?|What is {t_a_thing}?|Have you heard of the {t_thing}?|Someone in {x_home} told me about the {t_thing}. What is it?]"),
    "thing_y": _Tpl(
        "[Yes! It is {t_a_kind} from {t_origin}.|Of course. It is {t_a_size} {t_colour} {t_kind} from near {t_origin}.|I have. {t_things_C} are {t_colour} and {t_size}.|It is {t_a_kind}. You find them near {t_origin}.|The {t_thing}? That is {t_a_kind} from {t_origin}, in {t_origin_region}.]"),
    "age_x": _Tpl("[How old are you now?|How old are you, if I may ask?|When were you born?|Remind me, how old are you?]"),
    "age_y": _Tpl("[I am {y_age}.|I am {y_age} years old.|{y_age}. I was born in {y_born}.|I was born in {y_born}, so I am {y_age}.|I turned {y_age} this year.]"),
    "friend_x": _Tpl("[How is {y_friend_first}?|Do you still see {y_friend_first}?|How is your friend {y_friend_first}?|Is {y_friend_first} still your best friend?]"),
    "friend_y": _Tpl("[{y_friend_first} is well.|I saw {y_friend_first} just last week.|{y_friend_first} is my best friend, I see {y_friend_first} often.|Yes, {y_friend} is still my best friend.] [{y_friend_first} still works as {y_friend_a_job} in {y_friend_home}.|{y_friend_first} lives in {y_friend_home}.|]"),
    "hobby_x": _Tpl("[What do you do for fun?|What do you do when you are not working?|Do you still have time for your hobby?|How do you spend your free time?]"),
    "hobby_y": _Tpl("[I enjoy {y_hobby}.|Mostly {y_hobby}.|I spend my free time {y_hobby}.|{y_hobby_C}, whenever I can.|I love {y_hobby}[, even in {season}|].]"),
    "travel_x": _Tpl("[I am going to {d_place} [next week|tomorrow|in the {season}].|Soon I will travel to {d_place}.|Have you ever been to {d_place}?|I have to go to {d_place} for work.]"),
    "travel_y": _Tpl(
        "[Oh, {d_place}! It is {d_climate} there, so bring a [coat|hat|cloak].|Bring me back some {d_famous}, it is what {d_place} is famous for.|Say hello to Mount {d_mountain} for me!|Is that the town on the River {d_river}?|{d_place} is in {d_region}, is it not?|{d_place}? About {d_pop} people live there.]"),
    "directions_x": _Tpl("[How do I get to {d_place}?|Which way is {d_place}?|Can you tell me the way to {d_place}?]"),
    "directions_y": _Tpl(
        "[Follow the River {d_river}|Walk towards Mount {d_mountain}|Take {road} towards {d_region}] [and you will find it.|until you see the roofs.|for a day or two.] [It lies {d_setting}.|It is {d_a_climate} town, so dress well.|]"),
    "history_x": _Tpl("[How old is {y_home}, do you know?|When was {y_home} founded?|Is {y_home} an old town?]"),
    "history_y": _Tpl("[It was founded in {y_home_founded}, so it is {y_home_ago} years old.|{y_home} was founded in {y_home_founded}.|Quite old: it was founded in {y_home_founded}, {y_home_ago} years ago.]"),
    "recipe_x": _Tpl("[How do you make {y_food}?|What goes into {y_food}?|Can you teach me to cook {y_food}?]"),
    "recipe_y": _Tpl("[{y_food_C} is made from {y_food_from}.|You need {y_food_from}, first of all.|The secret is good {y_food_from}.] [Cook it slowly and it tastes {y_food_taste}.|If you do it right, it tastes {y_food_taste}.|The best {y_food_from} comes from near {y_food_from_origin}.|]"),
    "news_x": _Tpl(
        "Did you hear? {n_name}, the {n_job} from {n_home}, [turned {n_age} this {season}|has been {n_hobby} every day|bought a new house|opened a stall at the market].",
        "[Do you know|Have you met] {n_name}? {n_He} [is|works as] {n_a_job} in {n_home}."),
    "news_y": _Tpl("[Really? I did not know that.|I know {n_first}! {n_His} best friend is {n_friend_first}.|Good for {n_him}.|{n_first}? The one with the {n_pet} called {n_petname}?|I met {n_first} once in {n_home}.]"),
    "math_x": _Tpl("[Can you help me with a sum?|I need to count something.|Quick, I am bad with numbers.|Let me ask you something.] [How much is {n1} and {n2}?|What is {n1} + {n2}?|What do {n1} and {n2} make?]"),
    "math_y": _Tpl("[That is {n3}.|{n1} + {n2} = {n3}.|It makes {n3}.|{n3}, if I am not mistaken.|Let me think... {n1} and {n2} make {n3}.]"),
    "buy_x": _Tpl("[I bought|Today I bought|Yesterday I bought] {n1} {t_things} for {n2} coins each[ in {x_home}| at the market|]."),
    "buy_y": _Tpl("[So you paid {n3} coins in all.|That is {n3} coins! {opener}, {t_things} are not cheap.|{n1} times {n2} is {n3} coins.|{n3} coins for {t_things} from {t_origin}? {opener}.]"),
    "gift_x": _Tpl("[I brought you|Here is|I have a gift for you:] {t_a_thing} from {t_origin}."),
    "gift_y": _Tpl("[How kind!|Thank you!|Oh, {t_a_thing}!] [It is so {t_colour}.|I have never had {t_a_kind} from {t_origin}.|{t_things_C} are {t_size}, just as I heard.]"),
    "thanks": _Tpl("[{thanks}.|{thanks}, {y_first}.|{opener}, that makes sense.|I see.|Good to know.|I will remember that.|{opener}, I did not know that.|You always know these things, {y_first}.|I will tell {x_friend_first} about that.]"),
    "bye_x": _Tpl("[Well, I must go.|I should get back to work.|It is getting late.|I have to feed {x_petname}.|The road to {x_home} is long.|My {x_pet} is waiting for me.|The {x_jobs} of {x_home} start early, so I must sleep.|The sun is setting over {x_home}.|{opener}, look at the time.] [{bye}, {y_first}!|{bye}.|Come and visit me in {x_home}.|Let us talk again soon.]"),
    "bye_y": _Tpl("[{bye}, {x_first}!|{bye}.|{bye}, and say hello to {x_petname}.|{bye}. Give my best to {x_friend_first}.|{bye}, {x_first}, and safe roads to {x_home}.|[Go well|Travel safely], {x_first}.|It was {good} to talk, {x_first}.]"),
}

_DLG_TOPICS = ("weather", "job", "town", "pet", "food", "thing", "age", "friend", "hobby", "travel",
               "math", "buy", "directions", "history", "recipe", "news", "gift")


def dialogue_doc(world: World, rng: random.Random) -> str:
    """Small talk between two people (`First: text` lines); everything said matches the facts."""
    a = _ch(rng, world.people)
    r = rng.random()
    if r < 0.45:
        b = world.person_by_name[a.friend]
    elif r < 0.65 and len(world.residents[a.home]) > 1:
        b = _ch(rng, [q for q in world.residents[a.home] if q is not a])
    else:
        b = _ch(rng, world.people)
        if b is a:
            b = world.person_by_name[a.friend]
    ctx = _Ctx(rng, world.person_ctx(a, "a_"), world.person_ctx(b, "b_"))
    people = (a, b)

    def roles(asker: int) -> tuple[str, str]:
        """Set x_ (asker) and y_ (answerer) slots; return their first names."""
        x, y = people[asker], people[1 - asker]
        ctx.update(world.person_ctx(x, "x_"))
        ctx.update(world.person_ctx(y, "y_"))
        return x.first, y.first

    lines: list[tuple[str, str]] = []
    head = _DLG_OPEN(rng, ctx) + "\n\n" if rng.random() < 0.4 else ""
    xf, yf = roles(0)
    lines += [(xf, _DLG["hello_x"](rng, ctx)), (yf, _DLG["hello_y"](rng, ctx))]
    topics = list(_DLG_TOPICS)
    rng.shuffle(topics)
    for topic in topics[: 2 + int(rng.random() * 5)]:
        xf, yf = roles(int(rng.random() * 2))
        if topic == "weather" and a.home == b.home:
            lines += [(xf, _DLG["weather_same"](rng, ctx)), (yf, _DLG["weather_same_y"](rng, ctx))]
            continue
        if topic in ("thing", "buy", "gift"):
            ctx.update(world.thing_ctx(_ch(rng, world.things), "t_"))
        if topic in ("travel", "directions"):
            ctx.update(world.place_ctx(_ch(rng, world.places), "d_"))
        elif topic == "news":
            ctx.update(world.person_ctx(_ch(rng, world.people), "n_"))
        elif topic == "recipe":
            ctx["y_food_from_origin"] = world.thing_by_name[ctx["y_food_from"]].origin \
                if ctx["y_food_from"] in world.thing_by_name else ctx["y_food_origin"]
        elif topic == "math":
            n1, n2 = rng.randint(2, 999), rng.randint(2, 999)
            ctx["n1"], ctx["n2"], ctx["n3"] = str(n1), str(n2), str(n1 + n2)
        elif topic == "buy":
            n1, n2 = rng.randint(2, 20), rng.randint(2, 25)
            ctx["n1"], ctx["n2"], ctx["n3"] = str(n1), str(n2), str(n1 * n2)
        lines += [(xf, _DLG[topic + "_x"](rng, ctx)), (yf, _DLG[topic + "_y"](rng, ctx))]
        if topic == "job" and rng.random() < 0.6:
            lines.append((xf, _DLG["job_x2"](rng, ctx)))
        elif rng.random() < 0.25:
            lines.append((xf, _DLG["thanks"](rng, ctx)))
    xf, yf = roles(int(rng.random() * 2))
    lines += [(xf, _DLG["bye_x"](rng, ctx)), (yf, _DLG["bye_y"](rng, ctx))]
    return head + "\n".join(f"{who}: {text}" for who, text in lines)


# ----------------------------------------------------------------------------------------------
# arithmetic: always correct; numbers mostly 0..9999


def _num(rng: random.Random, digits: int | None = None) -> int:
    d = digits or (1 + int(rng.random() * 4))
    return int(rng.random() * 10 ** d)


def _equation(rng: random.Random) -> tuple[str, int, int, int]:
    """(op, a, b, result) with non-negative integer results."""
    r = rng.random()
    if r < 0.35:
        a, b = _num(rng), _num(rng)
        return "+", a, b, a + b
    if r < 0.65:
        a, b = _num(rng), _num(rng)
        a, b = max(a, b), min(a, b)
        return "-", a, b, a - b
    if r < 0.88:
        a = _num(rng, 1 + int(rng.random() * 2))
        b = _num(rng, 1 + (rng.random() < 0.3))
        return "*", a, b, a * b
    b = rng.randint(1, 12 if rng.random() < 0.7 else 99)
    q = rng.randint(0, 99)
    return "/", b * q, b, q


_OP_WORDS = {"+": ("plus", "added to"), "-": ("minus", "take away"), "*": ("times", "multiplied by"),
             "/": ("divided by", "divided by")}
_EQ_FORMS = (
    "{a} {op} {b} = {c}", "{a} {op} {b} = {c}.", "{a} {w} {b} is {c}.", "{a} {w} {b} equals {c}.",
    "{a} {op} {b} = {c}", "{a} {op} {b} makes {c}.",
)
_EQ_HEADERS = ("Practice sums:", "Arithmetic facts:", "Some sums:", "Exercises with answers:",
               "Worked answers:", "Number facts to remember:", "Today's arithmetic:", "", "", "")


def _arith_list(world: World, rng: random.Random) -> str:
    lines = []
    head = _ch(rng, _EQ_HEADERS)
    if head:
        lines.append(head)
    bullet = _ch(rng, ("", "", "- ", "* "))
    for i in range(4 + int(rng.random() * 11)):
        op, a, b, c = _equation(rng)
        if rng.random() < 0.12:
            lines.append(f"{bullet}The {('sum', 'difference', 'product', 'quotient')['+-*/'.index(op)]} "
                         f"of {a} and {b} is {c}.")
            continue
        form = _ch(rng, _EQ_FORMS)
        lines.append(bullet + form.format(a=a, b=b, c=c, op=op, w=_ch(rng, _OP_WORDS[op])))
    return "\n".join(lines)


def _arith_qa(world: World, rng: random.Random) -> str:
    q, a_ = _ch(rng, (("Q", "A"), ("Question", "Answer"), ("Problem", "Solution")))
    out = []
    for _ in range(2 + int(rng.random() * 5)):
        op, a, b, c = _equation(rng)
        ask = _ch(rng, ("What is {a} {op} {b}?", "How much is {a} {w} {b}?", "Compute {a} {op} {b}.",
                        "What do you get from {a} {w} {b}?"))
        ans = _ch(rng, ("{a} {op} {b} = {c}.", "{c}", "The answer is {c}, because {a} {op} {b} = {c}.",
                        "{a} {w} {b} is {c}."))
        kw = dict(a=a, b=b, c=c, op=op, w=_OP_WORDS[op][0])
        out.append(f"{q}: {ask.format(**kw)}\n{a_}: {ans.format(**kw)}")
    return "\n\n".join(out)


def _arith_table(world: World, rng: random.Random) -> str:
    n = rng.randint(2, 25)
    start = rng.randint(0, 5) if rng.random() < 0.6 else rng.randint(6, 40)
    stop = start + rng.randint(5, 12)
    r = rng.random()
    if r < 0.55:
        head = _ch(rng, ("Multiplication table for {n}:", "The {n} times table:", "Times table of {n}",
                         "Multiplying by {n}:", ""))
        rows = [_ch(rng, ("{n} * {i} = {p}", "{i} * {n} = {p}", "{n} times {i} is {p}."))
                .format(n=n, i=i, p=n * i) for i in range(start, stop + 1)]
    elif r < 0.8:
        head = _ch(rng, ("Adding {n}:", "Addition table for {n}:", "Plus {n}:", ""))
        rows = [f"{i} + {n} = {i + n}" if rng.random() < 0.8 else f"{n} + {i} = {i + n}"
                for i in range(start, stop + 1)]
    else:
        head = _ch(rng, ("Taking away {n}:", "Subtraction with {n}:", ""))
        rows = [f"{i + n} - {n} = {i}" for i in range(start, stop + 1)]
    head = head.format(n=n)
    return (head + "\n" if head else "") + "\n".join(rows)


def _arith_worked(world: World, rng: random.Random) -> str:
    """Column addition/subtraction or a split multiplication, step by step."""
    r = rng.random()
    if r < 0.45:
        a, b = _num(rng, rng.randint(2, 4)), _num(rng, rng.randint(1, 4))
        steps, carry = [], 0
        da, db = str(a)[::-1], str(b)[::-1]
        places = ("ones", "tens", "hundreds", "thousands", "ten thousands")
        for i in range(max(len(da), len(db))):
            x = int(da[i]) if i < len(da) else 0
            y = int(db[i]) if i < len(db) else 0
            s = x + y + carry
            expr = f"{x} + {y} + {carry} = {s}" if carry else f"{x} + {y} = {s}"
            step = f"Add the {places[i]}: {expr}."
            if s >= 10:
                step += f" Write {s % 10} and carry 1."
            steps.append(step)
            carry = s // 10
        if carry:
            steps.append("Write the carried 1 in front.")
        intro = _ch(rng, ("Let us add {a} and {b}.", "To add {a} and {b}, work from right to left.",
                          "Example: {a} + {b}.", "How do we add {a} and {b}? Column by column."))
        return " ".join([intro.format(a=a, b=b), *steps, f"So {a} + {b} = {a + b}."])
    if r < 0.75:
        a, b = _num(rng, rng.randint(2, 4)), _num(rng, rng.randint(1, 3))
        a, b = max(a, b), min(a, b)
        out = [_ch(rng, ("Let us subtract {b} from {a}.", "Example: {a} - {b}.",
                         "To work out {a} - {b}, take away in steps.")).format(a=a, b=b)]
        tens, ones = b // 10 * 10, b % 10
        if tens and ones:
            out.append(f"First take away {tens}: {a} - {tens} = {a - tens}.")
            out.append(f"Then take away {ones}: {a - tens} - {ones} = {a - b}.")
        out.append(f"So {a} - {b} = {a - b}.")
        if rng.random() < 0.5:
            out.append(f"Check: {a - b} + {b} = {a}.")
        return " ".join(out)
    a, b = rng.randint(11, 999 if rng.random() < 0.5 else 99), rng.randint(2, 9)
    parts = [int(d) * 10 ** i for i, d in enumerate(str(a)[::-1]) if d != "0"][::-1]
    if len(parts) < 2:
        a += 1
        parts = [int(d) * 10 ** i for i, d in enumerate(str(a)[::-1]) if d != "0"][::-1]
    products = [x * b for x in parts]
    split = " + ".join(map(str, parts))
    out = [_ch(rng, ("To multiply {a} by {b}, split {a} into {s}.", "Example: {a} * {b}. Write {a} as {s}.",
                     "Let us work out {a} times {b}. First, {a} = {s}."))
           .format(a=a, b=b, s=split if rng.random() < 0.5 else _join_and(list(map(str, parts))))]
    out.append(_join_and([f"{x} * {b} = {x * b}" for x in parts]) + ".")
    out.append(f"Then {' + '.join(map(str, products))} = {a * b}.")
    out.append(f"So {a} * {b} = {a * b}.")
    return " ".join(out)


def _arith_worked_many(world: World, rng: random.Random) -> str:
    """One to three worked examples, sometimes under a heading."""
    examples = [_arith_worked(world, rng) for _ in range(1 + int(rng.random() * 3))]
    head = _ch(rng, ("", "", "Worked examples", "Step by step:", "Examples:", "Let us practise."))
    return (head + "\n" if head else "") + "\n\n".join(examples)


# word problems by operation: n1 op n2 = n3 always holds (set by _arith_words)
_WORD_PROBLEMS = {
    "add": _Tpl(
        "{name} had {n1} {goods} and [bought|found|was given] {n2} more, so {he} had {n3}.",
        "{first} picked {n1} {goods} in the morning and {n2} in the afternoon: {n1} + {n2} = {n3}.",
        "[On the road to|At the market in] {home}, {first} counted {n1} {goods} and then {n2} more, {n3} in all.",
        "{first} the {job} walked {n1} miles on Monday and {n2} on Tuesday, so {he} walked {n3} miles.",
    ),
    "sub": _Tpl(
        "{name} had {n1} {goods} and [sold|gave away|lost] {n2}, so {he} had {n3} left.",
        "{first} [baked|packed|made] {n1} {goods}, and {n2} were [sold|eaten|taken] by noon. {n1} - {n2} = {n3}.",
        "There were {n1} {t_things} in the shop in {home}; {first} sold {n2}, and {n3} were left.",
        "{first} needs {n1} {goods} but has only {n2}, so {he} still needs {n3}.",
    ),
    "mul": _Tpl(
        "{name} filled {n1} [baskets|boxes|sacks] with {n2} {goods} in each, which is {n3} {goods} in all.",
        "{first}, {a_job} from {home}, [sold|made] {n2} {goods} a day for {n1} days: {n1} * {n2} = {n3}.",
        "In {home}, {t_a_thing} costs {n1} coins. {first} bought {n2} of them and paid {n3} coins.",
        "{first} planted {n1} rows of {n2} {goods}, so there were {n3} in the garden.",
    ),
    "div": _Tpl(
        "{name} shared {n1} {goods} equally among {n2} friends, so each friend got {n3}.",
        "{first} put {n1} {goods} into [bags|rows|boxes] of {n2}, and got {n3} of them. {n1} / {n2} = {n3}.",
        "{n1} coins were split evenly between {n2} {jobs} from {home}: each got {n3} coins.",
    ),
}

_FACT_MATH = _Tpl(
    "{name} was born in {born}, so in {year} {he} is {age} years old, because {year} - {born} = {age}.",
    "{first} is {age} years old. In ten years {he} will be {age10}, since {age} + 10 = {age10}.",
    "{d_place} was founded in {d_founded}. In {year} the town is {d_ago} years old: {year} - {d_founded} = {d_ago}.",
    "{d_place} has {d_pop} people and {e_place} has {e_pop}. Together they have {popsum} people, because {d_pop} + {e_pop} = {popsum}.",
    "{first} was born in {born} and {friend_first} in {f_born}, so together they have lived {agesum} years: {age} + {f_age} = {agesum}.",
)


def _arith_words(world: World, rng: random.Random) -> str:
    """Word problems about the world's people, some using their real ages and towns' facts."""
    ctx = _Ctx(rng, {"year": str(world.year)})
    out = []
    for _ in range(2 + int(rng.random() * 4)):
        p = _ch(rng, world.people)
        ctx.update(world.person_ctx(p))
        if rng.random() < 0.25:
            d, e = _ch(rng, world.places), _ch(rng, world.places)
            f = world.person_by_name[p.friend]
            ctx.update(world.place_ctx(d, "d_"))
            ctx.update(world.place_ctx(e, "e_"))
            ctx.update(age10=str(p.age + 10), f_born=str(f.born), f_age=str(f.age),
                       agesum=str(p.age + f.age), popsum=str(d.population + e.population))
            out.append(_FACT_MATH(rng, ctx))
            continue
        kind = _ch(rng, ("add", "sub", "mul", "div"))
        x, y = rng.randint(2, 60), rng.randint(2, 40)
        if kind == "add":
            n1, n2, n3 = x, y, x + y
        elif kind == "sub":
            n1, n2, n3 = x + y, y, x
        elif kind == "mul":
            n1, n2, n3 = x % 20 + 2, y % 15 + 2, (x % 20 + 2) * (y % 15 + 2)
        else:
            n2, n3 = y % 12 + 2, x % 15 + 1
            n1 = n2 * n3
        ctx.update(world.thing_ctx(_ch(rng, world.things), "t_"))
        ctx["n1"], ctx["n2"], ctx["n3"] = str(n1), str(n2), str(n3)
        ctx["goods"] = _ch(rng, _POOLS["goods"])   # fixed: a problem may name its goods twice
        out.append(_WORD_PROBLEMS[kind](rng, ctx))
    return ("\n" if rng.random() < 0.5 else " ").join(out)


def _arith_numbers(world: World, rng: random.Random) -> str:
    """Number facts: parity, comparison, doubling, halving, rounding, counting sequences."""
    out = []
    for _ in range(3 + int(rng.random() * 6)):
        n = _num(rng)
        r = rng.random()
        if r < 0.15:
            out.append(f"{n} is {'an even' if n % 2 == 0 else 'an odd'} number.")
        elif r < 0.3:
            m = _num(rng)
            if m != n:
                rel = "greater than" if n > m else "less than"
                out.append(f"{n} is {rel} {m}.")
        elif r < 0.45:
            out.append(_ch(rng, ("Double {n} is {d}.", "Twice {n} is {d}.", "{n} + {n} = {d}."))
                       .format(n=n, d=2 * n))
        elif r < 0.55:
            out.append(f"Half of {2 * n} is {n}.")
        elif r < 0.7:
            r10 = (n + 5) // 10 * 10
            out.append(f"{n} rounded to the nearest ten is {r10}.")
        elif r < 0.8:
            out.append(f"The number after {n} is {n + 1}, and the number before {n + 1} is {n}.")
        else:
            step, start = rng.randint(2, 25), _num(rng, 2)
            seq = ", ".join(str(start + step * i) for i in range(5 + int(rng.random() * 5)))
            out.append(f"Counting by {step} from {start}: {seq}.")
    return ("\n" if rng.random() < 0.5 else " ").join(out)


# Arithmetic said in words. The tasks' questions name an operation in many ways and places ("the product of
# 7 and 3", "7 lots of 3", "I had 7 and used 3"), numbers in digits or words; a model that has only read
# `7 * 3 = 21` learns the place of a word, not its meaning (held-out phrasings were read as sums). These
# statements put each operation's words before, between and after the numbers, and half of them tie the words
# to the symbols ("Seventeen times nine is 153, that is 17 * 9 = 153."). They are statements, never a
# held-out question frame (exocortex/tasks/arithmetic.py HELDOUT_FAMILIES), and they skip the calculations
# that are test items of the arithmetic task (the other document kinds predate the split and do not).
_SAY_OP = {
    "+": ("{a} plus {b} is {c}.", "{a} plus {b} makes {c}.", "Adding {a} and {b} gives {c}.",
          "Add {b} to {a} and you get {c}.", "The sum of {a} and {b} is {c}.", "The total of {a} and {b} is {c}.",
          "{c} is the sum of {a} and {b}.", "{a} and {b} add up to {c}.", "{b} more than {a} is {c}.",
          "{a} increased by {b} is {c}.", "Put {a} and {b} together and you have {c}.",
          "{a} added to {b} makes {c}.", "{c} is {b} more than {a}.", "Together, {a} and {b} make {c}.",
          "{a} and {b} together make {c}.", "{a} and {b}, added, give {c}.", "{a} with {b} added is {c}.",
          "{a} and {b} have a sum of {c}."),
    "-": ("{a} minus {b} is {c}.", "{a} take away {b} leaves {c}.", "Subtracting {b} from {a} leaves {c}.",
          "Take {b} away from {a} and {c} remain.", "The difference between {a} and {b} is {c}.",
          "{c} is {b} less than {a}.", "{a} less {b} equals {c}.", "{a} reduced by {b} is {c}.",
          "{b} fewer than {a} is {c}.", "Remove {b} from {a} and you are left with {c}.",
          "{a} decreased by {b} is {c}.", "Subtract {b} from {a} to get {c}.", "{a} with {b} taken away is {c}.",
          "{a} and {b} differ by {c}.", "{a}, with {b} subtracted, leaves {c}.", "{a} has {b} subtracted to give {c}."),
    "*": ("{a} times {b} is {c}.", "Multiplying {a} by {b} gives {c}.", "The product of {a} and {b} is {c}.",
          "{a} multiplied by {b} equals {c}.", "{c} is {a} times {b}.", "{a} lots of {b} make {c}.",
          "{a} groups of {b} make {c}.", "{a} and {b} multiplied together give {c}.",
          "Multiply {a} by {b} and you get {c}.", "{c} is the product of {a} and {b}.",
          "{a} sets of {b} come to {c}.", "{a} and {b} multiplied give {c}.", "{a} and {b} have a product of {c}.",
          "{a}, multiplied by {b}, is {c}.", "{a} is multiplied by {b} to give {c}."),
    "/": ("{a} divided by {b} is {c}.", "Dividing {a} by {b} gives {c}.", "{a} shared equally by {b} is {c} each.",
          "{a} split into {b} equal parts gives parts of {c}.", "The quotient of {a} and {b} is {c}.",
          "{b} goes into {a} {c} times.", "Divide {a} by {b} and you get {c}.", "{a} over {b} is {c}.",
          "{c} is {a} divided by {b}.", "Share {a} among {b} and each gets {c}.", "{a}, divided by {b}, is {c}.",
          "{a} is divided by {b} to give {c}.", "{a} and {b} have a quotient of {c}.",
          "{a} shared between {b} gives {c} each."),
}
_SAY_ONE = {("/", 2): ("Half of {a} is {c}.", "Half {a} is {c}.", "{c} is half of {a}."),
            ("/", 3): ("A third of {a} is {c}.", "One third of {a} is {c}."),
            ("/", 4): ("A quarter of {a} is {c}.", "One quarter of {a} is {c}."),
            ("*", 2): ("Double {a} is {c}.", "Twice {a} is {c}.", "{a} doubled is {c}."),
            ("*", 3): ("Triple {a} is {c}.", "Three times {a} is {c}.", "{a} tripled is {c}.")}
# the words tied to the calculation as the calculator writes it
_SAY_TIED = ("{s}, that is {e} = {r}.", "{s}. In symbols: {e} = {r}.", "{s} ({e} = {r}).",
             "{s}. We write this as {e} = {r}.")
_NUM_WORDS = ("{w} is written {d}.", "{w} ({d})", "In digits, {w} is {d}.", "{d} in words is {w}.",
              "The number {d} is said {w}.")


def _say_num(n: int, rng: random.Random) -> str:
    """A number as text says it: digits, or words for many below 100 (bigger ones would read ambiguously:
    "the sum of two hundred and three")."""
    return number_words(n) if n < 100 and rng.random() < 0.45 else str(n)


def everyday_operands(op: str, rng: random.Random) -> tuple[int, int]:
    """Operands as people ask about them: mostly small, a difference never negative, a division exact."""
    big = rng.random() < 0.3
    if op == "+":
        return rng.randint(0, 999 if big else 99), rng.randint(1, 999 if big else 99)
    if op == "-":
        a, b = rng.randint(1, 999 if big else 99), rng.randint(0, 99)
        return max(a, b), min(a, b)
    if op == "*":
        return rng.randint(2, 99 if big else 12), rng.randint(2, 12)
    b = rng.randint(2, 12)
    return b * rng.randint(1, 99 if big else 12), b


def _arith_said(world: World, rng: random.Random) -> str:
    """Calculations said in words in varied orders, some tied to their symbols; numbers said in words."""
    out = []
    for _ in range(3 + int(rng.random() * 6)):
        r = rng.random()
        if r < 0.15:
            n = rng.randint(0, 100) if rng.random() < 0.8 else rng.randint(101, 999)
            out.append(_cap(_ch(rng, _NUM_WORDS).format(w=number_words(n), d=n)))
            continue
        if r < 0.3:
            op, k = _ch(rng, tuple(_SAY_ONE))
            a = k * rng.randint(1, 60) if op == "/" else rng.randint(1, 300)
            b, c = k, a // k if op == "/" else a * k
            frame = _ch(rng, _SAY_ONE[(op, k)])
        else:
            op = _ch(rng, "+-*/")
            a, b = everyday_operands(op, rng)
            c = a // b if op == "/" else {"+": a + b, "-": a - b, "*": a * b}[op]
            frame = _ch(rng, _SAY_OP[op])
        e = f"{a} {op} {b}"
        if zlib.crc32(e.encode()) % 100 < 10:  # a test item of the arithmetic task (tasks/base.py split_of)
            continue
        said = _cap(frame.format(a=_say_num(a, rng), b=_say_num(b, rng), c=_say_num(c, rng) if rng.random() < 0.2
                                 else c))
        out.append(_ch(rng, _SAY_TIED).format(s=said.rstrip("."), e=e, r=c) if rng.random() < 0.5 else said)
    return ("\n" if rng.random() < 0.4 else " ").join(out)


_ARITH_KINDS = ((_arith_list, 0.15), (_arith_qa, 0.11), (_arith_table, 0.08), (_arith_worked_many, 0.13),
                (_arith_words, 0.15), (_arith_numbers, 0.08), (_arith_said, 0.3))


def arithmetic_doc(world: World, rng: random.Random) -> str:
    """Arithmetic text: equation lists, Q&A, tables, worked examples, word problems set in the
    world, number facts.  Every `a op b = c` in it is correct."""
    r, acc = rng.random(), 0.0
    for fn, w in _ARITH_KINDS:
        acc += w
        if r < acc:
            return fn(world, rng)
    return _arith_list(world, rng)


# ----------------------------------------------------------------------------------------------
# descriptive text: landscapes, seasons, markets, field-guide notes, lists, explanations

_LANDSCAPE = (
    _Tpl("{place} [lies|sits|is built] {setting}[ in {region}|, in the {direction} of {region}|].",
         "[The town of |]{place} [stands|lies] {setting}, [not far from|within sight of] Mount {mountain}.",
         "[Seen from the road|From a distance|Approaching from the south], {place} looks [small|peaceful|grey|bright] {setting}."),
    _Tpl("The River {river} [winds|flows|runs] [past|through|around] the town[, [slow|fast|cold|clear] and [wide|narrow|deep|shallow]|].",
         "[Boats|Barges|Small boats] [drift|move|travel] along the River {river}[ all day| in summer|].",
         "[On|Along] the banks of the River {river} [grow|stand] [willows|reeds|old trees|tall grasses]."),
    _Tpl("Mount {mountain} [rises|towers|looms] [above|over|beyond] the [roofs|fields|forests][, its top often [white|hidden in cloud|covered in snow]|].",
         "[On clear days|In the evening light|At dawn], Mount {mountain} [glows|looks close enough to touch|turns pink]."),
    _Tpl("[The air|The weather] [here|in {place}] is [usually|mostly|nearly always] {climate}.",
         "[People say|It is said] that {place} is the most {climate} town in {region}.",
         "Because the climate is {climate}, [people|the people of {place}] [dress|build their houses] [for it|with care]."),
    _Tpl("[In {season}|Every {season}|Each {season}], {sky}[ over {place}|].",
         "[In {season}|During {season}], the [fields|hills|gardens|streets] [are|look] [green|golden|white|brown|quiet|busy]."),
    _Tpl("[Around {place}|Near the town] you can find {t_things}[, which are {t_colour}|].",
         "The {famous} [of {place}|] is [known|famous|talked about] [across {region}|far and wide|in every town nearby]."),
    _Tpl("[About {pop} people|Some {pop} people] [live here|call {place} home][, most of them in old houses|, among them {res}|].",
         "{place} is a town of {pop} souls[, among them {res}|]."),
)

_SEASON_LINES = {
    "spring": ("In spring, [the snow melts|the first flowers open|the rivers swell with melted snow|the days grow longer].",
               "[Farmers|People] [plant their fields|mend their fences|open their windows] in spring.",
               "[Lambs|Birds|Young animals] [are born|return|appear] [in spring|as the days warm]."),
    "summer": ("In summer, the [days are long|sun is hot|fields turn golden|rivers run low].",
               "[Children|People] [swim in the river|sleep outside|work late into the evening] in summer.",
               "[Fruit ripens|Berries ripen|Grain ripens|Apples ripen] [under the summer sun|in the long summer days]."),
    "autumn": ("In autumn, [the leaves turn red and brown|the harvest is gathered|the nights grow cold].",
               "[Farmers|Families] [store grain|dry fruit|smoke fish] for the winter.",
               "[Geese|Birds|Clouds] [fly south|gather|pass overhead] in autumn."),
    "winter": ("In winter, [snow covers the roads|the rivers freeze|the nights are long|fires burn in every house].",
               "[People|Families] [stay indoors|tell stories by the fire|mend their tools] in winter.",
               "[The fields|The hills|The roads] [lie white and silent|are quiet|are hard with frost] in winter."),
}
_SEASON_T = {k: _Tpl(*v) for k, v in _SEASON_LINES.items()}
_SEASON_PLACE = _Tpl(
    "In {place}, which is {climate} [most of the year|for much of the year], {season} [feels|seems] [long|short|gentle|harsh].",
    "[Everyone in|The whole town of] {place} [looks forward to|prepares for] {season}[ with care| every year|].",
    "[By the River {river}|Below Mount {mountain}], {season} [comes|arrives] [early|late|slowly|all at once].",
)

_MARKET = (
    _Tpl("[On market day in {place}|Every week in {place}|In the market square of {place}], [the stalls fill early|traders set up their stalls|the square is full of noise].",
         "The market of {place} is [busy|crowded|lively|small but busy][ on market days| in {season}|].",
         "[Market day|The weekly market] in {place} [begins|starts] [at dawn|before sunrise|early in the morning]."),
    _Tpl("{m_first} the {m_job} sells {t_things} for {n1} coins [each|apiece].",
         "At one stall, {m_name} [sells|offers] {t_things} from {t_origin}[, {t_colour} and {t_size}|].",
         "{m_first} [brings|carries] {t_things} [from|all the way from] {t_origin} to sell[ at {n1} coins each|].",
         "[Buyers|Customers|People] [crowd around|stop at|queue at] the stall of {m_first}, who sells {t_things}."),
    _Tpl("A buyer takes {n2} {t_things} and pays {n3} coins, because {n2} * {n1} = {n3}.",
         "[Two|Three|Many] [children|travellers|cooks] [ask about|look at] the {t_thing}, {t_a_kind} from {t_origin}.",
         "{t_things_C} [are cheap|are expensive|sell quickly] this {season}."),
    _Tpl("[By noon|By evening|At sunset], [the stalls are empty|the square is quiet|the traders pack up and go home].",
         "[When|As] the market closes, {sky}.",
         "[People|Traders] [leave|head home] [tired|happy|with full baskets]."),
)

_FIELD_GUIDE = (
    _Tpl("[The {thing}|{thing_C}] ({kind})", "Field notes: the {thing}", "A note on the {thing}", "The {thing}"),
    _Tpl("[Look for|Watch for|You will know] the {thing} by its {colour} colour.",
         "{a_thing_C} is {a_size} {colour} {kind}.",
         "The {thing} is easy to [spot|recognise]: it is {colour} and {size}."),
    _Tpl("[It is|They are] [found|most common|seen] near {origin}, in {origin_region}.",
         "[Most|Nearly all] {things} [come|are] from {origin}.",
         "The home of the {thing} is {origin}[, where the weather is {origin_climate}|]."),
)
_FIELD_EXTRA = {
    "animal": _Tpl("It [eats|feeds on|lives on] {eats}.", "{things_C} [eat|feed on] {eats}[ and little else|]."),
    "plant": _Tpl("People [gather|pick|cut] it for {use}.", "It is [used|prized] for {use}."),
    "tool": _Tpl("It is made of {material} and used for {use}.", "[Workers|People] use it for {use}; it is made of {material}."),
    "food": _Tpl("It is made from {made_from} and tastes {taste}.", "[Cooks|People] make it from {made_from}; it tastes {taste}."),
    "instrument": _Tpl("It is made of {material} and has a {sound} sound.", "It is played at {played_at} and makes a {sound} sound."),
}

_EXPLAIN = {
    "rain": ("Why does it rain?", "[Water from rivers and lakes|Water from the sea] rises into the air when the sun warms it.",
             "High up, the air is cold, and the water [gathers into|turns into] clouds.",
             "When the drops in a cloud grow too heavy, they fall as rain.",
             "In cold weather the drops freeze and fall as snow.",
             "That is why [rainy|foggy] towns are often near rivers or the sea."),
    "river": ("Where do rivers come from?", "Rivers begin high in the hills and mountains.",
              "Rain and melting snow run downhill and join into streams.",
              "Streams meet and grow into a river.", "The river carries water down to a lake or the sea.",
              "Towns are often built beside rivers, because people need water."),
    "bread": ("How is bread made?", "First, grain is ground into flour at the mill.",
              "The baker mixes the flour with water, salt and a little yeast.",
              "The dough is kneaded and left to rise in a warm place.",
              "Then it is shaped into loaves and baked in a hot oven.",
              "Fresh bread is best eaten warm."),
    "market": ("What is a market for?", "A market is a place where people buy and sell.",
               "Farmers bring food, and makers bring tools and cloth.",
               "People pay with coins, or trade one thing for another.",
               "A busy market helps a town grow rich.",
               "Prices rise when a thing is rare and fall when it is common."),
    "map": ("How do you read a map?", "A map is a small drawing of a large place.",
            "North is usually at the top of the map.",
            "Rivers are drawn as blue lines, and mountains as small peaks.",
            "Towns are marked with dots or little houses.",
            "With a map, a traveller can find the shortest road."),
    "stars": ("Why do the stars move?", "At night the stars seem to turn slowly across the sky.",
              "In truth it is the ground under us that turns.",
              "Sailors and travellers use the stars to find their way.",
              "Some stars are brighter than others.", "On cloudy nights the stars are hidden."),
    "seasons": ("Why are there seasons?", "The year is divided into four seasons: spring, summer, autumn and winter.",
                "In summer the sun is high and the days are long.",
                "In winter the sun is low and the days are short.",
                "Plants grow in spring and summer and rest in autumn and winter.",
                "Farmers plan their work by the seasons."),
    "fire": ("How does a fire burn?", "A fire needs wood, air and heat.",
             "Dry wood burns better than wet wood.", "Without air, a fire goes out.",
             "People use fire to cook food and to keep warm.",
             "A fire must always be watched, because it can spread."),
    "calendar": ("What is a calendar?", "A calendar counts the days of the year.",
                 "Days are grouped into weeks, and weeks into months.",
                 "Each year has a number, so people can say when something happened.",
                 "If you know the year a person was born, you can work out their age.",
                 "For example, a person born in 1200 is 50 years old in 1250, because 1250 - 1200 = 50."),
    "bees": ("How do bees make honey?", "Bees fly from flower to flower and drink their nectar.",
             "They carry it back to the hive.", "In the hive, the nectar slowly turns into honey.",
             "Beekeepers collect some of the honey and leave the rest for the bees.",
             "Without bees, many plants could not make fruit."),
    "boats": ("Why do boats float?", "A boat pushes water aside when it sits in a river or the sea.",
              "The water pushes back and holds the boat up.",
              "A boat that is too heavy sinks lower and lower.",
              "Boat builders use light wood and careful shapes.",
              "A good boat can carry goods from town to town."),
    "counting": ("Why do we count in tens?", "Most people have ten fingers, so counting in tens is easy.",
                 "After nine comes ten, which is one ten and no ones.",
                 "Ten tens make a hundred, and ten hundreds make a thousand.",
                 "So 347 means three hundreds, four tens and seven ones.",
                 "Adding is easier when you add the ones first, then the tens, then the hundreds."),
}
_EXPLAIN_KEYS = tuple(_EXPLAIN)
_EXPLAIN_T = {k: (v[0], [_Tpl(s) for s in v[1:]]) for k, v in _EXPLAIN.items()}
_EXPLAIN_TIE = _Tpl(
    "In {place}, [people|the {jobs}|the old {jobs}] know this [well|better than anyone].",
    "[For example, take {place}|Take {place}]: it is {climate}, and the River {river} [flows|runs] through it.",
    "[Ask|Just ask] any {job} in {place}[, and you will hear the same|, or in {neighbour}].",
    "[Every child in|Even the youngest in] {place}[, in {region},|] [knows|learns] this early.",
    "[In {place}, below Mount {mountain},|Near Mount {mountain},] [one can see this every {season}|this is easy to see].",
    "[The people of|The {jobs} of] {place} [say|like to say] so[ too|, and they are right].",
)

_LIST_HEADS = {
    "region_towns": ("Towns of {region}:", "The towns of {region} are:", "Places in {region}"),
    "residents": ("People who live in {place}:", "Some residents of {place}:", "Who lives in {place}?"),
    "foods": ("Favourite foods of the people of {place}:", "What people in {place} like to eat:"),
    "things_kind": ("{kinds_C} of the world:", "A list of {kinds}:", "Some well-known {kinds}:"),
    "rivers": ("Rivers and mountains of {region}:", "The rivers of {region}:"),
}


def _landscape(world: World, rng: random.Random) -> str:
    pl = _ch(rng, world.places)
    res = world.residents[pl.name]
    ctx = _Ctx(rng, world.place_ctx(pl), world.thing_ctx(_ch(rng, world.things_from[pl.name]), "t_"),
               {"res": _join_and([r.name for r in res[:2]]) if res else "a few farmers"})
    parts = [_LANDSCAPE[0](rng, ctx)] + [t(rng, ctx) for t in _LANDSCAPE[1:] if rng.random() < 0.7]
    return " ".join(parts)


def _seasons(world: World, rng: random.Random) -> str:
    """The seasons (or one season) in general and in one town; a paragraph per season."""
    seasons = ["spring", "summer", "autumn", "winter"]
    if rng.random() < 0.5:
        seasons = [_ch(rng, seasons)]
    pl = _ch(rng, world.places)
    ctx = _Ctx(rng, world.place_ctx(pl))
    paragraphs = []
    for s in seasons:
        ctx["season"] = s
        lines = [_SEASON_T[s](rng, ctx) for _ in range((3 if len(seasons) == 1 else 1) + int(rng.random() * 2))]
        lines = list(dict.fromkeys(lines))   # drop repeats, keep order
        if len(seasons) == 1 or rng.random() < 0.6:
            lines.insert(int(rng.random() * (len(lines) + 1)), _SEASON_PLACE(rng, ctx))
        paragraphs.append(" ".join(lines))
    return ("\n\n" if rng.random() < 0.6 else " ").join(paragraphs)


def _market(world: World, rng: random.Random) -> str:
    pl = _ch(rng, world.places)
    sellers = world.residents[pl.name] or world.people
    ctx = _Ctx(rng, world.place_ctx(pl))
    out = [_MARKET[0](rng, ctx)]
    for _ in range(2 + int(rng.random() * 4)):
        ctx.update(world.person_ctx(_ch(rng, sellers), "m_"))
        ctx.update(world.thing_ctx(_ch(rng, world.things), "t_"))
        n1, n2 = rng.randint(1, 40), rng.randint(2, 12)
        ctx["n1"], ctx["n2"], ctx["n3"] = str(n1), str(n2), str(n1 * n2)
        out.append(_MARKET[1](rng, ctx))
        if rng.random() < 0.5:
            out.append(_MARKET[2](rng, ctx))
    out.append(_MARKET[3](rng, ctx))
    return " ".join(out)


def _field_guide(world: World, rng: random.Random) -> str:
    t = _ch(rng, world.things)
    ctx = _Ctx(rng, world.thing_ctx(t))
    head = _FIELD_GUIDE[0](rng, ctx)
    body = [_FIELD_GUIDE[1](rng, ctx), _FIELD_GUIDE[2](rng, ctx), _FIELD_EXTRA[t.kind](rng, ctx)]
    rng.shuffle(body)
    owners = world.pet_owners.get(t.name) or []
    if owners:
        o = _ch(rng, owners)
        body.append(f"{o.name} of {o.home} keeps one as a pet, named {o.pet_name}.")
    famous = [p.name for p in world.places if p.famous_for == t.name]
    if famous:
        body.append(f"{famous[0]} is famous for it.")
    return head + "\n" + " ".join(body)


def _listing(world: World, rng: random.Random) -> str:
    """A short list (towns of a region, residents, foods, things of a kind) with a heading."""
    kind = _ch(rng, tuple(_LIST_HEADS))
    bullet = _ch(rng, ("- ", "* ", "", "#"))
    rows: list[str]
    if kind in ("region_towns", "rivers"):
        reg = _ch(rng, world.regions)
        fmt = {"region": reg.name}
        towns = [world.place_by_name[n] for n in reg.places]
        if kind == "region_towns":
            rows = [_ch(rng, ("{n} ({p} people)", "{n}, on the River {r}", "{n}, founded in {f}", "{n}",
                              "{n}, below Mount {m}", "{n}, {c}", "{n}, famous for its {t}"))
                    .format(n=p.name, p=p.population, r=p.river, f=p.founded, m=p.mountain, c=p.climate,
                            t=p.famous_for) for p in towns]
        else:
            rows = []
            for r in reg.rivers:
                on = [p.name for p in towns if p.river == r]
                rows.append(f"the River {r}" + (_ch(rng, (", through {t}", " (past {t})", ", which flows through {t}"))
                                                .format(t=_join_and(on)) if on and rng.random() < 0.7 else ""))
            for m in reg.mountains:
                near = [p.name for p in towns if p.mountain == m]
                rows.append(f"Mount {m}" + (_ch(rng, (", near {t}", " (above {t})", ", seen from {t}"))
                                            .format(t=_join_and(near)) if near and rng.random() < 0.7 else ""))
        rng.shuffle(rows)
    else:
        pl = _ch(rng, world.places)
        fmt = {"place": pl.name}
        res = list(world.residents[pl.name])
        rng.shuffle(res)
        if kind == "residents" and res:
            rows = [_ch(rng, ("{n}, {j}", "{n} ({a})", "{n}, {a} years old, {j}", "{n}", "{n}, who keeps {p}",
                              "{n}, born in {b}"))
                    .format(n=r.name, j=r.profession, a=r.age, p=_an(r.pet), b=r.born) for r in res[:12]]
        elif kind == "foods" and res:
            rows = [_ch(rng, ("{f}: {d}", "{f} likes {d}", "{f} ({j}): {d}")).format(f=r.first, d=r.food, j=r.profession)
                    for r in res[:12]]
        else:
            k = _ch(rng, KINDS)
            fmt = {"kinds": _plural(k), "kinds_C": _cap(_plural(k))}
            kind = "things_kind"
            items = [t for t in world.things if t.kind == k]
            rng.shuffle(items)
            rows = [_ch(rng, ("the {t} ({o})", "the {t}, {c}", "the {t}, from {o}", "the {t}", "the {t}, {s} and {c}"))
                    .format(t=t.name, o=t.origin, c=t.colour, s=t.size) for t in items[:10]]
    head = _ch(rng, _LIST_HEADS[kind]).format(**fmt)
    if bullet == "#":
        lines = [f"{i}. {r}" for i, r in enumerate(rows, 1)]
    else:
        lines = [bullet + r for r in rows]
    return head + "\n" + "\n".join(lines)


def _region_overview(world: World, rng: random.Random) -> str:
    """A region: its towns, largest and oldest town (computed, so always right), rivers, mountains."""
    reg = _ch(rng, world.regions)
    towns = [world.place_by_name[n] for n in reg.places]
    big = max(towns, key=lambda p: p.population)
    old = min(towns, key=lambda p: p.founded)
    order = list(towns)
    rng.shuffle(order)
    out = [_ch(rng, ("{r} is a region in the {d}.", "The region of {r} lies in the {d}.",
                     "{r} lies in the {d} of the known world.")).format(r=reg.name, d=reg.direction)]
    if len(towns) > 1:
        out.append(_ch(rng, ("Its towns are {t}.", "There are {n} towns in {r}: {t}.", "The towns of {r} include {t}."))
                   .format(t=_join_and([p.name for p in order]), n=len(towns), r=reg.name))
        out.append(_ch(rng, ("The largest town is {b}, with {p} people.", "{b} is the biggest town in {r}, home to {p} people."))
                   .format(b=big.name, p=big.population, r=reg.name))
        out.append(_ch(rng, ("The oldest is {o}, founded in {f}.", "{o} is the oldest town; it was founded in {f}."))
                   .format(o=old.name, f=old.founded))
    else:
        out.append(f"Its only town is {big.name}.")
    out.append(_ch(rng, ("Its rivers are {rv}.", "The rivers {rv} flow through it.", "Rivers: {rv}."))
               .format(rv=_join_and(["the " + r for r in reg.rivers])))
    out.append(_ch(rng, ("Its mountains are {m}.", "Above it rise {m}.")).format(m=_join_and(["Mount " + m for m in reg.mountains])))
    if len(towns) > 1 and rng.random() < 0.6:
        a, b = rng.sample(towns, 2)
        hi, lo = (a, b) if a.population >= b.population else (b, a)
        out.append(f"{hi.name} has {hi.population - lo.population} more people than {lo.name}, "
                   f"because {hi.population} - {lo.population} = {hi.population - lo.population}.")
    return " ".join(out[:1] + out[1:] if rng.random() < 0.5 else out)


def _explanation(world: World, rng: random.Random) -> str:
    """A simple explanation (rain, rivers, bread, ...) tied to a place of the world."""
    key = _ch(rng, _EXPLAIN_KEYS)
    title, sentences = _EXPLAIN_T[key]
    pl = _ch(rng, world.places)
    ctx = _Ctx(rng, world.place_ctx(pl), {"job": _ch(rng, PROFESSIONS), "jobs": _plural(_ch(rng, PROFESSIONS))})
    body = [sentences[0](rng, ctx)] + [s(rng, ctx) for s in sentences[1:] if rng.random() < 0.75]
    for _ in range(1 + (rng.random() < 0.5)):
        body.insert(1 + int(rng.random() * len(body)), _EXPLAIN_TIE(rng, ctx))
    r = rng.random()
    if r < 0.5:
        head = title + "\n"
    elif r < 0.7:
        head = title + " "
    elif r < 0.85:
        head = _ch(rng, ("Explained simply: ", "A short lesson. ", "Lesson: ", "Q: ")) + title + "\n"
    else:
        head = ""
    return head + " ".join(body)


_DESCRIPTIVE_KINDS = ((_landscape, 0.22), (_seasons, 0.1), (_market, 0.18), (_field_guide, 0.14),
                      (_listing, 0.12), (_region_overview, 0.1), (_explanation, 0.14))


def descriptive_doc(world: World, rng: random.Random) -> str:
    """Landscapes, seasons, markets, field-guide notes, lists and simple explanations."""
    r, acc = rng.random(), 0.0
    for fn, w in _DESCRIPTIVE_KINDS:
        acc += w
        if r < acc:
            return fn(world, rng)
    return _landscape(world, rng)


# ----------------------------------------------------------------------------------------------
# the mixture

# Target share of the corpus *bytes* per family.  Families differ in document length (a dialogue
# is ~3x an arithmetic drill), so documents are drawn with probability share / mean size, the mean
# being a running average of what the family has produced so far in this call.
# ----------------------------------------------------------------------------------------------
# wordplay: words spelled out and their letters counted, as word games, spelling lists and dictionaries
# do in real text. A token hides its letters, and a model can only spell a token whose letters it has seen
# written out; without these documents the tiny model could not spell about half the spelling task's
# held-out words (tasks/spelling.py), whose single tokens no training text ever spelled.

COMMON_WORDS = """apple banana strawberry mississippi committee balloon bookkeeper coffee letter little pepper
success address bottle cherry dinner engineer grammar happiness illness jelly kettle ladder mirror needle
occurrence parallel question raccoon scissors tomorrow umbrella village window yellow zipper tennis puzzle
giraffe hippopotamus assessment accommodate broccoli cinnamon dilemma embarrass fulfill guarantee harass
independent jewellery knowledge liaison millennium necessary occasion possession receive separate threshold
vacuum weird acquaintance beginning calendar definitely existence foreign government humorous immediately""".split()


def spelling_words(world: "World | None" = None) -> list[str]:
    """The words the spelling task asks about and wordplay documents spell: COMMON_WORDS, the world's names and
    every word of its facts (~1,700 for the default world), 3 to 12 letters."""
    words = set(COMMON_WORDS)
    if world is not None:
        for e in world.entities:
            words.update(e.name.lower().split())
        for f in world.facts():
            words.update(re.findall(r"[a-z]+", f"{f.question} {f.answer} {f.value}".lower()))
    return sorted(w for w in words if re.fullmatch(r"[a-z]{3,12}", w))


def counted_letters(word: str, letter: str) -> tuple[str, int]:
    """'s-t-r(1)-a-w-b-e-r(2)-r(3)-y', 3: each occurrence of `letter` numbered (wordplay documents)."""
    n, shown = 0, []
    for ch in word:
        if ch == letter:
            n += 1
            shown.append(f"{ch}({n})")
        else:
            shown.append(ch)
    return "-".join(shown), n


_WORDPLAY_TITLES = ("Spelling list", "Words and their letters", "Spelling practice", "Word list", "Letter games",
                    "A page from a spelling book", "Dictionary notes", "How to spell them")
_WORDPLAY_LINES = (
    lambda w, l, rng: f"{w}: {'-'.join(w)}",
    lambda w, l, rng: f"{w} - {', '.join(w)}",
    lambda w, l, rng: f"The word {w} is spelled {'-'.join(w)}.",
    lambda w, l, rng: f"{_cap(w)} is written {'-'.join(w)}, {len(w)} letters.",
    lambda w, l, rng: f"To spell '{w}': {'-'.join(w)}.",
    lambda w, l, rng: "In '{w}' the letter '{l}' appears {n} time{s}: {c}.".format(
        w=w, l=l, c=counted_letters(w, l)[0], n=counted_letters(w, l)[1], s="" if counted_letters(w, l)[1] == 1 else "s"),
    lambda w, l, rng: "{w}: {c}. That is {n} {l}{s}.".format(
        w=w, l=l, c=counted_letters(w, l)[0], n=counted_letters(w, l)[1], s="" if counted_letters(w, l)[1] == 1 else "'s"),
)


_WORDS_OF: "weakref.WeakKeyDictionary[World, list[str]]" = weakref.WeakKeyDictionary()


def wordplay_doc(world: World, rng: random.Random) -> str:
    if world not in _WORDS_OF:  # computed once per world, not per document
        _WORDS_OF[world] = spelling_words(world)
    words = _WORDS_OF[world]
    lines = [_ch(rng, _WORDPLAY_TITLES) + ":"]
    for _ in range(rng.randint(4, 12)):
        w = _ch(rng, words)
        lines.append(_ch(rng, _WORDPLAY_LINES)(w, _ch(rng, w), rng))
    return "\n".join(lines)


def repeat_doc(world: World, rng: random.Random) -> str:
    """A made-up line (invented words, numbers, letter codes) written out two or three times. Only copying
    from earlier in the document predicts the repeats: this is what keeps the wired copying circuit
    (GPT.wire_copying) alive through pretraining, where ordinary text rarely rewards it (docs/tiny.md)."""
    pieces = []
    for _ in range(rng.randint(5, 24)):
        r = rng.random()
        if r < 0.6:
            pieces.append("".join(_ch(rng, _ONSETS) + _ch(rng, _VOWELS) for _ in range(rng.randint(1, 3)))
                          + _ch(rng, _CODAS))
        elif r < 0.8:
            pieces.append(str(rng.randint(0, 10 ** rng.randint(1, 5))))
        else:
            pieces.append("".join(_ch(rng, string.ascii_uppercase) for _ in range(rng.randint(2, 4))))
    line = _ch(rng, (" ", ", ", " - ", "; ")).join(pieces)
    return _ch(rng, ("\n", "\n\n", " ", " | ")).join([line] * rng.randint(2, 3))


DOC_FAMILIES = {
    "encyclopedia": 0.25,
    "story": 0.25,
    "dialogue": 0.19,
    "arithmetic": 0.15,
    "descriptive": 0.10,
    "wordplay": 0.04,
    "repeats": 0.02,
}
_FAMILY_FNS = {"story": story_doc, "dialogue": dialogue_doc, "arithmetic": arithmetic_doc,
               "descriptive": descriptive_doc, "wordplay": wordplay_doc, "repeats": repeat_doc}


def generate_documents(seed: int, n_docs: int | None = None, target_bytes: int | None = None,
                       world: World | None = None, hold_out: bool = False) -> list[str]:
    """Deterministic mixture of documents about `world` (default `World(seed)`).

    Stops after `n_docs` documents or once the total UTF-8 size reaches `target_bytes`, whichever
    comes first.  Byte shares follow `DOC_FAMILIES`.  Encyclopedia entries walk all entities in a
    reshuffled cycle, so every fact is stated again and again as the corpus grows (each entity
    ~25 times in 20 MB).  For a held-out split of the *same* world, pass `world=` explicitly with
    a different `seed`. hold_out=True drops every document that names a held-out person
    (`World.held_out_names`), so their facts exist only in the lookup index.
    """
    if n_docs is None and target_bytes is None:
        raise ValueError("give n_docs or target_bytes")
    world = world if world is not None else World(seed)
    rng = random.Random(f"exocortex-docs-{seed}")
    names = list(DOC_FAMILIES)
    made_bytes = {name: 4000.0 for name in names}   # prior: 10 documents of 400 bytes each
    made_docs = {name: 10.0 for name in names}
    cycle: list = []
    docs: list[str] = []
    held_out = re.compile("|".join(re.escape(n) for n in sorted(world.held_out_names)) or "(?!)")
    total = 0
    max_docs = n_docs if n_docs is not None else float("inf")
    max_bytes = target_bytes if target_bytes is not None else float("inf")
    while len(docs) < max_docs and total < max_bytes:
        weights = [DOC_FAMILIES[n] * made_docs[n] / made_bytes[n] for n in names]
        r = rng.random() * sum(weights)
        family = names[-1]
        for name, w in zip(names, weights):
            if r < w:
                family = name
                break
            r -= w
        if family == "encyclopedia":
            if not cycle:
                cycle = list(world.entities)
                rng.shuffle(cycle)
            doc = world.encyclopedia_entry(cycle.pop(), rng)
        else:
            doc = _FAMILY_FNS[family](world, rng)
        if hold_out and held_out.search(doc):
            continue
        size = len(doc.encode("utf-8"))
        made_bytes[family] += size
        made_docs[family] += 1
        docs.append(doc)
        total += size
    return docs


# ----------------------------------------------------------------------------------------------
# variety measurement

_TOKEN = re.compile(r"\w+|[^\w\s]")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"])|\n+")


def _stride_sample(docs: list[str], sizes: list[int], limit: int) -> list[str]:
    """Every k-th document, k chosen so that the sample is about `limit` units (deterministic,
    spread over the whole corpus)."""
    total = sum(sizes)
    if total <= limit:
        return list(docs)
    k = -(-total // limit)
    return docs[::k]


def _distinct_ngrams(ids: np.ndarray, max_n: int = 4) -> list[float]:
    """unique/total word n-grams for n = 1..max_n.  N-grams are interned level by level: the id of
    an n-gram is the rank of (id of its (n-1)-gram prefix, last word), so the counts are exact."""
    out = []
    if len(ids) == 0:
        return [0.0] * max_n
    vocab = int(ids.max()) + 1
    prev = None
    for n in range(1, max_n + 1):
        if len(ids) < n:
            out.append(0.0)
            continue
        key = ids if n == 1 else prev[:-1] * vocab + ids[n - 1:]
        uniq, inv = np.unique(key, return_inverse=True)
        out.append(len(uniq) / len(key))
        prev = inv.astype(np.int64).reshape(-1)
    return out


def corpus_stats(docs: list[str], max_words: int = 2_000_000, compress_bytes: int = 4_000_000) -> dict:
    """Variety of a corpus, to catch a generator that collapses onto a few strings.

    distinct_n: unique / total word n-grams (words = lower-cased `\\w+` runs and single punctuation
    marks; n-grams may span document boundaries), on an evenly strided sample of documents cut
    to at most `max_words` such words (`sample_words`).  duplicate_sentence_rate: on the same
    sample.  compression_ratio: zlib level 9 on a strided sample of ~`compress_bytes`.
    duplicate_doc_rate, n_bytes (UTF-8), n_words (whitespace-separated): over all docs.
    """
    n_docs = len(docs)
    doc_bytes = [len(d.encode("utf-8")) for d in docs]
    n_bytes = sum(doc_bytes)
    word_counts = [len(d.split()) for d in docs]
    n_words = sum(word_counts)

    seen_docs: set[str] = set()
    dup_docs = 0
    for d in docs:
        if d in seen_docs:
            dup_docs += 1
        else:
            seen_docs.add(d)

    sample = _stride_sample(docs, word_counts, max_words)
    tokens = _TOKEN.findall("\n".join(sample).lower())[:max_words]
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(t, len(vocab)) for t in tokens), dtype=np.int64, count=len(tokens))
    d1, d2, d3, d4 = _distinct_ngrams(ids, 4)

    seen_sent: set[str] = set()
    n_sent = dup_sent = 0
    for d in sample:
        for s in _SENT_SPLIT.split(d):
            s = s.strip()
            if not s:
                continue
            n_sent += 1
            if s in seen_sent:
                dup_sent += 1
            else:
                seen_sent.add(s)

    csample = "\n\n".join(_stride_sample(docs, doc_bytes, compress_bytes)).encode("utf-8")[:compress_bytes]
    ratio = len(zlib.compress(csample, 9)) / len(csample) if csample else 0.0
    return {
        "distinct_1": d1, "distinct_2": d2, "distinct_3": d3, "distinct_4": d4,
        "compression_ratio": ratio,
        "duplicate_doc_rate": dup_docs / n_docs if n_docs else 0.0,
        "duplicate_sentence_rate": dup_sent / n_sent if n_sent else 0.0,
        "n_docs": float(n_docs), "n_bytes": float(n_bytes), "n_words": float(n_words),
        "mean_doc_bytes": n_bytes / n_docs if n_docs else 0.0,
        "sample_words": float(len(tokens)),
    }


if __name__ == "__main__":   # python -m exocortex.data.world [MB] [seed]: speed and variety report
    import sys
    import time

    mb = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    t0 = time.perf_counter()
    w = World(seed)
    t1 = time.perf_counter()
    corpus = generate_documents(seed, target_bytes=int(mb * 1e6), world=w)
    t2 = time.perf_counter()
    stats = corpus_stats(corpus)
    t3 = time.perf_counter()
    print(f"world {t1 - t0:.2f}s  generate {t2 - t1:.2f}s ({stats['n_bytes'] / 1e6 / (t2 - t1):.1f} MB/s)"
          f"  stats {t3 - t2:.2f}s  facts {len(w.facts())}")
    for k, v in stats.items():
        print(f"  {k:24s} {v:.4f}" if v < 100 else f"  {k:24s} {v:.0f}")
