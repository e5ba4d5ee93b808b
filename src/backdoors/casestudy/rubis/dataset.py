"""The RUBiS data set, generated deterministically: the same `Scale` and seed give the same
rows, byte for byte, so runs compare and a test can predict what it loads.

    load(conn, Scale(users=10_000, items=20_000, bids=100_000))   # psycopg 3 connection

Shapes follow RUBiS's generator: 62 regions and 20 categories, each user in a region,
items sold by users in categories, auctions of 7 days around a fixed epoch, bids at
increasing prices on their item (so `items.max_bid` and `nb_of_bids` agree with `bids`),
comments between users about items. Rows are loaded with COPY, indexes built after.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from ...errors import ConfigError
from .schema import DDL, INDEXES, SEQUENCES, TABLES

EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)
REGIONS = 62
CATEGORIES = 20
WORDS = ("antique", "blue", "camera", "desk", "engine", "fine", "guitar", "hand-made", "iron",
         "jade", "kettle", "lamp", "mint", "new", "old", "piano", "quartz", "rare", "silver",
         "table", "used", "vinyl", "watch", "yellow", "zinc")
#: a user's password is derived from the id, so load generators can log in as anyone
PASSWORD = "password{}"


@dataclass(frozen=True)
class Scale:
    users: int = 10_000
    items: int = 20_000
    bids: int = 100_000
    comments: int = 10_000
    seed: int = 1

    def __post_init__(self):
        for name in ("users", "items", "bids", "comments"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"data set scale: {name} must be a whole number >= 0, got {value!r}")
        if self.users < 2 or self.items < 1:
            raise ConfigError(f"data set scale: needs at least 2 users and 1 item, got "
                              f"{self.users} users and {self.items} items")

    def scaled(self, factor: float) -> Scale:
        """Every count times `factor` (at least the minimum)."""
        return Scale(max(2, round(self.users * factor)), max(1, round(self.items * factor)),
                     round(self.bids * factor), round(self.comments * factor), self.seed)


def region_name(i: int) -> str:
    return f"region-{i:02d}"


def category_name(i: int) -> str:
    return f"category-{i:02d}"


def nickname(user: int) -> str:
    return f"user{user}"


def _money(cents: int) -> Decimal:
    return Decimal(cents).scaleb(-2)


def regions() -> Iterator[tuple]:
    for i in range(1, REGIONS + 1):
        yield i, region_name(i)


def categories() -> Iterator[tuple]:
    for i in range(1, CATEGORIES + 1):
        yield i, category_name(i)


def users(scale: Scale) -> Iterator[tuple]:
    rng = random.Random(f"users-{scale.seed}")
    for u in range(1, scale.users + 1):
        yield (u, f"First{u}", f"Last{u}", nickname(u), PASSWORD.format(u), f"user{u}@rubis.lab",
               rng.randint(-5, 50), _money(rng.randint(0, 1_000_000)),
               EPOCH - timedelta(days=rng.randint(1, 1000)), rng.randint(1, REGIONS))


@dataclass
class _Item:
    initial: int  # cents
    max_bid: int = 0
    bids: int = 0


def items_and_bids(scale: Scale) -> tuple[list[tuple], list[tuple]]:
    """(items rows, bids rows): bids rise on their item, and each item's max_bid and
    nb_of_bids are those of its bids."""
    rng = random.Random(f"items-{scale.seed}")
    state = [_Item(rng.randint(100, 100_000)) for _ in range(scale.items)]
    bids = []
    for b in range(1, scale.bids + 1):
        i = rng.randrange(scale.items)
        it = state[i]
        price = max(it.initial, it.max_bid) + rng.randint(1, 500)
        it.max_bid, it.bids = price, it.bids + 1
        bids.append((b, rng.randint(1, scale.users), i + 1, 1, _money(price),
                     _money(price + rng.randint(0, 1000)), EPOCH + timedelta(seconds=b)))
    items = []
    for i, it in enumerate(state):
        words = rng.sample(WORDS, 3)
        start = EPOCH - timedelta(days=rng.randint(0, 6))
        items.append((i + 1, " ".join(words), f"A {' '.join(words)}, item {i + 1}.",
                      _money(it.initial), rng.randint(1, 10), _money(it.initial * 2),
                      _money(it.initial * 3), it.bids, _money(it.max_bid), start,
                      start + timedelta(days=7), rng.randint(1, scale.users),
                      rng.randint(1, CATEGORIES)))
    return items, bids


def comments(scale: Scale) -> Iterator[tuple]:
    rng = random.Random(f"comments-{scale.seed}")
    for c in range(1, scale.comments + 1):
        yield (c, rng.randint(1, scale.users), rng.randint(1, scale.users),
               rng.randint(1, scale.items), rng.randint(-5, 5), EPOCH + timedelta(seconds=c),
               f"comment {c}")


COLUMNS = {
    "regions": "id, name",
    "categories": "id, name",
    "users": "id, firstname, lastname, nickname, password, email, rating, balance, "
             "creation_date, region",
    "items": "id, name, description, initial_price, quantity, reserve_price, buy_now, "
             "nb_of_bids, max_bid, start_date, end_date, seller, category",
    "bids": "id, user_id, item_id, qty, bid, max_bid, date",
    "comments": "id, from_user_id, to_user_id, item_id, rating, date, comment",
}


def load(conn, scale: Scale = Scale()) -> dict[str, int]:
    """Create the schema in an empty database and load the data set (one transaction);
    returns the rows per table. `conn`: a psycopg 3 connection (not autocommit)."""
    existing = conn.execute("SELECT count(*) FROM information_schema.tables WHERE "
                            "table_schema = 'public' AND table_name = ANY(%s)",
                            (list(TABLES),)).fetchone()[0]
    if existing:
        raise ConfigError(f"the database already holds {existing} of the RUBiS tables: load "
                          "into an empty database (drop it first)")
    items, bids = items_and_bids(scale)
    rows = {"regions": regions(), "categories": categories(), "users": users(scale),
            "items": items, "bids": bids, "comments": comments(scale)}
    counts = {}
    with conn.transaction():
        conn.execute(DDL)
        for table, source in rows.items():
            n = 0
            with conn.cursor().copy(f"COPY {table} ({COLUMNS[table]}) FROM STDIN") as copy:
                for row in source:
                    copy.write_row(row)
                    n += 1
            counts[table] = n
        conn.execute(INDEXES)
        conn.execute(SEQUENCES)
    conn.execute("ANALYZE")
    conn.commit()
    return counts
