"""Which peers are still alive, for an error that can name the rank that was lost.

gloo reports a dead peer as ``Connection closed by peer [addr]:port`` and an
unreachable one as ``Timed out waiting ... for recv``: neither names a rank.
Every worker therefore bumps a counter of its own in the rendezvous store
(``MASTER_ADDR:MASTER_PORT``, the store that ``init_process_group`` and
``torchrun`` use) twice a second, over a connection of its own.  After a
communication error, :meth:`Heartbeat.lost_ranks` watches the counters for
a few seconds: a peer whose counter stopped has died or is cut off.  A
worker that stops because it lost a peer says so in the store first
(:meth:`Heartbeat.leaving`), so the others do not name it too.
"""
from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import torch.distributed as dist

PERIOD_S = 0.5   #: how often a worker bumps its counter
WINDOW_S = 3.0   #: how long a counter must stand still for its rank to count as lost
STORE_TIMEOUT_S = 5.0


class PeerLost(RuntimeError):
    """Communication failed because peers died or became unreachable; names them.

    Attributes:
        ranks (list[int]): The ranks found lost.
    """

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


class Heartbeat:
    """A daemon thread that shows this worker is alive, and the check of the others.

    Args:
        rank (int): This worker's rank.
        world_size (int): Number of workers.
        host (str, optional): The rendezvous store's address.
            (default: ``$MASTER_ADDR``)
        port (int, optional): Its port. (default: ``$MASTER_PORT``)
    """

    def __init__(self, rank: int, world_size: int, host: str | None = None,
                 port: int | None = None):
        self.rank, self.world_size = rank, world_size
        self.host = host or os.environ["MASTER_ADDR"]
        self.port = int(port or os.environ["MASTER_PORT"])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="adaqp-heartbeat", daemon=True)

    def _key(self, rank: int) -> str:
        return f"adaqp/heartbeat/{rank}"

    def _left_key(self, rank: int) -> str:
        return f"adaqp/left/{rank}"

    def _store(self) -> dist.TCPStore:
        return dist.TCPStore(self.host, self.port, is_master=False,
                             timeout=timedelta(seconds=STORE_TIMEOUT_S), wait_for_workers=False)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        """Stops the beat; with `wait`, returns once the thread has sent its last one."""
        self._stop.set()
        if wait and self._thread.is_alive():
            self._thread.join(STORE_TIMEOUT_S + 1)

    def _beat(self) -> None:
        store = None
        while not self._stop.is_set():
            try:
                store = store or self._store()
                store.add(self._key(self.rank), 1)
            except Exception:  # unreachable for now: a new connection next time
                store = None
            self._stop.wait(PERIOD_S)

    def lost_ranks(self, window_s: float = WINDOW_S) -> list[int] | None:
        """The peers whose counters stood still for `window_s`; None if the
        store is unreachable, [] if it went away during the check."""
        peers = [r for r in range(self.world_size) if r != self.rank]
        try:
            store = self._store()
            # add(key, 0) reads a counter without waiting for it to exist.
            before = [store.add(self._key(r), 0) for r in peers]
        except Exception:
            return None
        try:
            time.sleep(window_s)
            after = [store.add(self._key(r), 0) for r in peers]
            stalled = [r for r, a, b in zip(peers, before, after) if a == b]
            # A peer that left because it lost another is not itself the cause.
            return [r for r in stalled if not store.check([self._left_key(r)])]
        except Exception:
            # Its host (rank 0's, locally) left meanwhile, most likely having
            # named the lost peer itself: name nobody rather than guess.
            return []

    def leaving(self) -> None:
        """Records that this worker stops because it lost a peer (best effort)."""
        try:
            self._store().set(self._left_key(self.rank), "1")
        except Exception:
            pass

    def explain(self, err: BaseException) -> PeerLost | None:
        """A :class:`PeerLost` naming the lost peers behind `err`, or None if every peer is alive."""
        cause = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        lost = self.lost_ranks()
        if lost is None:
            return PeerLost(f"lost rank 0: the rendezvous store at {self.host}:{self.port} "
                            f"(on rank 0's host) is unreachable, so either that host or this "
                            f"one is off the network or gone; the failed operation said: "
                            f"{cause}", [0])
        if not lost:
            return None
        self.leaving()
        names = ", ".join(map(str, lost))
        return PeerLost(f"lost rank{'s' if len(lost) > 1 else ''} {names}: no heartbeat for "
                        f"{WINDOW_S:g} s (the process died, or its host is unreachable); the "
                        f"failed operation said: {cause}", lost)
