"""Spec for counter leases (pqtunnel/leases.py) and the stored-mark format (pqtunnel/stores.py).

A replica seals a record only with a counter from a block it holds by a committed
compare-and-swap on the key's stored high-water mark. The property test at the end runs
any interleaving of replicas, crashes, takeovers, lost requests, lost replies and late
commits against a model store, and checks that no counter is ever used twice.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pqtunnel.errors import LeaseStoppedError, LocalProtocolError, NoCounterError, StoreDataError, StoreKeyError
from pqtunnel.identity import Identity
from pqtunnel.leases import (
    MAX_MARK,
    Block,
    CounterLease,
    Granted,
    KeyMissing,
    MarkMoved,
    Refused,
    Reservation,
    ReserveResult,
    Unanswered,
    counter_key_id,
)
from pqtunnel.stores import StoreCodec, check_store_id
from tests.conftest import CountingEntropy

KEY = "0011223344556677.i2r"


class ModelStore:
    """The store contract in a dict: compare-and-swap on one integer per key."""

    def __init__(self) -> None:
        self.marks: dict[str, int] = {}

    def reserve(self, request: Reservation) -> ReserveResult:
        current = self.marks.get(request.key_id)
        if current is None:
            if request.expected_mark is not None:
                return KeyMissing()
        elif current != request.expected_mark:
            return MarkMoved(current)
        self.marks[request.key_id] = request.new_mark
        return Granted()


def take(lease: CounterLease, count: int) -> list[int]:
    return [lease.next_counter() for _ in range(count)]


def granted(lease: CounterLease, store: ModelStore) -> Reservation:
    """Ask the store what the lease wants and feed the answer back."""
    request = lease.wants_reservation()
    assert request is not None
    lease.feed(request, store.reserve(request))
    return request


# --- the hot path ---------------------------------------------------------------------------------


def test_a_fresh_lease_hands_out_nothing_before_its_first_block_is_granted() -> None:
    lease = CounterLease.fresh(KEY, block_size=8)
    with pytest.raises(NoCounterError):
        lease.next_counter()
    request = lease.wants_reservation()
    assert request == Reservation(KEY, None, 8, 1)  # create: the key must not exist yet
    with pytest.raises(NoCounterError):
        lease.next_counter()  # asked, not yet answered: still nothing
    lease.feed(request, Granted())
    assert take(lease, 8) == list(range(8))


def test_the_next_block_is_asked_for_at_low_water_so_the_sender_never_waits() -> None:
    store = ModelStore()
    lease = CounterLease.fresh(KEY, block_size=8, low_water=3)
    granted(lease, store)
    assert take(lease, 4) == [0, 1, 2, 3]
    assert lease.wants_reservation() is None  # 4 left: above low water
    lease.next_counter()
    request = lease.wants_reservation()  # 3 left: ask now
    assert request is not None and request.block == Block(8, 16)
    assert lease.wants_reservation() is None  # one request outstanding at a time
    assert take(lease, 3) == [5, 6, 7]  # the current block keeps serving meanwhile
    lease.feed(request, store.reserve(request))
    assert lease.held == [Block(8, 16)]
    assert take(lease, 2) == [8, 9]
    assert store.marks[KEY] == 16


def test_the_sender_stops_when_the_block_runs_out_before_the_store_answers() -> None:
    store = ModelStore()
    lease = CounterLease.fresh(KEY, block_size=4, low_water=1)
    granted(lease, store)
    take(lease, 3)
    request = lease.wants_reservation()
    lease.next_counter()
    with pytest.raises(NoCounterError) as stalled:
        lease.next_counter()
    assert not isinstance(stalled.value, LeaseStoppedError)  # waiting, not dead
    lease.feed(request, store.reserve(request))
    assert lease.next_counter() == 4


def test_counters_in_hand_and_held_blocks_are_reported() -> None:
    store = ModelStore()
    lease = CounterLease.fresh(KEY, block_size=10, low_water=9)
    granted(lease, store)
    take(lease, 3)
    granted(lease, store)
    assert lease.available == 17
    assert lease.held == [Block(3, 10), Block(10, 20)]


# --- answers from the store -----------------------------------------------------------------------


def test_a_failed_swap_retries_from_the_stored_mark() -> None:
    store = ModelStore()
    store.marks[KEY] = 40  # another replica has reserved up to 40
    lease = CounterLease.takeover(KEY, 24, block_size=8)
    first = lease.wants_reservation()
    lease.feed(first, store.reserve(first))
    assert not lease.ready
    second = granted(lease, store)
    assert second.expected_mark == 40 and take(lease, 2) == [40, 41]


def test_a_reservation_whose_reply_was_lost_leaks_its_block_and_never_uses_it() -> None:
    store = ModelStore()
    lease = CounterLease.fresh(KEY, block_size=8)
    lost = lease.wants_reservation()
    store.reserve(lost)  # committed, but the answer never arrived
    lease.feed(lost, Unanswered("timeout"))
    assert lease.leaked == [Block(0, 8)]
    retry = lease.wants_reservation()
    assert retry.expected_mark is None  # same expected mark: it cannot commit twice
    lease.feed(retry, store.reserve(retry))  # MarkMoved(8): the first one had committed
    granted(lease, store)
    assert take(lease, 2) == [8, 9]
    assert lease.leaked == [Block(0, 8)]


def test_a_lost_request_that_never_reached_the_store_is_simply_retried() -> None:
    store = ModelStore()
    lease = CounterLease.fresh(KEY, block_size=8)
    lease.feed(lease.wants_reservation(), Unanswered("connection refused"))
    granted(lease, store)
    assert take(lease, 1) == [0]
    assert lease.leaked == []  # the retry committed, so the first never did


def test_a_missing_mark_stops_the_lease_for_good() -> None:
    lease = CounterLease.takeover(KEY, 16, block_size=8)
    lease.feed(lease.wants_reservation(), KeyMissing())
    with pytest.raises(LeaseStoppedError, match="gone"):
        lease.next_counter()
    assert lease.wants_reservation() is None


def test_taking_over_a_key_with_no_stored_mark_is_refused() -> None:
    lease = CounterLease.takeover(KEY, None)
    assert lease.wants_reservation() is None
    with pytest.raises(LeaseStoppedError, match="state is gone"):
        lease.next_counter()


@pytest.mark.parametrize("current", [16, 8, 0])
def test_a_stored_mark_that_did_not_grow_means_the_store_went_back_in_time(current: int) -> None:
    lease = CounterLease.takeover(KEY, 16, block_size=8)
    lease.feed(lease.wants_reservation(), MarkMoved(current))
    assert lease.stopped is not None and "rolled back" in lease.stopped
    with pytest.raises(LeaseStoppedError):
        lease.next_counter()


def test_a_mark_below_the_known_floor_is_refused_at_takeover() -> None:
    lease = CounterLease.takeover(KEY, 100, floor=500)
    assert lease.stopped is not None and "below the known floor" in lease.stopped


def test_data_the_store_could_not_vouch_for_stops_the_lease() -> None:
    lease = CounterLease.fresh(KEY)
    lease.feed(lease.wants_reservation(), Refused("integrity check failed"))
    with pytest.raises(LeaseStoppedError, match="integrity check failed"):
        lease.next_counter()


def test_a_lease_keeps_the_counters_it_holds_after_it_stops() -> None:
    """Stopping means no new blocks; a block already held is still only ours."""
    store = ModelStore()
    lease = CounterLease.fresh(KEY, block_size=4, low_water=2)
    granted(lease, store)
    take(lease, 2)
    lease.feed(lease.wants_reservation(), KeyMissing())
    assert take(lease, 2) == [2, 3]
    with pytest.raises(LeaseStoppedError):
        lease.next_counter()


def test_an_answer_to_a_request_that_is_not_outstanding_is_our_bug() -> None:
    lease = CounterLease.fresh(KEY)
    request = lease.wants_reservation()
    lease.feed(request, Unanswered("timeout"))
    with pytest.raises(LocalProtocolError):
        lease.feed(request, Granted())  # the late answer to a request already given up


def test_the_64_bit_counter_space_ends_the_lease() -> None:
    store = ModelStore()
    store.marks[KEY] = MAX_MARK - 3
    lease = CounterLease.takeover(KEY, MAX_MARK - 3, block_size=8, low_water=0)
    request = granted(lease, store)
    assert request.block == Block(MAX_MARK - 3, MAX_MARK)
    assert take(lease, 3)[-1] == MAX_MARK - 1
    assert lease.wants_reservation() is None
    with pytest.raises(LeaseStoppedError, match="used up"):
        lease.next_counter()


def test_lease_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        CounterLease.fresh(KEY, block_size=0)
    with pytest.raises(ValueError):
        CounterLease.fresh(KEY, block_size=8, low_water=8)


def test_counter_keys_name_the_session_and_direction() -> None:
    assert counter_key_id(bytes.fromhex("0011223344556677"), "r2i") == "0011223344556677.r2i"
    with pytest.raises(LocalProtocolError):
        counter_key_id(b"short", "i2r")
    with pytest.raises(LocalProtocolError):
        counter_key_id(bytes(8), "both")


# --- the stored mark's format -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def codec() -> StoreCodec:
    return StoreCodec.for_identity(Identity.generate("alice", CountingEntropy()))


def test_a_stored_mark_round_trips(codec: StoreCodec) -> None:
    for mark in (0, 65536, MAX_MARK):
        assert codec.decode_mark(KEY, codec.encode_mark(KEY, mark)) == mark


@pytest.mark.parametrize("value", [b"", b"65536", b"\xff\xfe", b"pqtunnel-mark/1 -5 00",
                                   b"pqtunnel-mark/2 5 " + b"0" * 32, b"pqtunnel-mark/1 5 " + b"0" * 32,
                                   b"pqtunnel-mark/1 99999999999999999999999 " + b"0" * 32])
def test_garbage_in_the_store_is_refused(codec: StoreCodec, value: bytes) -> None:
    with pytest.raises(StoreDataError):
        codec.decode_mark(KEY, value)


def test_a_mark_from_another_node_or_another_key_is_refused(codec: StoreCodec) -> None:
    other_node = StoreCodec.for_identity(Identity.generate("mallory"))
    with pytest.raises(StoreDataError, match="integrity"):
        codec.decode_mark(KEY, other_node.encode_mark(KEY, 64))
    with pytest.raises(StoreDataError, match="integrity"):
        codec.decode_mark(KEY, codec.encode_mark("8899aabbccddeeff.i2r", 1 << 40))
    tampered = codec.encode_mark(KEY, 64).replace(b" 64 ", b" 65 ")
    with pytest.raises(StoreDataError, match="integrity"):
        codec.decode_mark(KEY, tampered)


def test_replicas_of_one_node_share_the_codec() -> None:
    identity = Identity.generate("alice")
    copy = Identity(identity.name, identity.ed25519_seed, dict(identity.pq_seeds), identity.x25519_static)
    value = StoreCodec.for_identity(identity).encode_mark(KEY, 7)
    assert StoreCodec.for_identity(copy).decode_mark(KEY, value) == 7


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 129, "with space", "-leading"])
def test_store_ids_are_short_and_printable(bad: str) -> None:
    with pytest.raises(StoreKeyError):
        check_store_id(bad)


# --- any interleaving: no counter is ever used twice -------------------------------------------------


class Replicas(RuleBasedStateMachine):
    """Replicas of one node sending under one key, against one model store.

    The network may lose a request before the store, lose the store's reply, or deliver a
    request long after its sender gave up on it (timeout) and retried. A replica may crash
    at any time and be replaced by one that takes over from the stored mark; a replica that
    is not scheduled for many steps is frozen (SIGSTOP) and later resumes with its old block.
    """

    REPLICAS = 3

    def __init__(self) -> None:
        super().__init__()
        self.store = ModelStore()
        self.leases: list[CounterLease | None] = [CounterLease.fresh(KEY, block_size=4, low_water=1)]
        self.leases += [None] * (self.REPLICAS - 1)
        self.network: list[tuple[CounterLease, Reservation]] = []
        self.committed: dict[int, list[Block]] = {}  # by id() of the lease whose request committed
        self.used: dict[int, int] = {}  # counter -> id() of the lease that sealed with it
        self.sequences: dict[int, list[int]] = {}
        self.retired: list[CounterLease] = []  # keeps ids unique while the test runs

    def _lease(self, index: int) -> CounterLease | None:
        return self.leases[index % self.REPLICAS]

    @rule(replica=st.integers(0, REPLICAS - 1))
    def ask(self, replica: int) -> None:
        lease = self._lease(replica)
        request = lease.wants_reservation() if lease else None
        if request is not None:
            self.network.append((lease, request))

    @rule(data=st.data(), reply=st.booleans())
    def deliver(self, data: st.DataObject, reply: bool) -> None:
        """The store commits (or refuses) a request; the reply may be lost."""
        if not self.network:
            return
        lease, request = self.network.pop(data.draw(st.integers(0, len(self.network) - 1)))
        outcome = self.store.reserve(request)
        if isinstance(outcome, Granted):
            self.committed.setdefault(id(lease), []).append(request.block)
        if reply and lease.pending is request and lease in self.leases:
            lease.feed(request, outcome)

    @rule(data=st.data())
    def lose_request(self, data: st.DataObject) -> None:
        if self.network:
            self.network.pop(data.draw(st.integers(0, len(self.network) - 1)))

    @rule(replica=st.integers(0, REPLICAS - 1))
    def time_out(self, replica: int) -> None:
        """The replica stops waiting; its request may still be in the network or committed."""
        lease = self._lease(replica)
        if lease is not None and lease.pending is not None:
            lease.feed(lease.pending, Unanswered("timeout"))

    @rule(replica=st.integers(0, REPLICAS - 1), count=st.integers(1, 6))
    def send(self, replica: int, count: int) -> None:
        lease = self._lease(replica)
        for _ in range(count if lease else 0):
            try:
                counter = lease.next_counter()
            except NoCounterError:
                return
            assert counter not in self.used, f"counter {counter} used twice"
            self.used[counter] = id(lease)
            self.sequences.setdefault(id(lease), []).append(counter)

    @rule(replica=st.integers(0, REPLICAS - 1))
    def crash_and_take_over(self, replica: int) -> None:
        """SIGKILL: the replica's blocks die with it; a new one continues from the stored mark."""
        old = self.leases[replica]
        if old is not None:
            self.retired.append(old)
        self.leases[replica] = CounterLease.takeover(KEY, self.store.marks.get(KEY), block_size=4, low_water=1)

    @invariant()
    def no_counter_is_used_twice_and_each_comes_from_a_block_its_user_was_granted(self) -> None:
        for counter, owner in self.used.items():
            assert any(counter in block for block in self.committed.get(owner, [])), counter
        for sequence in self.sequences.values():
            assert sequence == sorted(set(sequence)), "counters must strictly increase per replica"

    @invariant()
    def the_stored_mark_covers_every_counter_used(self) -> None:
        if self.used:
            assert max(self.used) < self.store.marks[KEY]


TestReplicas = Replicas.TestCase
TestReplicas.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
