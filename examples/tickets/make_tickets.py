"""Write the example support tickets (train.csv, eval.csv, new.csv) that README's "On your own
data" trains on: short customer messages, a string label (the team that should answer), and the
site each ticket came from (for `federation.partition: by_column`).

    python examples/tickets/make_tickets.py      # rewrites the three files; the same bytes every time

The words that decide the team are mixed with words every team sees, so a model must read them;
the eval tickets are new combinations of the same vocabulary.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

HERE = Path(__file__).parent
SITES = ["berlin", "lisbon", "madrid", "oslo"]
TOPICS = {
    "billing": ["invoice", "refund", "charged twice", "payment", "receipt", "subscription fee", "credit card",
                "overcharged", "billing address", "discount code"],
    "shipping": ["parcel", "delivery", "courier", "tracking number", "package", "shipment", "arrived late",
                 "wrong address", "lost in transit", "delivery date"],
    "technical": ["app crashes", "login fails", "error message", "password reset", "the website is down",
                  "update broke", "cannot sync", "bluetooth", "screen freezes", "firmware"],
}
OPENERS = ["hello,", "hi team,", "good morning,", "dear support,", "hey,", ""]
FILLERS = ["my order from last week", "my account", "the thing I bought", "this", "my last order",
           "the item", "everything", "my request"]
ASKS = ["can you help?", "please check.", "what should I do?", "this is urgent.", "thanks.",
        "I have waited two days.", "please fix it.", ""]
TEMPLATES = ["{o} {t} for {f}. {a}", "{o} problem with {t} on {f}, {a}", "{o} {f}: {t} again. {a}",
             "{o} I need help with {t}. {a}", "{o} about {f} - {t}. {a}"]


def ticket(rng: random.Random, topic: str) -> str:
    text = rng.choice(TEMPLATES).format(o=rng.choice(OPENERS), t=rng.choice(TOPICS[topic]),
                                        f=rng.choice(FILLERS), a=rng.choice(ASKS))
    return " ".join(text.split())


def write(name: str, rows: list[list[str]], header: list[str]) -> None:
    with open(HERE / name, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def main() -> None:
    rng = random.Random(7)
    for name, n in (("train.csv", 360), ("eval.csv", 90)):
        rows = []
        for _ in range(n):
            topic = rng.choice(list(TOPICS))
            rows.append([ticket(rng, topic), topic, rng.choice(SITES)])
        write(name, rows, ["message", "team", "site"])
    write("new.csv", [[ticket(rng, t)] for t in ("billing", "shipping", "technical", "shipping")], ["message"])


if __name__ == "__main__":
    main()
