"""Solvers that answer each task by reading the prompt, as a perfect model would."""

from __future__ import annotations

import re
from collections import Counter


def _tail_after(text: str, marker: str) -> str:
    return text[text.rfind(marker) + len(marker) :]


def solve_niah(text: str) -> str:
    question = text[text.rfind("\nWhat ") :]
    query = re.search(r"magic \w+ for (.+?) mentioned in the provided text\?", question).group(1)
    keys = re.split(r", and |, ", query)
    values = []
    for key in keys:
        values += re.findall(r"One of the special magic \w+ for " + re.escape(key) + r" is: (\S+)\.", text)
    return " ".join(values)


def solve_vt(text: str) -> str:
    task = _tail_after(text, "Memorize and track the chain(s)")
    value = re.search(r"assigned the value (\d+) in the text above", task).group(1)
    assigned = {}
    for name, source in re.findall(r"VAR (\w+) = (VAR \w+|\d+)", task):
        assigned[name] = source
    found = {name for name, source in assigned.items() if source == value}
    grew = True
    while grew:
        grew = False
        for name, source in assigned.items():
            if name not in found and source.startswith("VAR ") and source[4:] in found:
                found.add(name)
                grew = True
    return " ".join(sorted(found))


def solve_cwe(text: str) -> str:
    task = _tail_after(text, "Memorize the ones that appear most often.\n")
    listing = task[: task.find("\nQuestion:")]
    counts = Counter(re.findall(r"\d+\. (\S+)", listing))
    return " ".join(f"{i + 1}. {w}" for i, (w, _) in enumerate(counts.most_common(10)))


def solve_fwe(text: str) -> str:
    listing = _tail_after(text, "three most frequently appeared coded words. ")
    listing = listing[: listing.find("\nQuestion:")]
    counts = Counter(w for w in listing.split() if w != "...")
    return " ".join(w for w, _ in counts.most_common(3))


def solve_qa(text: str) -> str:
    question = re.search(r"Question: (.+?) Answer:$", text).group(1)
    born, towns, firms, landmarks = {}, {}, {}, {}
    for name, prof, town, year in re.findall(
        r"\n([A-Z][a-z]+ [A-Z][a-z]+) was an? (\w+) born in (\w+) in (\d+)\.", text
    ):
        born[name] = (prof, town, year)
    for town, river in re.findall(r"(\w+) is a town on the (\w+) River\.", text):
        towns.setdefault(town, {})["river"] = river
    for town, year in re.findall(r"(\w+) was founded in (\d+)\.", text):
        towns.setdefault(town, {})["year"] = year
    for firm, product in re.findall(r"([A-Z]\w+ [A-Z]\w+) makes ([^.]+)\.", text):
        firms.setdefault(firm, {})["product"] = product
    for firm, year, founder in re.findall(r"([A-Z]\w+ [A-Z]\w+) was founded in (\d+) by ([^.]+)\.", text):
        firms.setdefault(firm, {}).update(year=year, founder=founder)
    for firm, town in re.findall(r"([A-Z]\w+ [A-Z]\w+) is headquartered in (\w+)\.", text):
        firms.setdefault(firm, {})["town"] = town
    for mark, town in re.findall(r"The ([A-Z]\w+ [A-Z]\w+) is an? \w+ in (\w+)\.", text):
        landmarks.setdefault(mark, {})["town"] = town
    for mark, who, year in re.findall(
        r"The ([A-Z]\w+ [A-Z]\w+) was designed by ([^.]+?) and completed in (\d+)\.", text
    ):
        landmarks.setdefault(mark, {}).update(designer=who, year=year)
    rules = [
        (r"In which town was the designer of the (.+) born\?", lambda m: born[landmarks[m]["designer"]][1]),
        (r"In what year was the designer of the (.+) born\?", lambda m: born[landmarks[m]["designer"]][2]),
        (r"In which town was the founder of (.+) born\?", lambda m: born[firms[m]["founder"]][1]),
        (r"What was the profession of the founder of (.+)\?", lambda m: born[firms[m]["founder"]][0]),
        (
            r"Which river flows through the town where (.+) is headquartered\?",
            lambda m: towns[firms[m]["town"]]["river"] + " River",
        ),
        (
            r"In what year was the town where the (.+) stands founded\?",
            lambda m: towns[landmarks[m]["town"]]["year"],
        ),
        (r"In which town was (.+) born\?", lambda m: born[m][1]),
        (r"In what year was (.+) born\?", lambda m: born[m][2]),
        (r"What was the profession of (.+)\?", lambda m: born[m][0]),
        (r"Which river flows through (.+)\?", lambda m: towns[m]["river"] + " River"),
        (r"Who founded (.+)\?", lambda m: firms[m]["founder"]),
        (r"In which town is (\w+ \w+) headquartered\?", lambda m: firms[m]["town"]),
        (r"What does (.+) make\?", lambda m: firms[m]["product"]),
        (r"Who designed the (.+)\?", lambda m: landmarks[m]["designer"]),
        (r"In what year was the (.+) completed\?", lambda m: landmarks[m]["year"]),
        (r"In which town is the (.+)\?", lambda m: landmarks[m]["town"]),
        (r"In what year was (.+) founded\?", lambda m: (firms.get(m) or towns[m])["year"]),
    ]
    for pattern, answer in rules:
        match = re.fullmatch(pattern, question)
        if match:
            return answer(match.group(1))
    raise AssertionError(f"oracle cannot parse question {question!r}")


def solve_ruler(task: str, text: str) -> str:
    if task.startswith("niah"):
        return solve_niah(text)
    return {"vt": solve_vt, "cwe": solve_cwe, "fwe": solve_fwe, "qa_1": solve_qa, "qa_2": solve_qa}[task](
        text
    )


def solve_mrcr(text: str) -> str:
    final = re.search(r"User: Prepend (\w+) to the (\d+)\w\w \(1 indexed\) (.+?)\. Do not include", text)
    hash_prefix, nth, request = final.group(1), int(final.group(2)), final.group(3)
    turns = re.findall(r"User: (.+?)\n\nAssistant: (.*?)(?=\n\nUser: |\Z)", text, flags=re.S)
    responses = [resp for user, resp in turns if user == f"Write a {request}."]
    return hash_prefix + responses[nth - 1]
