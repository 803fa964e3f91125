"""Claims on hot-folder photos: a watcher takes one in the store before its model runs, so two watchers on one
folder run the model once per photo (each photo was already recorded once: the ledger key is unique).

A claim names its owner (`host:pid:token`). One whose owner is gone is taken over: a process of this machine that
no longer runs at once, any other after `CLAIM_TTL_S` (a watcher killed on another machine of a shared
PostgreSQL store). The claim is deleted once the inspection is recorded; a claim left behind after that is
harmless, since the recorded key is looked up first.
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError

from vlm_inspect.station.schema import Claim, utc_now
from vlm_inspect.station.store import StationStore

CLAIM_TTL_S = 600
"""A claim of another machine's watcher older than this is taken over: longer than any batch of photos takes."""


def new_owner() -> str:
    """This watcher's name in its claims: host, process id and a token (two watchers of one process differ)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def claim(store: StationStore, source_key: str, owner: str) -> bool:
    """Take `source_key` for `owner` before inspecting it; False while another live watcher holds it."""
    try:
        with store.writing() as session:
            held = session.get(Claim, source_key)
            if held is None:
                session.add(Claim(source_key=source_key, owner=owner))
                return True
            if held.owner != owner and not _abandoned(held):
                return False
            # Compare-and-set on the old owner: of two watchers taking over one claim, one wins.
            taken = update(Claim).where(Claim.source_key == source_key, Claim.owner == held.owner)
            return session.execute(taken.values(owner=owner, created_at=utc_now())).rowcount == 1
    except IntegrityError:
        return False  # another watcher inserted it between our look and our insert (PostgreSQL)


def release(store: StationStore, source_key: str, owner: str) -> None:
    """Give a claim back: the photo is recorded, or was not inspected after all."""
    with store.writing() as session:
        session.execute(delete(Claim).where(Claim.source_key == source_key, Claim.owner == owner))


def _abandoned(held: Claim) -> bool:
    created = held.created_at if held.created_at.tzinfo else held.created_at.replace(tzinfo=timezone.utc)
    if datetime.now(timezone.utc) - created > timedelta(seconds=CLAIM_TTL_S):
        return True
    host, _, rest = held.owner.partition(":")
    pid = rest.partition(":")[0]
    return host == socket.gethostname() and pid.isdigit() and not _running(int(pid))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
