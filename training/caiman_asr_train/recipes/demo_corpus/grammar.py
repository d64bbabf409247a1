"""The demo corpus's sentence grammar: distinct English sentences fixed by a seed.

Words come from ``lexicon.json`` and the weighted sentence patterns from
``patterns.json``, both package data beside this module; list order matters,
since the same seed gives the same sentences only with the same lists.
Nouns and adjectives carry semantic classes so that the grammar pairs words
sensibly ("eat the warm bread", not "eat the bus"): T portable thing,
C clothing, O can be opened, X text or picture, G game or instrument, F food,
D drink, A animal, P person, V vehicle. A verb's ``objects`` are the classes
it takes ("L" for places, "" when intransitive), its ``subjects`` the classes
of who or what can do it.
"""

import hashlib
import json
import random
from importlib import resources
from typing import Callable, NamedTuple, Optional

from caiman_asr_train.core.errors import DataError

MIN_WORDS, MAX_WORDS = 3, 10
DATA_FILES = ("lexicon.json", "patterns.json")


def _data_bytes(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


def data_files_sha256() -> str:
    """SHA-256 over the grammar's data files, part of the corpus fingerprint."""
    digest = hashlib.sha256()
    for name in DATA_FILES:
        digest.update(hashlib.sha256(_data_bytes(name)).digest())
    return digest.hexdigest()


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


_LEXICON = json.loads(_data_bytes("lexicon.json"))
_NOUNS = [_Noun(*entry) for entry in _LEXICON["nouns"]]
_NAMES = _LEXICON["names"]
# Adjectives: (word, classes of nouns it can describe).
_ADJECTIVES = _LEXICON["adjectives"]
# Places: (noun, prepositions for "where").
_PLACES = _LEXICON["places"]
# Where small things lie: (noun, prepositions).
_SPOTS = _LEXICON["spots"]
_VERBS = [_Verb(*entry) for entry in _LEXICON["verbs"]]
_MOTION_VERBS = [_Verb(*entry) for entry in _LEXICON["motion_verbs"]]
# Verbs of motion take a destination ("to the park", "home") instead of a location.
_MOTION = set(_LEXICON["motion"])
# Verbs of state sound wrong in the progressive ("he is liking").
_STATIVE = set(_LEXICON["stative"])
_MANNER = _LEXICON["manner"]
_FREQUENCY = _LEXICON["frequency"]
_DEGREE = _LEXICON["degree"]
_DAYS = _LEXICON["days"]
_MONTHS = _LEXICON["months"]
_ONES = _LEXICON["ones"]
_TENS = _LEXICON["tens"]
_UNITS = _LEXICON["units"]
# What runs to a timetable: (noun, verbs for "what time does the NOUN VERB").
_SCHEDULES = _LEXICON["schedules"]
_POSSESSIVES = _LEXICON["possessives"]
# Subjects: (words, person) with person "1" (i), "3" (third singular) or "p" (other).
_PRONOUNS = _LEXICON["pronouns"]
_BE = _LEXICON["be"]
_CONTRACTED_BE = _LEXICON["contracted_be"]
# Sentence patterns: (weight, name of the _Grammar method that makes one).
_PATTERNS = [(entry["weight"], entry["pattern"]) for entry in json.loads(_data_bytes("patterns.json"))]


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
        self.patterns: list[tuple[float, Callable[[], list[str]]]] = []
        for weight, name in _PATTERNS:
            method = getattr(self, name, None) if not name.startswith("_") else None
            if method is None:
                raise DataError(f"patterns.json names {name!r}, which the demo grammar has no method for")
            self.patterns.append((weight, method))

    # -- small pieces -------------------------------------------------------

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def choice(self, seq):
        return self.rng.choice(seq)

    def noun(self, classes: str) -> _Noun:
        return self.choice([n for n in _NOUNS if set(n.classes) & set(classes)])

    def adjective(self, noun_classes: str) -> str:
        return self.choice([a for a, cls in _ADJECTIVES if set(cls) & set(noun_classes)])

    def noun_phrase(
        self, classes: str, plural: Optional[bool] = None, adjective_p: float = 0.4
    ) -> tuple[list[str], bool]:
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
            return self.choice(
                [
                    ["yesterday"],
                    ["last", self.choice(["night", "week", "month", "year", "summer"])],
                    ["this", self.choice(["morning", "afternoon"])],
                    ["on", self.choice(_DAYS)],
                    ["in", self.choice(_MONTHS)],
                    number_words(rng.randint(2, 12))
                    + [self.choice(["days", "weeks", "years", "minutes", "hours"]), "ago"],
                    ["at", *number_words(rng.randint(1, 12)), "o'clock"],
                    ["after", "lunch"],
                    ["before", "dinner"],
                    ["earlier"],
                ]
            )
        if tense == "future":
            return self.choice(
                [
                    ["tomorrow"],
                    ["tonight"],
                    ["soon"],
                    ["later"],
                    ["next", self.choice(["week", "month", "year", "summer", "time"])],
                    ["on", self.choice(_DAYS)],
                    ["this", self.choice(["evening", "weekend", "afternoon"])],
                    ["at", *number_words(rng.randint(1, 12)), "o'clock"],
                    ["after", "school"],
                    ["in", *number_words(rng.randint(2, 30)), self.choice(["minutes", "days"])],
                ]
            )
        if tense == "progressive":
            return self.choice(
                [
                    ["now"],
                    ["right", "now"],
                    ["today"],
                    ["at", "the", "moment"],
                    ["this", "morning"],
                    ["again"],
                ]
            )
        return self.choice(
            [
                ["every", self.choice(["day", "morning", "evening", "week", "night", "summer"])],
                ["in", "the", self.choice(["morning", "afternoon", "evening"])],
                ["at", "night"],
                ["on", self.choice(_DAYS) + "s"],
                ["after", self.choice(["breakfast", "lunch", "work"])],
                ["before", self.choice(["breakfast", "dinner", "bed"])],
                ["on", "weekends"],
                ["at", "noon"],
                ["in", self.choice(["winter", "summer", "spring"])],
            ]
        )

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
        modal = self.choice(
            ["can", "can't", "could", "should", "must", "might", "may", "would", "shouldn't", "couldn't"]
        )
        return subject + [modal] + self.verb_phrase(verb, "base") + self.extras("future", not verb.objects)

    def perfect(self) -> list[str]:
        verb = self.choice(self.transitive)
        subject, person = self.subject(verb.subjects)
        if self.chance(0.35):
            return (
                ["have", "you"]
                + self.choice([[], ["ever"], ["already"]])
                + self.verb_phrase(verb, "participle")
            )
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
            who = self.choice([[self.choice(_NAMES)], self.definite("PA", plural=False)[0], ["he"], ["she"]])
            return ["what", "is"] + who + ["doing"] + self.extras("progressive", True)
        if kind == 5:
            verb = self.choice(self.verbs)
            subject, person = self.subject(verb.subjects)
            wh = self.choice(["why", "when", "where", "how", "how", "how", "why"])
            aux = self.choice(["did", "does" if person == "3" else "do", "can", "should", "will"])
            return [wh, aux] + subject + self.verb_phrase(verb, "base")
        if kind == 6:
            words, plural = self.definite("TCXGFDAVP")
            return (
                ["why", "are" if plural else "is"]
                + words
                + [self.choice(_DEGREE[:4]), self.adjective(_noun_classes(words[-1]))]
            )
        thing, verbs = self.choice(_SCHEDULES)
        return ["what", "time", "does", "the", thing, self.choice(verbs)]

    def command(self) -> list[str]:
        verb = self.choice(self.verbs)
        head = self.choice(
            [[], [], ["please"], ["don't"], ["let's"], ["please", "don't"], ["never"], ["always"]]
        )
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
            weather = self.choice(
                [
                    "cold",
                    "hot",
                    "warm",
                    "sunny",
                    "windy",
                    "cloudy",
                    "dark",
                    "quiet",
                    "late",
                    "early",
                    "nice",
                    "wet",
                    "dry",
                ]
            )
            head = self.choice([["it's"], ["it", "is"], ["it", "was"], ["it", "will", "be"]])
            tail = self.choice(
                [[], ["outside"], ["today"], ["tonight"], ["again"], ["in", "the", "morning"], ["here"]]
            )
            return head + ([self.choice(_DEGREE)] if self.chance(0.5) else []) + [weather] + tail
        if kind == 2:
            name = self.choice(_NAMES)
            singular, _, classes = self.noun("P")
            adjective = self.adjective(classes)
            return [name, "is", _article(adjective), adjective, singular] + (
                self.place() if self.chance(0.3) else []
            )
        if kind == 3:
            words, _ = self.definite("TCXGFDAV", plural=False)
            verb = self.choice(["looks", "sounds", "smells", "feels", "seems"])
            return words + [verb, self.adjective(_noun_classes(words[-1]))]
        singular, _, classes = self.choice(self.countable)
        adjective = self.adjective(classes)
        return self.choice([["that's"], ["this", "is"], ["what"], ["it", "was"]]) + [
            _article(adjective),
            adjective,
            singular,
        ]

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
        return (
            self.choice(
                [
                    ["we", "waited", "for"],
                    ["it", "takes"],
                    ["it", "took"],
                    ["i", "walked"],
                    ["they", "drove"],
                    ["she", "stayed", "for"],
                ]
            )
            + number_words(n)
            + [unit]
        )

    def wants_to(self) -> list[str]:
        verb = self.choice(self.verbs)
        subject, person = self.subject("P")
        want = self.choice(["want", "need", "like", "love", "hope", "try", "forget", "plan"])
        if person == "3":
            want = {"try": "tries"}.get(want, want + "s")
        elif self.chance(0.4):
            want = {"try": "tried", "forget": "forgot", "plan": "planned"}.get(
                want, want + "d" if want.endswith("e") else want + "ed"
            )
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
        head = self.choice(
            [
                ["i", "think"],
                ["i", "know"],
                ["we", "hope"],
                ["she", "said"],
                ["i", "don't", "think"],
                ["they", "know"],
                ["he", "thinks"],
            ]
        )
        tail = self.clause(self.choice(["present", "past"]))
        return head + (["that"] if self.chance(0.3) else []) + tail

    def put_give(self) -> list[str]:
        thing, _ = self.noun_phrase("TCXF", adjective_p=0.3)
        kind = self.rng.randrange(3)
        if kind == 0:
            noun, preps = self.choice(_SPOTS)
            return (
                self.choice([["put"], ["please", "put"], ["i", "put"], ["she", "left"]])
                + thing
                + [self.choice(preps), "the", noun]
            )
        if kind == 1:
            verb = self.choice(["give", "gave", "show", "showed", "bring", "brought", "send", "sent"])
            if self.chance(0.5):
                return [verb, self.choice(["me", "him", "her", "us", "them"])] + thing
            return [verb] + thing + ["to", self.choice(_NAMES)]
        return (
            self.choice(
                [
                    ["can", "you", "pass"],
                    ["please", "pass"],
                    ["could", "you", "hand"],
                    ["will", "you", "bring"],
                ]
            )
            + ["me"]
            + thing
        )

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


def make_sentences(seed: int = 0, num_train: int = 3000, num_dev: int = 200) -> tuple[list[str], list[str]]:
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
