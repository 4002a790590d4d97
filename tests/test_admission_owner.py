"""The queue owner (engine/runtime/admission.py) on its own: its grants count at once,
and a replaced owner's grants never reach a run."""

from __future__ import annotations

import asyncio

import stepline as sl
from stepline.core import codec
from stepline.core.events import Body, Event, PartitionClaimed, SlotGranted, SlotReleased, SlotRequested
from stepline.core.ids import new_event_id
from stepline.log.topics import Topics
from stepline.runtime.admission import Admission
from stepline.sdk.context import now_ms
from tests.conftest import eventually

QUEUE = "api"


class Owner:
    def __init__(self, url: str) -> None:
        self.log = sl.open_log(url)
        self.topics = Topics(partitions=1)
        self.notices: list[str] = []
        self.admission: Admission | None = None

    async def __aenter__(self) -> Owner:
        await self.log.start()
        await self.log.ensure_topics(self.topics.specs())

        def notify(run_id: str, task_id: str, body: Body) -> asyncio.Future[int]:
            assert isinstance(body, SlotGranted)
            self.notices.append(run_id)
            done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            done.set_result(0)
            return done

        self.admission = Admission(self.log, self.topics, notify, now_ms, "owner-1")
        await self.admission.start()
        await eventually(lambda: self.admission is not None and self.admission._mine, timeout=30,
                         what="the owner to claim the queues partition")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.admission is not None
        await self.admission.close()
        await self.log.close()

    async def ask(self, *run_ids: str, limit: int = 3) -> None:
        assert self.admission is not None
        await asyncio.gather(*(self.admission.request(
            rid, "t", SlotRequested(QUEUE, None, 0, n, limit)) for n, rid in enumerate(run_ids)))

    async def append(self, body: Body, epoch: int, run_id: str = "") -> None:
        ev = Event(new_event_id(), body.TYPE, run_id, "t" if run_id else "", 0, now_ms(), epoch, body)
        await self.log.append(self.topics.queues, 0, [(QUEUE.encode(), codec.encode(ev))])


async def settle() -> None:
    # Long enough for the owner's tail to read and act on what was appended.
    await asyncio.sleep(1.5)


async def test_grants_count_before_they_are_read_back(backend_url):
    async with Owner(backend_url) as owner:
        await owner.ask("r1", "r2", "r3")
        await eventually(lambda: len(owner.notices) == 3, timeout=20, what="three grants")
        # Seven more ask while three hold the limit of three: none may start.
        await owner.ask(*(f"r{n}" for n in range(4, 11)))
        await settle()
        assert sorted(owner.notices) == ["r1", "r2", "r3"]
        assert owner.admission is not None
        await owner.admission.release("r1", "t", SlotReleased(QUEUE, None, "done"))
        await eventually(lambda: len(owner.notices) == 4, timeout=20, what="the freed slot's grant")
        await settle()
        assert len(owner.notices) == 4


async def test_a_burst_of_requests_gets_exactly_the_limit(backend_url):
    async with Owner(backend_url) as owner:
        for n in range(0, 30, 3):  # several appends: the tail reads them in several rounds
            await owner.ask(*(f"r{n + i}" for i in range(3)), limit=4)
        await eventually(lambda: len(owner.notices) >= 4, timeout=20, what="four grants")
        await settle()
        assert len(owner.notices) == 4


async def test_a_replaced_owner_grants_nothing_and_tells_no_run(backend_url):
    async with Owner(backend_url) as owner:
        await owner.ask("r1")
        await eventually(lambda: owner.notices == ["r1"], timeout=20, what="the first grant")
        # Another worker claims the partition (this one was paused past its session).
        await owner.append(PartitionClaimed(0, "owner-2"), epoch=1000)
        await owner.ask("r2", "r3")
        await settle()
        assert owner.notices == ["r1"]
        granted = []
        for r in await owner.log.read(owner.topics.queues, 0, 0, 1000):
            ev = codec.decode(r.value)
            if isinstance(ev.body, SlotGranted):
                granted.append((ev.run_id, ev.epoch))
        # Its one grant came before the claim, under its own epoch; none after.
        assert len(granted) == 1 and granted[0][0] == "r1" and granted[0][1] < 1000
