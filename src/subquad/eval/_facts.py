"""Procedurally generated fact documents for the offline RULER QA tasks.

RULER's qa_1 / qa_2 draw documents and questions from SQuAD and HotpotQA, which cannot be downloaded
here. This builds a small fictional world per sample (people, towns, firms, landmarks with made-up,
unique names) and writes short encyclopedia-style documents about it. qa_1 asks about a fact stated
in one document (SQuAD-like); qa_2 asks a two-hop question whose answer needs two documents, the
bridge entity named only in the first (HotpotQA-like). Distractor documents come in the same linked
pairs, so partial chains about other entities surround the gold ones. Every fact is stated in a fixed
sentence form and filler sentences carry no facts, so each question has exactly one answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ._core import pseudo_word

_FIRST_NAMES = (
    "Ada Alma Anton Aria Bruno Clara Dmitri Edith Elena Emil Ezra Farah Felix Greta Hana Hugo Ines Ivo "
    "Jonas Kaia Karl Lena Leon Lidia Luca Maren Mateo Mila Nadia Nils Noor Olga Oskar Pavel Petra Rosa "
    "Ruth Sami Selma Silas Sofia Tamar Teo Uma Vera Viktor Wanda Yara Yusuf Zora"
).split()
_TOWN_SUFFIXES = "ford haven bury stead wick mouth field holm dale port by ton moor wold".split()
_INDUSTRIES = {
    "Ironworks": "cast-iron stoves",
    "Textiles": "woollen blankets",
    "Instruments": "brass barometers",
    "Glassworks": "pressed-glass lamps",
    "Printing": "railway timetables",
    "Optics": "ship telescopes",
    "Mills": "stone-ground flour",
    "Ceramics": "glazed roof tiles",
    "Engines": "small steam engines",
    "Cordage": "hemp ropes",
    "Clockworks": "tower clocks",
    "Tanning": "saddle leather",
}
_LANDMARK_KINDS = (
    "Bridge Tower Library Observatory Lighthouse Theatre Museum Aqueduct Viaduct Chapel Granary Bathhouse"
).split()
_DESIGNERS = ("architect", "engineer")
_PROFESSIONS = (
    "painter botanist cartographer composer chemist printer surveyor clockmaker glassblower merchant "
    "astronomer sculptor"
).split()

_PERSON_FILLERS = (
    "{s} kept detailed notebooks throughout a long career.",
    "Colleagues described {s} as patient, exacting and generous with apprentices.",
    "Much of the early work of {s} was lost in a fire.",
    "Letters written by {s} are held in several regional archives.",
    "{s} travelled widely but always returned home for the winter.",
    "A short biography of {s} was written by a former student.",
    "{s} rarely spoke about private matters in public.",
)
_TOWN_FILLERS = (
    "The old market square is still used on Saturdays.",
    "The town is known for its stone walls and narrow lanes.",
    "Several mills once stood along the water.",
    "A small museum near the station describes local trades.",
    "The surrounding hills are used for grazing sheep.",
    "Its annual autumn fair draws visitors from nearby villages.",
)
_COMPANY_FILLERS = (
    "The firm began in a single rented workshop.",
    "Its products were sold across the region and abroad.",
    "The company is still owned by descendants of its first employees.",
    "A small museum at the works displays early catalogues.",
    "Its workshops were rebuilt after a flood damaged the ground floor.",
)
_LANDMARK_FILLERS = (
    "Visitors often remark on the quality of the stonework.",
    "It was restored after a storm damaged the roof.",
    "It appears on many old postcards of the town.",
    "Guided tours are offered during the summer months.",
    "Local children are taught its history at school.",
)


@dataclass
class Person:
    name: str
    profession: str
    town: str
    year: int


@dataclass
class Town:
    name: str
    river: str
    year: int


@dataclass
class Company:
    name: str
    product: str
    year: int
    founder: str
    town: str


@dataclass
class Landmark:
    name: str  # without the article, e.g. "Varnok Bridge"
    kind: str
    town: str
    designer: str
    year: int


class FactWorld:
    """A fictional world with unique names, grown on demand, and documents about it."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()
        self.people: dict[str, Person] = {}
        self.towns: dict[str, Town] = {}

    def _unique(self, make) -> str:
        while True:
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name

    def _proper(self, syllables: int) -> str:
        return pseudo_word(self.rng, syllables).capitalize()

    def town(self, fresh: bool = False) -> Town:
        if not fresh and self.towns and self.rng.random() < 0.3:
            return self.towns[self.rng.choice(sorted(self.towns))]
        name = self._unique(lambda: self._proper(1) + self.rng.choice(_TOWN_SUFFIXES))
        river = self._unique(lambda: self._proper(2))
        town = Town(name, river, self.rng.randint(900, 1800))
        self.towns[name] = town
        return town

    def person(self, professions=_PROFESSIONS) -> Person:
        name = self._unique(
            lambda: f"{self.rng.choice(_FIRST_NAMES)} {self._proper(self.rng.choice((2, 3)))}"
        )
        person = Person(name, self.rng.choice(professions), self.town().name, self.rng.randint(1650, 1960))
        self.people[name] = person
        return person

    def company(self) -> Company:
        industry = self.rng.choice(sorted(_INDUSTRIES))
        name = self._unique(lambda: f"{self._proper(2)} {industry}")
        founder = self.person()
        return Company(
            name, _INDUSTRIES[industry], self.rng.randint(1750, 1990), founder.name, self.town().name
        )

    def landmark(self) -> Landmark:
        kind = self.rng.choice(_LANDMARK_KINDS)
        name = self._unique(lambda: f"{self._proper(2)} {kind}")
        designer = self.person(_DESIGNERS)
        return Landmark(name, kind.lower(), self.town().name, designer.name, self.rng.randint(1700, 1990))

    # -- documents ---------------------------------------------------------------------------------

    def _document(self, title: str, facts: list[str], fillers: tuple[str, ...], **fmt: str) -> str:
        extra = [f.format(**fmt) for f in self.rng.sample(fillers, self.rng.randint(1, 3))]
        body = facts[:1] + self.rng.sample(facts[1:] + extra, len(facts) - 1 + len(extra))
        return f"{title}\n{' '.join(body)}"

    def person_doc(self, p: Person) -> str:
        surname = p.name.split(" ", 1)[1]
        article = "an" if p.profession[0] in "aeiou" else "a"
        facts = [f"{p.name} was {article} {p.profession} born in {p.town} in {p.year}."]
        return self._document(p.name, facts, _PERSON_FILLERS, s=surname)

    def town_doc(self, t: Town) -> str:
        facts = [f"{t.name} is a town on the {t.river} River.", f"{t.name} was founded in {t.year}."]
        return self._document(t.name, facts, _TOWN_FILLERS)

    def company_doc(self, c: Company) -> str:
        facts = [
            f"{c.name} makes {c.product}.",
            f"{c.name} was founded in {c.year} by {c.founder}.",
            f"{c.name} is headquartered in {c.town}.",
        ]
        return self._document(c.name, facts, _COMPANY_FILLERS)

    def landmark_doc(self, m: Landmark) -> str:
        facts = [
            f"The {m.name} is {'an' if m.kind[0] in 'aeiou' else 'a'} {m.kind} in {m.town}.",
            f"The {m.name} was designed by {m.designer} and completed in {m.year}.",
        ]
        return self._document(f"The {m.name}", facts, _LANDMARK_FILLERS)

    def distractor_group(self) -> list[str]:
        """One or two linked documents about fresh entities (a partial chain like the gold ones)."""
        roll = self.rng.random()
        if roll < 0.3:
            m = self.landmark()
            second = self.person_doc(self.people[m.designer]) if self.rng.random() < 0.7 else None
            if second is None:
                second = self.town_doc(self.towns[m.town])
            return [self.landmark_doc(m), second]
        if roll < 0.6:
            c = self.company()
            if self.rng.random() < 0.6:
                return [self.company_doc(c), self.person_doc(self.people[c.founder])]
            return [self.company_doc(c), self.town_doc(self.towns[c.town])]
        if roll < 0.8:
            return [self.person_doc(self.person())]
        return [self.town_doc(self.town(fresh=True))]

    # -- questions ---------------------------------------------------------------------------------

    def single_hop(self) -> tuple[str, list[str], list[str]]:
        """(question, answers, gold documents) answerable from one document."""
        kind = self.rng.choice(("person", "town", "company", "landmark"))
        if kind == "person":
            p = self.person()
            question, answers = self.rng.choice(
                (
                    (f"In which town was {p.name} born?", [p.town]),
                    (f"In what year was {p.name} born?", [str(p.year)]),
                    (f"What was the profession of {p.name}?", [p.profession]),
                )
            )
            return question, answers, [self.person_doc(p)]
        if kind == "town":
            t = self.town(fresh=True)
            question, answers = self.rng.choice(
                (
                    (f"Which river flows through {t.name}?", [f"{t.river} River", t.river]),
                    (f"In what year was {t.name} founded?", [str(t.year)]),
                )
            )
            return question, answers, [self.town_doc(t)]
        if kind == "company":
            c = self.company()
            question, answers = self.rng.choice(
                (
                    (f"Who founded {c.name}?", [c.founder]),
                    (f"In which town is {c.name} headquartered?", [c.town]),
                    (f"What does {c.name} make?", [c.product]),
                    (f"In what year was {c.name} founded?", [str(c.year)]),
                )
            )
            return question, answers, [self.company_doc(c)]
        m = self.landmark()
        question, answers = self.rng.choice(
            (
                (f"Who designed the {m.name}?", [m.designer]),
                (f"In what year was the {m.name} completed?", [str(m.year)]),
                (f"In which town is the {m.name}?", [m.town]),
            )
        )
        return question, answers, [self.landmark_doc(m)]

    def two_hop(self) -> tuple[str, list[str], list[str]]:
        """(question, answers, gold documents): the answer needs the bridge entity's own document."""
        kind = self.rng.randrange(6)
        if kind < 2:
            m = self.landmark()
            d = self.people[m.designer]
            question, answers = (
                (f"In which town was the designer of the {m.name} born?", [d.town])
                if kind == 0
                else (f"In what year was the designer of the {m.name} born?", [str(d.year)])
            )
            return question, answers, [self.landmark_doc(m), self.person_doc(d)]
        if kind < 4:
            c = self.company()
            f = self.people[c.founder]
            question, answers = (
                (f"In which town was the founder of {c.name} born?", [f.town])
                if kind == 2
                else (f"What was the profession of the founder of {c.name}?", [f.profession])
            )
            return question, answers, [self.company_doc(c), self.person_doc(f)]
        if kind == 4:
            c = self.company()
            t = self.towns[c.town]
            question = f"Which river flows through the town where {c.name} is headquartered?"
            return question, [f"{t.river} River", t.river], [self.company_doc(c), self.town_doc(t)]
        m = self.landmark()
        t = self.towns[m.town]
        question = f"In what year was the town where the {m.name} stands founded?"
        return question, [str(t.year)], [self.landmark_doc(m), self.town_doc(t)]
