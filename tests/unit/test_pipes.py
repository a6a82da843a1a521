"""Messages on a pipe survive a process killed mid-message: the reader drops the cut message and nothing else.

The real pipes between the real processes are exercised by tests/e2e/test_reliability.py (workers
killed under load, and while blocked half-way through writing a response); here the message format
itself is checked against every way a byte stream can be cut and chunked.
"""

from __future__ import annotations

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st

from service.pipes import MessageReader, new_magic, pack

MAGIC = new_magic()
ITEMS = st.lists(st.binary(max_size=3000) | st.text(max_size=300) | st.tuples(st.text(max_size=40), st.integers()),
                 min_size=1, max_size=8)
CHUNKS = st.lists(st.integers(0, 1 << 20), max_size=12)


def read(stream: bytes, cuts: list[int]) -> list:
    """What one reader gets from ``stream`` delivered in pieces split at ``cuts``."""
    reader, got, last = MessageReader(MAGIC), [], 0
    for point in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        got += [pickle.loads(payload) for payload in reader.feed(stream[last:point])]
        last = point
    return got


@settings(max_examples=300, deadline=None)
@given(ITEMS, CHUNKS)
def test_whole_messages_come_out_in_order_however_the_stream_is_chunked(items, cuts):
    assert read(b"".join(pack(MAGIC, item) for item in items), cuts) == items


@settings(max_examples=300, deadline=None)
@given(ITEMS, st.integers(0, 7), st.floats(0, 1, exclude_max=True), CHUNKS)
def test_a_message_cut_short_by_a_dead_writer_is_dropped_and_the_rest_delivered(items, victim, fraction, cuts):
    messages = [pack(MAGIC, item) for item in items]
    victim %= len(messages)
    cut = messages[victim][:int(len(messages[victim]) * fraction)]  # the writer died after writing this much
    stream = b"".join(messages[:victim]) + cut + b"".join(messages[victim + 1:])
    # cut in its tail, and the next message's MAGIC begins with the bytes missing (by chance): its payload
    # is whole, and it is delivered
    at = len(b"".join(messages[:victim]))
    whole = len(cut) >= len(messages[victim]) - len(MAGIC) and stream[at:].startswith(messages[victim])
    assert read(stream, cuts) == items[:victim] + items[victim + 1 - whole:]


@settings(max_examples=300, deadline=None)
@given(ITEMS, st.floats(0, 1, exclude_min=True, exclude_max=True), CHUNKS)
def test_a_reader_that_starts_mid_message_skips_to_the_next_message(items, fraction, cuts):
    """A replacement worker finds the rest of a request its killed predecessor had begun to read."""
    messages = [pack(MAGIC, item) for item in items]
    consumed = max(1, int(len(messages[0]) * fraction))
    assert read(messages[0][consumed:] + b"".join(messages[1:]), cuts) == items[1:]


def test_a_cut_message_is_reported_and_its_bytes_released(caplog):
    messages = [pack(MAGIC, "first"), pack(MAGIC, "second" * 1000), pack(MAGIC, "third")]
    reader = MessageReader(MAGIC)
    assert [pickle.loads(p) for p in reader.feed(messages[0] + messages[1][:2000])] == ["first"]
    assert len(reader.pending) == 2000  # waiting for the rest of "second"
    assert [pickle.loads(p) for p in reader.feed(messages[2])] == ["third"]
    assert reader.pending == b""
    assert "dropped 2000 bytes" in caplog.text


def test_a_writer_dead_in_the_tail_whose_successor_s_magic_completes_it_loses_no_message():
    """The missing last tail byte equals the next MAGIC's first (1 in 256): the payload before is whole
    and delivered, and the next message is found where its MAGIC began, inside that tail."""
    magic = bytes([0x5A ^ 0xFF]) + new_magic()[1:-1] + bytes([0x5A])  # ~magic[-1] == magic[0]
    first, second = pack(magic, "first"), pack(magic, "second")
    stream = first[:-1] + second
    for cut in range(len(stream) + 1):
        reader = MessageReader(magic)
        got = [pickle.loads(p) for p in reader.feed(stream[:cut]) + reader.feed(stream[cut:])]
        assert got == ["first", "second"], cut


def test_a_magic_cut_one_byte_short_does_not_hide_the_next_message():
    """A writer that died one byte into its MAGIC's end, where that MAGIC's last byte is its first: the
    cut bytes and the next MAGIC's first byte read as a whole MAGIC. The next message, whose MAGIC
    begins inside that one, is delivered (it was lost, with all up to the MAGIC after it)."""
    magic = bytes([7]) + bytes(range(100, 114)) + bytes([7])
    messages = [pack(magic, item) for item in (b"lost", b"next", ("after", 1))]
    stream = messages[0][:len(magic) - 1] + messages[1] + messages[2]
    reader = MessageReader(magic)
    assert [pickle.loads(payload) for payload in reader.feed(stream)] == [b"next", ("after", 1)]
