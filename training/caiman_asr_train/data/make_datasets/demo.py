"""Build the built-in demo speech corpus: synthetic English sentences spoken by eSpeak NG.

A fixed-seed grammar writes distinct sentences of 3-10 words over a vocabulary
of about a thousand common words (statements in several tenses, negations,
questions, commands, descriptions, number phrases, two-clause sentences). The
dev sentences are held out: none occurs in training and every dev word does.
Each sentence is spoken by eSpeak NG with a voice, variant, speed and pitch
drawn from the seed, padded with a little silence and a faint noise floor,
resampled to 16 kHz mono and written as FLAC.

Output (default ``datasets/demo`` at the repository root)::

    train.json, dev.json        manifests (SPEC section 11), fnames relative to the output dir
    audio/train/*.flac, audio/dev/*.flac
    corpus.json                 generation settings; "complete": true once finished

The same seed and counts give the same manifests and byte-identical audio,
whatever the number of worker processes. Re-running with the same settings is
a no-op once ``corpus.json`` says the corpus is complete; an interrupted run
resumes, keeping every FLAC already written (each is written atomically, so
any file present is whole).

eSpeak NG comes from the PyPI package ``espeakng-loader`` (library and voice
data, driven through ctypes); the ``espeak-ng`` command is the fallback.

Usage::

    python -m caiman_asr_train.data.make_datasets.demo [--output_dir datasets/demo] [--seed 0]
"""

import _ctypes
import argparse
import ctypes
import io
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Union

import numpy as np
import soundfile
import soxr
from tqdm import tqdm

from caiman_asr_train.core.errors import DataError
from caiman_asr_train.data.manifest import manifest_entry, read_manifest, write_manifest
from caiman_asr_train.utils.atomic import atomic_write_bytes
from caiman_asr_train.utils.cli import run_cli

PathLike = Union[str, os.PathLike]

SAMPLE_RATE = 16000
MIN_WORDS, MAX_WORDS = 3, 10
# Bump when the grammar or the synthesis changes, so that an old corpus is not
# mistaken for a complete new one.
GENERATOR_VERSION = 2

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def default_output_dir() -> Path:
    """``datasets/demo`` at the repository root, or under the current directory
    when the package is installed outside a checkout."""
    repo_root = _PACKAGE_ROOT.parents[1]
    if _PACKAGE_ROOT.parent.name == "training":
        return repo_root / "datasets" / "demo"
    return Path("datasets") / "demo"


# ---------------------------------------------------------------------------
# Lexicon. Nouns and adjectives carry semantic classes so that the grammar
# pairs words sensibly ("eat the warm bread", not "eat the bus"):
#   T portable thing, C clothing, O can be opened, X text or picture, G game or
#   instrument, F food, D drink, A animal, P person, V vehicle.
# ---------------------------------------------------------------------------


class _Noun(NamedTuple):
    singular: str
    plural: Optional[str]  # None for mass nouns ("bread")
    classes: str


class _Verb(NamedTuple):
    base: str
    third: str  # third person singular present
    past: str
    participle: str
    ing: str
    objects: str  # classes of its objects, "L" for places; "" when used intransitively
    subjects: str  # classes of who or what can do it: "P", "A", "V"


_NOUNS = [_Noun(*entry) for entry in [
    ("book", "books", "TXO"), ("letter", "letters", "TXO"), ("cup", "cups", "T"),
    ("chair", "chairs", "T"), ("table", "tables", "T"), ("door", "doors", "O"),
    ("window", "windows", "O"), ("phone", "phones", "T"), ("bag", "bags", "TO"),
    ("box", "boxes", "TO"), ("key", "keys", "T"), ("ball", "balls", "TG"),
    ("bottle", "bottles", "TO"), ("hat", "hats", "TC"), ("shirt", "shirts", "TC"),
    ("coat", "coats", "TC"), ("shoe", "shoes", "TC"), ("clock", "clocks", "T"),
    ("lamp", "lamps", "T"), ("picture", "pictures", "TX"), ("map", "maps", "TX"),
    ("pen", "pens", "T"), ("pencil", "pencils", "T"), ("plate", "plates", "T"),
    ("bowl", "bowls", "T"), ("knife", "knives", "T"), ("spoon", "spoons", "T"),
    ("glass", "glasses", "T"), ("watch", "watches", "TC"), ("dress", "dresses", "TC"),
    ("camera", "cameras", "T"), ("computer", "computers", "T"), ("radio", "radios", "T"),
    ("guitar", "guitars", "TG"), ("piano", "pianos", "G"), ("toy", "toys", "T"),
    ("coin", "coins", "T"), ("ring", "rings", "TC"), ("basket", "baskets", "T"),
    ("bucket", "buckets", "T"), ("wallet", "wallets", "TO"), ("umbrella", "umbrellas", "TO"),
    ("jacket", "jackets", "TC"), ("blanket", "blankets", "T"), ("pillow", "pillows", "T"),
    ("candle", "candles", "T"), ("ticket", "tickets", "TX"), ("gift", "gifts", "TO"),
    ("photo", "photos", "TX"), ("card", "cards", "TX"), ("note", "notes", "TX"),
    ("list", "lists", "X"), ("story", "stories", "X"), ("message", "messages", "X"),
    ("newspaper", "newspapers", "TX"), ("magazine", "magazines", "TX"),
    ("flower", "flowers", "T"), ("stone", "stones", "T"), ("leaf", "leaves", "T"),
    ("mirror", "mirrors", "T"), ("towel", "towels", "T"), ("brush", "brushes", "T"),
    ("drawer", "drawers", "O"), ("envelope", "envelopes", "TXO"), ("sock", "socks", "TC"),
    ("hammer", "hammers", "T"), ("rope", "ropes", "T"), ("game", "games", "G"),
    ("song", "songs", "GX"), ("window", "windows", "O"), ("gate", "gates", "O"),
    ("apple", "apples", "F"), ("orange", "oranges", "F"), ("egg", "eggs", "F"),
    ("banana", "bananas", "F"), ("cake", "cakes", "F"), ("cookie", "cookies", "F"),
    ("sandwich", "sandwiches", "F"), ("potato", "potatoes", "F"), ("tomato", "tomatoes", "F"),
    ("pie", "pies", "F"), ("lemon", "lemons", "F"), ("carrot", "carrots", "F"),
    ("peach", "peaches", "F"), ("pear", "pears", "F"), ("pizza", "pizzas", "F"),
    ("bread", None, "F"), ("rice", None, "F"), ("soup", None, "F"), ("cheese", None, "F"),
    ("meat", None, "F"), ("fruit", None, "F"), ("chocolate", None, "F"),
    ("milk", None, "D"), ("tea", None, "D"), ("coffee", None, "D"), ("water", None, "D"),
    ("juice", None, "D"), ("money", None, "T"), ("music", None, "X"),
    ("car", "cars", "VO"), ("bus", "buses", "V"), ("bike", "bikes", "V"),
    ("boat", "boats", "V"), ("train", "trains", "V"), ("truck", "trucks", "V"),
    ("plane", "planes", "V"), ("taxi", "taxis", "V"),
    ("dog", "dogs", "A"), ("cat", "cats", "A"), ("bird", "birds", "A"),
    ("horse", "horses", "A"), ("cow", "cows", "A"), ("fish", "fish", "A"),
    ("rabbit", "rabbits", "A"), ("duck", "ducks", "A"), ("sheep", "sheep", "A"),
    ("pig", "pigs", "A"), ("goat", "goats", "A"), ("mouse", "mice", "A"),
    ("frog", "frogs", "A"), ("bear", "bears", "A"), ("monkey", "monkeys", "A"),
    ("lion", "lions", "A"), ("puppy", "puppies", "A"), ("kitten", "kittens", "A"),
    ("man", "men", "P"), ("woman", "women", "P"), ("child", "children", "P"),
    ("boy", "boys", "P"), ("girl", "girls", "P"), ("baby", "babies", "P"),
    ("teacher", "teachers", "P"), ("doctor", "doctors", "P"), ("driver", "drivers", "P"),
    ("farmer", "farmers", "P"), ("friend", "friends", "P"), ("student", "students", "P"),
    ("neighbor", "neighbors", "P"), ("nurse", "nurses", "P"), ("player", "players", "P"),
    ("singer", "singers", "P"), ("worker", "workers", "P"), ("brother", "brothers", "P"),
    ("sister", "sisters", "P"), ("mother", "mothers", "P"), ("father", "fathers", "P"),
    ("uncle", "uncles", "P"), ("aunt", "aunts", "P"), ("waiter", "waiters", "P"),
    ("pilot", "pilots", "P"), ("artist", "artists", "P"), ("king", "kings", "P"),
    ("queen", "queens", "P"), ("cousin", "cousins", "P"), ("guest", "guests", "P"),
]]

_NAMES = [
    "john", "mary", "peter", "sarah", "david", "emma", "james", "anna", "tom", "lucy",
    "paul", "kate", "mike", "laura", "sam", "alice", "ben", "grace", "jack", "olivia",
    "daniel", "sophie", "henry", "ella",
]

# Adjectives: (word, classes of nouns it can describe).
_ADJECTIVES = [
    ("big", "TCOXGFAVP"), ("small", "TCOXGFAVP"), ("old", "TCOXGAVP"), ("new", "TCOXGV"),
    ("red", "TCOV"), ("blue", "TCOV"), ("green", "TCOVF"), ("yellow", "TCOV"),
    ("black", "TCOVA"), ("white", "TCOVA"), ("brown", "TCOVA"), ("long", "TCXG"),
    ("short", "TCXGP"), ("hot", "FD"), ("cold", "FD"), ("warm", "TCFD"),
    ("happy", "AP"), ("sad", "AXP"), ("quiet", "AVP"), ("loud", "GAVP"), ("clean", "TCOV"),
    ("dirty", "TCOV"), ("heavy", "TOV"), ("light", "TC"), ("soft", "TCF"), ("hard", "TXGF"),
    ("fast", "AVP"), ("slow", "AVP"), ("young", "AP"), ("tall", "P"), ("little", "TAPF"),
    ("bright", "TCV"), ("dark", "TC"), ("empty", "TO"), ("full", "TO"), ("cheap", "TCV"),
    ("expensive", "TCVF"), ("beautiful", "TCXAP"), ("pretty", "TCP"), ("strong", "APD"),
    ("tired", "AP"), ("hungry", "AP"), ("busy", "P"), ("rich", "P"), ("poor", "P"),
    ("kind", "P"), ("funny", "XGAP"), ("strange", "TXGAP"), ("nice", "TCXGFDAVP"),
    ("good", "TCXGFDAVP"), ("bad", "XGFD"), ("great", "XGP"), ("fresh", "FD"),
    ("sweet", "FDA"), ("wet", "TCA"), ("dry", "TCF"), ("wild", "A"), ("simple", "XG"),
    ("broken", "TOGV"), ("lucky", "TAP"), ("careful", "P"), ("famous", "XGP"),
    ("huge", "TAV"), ("tiny", "TAF"), ("gentle", "AP"), ("angry", "AP"), ("calm", "AP"),
    ("brave", "AP"), ("friendly", "AP"), ("lazy", "AP"), ("delicious", "F"),
    ("boring", "XG"), ("interesting", "XGP"), ("favorite", "TCXGFDAV"), ("shiny", "TCV"),
    ("round", "TF"), ("sharp", "T"), ("ugly", "TCA"), ("clever", "AP"), ("sleepy", "AP"),
]

# Places: (noun, prepositions for "where", or None when it is not a destination).
_PLACES = [
    ("kitchen", ("in",)), ("garden", ("in",)), ("park", ("in", "near")), ("school", ("at", "near")),
    ("office", ("at", "in")), ("station", ("at", "near")), ("market", ("at",)),
    ("shop", ("in", "near")), ("library", ("in", "at")), ("hospital", ("at", "near")),
    ("bank", ("at", "near")), ("church", ("at", "near")), ("river", ("near", "by")),
    ("lake", ("by", "near")), ("beach", ("on", "at")), ("forest", ("in",)),
    ("city", ("in",)), ("village", ("in",)), ("street", ("on", "in")),
    ("house", ("in", "behind", "near")), ("room", ("in",)), ("hall", ("in",)),
    ("hotel", ("at", "in")), ("restaurant", ("at", "in")), ("airport", ("at",)),
    ("farm", ("on", "at")), ("field", ("in",)), ("mountain", ("on", "near")),
    ("bridge", ("on", "under", "near")), ("bathroom", ("in",)), ("bedroom", ("in",)),
    ("garage", ("in",)), ("playground", ("in", "at")), ("museum", ("at", "in")),
    ("zoo", ("at",)), ("cafe", ("at", "in")), ("corner", ("on", "at")),
    ("island", ("on",)), ("hill", ("on",)), ("castle", ("in", "near")),
]

# Where small things lie: (noun, prepositions).
_SPOTS = [
    ("table", ("on", "under")), ("bed", ("on", "under")), ("desk", ("on", "under")),
    ("shelf", ("on",)), ("floor", ("on",)), ("chair", ("on", "under")),
    ("sofa", ("on", "behind")), ("box", ("in",)), ("bag", ("in",)), ("drawer", ("in",)),
    ("car", ("in",)), ("door", ("behind", "near")), ("window", ("near",)),
    ("cupboard", ("in",)), ("fridge", ("in",)), ("pocket", ("in",)),
]

_VERBS = [_Verb(*entry) for entry in [
    ("see", "sees", "saw", "seen", "seeing", "TCXGFAPVL", "PA"),
    ("find", "finds", "found", "found", "finding", "TCXGFAPV", "PA"),
    ("want", "wants", "wanted", "wanted", "wanting", "TCXGFDAV", "PA"),
    ("like", "likes", "liked", "liked", "liking", "TCXGFDAPVL", "PA"),
    ("need", "needs", "needed", "needed", "needing", "TCXFDV", "PA"),
    ("have", "has", "had", "had", "having", "TCXGFAV", "P"),
    ("lose", "loses", "lost", "lost", "losing", "TCX", "P"),
    ("keep", "keeps", "kept", "kept", "keeping", "TCXFA", "P"),
    ("get", "gets", "got", "got", "getting", "TCXFDV", "P"),
    ("buy", "buys", "bought", "bought", "buying", "TCXGFDAV", "P"),
    ("sell", "sells", "sold", "sold", "selling", "TCXFDAV", "P"),
    ("bring", "brings", "brought", "brought", "bringing", "TCXGFD", "PA"),
    ("carry", "carries", "carried", "carried", "carrying", "TCXF", "PA"),
    ("take", "takes", "took", "taken", "taking", "TCXFV", "PA"),
    ("hold", "holds", "held", "held", "holding", "TCXA", "P"),
    ("drop", "drops", "dropped", "dropped", "dropping", "TCXF", "PA"),
    ("show", "shows", "showed", "shown", "showing", "TCX", "P"),
    ("use", "uses", "used", "used", "using", "TV", "P"),
    ("clean", "cleans", "cleaned", "cleaned", "cleaning", "TCOVL", "P"),
    ("wash", "washes", "washed", "washed", "washing", "TCVA", "P"),
    ("fix", "fixes", "fixed", "fixed", "fixing", "TOGV", "P"),
    ("open", "opens", "opened", "opened", "opening", "O", "P"),
    ("close", "closes", "closed", "closed", "closing", "O", "P"),
    ("paint", "paints", "painted", "painted", "painting", "TOVL", "P"),
    ("move", "moves", "moved", "moved", "moving", "TV", "P"),
    ("break", "breaks", "broke", "broken", "breaking", "TO", "PA"),
    ("throw", "throws", "threw", "thrown", "throwing", "T", "P"),
    ("catch", "catches", "caught", "caught", "catching", "TVA", "PA"),
    ("hide", "hides", "hid", "hidden", "hiding", "TCXF", "PA"),
    ("check", "checks", "checked", "checked", "checking", "TXV", "P"),
    ("forget", "forgets", "forgot", "forgotten", "forgetting", "TCX", "P"),
    ("remember", "remembers", "remembered", "remembered", "remembering", "XGPL", "P"),
    ("eat", "eats", "ate", "eaten", "eating", "F", "PA"),
    ("cook", "cooks", "cooked", "cooked", "cooking", "F", "P"),
    ("drink", "drinks", "drank", "drunk", "drinking", "D", "PA"),
    ("make", "makes", "made", "made", "making", "FDX", "P"),
    ("read", "reads", "read", "read", "reading", "X", "P"),
    ("write", "writes", "wrote", "written", "writing", "X", "P"),
    ("send", "sends", "sent", "sent", "sending", "TX", "P"),
    ("meet", "meets", "met", "met", "meeting", "P", "P"),
    ("call", "calls", "called", "called", "calling", "PA", "P"),
    ("help", "helps", "helped", "helped", "helping", "P", "P"),
    ("visit", "visits", "visited", "visited", "visiting", "PL", "P"),
    ("thank", "thanks", "thanked", "thanked", "thanking", "P", "P"),
    ("ask", "asks", "asked", "asked", "asking", "P", "P"),
    ("follow", "follows", "followed", "followed", "following", "PAV", "PA"),
    ("feed", "feeds", "fed", "fed", "feeding", "AP", "P"),
    ("wake", "wakes", "woke", "woken", "waking", "AP", "PA"),
    ("love", "loves", "loved", "loved", "loving", "FDGXAPL", "PA"),
    ("miss", "misses", "missed", "missed", "missing", "PAVL", "PA"),
    ("chase", "chases", "chased", "chased", "chasing", "TAV", "PA"),
    ("watch", "watches", "watched", "watched", "watching", "GAPV", "PA"),
    ("hear", "hears", "heard", "heard", "hearing", "GXAPV", "PA"),
    ("drive", "drives", "drove", "driven", "driving", "V", "P"),
    ("ride", "rides", "rode", "ridden", "riding", "V", "P"),
    ("leave", "leaves", "left", "left", "leaving", "TCXL", "P"),
    ("play", "plays", "played", "played", "playing", "G", "P"),
    ("wear", "wears", "wore", "worn", "wearing", "C", "P"),
    ("draw", "draws", "drew", "drawn", "drawing", "APVL", "P"),
    ("fill", "fills", "filled", "filled", "filling", "O", "P"),
    ("sleep", "sleeps", "slept", "slept", "sleeping", "", "PA"),
    ("run", "runs", "ran", "run", "running", "", "PAV"),
    ("walk", "walks", "walked", "walked", "walking", "", "PA"),
    ("sit", "sits", "sat", "sat", "sitting", "", "PA"),
    ("wait", "waits", "waited", "waited", "waiting", "", "PAV"),
    ("work", "works", "worked", "worked", "working", "", "P"),
    ("play", "plays", "played", "played", "playing", "", "PA"),
    ("swim", "swims", "swam", "swum", "swimming", "", "PA"),
    ("dance", "dances", "danced", "danced", "dancing", "", "P"),
    ("sing", "sings", "sang", "sung", "singing", "", "PA"),
    ("laugh", "laughs", "laughed", "laughed", "laughing", "", "P"),
    ("cry", "cries", "cried", "cried", "crying", "", "P"),
    ("smile", "smiles", "smiled", "smiled", "smiling", "", "P"),
    ("stay", "stays", "stayed", "stayed", "staying", "", "PA"),
    ("arrive", "arrives", "arrived", "arrived", "arriving", "", "PV"),
    ("stop", "stops", "stopped", "stopped", "stopping", "", "PAV"),
    ("live", "lives", "lived", "lived", "living", "", "PA"),
    ("rest", "rests", "rested", "rested", "resting", "", "PA"),
    ("talk", "talks", "talked", "talked", "talking", "", "P"),
    ("listen", "listens", "listened", "listened", "listening", "", "PA"),
    ("shout", "shouts", "shouted", "shouted", "shouting", "", "P"),
    ("jump", "jumps", "jumped", "jumped", "jumping", "", "PA"),
    ("fall", "falls", "fell", "fallen", "falling", "", "PA"),
    ("stand", "stands", "stood", "stood", "standing", "", "PA"),
    ("study", "studies", "studied", "studied", "studying", "", "P"),
    ("climb", "climbs", "climbed", "climbed", "climbing", "", "PA"),
    ("hide", "hides", "hid", "hidden", "hiding", "", "PA"),
    ("read", "reads", "read", "read", "reading", "", "P"),
    ("cook", "cooks", "cooked", "cooked", "cooking", "", "P"),
    ("eat", "eats", "ate", "eaten", "eating", "", "PA"),
    ("fly", "flies", "flew", "flown", "flying", "", "AV"),
]]
# Verbs of motion take a destination ("to the park", "home") instead of a location.
_MOTION = {"go", "come", "walk", "run", "drive", "travel", "return", "fly", "hurry", "ride"}
_MOTION_VERBS = [_Verb(*entry) for entry in [
    ("go", "goes", "went", "gone", "going", "", "PAV"),
    ("come", "comes", "came", "come", "coming", "", "PAV"),
    ("travel", "travels", "traveled", "traveled", "traveling", "", "P"),
    ("return", "returns", "returned", "returned", "returning", "", "PV"),
    ("hurry", "hurries", "hurried", "hurried", "hurrying", "", "PA"),
    ("drive", "drives", "drove", "driven", "driving", "", "P"),
    ("ride", "rides", "rode", "ridden", "riding", "", "P"),
]]

# Verbs of state sound wrong in the progressive ("he is liking").
_STATIVE = {"see", "want", "like", "need", "have", "love", "remember", "forget", "hear", "miss"}

_MANNER = [
    "quickly", "slowly", "quietly", "carefully", "loudly", "happily", "gently", "easily",
    "badly", "well", "again", "together", "early", "late", "suddenly", "politely",
]
_FREQUENCY = ["always", "never", "often", "sometimes", "usually", "rarely", "also", "just"]
_DEGREE = ["very", "really", "too", "so", "quite", "rather", "pretty"]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_MONTHS = [
    "january", "february", "march", "april", "may", "june", "july", "august",
    "september", "october", "november", "december",
]
_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_UNITS = [("minute", "minutes"), ("hour", "hours"), ("day", "days"), ("week", "weeks"),
          ("year", "years"), ("mile", "miles"), ("dollar", "dollars")]
# What runs to a timetable: (noun, verbs for "what time does the NOUN VERB").
_SCHEDULES = [(noun, ("leave", "arrive", "stop")) for noun in ("bus", "train", "plane", "boat")] + [
    (noun, ("open", "close")) for noun in ("shop", "bank", "museum", "library", "market")] + [
    (noun, ("start", "end", "finish")) for noun in ("game", "film", "show", "party", "class")]
_POSSESSIVES = ["my", "your", "his", "her", "our", "their"]

# Subjects: (words, person) with person "1" (i), "3" (third singular) or "p" (other).
_PRONOUNS = [(["i"], "1"), (["you"], "p"), (["we"], "p"), (["they"], "p"),
             (["he"], "3"), (["she"], "3")]
_BE = {"1": ("am", "was"), "3": ("is", "was"), "p": ("are", "were")}
_CONTRACTED_BE = {"i": "i'm", "you": "you're", "we": "we're", "they": "they're",
                  "he": "he's", "she": "she's"}


def number_words(n: int) -> list[str]:
    """English words for 0 <= n <= 100, e.g. 42 -> ["forty", "two"]."""
    if n < 20:
        return [_ONES[n]]
    if n == 100:
        return ["one", "hundred"]
    tens, ones = divmod(n, 10)
    return [_TENS[tens]] + ([_ONES[ones]] if ones else [])


def _article(next_word: str) -> str:
    # The word lists avoid "hour", "honest", "useful" and the like, so the
    # spelling decides.
    return "an" if next_word[0] in "aeiou" else "a"


class _Grammar:
    """Sentence patterns drawing from one ``random.Random`` stream."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.verbs = _VERBS + _MOTION_VERBS
        self.transitive = [v for v in self.verbs if v.objects]
        self.intransitive = [v for v in self.verbs if not v.objects]
        self.dynamic = [v for v in self.verbs if v.base not in _STATIVE]
        self.countable = [n for n in _NOUNS if n.plural is not None]
        self.patterns: list[tuple[float, Callable[[], list[str]]]] = [
            (6, self.statement), (2, self.negative), (2, self.progressive),
            (1.5, self.future), (1.5, self.modal), (2, self.yes_no_question),
            (2.5, self.wh_question), (2, self.command), (2, self.description),
            (1.5, self.there_is), (2, self.numbers), (1, self.perfect),
            (1, self.wants_to), (1, self.two_clauses), (0.7, self.opinion),
            (0.8, self.put_give),
        ]

    # -- small pieces -------------------------------------------------------

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def choice(self, seq):
        return self.rng.choice(seq)

    def noun(self, classes: str) -> _Noun:
        return self.choice([n for n in _NOUNS if set(n.classes) & set(classes)])

    def adjective(self, noun_classes: str) -> str:
        return self.choice([a for a, cls in _ADJECTIVES if set(cls) & set(noun_classes)])

    def noun_phrase(self, classes: str, plural: Optional[bool] = None,
                    adjective_p: float = 0.4) -> tuple[list[str], bool]:
        """Determiner, optional adjective, noun. Returns (words, is_plural)."""
        singular, plural_form, noun_classes = self.noun(classes)
        if plural is None:
            plural = plural_form is not None and self.chance(0.3)
        mass = plural_form is None
        noun = plural_form if plural and not mass else singular
        adjective = [self.adjective(noun_classes)] if self.chance(adjective_p) else []
        first = (adjective or [noun])[0]
        if mass:
            determiners = ["the", "some", "this", "that", "more"] + _POSSESSIVES
        elif plural:
            determiners = ["the", "some", "these", "those", "many", "two", "three"] + _POSSESSIVES
        else:
            determiners = ["the", "the", _article(first), "this", "that", "every"] + _POSSESSIVES
        return [self.choice(determiners)] + adjective + [noun], plural and not mass

    def definite(self, classes: str, plural: Optional[bool] = None) -> tuple[list[str], bool]:
        """Determiner such as "the", "this" or "my", then the noun. Returns (words, is_plural)."""
        singular, plural_form, _ = self.noun(classes)
        if plural is None:
            plural = plural_form is not None and self.chance(0.3)
        plural = plural and plural_form is not None
        if plural:
            determiner = self.choice(["the", "these", "those"] + _POSSESSIVES)
        else:
            determiner = self.choice(["the", "this", "that"] + _POSSESSIVES)
        return [determiner, plural_form if plural else singular], plural

    def subject(self, classes: str) -> tuple[list[str], str]:
        """A subject able to do something of ``classes`` ("P", "A", "V")."""
        options = []
        if "P" in classes:
            options += ["pronoun", "pronoun", "name", "noun"]
        if "A" in classes or "V" in classes:
            options += ["noun"]
        kind = self.choice(options)
        if kind == "pronoun":
            words, person = self.choice(_PRONOUNS)
            return list(words), person
        if kind == "name":
            return [self.choice(_NAMES)], "3"
        words, plural = self.noun_phrase(classes, adjective_p=0.25)
        return words, "p" if plural else "3"

    def object_phrase(self, classes: str) -> list[str]:
        """The object of a verb taking ``classes``; "L" adds place nouns, "P" names."""
        options = [c for c in classes if c != "L"]
        pick = self.choice(list(classes))
        if pick == "L" or not options:
            return ["the", self.choice(_PLACES)[0]]
        if pick == "P" and self.chance(0.3):
            return [self.choice(_NAMES + ["me", "him", "her", "us", "them"])]
        return self.noun_phrase("".join(options))[0]

    def place(self, small_things: bool = False) -> list[str]:
        """Where something is: a place, or for small things also a spot such as "under the bed"."""
        if small_things and self.chance(0.5):
            noun, preps = self.choice(_SPOTS)
        else:
            noun, preps = self.choice(_PLACES)
        return [self.choice(preps), self.choice(["the", "the", "my", "our", "this", "that"]), noun]

    def destination(self) -> list[str]:
        if self.chance(0.15):
            return [self.choice(["home", "there", "here", "outside", "downstairs", "upstairs"])]
        if self.chance(0.15):
            return ["to", self.choice(["school", "work", "bed", "church", "town"])]
        return ["to", "the", self.choice(_PLACES)[0]]

    def time(self, tense: str) -> list[str]:
        """A time phrase fitting ``tense``: past, present, progressive or future."""
        rng = self.rng
        if tense == "past":
            return self.choice([
                ["yesterday"], ["last", self.choice(["night", "week", "month", "year", "summer"])],
                ["this", self.choice(["morning", "afternoon"])], ["on", self.choice(_DAYS)],
                ["in", self.choice(_MONTHS)], number_words(rng.randint(2, 12)) + [
                    self.choice(["days", "weeks", "years", "minutes", "hours"]), "ago"],
                ["at", *number_words(rng.randint(1, 12)), "o'clock"], ["after", "lunch"],
                ["before", "dinner"], ["earlier"],
            ])
        if tense == "future":
            return self.choice([
                ["tomorrow"], ["tonight"], ["soon"], ["later"], ["next", self.choice(
                    ["week", "month", "year", "summer", "time"])], ["on", self.choice(_DAYS)],
                ["this", self.choice(["evening", "weekend", "afternoon"])],
                ["at", *number_words(rng.randint(1, 12)), "o'clock"], ["after", "school"],
                ["in", *number_words(rng.randint(2, 30)), self.choice(["minutes", "days"])],
            ])
        if tense == "progressive":
            return self.choice([["now"], ["right", "now"], ["today"], ["at", "the", "moment"],
                                ["this", "morning"], ["again"]])
        return self.choice([
            ["every", self.choice(["day", "morning", "evening", "week", "night", "summer"])],
            ["in", "the", self.choice(["morning", "afternoon", "evening"])], ["at", "night"],
            ["on", self.choice(_DAYS) + "s"], ["after", self.choice(["breakfast", "lunch", "work"])],
            ["before", self.choice(["breakfast", "dinner", "bed"])], ["on", "weekends"],
            ["at", "noon"], ["in", self.choice(["winter", "summer", "spring"])],
        ])

    def verb_phrase(self, verb: _Verb, form: str) -> list[str]:
        """The verb in ``form`` (a ``_Verb`` field name) and its object, destination or nothing."""
        words = [getattr(verb, form)]
        if verb.objects:
            words += self.object_phrase(verb.objects)
        elif verb.base in _MOTION and self.chance(0.8):
            words += self.destination()
        return words

    def extras(self, tense: str, intransitive: bool) -> list[str]:
        """Optional adverb, place and time after the verb phrase."""
        words = []
        if self.chance(0.25):
            words.append(self.choice(_MANNER))
        if self.chance(0.45 if intransitive else 0.25):
            words += self.place()
        if self.chance(0.35):
            words += self.time(tense)
        return words

    def clause(self, tense: str) -> list[str]:
        verb = self.choice(self.verbs)
        subject, person = self.subject(verb.subjects)
        if tense == "past":
            form = "past"
        else:
            form = "third" if person == "3" else "base"
        adverb = [self.choice(_FREQUENCY)] if tense == "present" and self.chance(0.3) else []
        return subject + adverb + self.verb_phrase(verb, form) + self.extras(tense, not verb.objects)

    # -- patterns -----------------------------------------------------------

    def statement(self) -> list[str]:
        return self.clause(self.choice(["present", "past", "past"]))

    def negative(self) -> list[str]:
        verb = self.choice(self.verbs)
        subject, person = self.subject(verb.subjects)
        tense = self.choice(["present", "past", "future"])
        if tense == "past":
            aux = ["didn't"] if self.chance(0.8) else ["did", "not"]
        elif tense == "future":
            aux = ["won't"] if self.chance(0.8) else ["will", "not"]
        else:
            aux = ["doesn't"] if person == "3" else ["don't"]
        return subject + aux + self.verb_phrase(verb, "base") + self.extras(tense, not verb.objects)

    def progressive(self) -> list[str]:
        verb = self.choice(self.dynamic)
        subject, person = self.subject(verb.subjects)
        be_present, be_past = _BE[person]
        if subject[0] in _CONTRACTED_BE and len(subject) == 1 and self.chance(0.5):
            head = [_CONTRACTED_BE[subject[0]]]
        else:
            head = subject + [be_past if self.chance(0.3) else be_present]
        return head + self.verb_phrase(verb, "ing") + self.extras("progressive", not verb.objects)

    def future(self) -> list[str]:
        verb = self.choice(self.verbs)
        subject, person = self.subject(verb.subjects)
        if self.chance(0.6):
            aux = ["will"]
            if subject[0] in ("i", "we") and len(subject) == 1 and self.chance(0.4):
                subject, aux = [subject[0] + "'ll"], []
        else:
            aux = [_BE[person][0], "going", "to"]
        return subject + aux + self.verb_phrase(verb, "base") + self.extras("future", not verb.objects)

    def modal(self) -> list[str]:
        verb = self.choice(self.verbs)
        subject, _ = self.subject(verb.subjects)
        modal = self.choice(["can", "can't", "could", "should", "must", "might", "may",
                             "would", "shouldn't", "couldn't"])
        return (subject + [modal] + self.verb_phrase(verb, "base")
                + self.extras("future", not verb.objects))

    def perfect(self) -> list[str]:
        verb = self.choice(self.transitive)
        subject, person = self.subject(verb.subjects)
        if self.chance(0.35):
            return (["have", "you"] + self.choice([[], ["ever"], ["already"]])
                    + self.verb_phrase(verb, "participle"))
        aux = ["has"] if person == "3" else ["have"]
        if subject[0] in ("i", "we", "you", "they") and len(subject) == 1 and self.chance(0.5):
            subject, aux = [subject[0] + "'ve"], []
        middle = self.choice([[], ["already"], ["just"], ["never"]])
        return subject + aux + middle + self.verb_phrase(verb, "participle")

    def yes_no_question(self) -> list[str]:
        verb = self.choice(self.verbs)
        subject, person = self.subject(verb.subjects)
        kind = self.choice(["do", "did", "will", "can", "be"])
        if kind == "be" and verb.base not in _STATIVE:
            be = {"1": "am", "3": "is", "p": "are"}[person]
            return [be] + subject + self.verb_phrase(verb, "ing") + self.extras("progressive", False)
        aux = {"do": "does" if person == "3" else "do"}.get(kind, kind)
        tense = {"do": "present", "did": "past"}.get(kind, "future")
        return [aux] + subject + self.verb_phrase(verb, "base") + self.extras(tense, not verb.objects)

    def wh_question(self) -> list[str]:
        kind = self.rng.randrange(8)
        if kind == 0:
            words, plural = self.definite("TCXGFAV")
            return ["where", "are" if plural else "is"] + words
        if kind == 1:
            verb = self.choice(self.transitive)
            subject, person = self.subject(verb.subjects)
            aux = self.choice(["did", "does" if person == "3" else "do", "will", "can"])
            tense = {"did": "past", "does": "present", "do": "present"}.get(aux, "future")
            return ["what", aux] + subject + [verb.base] + self.extras(tense, False)
        if kind == 2:
            verb = self.choice(self.transitive)
            return ["who"] + self.verb_phrase(verb, "past") + self.extras("past", False)
        if kind == 3:
            singular, plural_form, classes = self.noun("TCXGFAV")
            if plural_form is None:
                return ["which", singular, "do", "you", self.choice(["like", "want", "need"])]
            verb = self.choice([v for v in self.transitive if set(v.objects) & set(classes)])
            return ["how", "many", plural_form, "did"] + self.subject(verb.subjects)[0] + [verb.base]
        if kind == 4:
            who = self.choice([[self.choice(_NAMES)], self.definite("PA", plural=False)[0],
                               ["he"], ["she"]])
            return ["what", "is"] + who + ["doing"] + self.extras("progressive", True)
        if kind == 5:
            verb = self.choice(self.verbs)
            subject, person = self.subject(verb.subjects)
            wh = self.choice(["why", "when", "where", "how", "how", "how", "why"])
            aux = self.choice(["did", "does" if person == "3" else "do", "can", "should", "will"])
            return [wh, aux] + subject + self.verb_phrase(verb, "base")
        if kind == 6:
            words, plural = self.definite("TCXGFDAVP")
            return (["why", "are" if plural else "is"] + words
                    + [self.choice(_DEGREE[:4]), self.adjective(_noun_classes(words[-1]))])
        thing, verbs = self.choice(_SCHEDULES)
        return ["what", "time", "does", "the", thing, self.choice(verbs)]

    def command(self) -> list[str]:
        verb = self.choice(self.verbs)
        head = self.choice([[], [], ["please"], ["don't"], ["let's"], ["please", "don't"],
                            ["never"], ["always"]])
        tail = ["please"] if "please" not in head and self.chance(0.25) else []
        return head + self.verb_phrase(verb, "base") + self.extras("future", not verb.objects) + tail

    def description(self) -> list[str]:
        kind = self.rng.randrange(5)
        if kind == 0:
            words, plural = self.definite("TCXGFDAVP")
            be = self.choice(["are", "were"] if plural else ["is", "was"])
            degree = [self.choice(_DEGREE)] if self.chance(0.5) else []
            return words + [be] + degree + [self.adjective(_noun_classes(words[-1]))]
        if kind == 1:
            weather = self.choice(["cold", "hot", "warm", "sunny", "windy", "cloudy", "dark",
                                   "quiet", "late", "early", "nice", "wet", "dry"])
            head = self.choice([["it's"], ["it", "is"], ["it", "was"], ["it", "will", "be"]])
            tail = self.choice([[], ["outside"], ["today"], ["tonight"], ["again"],
                                ["in", "the", "morning"], ["here"]])
            return head + ([self.choice(_DEGREE)] if self.chance(0.5) else []) + [weather] + tail
        if kind == 2:
            name = self.choice(_NAMES)
            singular, _, classes = self.noun("P")
            adjective = self.adjective(classes)
            return [name, "is", _article(adjective), adjective, singular] + (
                self.place() if self.chance(0.3) else [])
        if kind == 3:
            words, _ = self.definite("TCXGFDAV", plural=False)
            verb = self.choice(["looks", "sounds", "smells", "feels", "seems"])
            return words + [verb, self.adjective(_noun_classes(words[-1]))]
        singular, _, classes = self.choice(self.countable)
        adjective = self.adjective(classes)
        return self.choice([["that's"], ["this", "is"], ["what"], ["it", "was"]]) + [
            _article(adjective), adjective, singular]

    def there_is(self) -> list[str]:
        singular, plural_form, classes = self.noun("TCXGFDAVP")
        adjective = [self.adjective(classes)] if self.chance(0.35) else []
        if plural_form is None:
            determiner, noun, be = self.choice(["some", "no", "more"]), singular, "is"
        elif self.chance(0.35):
            determiner = self.choice(["some", "two", "three", "many", "no"])
            noun, be = plural_form, "are"
        else:
            determiner, noun, be = _article((adjective or [singular])[0]), singular, "is"
        if self.chance(0.3):
            be = {"is": "was", "are": "were"}[be]
        head = ["there's"] if be == "is" and self.chance(0.4) else ["there", be]
        return head + [determiner] + adjective + [noun] + self.place(small_things="A" not in classes)

    def numbers(self) -> list[str]:
        rng = self.rng
        kind = rng.randrange(6)
        if kind == 0:
            singular, plural_form, _ = self.choice(self.countable)
            n = rng.randint(1, 99)
            noun = singular if n == 1 else plural_form
            subject, person = self.subject("P")
            verb = self.choice([v for v in _VERBS if v.base in ("have", "need", "want", "buy", "find")])
            if self.chance(0.5):
                form = verb.past
            else:
                form = verb.third if person == "3" else verb.base
            return subject + [form] + number_words(n) + [noun]
        if kind == 1:
            _, plural_form, classes = self.choice(self.countable)
            place = self.place(small_things="A" not in classes)
            count = number_words(rng.randint(2, 99))
            return ["there", self.choice(["are", "were"])] + count + [plural_form] + place
        if kind == 2:
            words, _ = self.noun_phrase("TCXGFV", plural=False, adjective_p=0.2)
            n = rng.randint(2, 100)
            return words + [self.choice(["costs", "cost"])] + number_words(n) + ["dollars"]
        if kind == 3:
            name = self.choice(_NAMES + ["my", "your", "our"])
            who = [name] if name in _NAMES else [name, self.noun("P").singular]
            return who + ["is"] + number_words(rng.randint(2, 99)) + ["years", "old"]
        if kind == 4:
            vehicle = self.choice(["bus", "train", "plane", "boat", "taxi"])
            verb = self.choice(["leaves", "left", "arrives", "arrived", "comes"])
            return ["the", vehicle, verb, "at"] + number_words(rng.randint(1, 12)) + ["o'clock"]
        singular, plural_form = self.choice(_UNITS)
        n = rng.randint(1, 60)
        unit = singular if n == 1 else plural_form
        return (self.choice([["we", "waited", "for"], ["it", "takes"], ["it", "took"],
                             ["i", "walked"], ["they", "drove"], ["she", "stayed", "for"]])
                + number_words(n) + [unit])

    def wants_to(self) -> list[str]:
        verb = self.choice(self.verbs)
        subject, person = self.subject("P")
        want = self.choice(["want", "need", "like", "love", "hope", "try", "forget", "plan"])
        if person == "3":
            want = {"try": "tries"}.get(want, want + "s")
        elif self.chance(0.4):
            want = {"try": "tried", "forget": "forgot", "plan": "planned"}.get(
                want, want + "d" if want.endswith("e") else want + "ed")
        if subject == ["i"] and self.chance(0.3):
            return ["i'd", "like", "to"] + self.verb_phrase(verb, "base")
        return subject + [want, "to"] + self.verb_phrase(verb, "base")

    def two_clauses(self) -> list[str]:
        first = self.short_clause()
        second = self.short_clause()
        return first + [self.choice(["and", "but", "because", "so", "when", "or"])] + second

    def short_clause(self) -> list[str]:
        verb = self.choice(self.intransitive)
        subject, person = self.subject(verb.subjects)
        if self.chance(0.5):
            form = "past"
        else:
            form = "third" if person == "3" else "base"
        return subject + self.verb_phrase(verb, form)

    def opinion(self) -> list[str]:
        head = self.choice([["i", "think"], ["i", "know"], ["we", "hope"], ["she", "said"],
                            ["i", "don't", "think"], ["they", "know"], ["he", "thinks"]])
        tail = self.clause(self.choice(["present", "past"]))
        return head + (["that"] if self.chance(0.3) else []) + tail

    def put_give(self) -> list[str]:
        thing, _ = self.noun_phrase("TCXF", adjective_p=0.3)
        kind = self.rng.randrange(3)
        if kind == 0:
            noun, preps = self.choice(_SPOTS)
            return (self.choice([["put"], ["please", "put"], ["i", "put"], ["she", "left"]])
                    + thing + [self.choice(preps), "the", noun])
        if kind == 1:
            verb = self.choice(["give", "gave", "show", "showed", "bring", "brought", "send", "sent"])
            if self.chance(0.5):
                return [verb, self.choice(["me", "him", "her", "us", "them"])] + thing
            return [verb] + thing + ["to", self.choice(_NAMES)]
        return self.choice([["can", "you", "pass"], ["please", "pass"], ["could", "you", "hand"],
                            ["will", "you", "bring"]]) + ["me"] + thing

    def sentence(self) -> str:
        """One sentence of MIN_WORDS..MAX_WORDS words."""
        weights = [w for w, _ in self.patterns]
        while True:
            pattern = self.rng.choices(self.patterns, weights=weights)[0][1]
            words = pattern()
            if MIN_WORDS <= len(words) <= MAX_WORDS:
                return " ".join(words)


def _noun_classes(word: str) -> str:
    """Classes of a noun given in either number ("TCXGFDAVP" if unknown)."""
    for singular, plural, classes in _NOUNS:
        if word in (singular, plural):
            return classes
    return "TCXGFDAVP"


def make_sentences(
    seed: int = 0, num_train: int = 3000, num_dev: int = 200
) -> tuple[list[str], list[str]]:
    """Distinct training sentences and held-out dev sentences, fixed by ``seed``.

    No dev sentence occurs in training. Dev sentences use only training words
    whenever the grammar offers enough of them within a fixed number of draws,
    which is always the case at the default sizes; a tiny training set cannot
    cover the vocabulary, so its dev set then takes any new sentences.
    Sentences have 3-10 words of lowercase letters and apostrophes.
    """
    grammar = _Grammar(random.Random(seed))
    # The grammar can make ~10^9 sentences, so repeats are rare; the draw
    # limits only guard against an endless loop.
    max_draws = 50 * (num_train + num_dev) + 1000
    train: list[str] = []
    seen: set[str] = set()
    for _ in range(max_draws):
        if len(train) == num_train:
            break
        sentence = grammar.sentence()
        if sentence not in seen:
            seen.add(sentence)
            train.append(sentence)
    vocabulary = {word for sentence in train for word in sentence.split()}
    dev: list[str] = []
    for draw in range(max_draws):
        if len(dev) == num_dev:
            break
        sentence = grammar.sentence()
        in_vocabulary = vocabulary.issuperset(sentence.split())
        if sentence not in seen and (in_vocabulary or draw >= 20 * num_dev + 500):
            seen.add(sentence)
            dev.append(sentence)
    if len(train) < num_train or len(dev) < num_dev:
        raise DataError(
            f"could only make {len(train)} training and {len(dev)} dev sentences; "
            "ask for fewer with --num_train/--num_dev"
        )
    return train, dev


# ---------------------------------------------------------------------------
# Speech synthesis
# ---------------------------------------------------------------------------

# A few speakers rather than hundreds: the demo must train to a low WER in
# minutes on two CPU cores, and each extra accent or synthesiser is another
# pronunciation of every word for the model to learn. Two accents times six
# voice variants, with moderate speeds and pitches, still give the model
# several voices to generalise over (the dev set uses the same speakers).
_VOICES = ["en-us", "en"]
_VARIANTS = ["", "m1", "m3", "f1", "f2", "f4"]

# espeak_lib.h constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class _EspeakLibrary:
    """libespeak-ng from the ``espeakng-loader`` wheel, called through ctypes.

    The library keeps state in static variables (such as the phase of its
    pitch flutter) that carries over from one utterance to the next and shifts
    lengths by a few samples, so the corpus would depend on which process spoke
    which sentences in which order. Each utterance therefore gets a freshly
    loaded library: load, initialise, speak, terminate, unload (about 3 ms).
    """

    def __init__(self):
        import espeakng_loader

        self.path = espeakng_loader.get_library_path()
        self.data_path = espeakng_loader.get_data_path().encode()
        self._chunks: list[np.ndarray] = []
        # Keep a reference: ctypes frees the C trampoline with the Python object.
        self._callback = _SYNTH_CALLBACK(self._collect)
        # Fail here, where the caller can fall back to the command, not mid-corpus.
        self._unload(self._load())

    def _load(self) -> ctypes.CDLL:
        lib = ctypes.CDLL(self.path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path, _INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise OSError(f"espeak_Initialize failed with data at {self.data_path.decode()}")
        lib.espeak_SetSynthCallback(self._callback)
        return lib

    @staticmethod
    def _unload(lib: ctypes.CDLL) -> None:
        lib.espeak_Terminate()
        # dlclose drops the mapping, so the next load starts from pristine statics.
        _ctypes.dlclose(lib._handle)

    def _collect(self, wav, num_samples, _events) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = keep going

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int,
                   seed: int) -> np.ndarray:
        """int16 samples ``[N]`` at ``self.sample_rate`` Hz; ``seed`` fixes breath noise."""
        lib = self._load()
        try:
            set_seed = getattr(lib, "espeak_ng_SetRandSeed", None)  # eSpeak NG >= 1.52
            if set_seed is not None:
                set_seed(ctypes.c_long(seed))
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise DataError(f"eSpeak NG has no voice {voice!r}; reinstall espeakng-loader")
            # The voice sets its own defaults, so parameters come after it.
            for parameter, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
                lib.espeak_SetParameter(parameter, value, 0)
            self._chunks = []
            encoded = text.encode() + b"\0"
            status = lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8,
                                      None, None)
            lib.espeak_Synchronize()
        finally:
            self._unload(lib)
        if status != 0:
            raise DataError(f"eSpeak NG failed (status {status}) on {text!r}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


class _EspeakCommand:
    """The ``espeak-ng`` program, one process per utterance (no pitch range or seed control)."""

    def __init__(self, executable: str):
        self.executable = executable

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int,
                   seed: int) -> np.ndarray:
        command = [self.executable, "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text]
        result = subprocess.run(command, capture_output=True, check=False)
        if result.returncode != 0:
            raise DataError(f"{' '.join(command)} failed: {result.stderr.decode().strip()}")
        samples, self.sample_rate = soundfile.read(io.BytesIO(result.stdout), dtype="int16")
        return samples


_ENGINE = None


def _espeak():
    """This process's eSpeak NG: the bundled library, else the ``espeak-ng`` command."""
    global _ENGINE
    if _ENGINE is None:
        try:
            _ENGINE = _EspeakLibrary()
        except (ImportError, OSError, AttributeError, RuntimeError) as exc:
            executable = shutil.which("espeak-ng")
            if executable is None:
                raise DataError(
                    f"cannot load eSpeak NG ({exc}); `pip install espeakng-loader` "
                    "or install the espeak-ng package"
                ) from None
            _ENGINE = _EspeakCommand(executable)
    return _ENGINE


def speaker_settings(seed: int, split: str, index: int) -> dict:
    """Voice, speed, pitch and recording conditions of one utterance, fixed by its seed."""
    rng = random.Random(f"{seed}:{split}:{index}")
    variant = rng.choice(_VARIANTS)
    return {
        "voice": rng.choice(_VOICES) + (f"+{variant}" if variant else ""),
        "rate": rng.randint(150, 190),  # words per minute
        "pitch": rng.randint(35, 65),  # 0..99, 50 is the voice's normal pitch
        "pitch_range": rng.randint(40, 80),  # 0 is a monotone
        "peak": rng.uniform(0.3, 0.95),  # peak amplitude, full scale = 1
        "lead_silence": rng.uniform(0.05, 0.3),  # seconds
        "trail_silence": rng.uniform(0.05, 0.3),  # seconds
        # Background noise, full scale = 1: at most ~5 LSB of 16-bit audio, so
        # that FLAC still compresses well.
        "noise_std": 10 ** rng.uniform(-5.0, -3.8),
        "noise_seed": rng.getrandbits(32),  # also seeds eSpeak's own breath noise
    }


def synthesize(text: str, settings: dict) -> np.ndarray:
    """Speak ``text`` with ``settings`` (see ``speaker_settings``): float32 ``[N]`` at 16 kHz."""
    engine = _espeak()
    samples = engine.synthesize(
        text, settings["voice"], settings["rate"], settings["pitch"], settings["pitch_range"],
        settings["noise_seed"],
    )
    speech = samples.astype(np.float32)
    peak = float(np.abs(speech).max(initial=0.0))
    if peak == 0:
        raise DataError(f"eSpeak NG produced no audio for {text!r} with voice {settings['voice']}")
    speech *= settings["peak"] / peak
    speech = soxr.resample(speech, engine.sample_rate, SAMPLE_RATE, quality="HQ")
    lead = np.zeros(int(settings["lead_silence"] * SAMPLE_RATE), np.float32)
    trail = np.zeros(int(settings["trail_silence"] * SAMPLE_RATE), np.float32)
    audio = np.concatenate([lead, speech, trail])
    noise_rng = np.random.default_rng(settings["noise_seed"])
    noise = noise_rng.normal(0.0, settings["noise_std"], audio.shape)
    return np.clip(audio + noise.astype(np.float32), -1.0, 1.0).astype(np.float32)


def _flac_bytes(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def _make_utterance(task: tuple) -> tuple[str, int, int]:
    """Pool worker: synthesise one sentence into its FLAC. Returns (split, index, num_samples)."""
    seed, split, index, text, path = task
    audio = synthesize(text, speaker_settings(seed, split, index))
    atomic_write_bytes(path, _flac_bytes(audio))
    return split, index, len(audio)


# ---------------------------------------------------------------------------
# The corpus on disk
# ---------------------------------------------------------------------------

MARKER = "corpus.json"
SPLITS = ("train", "dev")


def _fname(split: str, index: int) -> str:
    return f"audio/{split}/{split}_{index:05d}.flac"


def _read_marker(path: Path) -> Optional[dict]:
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(output_dir: Path, settings: dict) -> bool:
    """Whether the manifests list the asked-for counts and all their audio exists."""
    for split in SPLITS:
        try:
            entries = read_manifest(output_dir / f"{split}.json")
        except DataError:
            return False
        if len(entries) != settings[f"num_{split}"]:
            return False
        if not all((output_dir / e["files"][0]["fname"]).is_file() for e in entries):
            return False
    return True


def _existing_num_samples(path: Path) -> Optional[int]:
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError):
        return None
    return info.frames if info.samplerate == SAMPLE_RATE and info.frames > 0 else None


def _run_tasks(tasks: list[tuple], workers: int, progress: bool) -> Iterator[tuple[str, int, int]]:
    bar = tqdm(total=len(tasks), desc="demo corpus", unit="utt", disable=not progress or not tasks)
    with bar:
        if workers <= 1 or len(tasks) < 2:
            for result in map(_make_utterance, tasks):
                bar.update()
                yield result
            return
        # fork: workers inherit the imported modules instead of re-importing torch.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with context.Pool(workers) as pool:
            for result in pool.imap_unordered(_make_utterance, tasks, chunksize=8):
                bar.update()
                yield result


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def make_demo_corpus(
    output_dir: Optional[PathLike] = None,
    seed: int = 0,
    num_train: int = 3000,
    num_dev: int = 200,
    workers: Optional[int] = None,
    progress: bool = True,
) -> dict:
    """Make (or finish, or leave alone) the demo corpus in ``output_dir``.

    Returns the contents of ``corpus.json``: the settings plus ``complete``,
    ``train_hours`` and ``dev_hours`` (audio duration in hours).

    Raises:
        DataError: ``output_dir`` holds a corpus made with other settings, or
            eSpeak NG is unavailable.
    """
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir()
    workers = workers if workers is not None else _default_workers()
    settings = {"generator_version": GENERATOR_VERSION, "seed": seed, "num_train": num_train,
                "num_dev": num_dev, "sample_rate": SAMPLE_RATE}
    marker_path = output_dir / MARKER
    previous = _read_marker(marker_path)
    if previous is not None and {k: previous.get(k) for k in settings} != settings:
        described = ", ".join(f"{k}={previous.get(k)}" for k in settings)
        raise DataError(
            f"{output_dir} holds a demo corpus made with {described}; delete that folder "
            "or pass another --output_dir"
        )
    if previous is not None and previous.get("complete") and _is_complete(output_dir, settings):
        return previous
    atomic_write_bytes(marker_path, json.dumps({**settings, "complete": False}, indent=2).encode())
    # A killed worker leaves its half-written temporary file behind.
    for stale in output_dir.glob("audio/*/.*.tmp"):
        stale.unlink()

    sentences = dict(zip(SPLITS, make_sentences(seed, num_train, num_dev)))
    num_samples: dict[tuple[str, int], int] = {}
    tasks = []
    for split in SPLITS:
        for index, text in enumerate(sentences[split]):
            path = output_dir / _fname(split, index)
            # Without a marker from this run's settings, files on disk may be
            # someone else's: only resume over our own.
            existing = _existing_num_samples(path) if previous is not None else None
            if existing is not None:
                num_samples[split, index] = existing
            else:
                tasks.append((seed, split, index, text, path))
    for split, index, count in _run_tasks(tasks, workers, progress):
        num_samples[split, index] = count

    marker = {**settings, "complete": True}
    for split in SPLITS:
        entries = [manifest_entry(text, _fname(split, index), num_samples[split, index], SAMPLE_RATE)
                   for index, text in enumerate(sentences[split])]
        write_manifest(entries, output_dir / f"{split}.json")
        total = sum(num_samples[split, index] for index in range(len(sentences[split])))
        marker[f"{split}_hours"] = round(total / SAMPLE_RATE / 3600, 4)
    atomic_write_bytes(marker_path, (json.dumps(marker, indent=2) + "\n").encode())
    return marker


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output_dir", default=None,
        help="where to write the corpus (default: datasets/demo at the repository root)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of sentences and voices (default: 0)")
    parser.add_argument("--num_train", type=int, default=3000,
                        help="number of training utterances (default: 3000)")
    parser.add_argument("--num_dev", type=int, default=200,
                        help="number of held-out dev utterances (default: 200)")
    parser.add_argument("--workers", type=int, default=None,
                        help="synthesis processes (default: one per available CPU core)")
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_dev < 1:
        parser.error("--num_train and --num_dev must be at least 1")
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir()
    start = time.monotonic()
    marker = make_demo_corpus(output_dir, args.seed, args.num_train, args.num_dev, args.workers)
    hours = marker["train_hours"] + marker["dev_hours"]
    print(f"demo corpus: {args.num_train} train + {args.num_dev} dev utterances, "
          f"{hours:.2f} h of audio in {output_dir} ({time.monotonic() - start:.1f} s)")


if __name__ == "__main__":
    run_cli(main)
