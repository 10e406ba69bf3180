"""The tenant's account database: generated companies, and matching rows to them.

Generation
    Account ``i`` (0-based) has the external id ``ACC-{i+1:07d}``, Demandbase's own
    numeric ``Account ID`` ``i + 1``, a name built from three word lists (a stem such
    as "Société" or "Northwind", a trade such as "Générale" or "Robotics", a legal form
    such as ", S.A." or "GmbH") and a domain built from the same words. The lists hold
    non-ASCII letters, commas and double quotes on purpose, so that every file that
    crosses the emulator exercises CSV quoting and UTF-8.

    The word combinations are walked with an affine bijection ``j = (offset + i *
    stride) mod M`` over the ``M`` combinations, its ``offset`` and ``stride`` (coprime
    to ``M``) drawn from the seed: the same seed gives the same database, neighbouring
    accounts do not look alike, and 100,000 accounts cost one pass of string formatting
    (well under a second). Past ``M`` accounts the walk starts again with a number in
    the domain, so domains stay unique for any size.

Matching [DOC]
    Demandbase matches an import row by External Account ID first, then by domain and
    name; a row that matches neither is ignored. :meth:`AccountDatabase.match` does
    that, comparing domain and name after :func:`match_key` (trimmed, case-folded).
"""

from __future__ import annotations

import math
import random
import unicodedata
from collections.abc import Iterator
from typing import Final

from dbsync.model import Account

__all__ = ["AccountDatabase", "match_key"]

_STEMS: Final = (
    "Acme", "Northwind", "Contoso", "Fabrikam", "Globex", "Initech", "Umbrella", "Vandelay",
    "Tyrell", "Cyberdyne", "Soylent", "Hooli", "Massive", "Stark", "Wayne", "Gringott",
    "Oscorp", "Aperture", "Black Mesa", "Blue Harbor", "Red Rock", "Silver Lake", "Iron Gate",
    "Granite", "Summit", "Pinnacle", "Evergreen", "Redwood", "Cedar", "Maple", "Harbor",
    "Beacon", "Lighthouse", "Meridian", "Zenith", "Vertex", "Quantum", "Nimbus", "Polaris",
    "Orion", "Atlas", "Titan", "Apex", "Crescent", "Sterling", "Keystone", "Falcon", "Osprey",
    "Société", "Zürich", "Ålesund", "Kraków", "São Paulo", "Düsseldorf", "Malmö", "Málaga",
    "Øresund", "Île-de-France", "Łódź", "Čapek", "Nordström", "Müller", "Gödel", "Niño",
)  # fmt: skip
_TRADES: Final = (
    "Robotics", "Analytics", "Logistics", "Foods", "Capital", "Labs", "Systems", "Energy",
    "Pharma", "Textiles", "Holdings", "Media", "Mining", "Airlines", "Bank", "Insurance",
    "Networks", "Software", "Biotech", "Motors", "Shipping", "Chemicals", "Foundry",
    "Semiconductors", "Hospitality", "Consulting", "Retail", "Aerospace", "Agritech",
    "Payments", "Security", "Health", "Telecom", "Optics", "Materials", "Instruments",
    "Générale", "Industrie", "Précision", "Maschinenbau", "Lebensmittel", "Bürotechnik",
    '"Blue Sky" Ventures', '"Nova" Partners', "Data & Co", "Brothers' Trading",
)  # fmt: skip
# (legal form, end of the domain); each form ends its domains differently, so that no
# two accounts share a domain. Forms with a leading comma follow the name directly.
_FORMS: Final = (
    (" Inc.", ".com"), (", Inc.", "-inc.com"), (" LLC", ".us"), (" Corp.", "corp.com"),
    (" GmbH", ".de"), (" AG", ".ch"), (", S.A.", ".fr"), (" S.p.A.", ".it"), (" Ltd", ".co.uk"),
    (" plc", "-group.co.uk"), (" B.V.", ".nl"), (" K.K.", ".co.jp"), (" SAS", "-sas.fr"),
    (" Oy", ".fi"), (" AB", ".se"), ("", ".io"),
)  # fmt: skip


def match_key(domain: str, name: str) -> tuple[str, str]:
    """How Demandbase compares a row's domain and name with an account's: case-insensitively."""
    return domain.strip().casefold(), name.strip().casefold()


def _slug(word: str) -> str:
    """``word`` in lower-case ASCII letters and digits: "Société" -> "societe"."""
    ascii_text = unicodedata.normalize("NFKD", word).encode("ascii", "ignore").decode()
    return "".join(c for c in ascii_text.lower() if c.isalnum())


class AccountDatabase:
    """``count`` generated companies, deterministic for a ``seed``, with match indexes."""

    def __init__(self, count: int, seed: int) -> None:
        rng = random.Random(f"{seed}:accounts")
        stems, trades, forms = list(_STEMS), list(_TRADES), list(_FORMS)
        for words in (stems, trades, forms):
            rng.shuffle(words)
        combinations = len(stems) * len(trades) * len(forms)
        offset = rng.randrange(combinations)
        stride = rng.randrange(1, combinations)
        while math.gcd(stride, combinations) != 1:
            stride += 1
        stem_slugs = [_slug(s) for s in stems]
        trade_slugs = [_slug(t) for t in trades]

        external_ids: list[str] = []
        names: list[str] = []
        domains: list[str] = []
        for i in range(count):
            round_, _ = divmod(i, combinations)
            j = (offset + i * stride) % combinations
            j, s = divmod(j, len(stems))
            f, t = divmod(j, len(trades))
            form, ending = forms[f]
            external_ids.append(f"ACC-{i + 1:07d}")
            names.append(f"{stems[s]} {trades[t]}{form}")
            suffix = str(round_ + 1) if round_ else ""
            domains.append(f"{stem_slugs[s]}{trade_slugs[t]}{suffix}{ending}")
        self._external_ids = external_ids
        self._names = names
        self._domains = domains
        self._by_external_id = {e: i for i, e in enumerate(external_ids)}
        pairs = enumerate(zip(domains, names, strict=True))
        self._by_key = {match_key(domain, name): i for i, (domain, name) in pairs}

    def __len__(self) -> int:
        return len(self._external_ids)

    def external_id(self, index: int) -> str:
        return self._external_ids[index]

    def name(self, index: int) -> str:
        return self._names[index]

    def domain(self, index: int) -> str:
        return self._domains[index]

    @staticmethod
    def demandbase_id(index: int) -> int:
        """Demandbase's own numeric ``Account ID`` for account ``index``."""
        return index + 1

    def account(self, index: int) -> Account:
        return Account(
            external_id=self._external_ids[index],
            name=self._names[index],
            domain=self._domains[index],
        )

    def page(self, offset: int, limit: int) -> Iterator[Account]:
        """Accounts ``offset`` to ``offset + limit - 1``, in database order."""
        for index in range(offset, min(offset + limit, len(self))):
            yield self.account(index)

    def index_of(self, external_id: str) -> int | None:
        """The account whose External Account ID is ``external_id``."""
        return self._by_external_id.get(external_id)

    def match(self, external_id: str, domain: str, name: str) -> int | None:
        """The account an import row stands for: by external id first, then domain and name."""
        if external_id and (index := self._by_external_id.get(external_id)) is not None:
            return index
        return self._by_key.get(match_key(domain, name))
