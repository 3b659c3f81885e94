#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/seeds/<target>/: valid frames of every kind,
built from the layout documented in src/frame.rs (16-byte little-endian header, then payload).

    python3 fuzz/gen_seeds.py      # from the repository root (or anywhere)

Seeds per target:
  frame_decode     one datagram per file
  channel_recv     one byte of fd count (the header's), then the datagram
  frame_roundtrip  the `arbitrary` layout of the target's Input: kind, flags, fds (one byte
                   each), seq (u32, little-endian), then the payload (the rest)
  primary_protocol a config byte (workers, listeners, fast stop, short timeouts, schedule),
                   then records: a head byte
                   (op in bits 0-4, worker in bits 5-7) and the op's operands; see the
                   module docs of fuzz_targets/primary_protocol.rs
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(HERE, "seeds")

# value, name, payload, fds, flags
ONLINE, LISTENING, CONNECTION, ACK, MESSAGE, DISCONNECT, STATS, CLOSE = range(1, 9)
ACK_REFUSED = 0x01
MAX_PAYLOAD = 4096 - 16


def frame(kind, payload=b"", fds=0, flags=0, seq=1):
    header = b"FC" + bytes([1, kind, flags, fds]) + b"\0\0" + struct.pack("<II", seq, len(payload))
    return header + payload


FRAMES = {
    "online": (ONLINE, b"", 0, 0),
    "listening": (LISTENING, struct.pack("<H", 0), 0, 0),
    "listening_ffff": (LISTENING, struct.pack("<H", 0xFFFF), 0, 0),
    "connection": (CONNECTION, struct.pack("<H", 1), 1, 0),
    "ack": (ACK, struct.pack("<I", 1), 0, 0),
    "ack_refused": (ACK, struct.pack("<I", 3), 0, ACK_REFUSED),
    "ack_max": (ACK, struct.pack("<I", 0xFFFFFFFF), 0, 0),
    "message_empty": (MESSAGE, b"", 0, 0),
    "message_hello": (MESSAGE, b"hello", 0, 0),
    "message_fd": (MESSAGE, b"with an fd", 1, 0),
    "message_8fds": (MESSAGE, b"eight", 8, 0),
    "message_max": (MESSAGE, bytes(i % 251 for i in range(MAX_PAYLOAD)), 0, 0),
    "disconnect": (DISCONNECT, b"", 0, 0),
    "stats": (STATS, struct.pack("<QQ", 12345, 678), 0, 0),
    "close": (CLOSE, b"", 0, 0),
}


# primary_protocol ops (fuzz_targets/primary_protocol.rs, `Op`)
P_RAW, P_FRAME, P_MESSAGE, P_ONLINE, P_LISTENING, P_ACK, P_STATS, P_CLOSE, P_CONNECTION, \
    P_DISCONNECT, P_EXIT, P_SLEEP, P_SHUTWR, P_FLOOD, P_FDFLOOD, P_EMPTY = range(16)


def config(workers, listeners=0, fast_stop=False, short=False, shared=False):
    return bytes([(workers - 1) | listeners << 2 | (0x10 if fast_stop else 0)
                  | (0x20 if short else 0) | (0x40 if shared else 0)])


def rec(worker, op, *operands):
    out = bytes([worker << 5 | op])
    for o in operands:
        out += o if isinstance(o, bytes) else bytes([o])
    return out


def u16(v):
    return struct.pack("<H", v)


def p_message(worker, payload, fds=0):
    return rec(worker, P_MESSAGE, fds, u16(len(payload)), payload)


def p_raw(worker, data, fds=0):
    return rec(worker, P_RAW, fds, u16(len(data)), data)


def p_frame(worker, kind, payload=b"", hdr_fds=0, fds=0, flags=0):
    return rec(worker, P_FRAME, kind, flags, hdr_fds, fds, u16(len(payload)), payload)


PRIMARY_PROTOCOL = {
    # Well-behaved: messages with and without fds, ready once, optional frames.
    "clean": config(2)
    + p_message(0, b"hello")
    + rec(1, P_LISTENING, 0xFF)
    + p_message(1, b"two fds", 2)
    + rec(0, P_ACK, 0, struct.pack("<I", 3))
    + rec(1, P_STATS, struct.pack("<QQ", 5, 6))
    + rec(0, P_SLEEP, 5)
    + p_message(0, b"eight", 8),
    "clean_listeners": config(3, 2)
    + rec(0, P_LISTENING, 0)
    + rec(0, P_LISTENING, 1)
    + rec(1, P_LISTENING, 1)
    + rec(2, P_FLOOD, 100)
    + p_message(1, b"x" * 300, 1),
    "clean_fast_stop": config(2, 0, True) + p_message(0, b"a", 1) + p_message(1, b"b"),
    # Garbage from worker 0 between good messages; worker 1 stays good.
    "garbage": config(2)
    + p_message(0, b"before", 1)
    + p_raw(0, b"XXXXXXXXXXXXXXXXXXXXXXXX", 3)
    + p_message(0, b"never read")
    + p_message(1, b"fine"),
    # Worker 0 floods fds: 32 messages of 8 fds, then 9 and 10 fds on one datagram.
    "fd_flood": config(3)
    + rec(0, P_FDFLOOD, 32, 8)
    + p_frame(0, MESSAGE, b"nine", hdr_fds=8, fds=9)
    + rec(1, P_FDFLOOD, 16, 1)
    + p_raw(2, b"", 10),
    "fd_mismatch": config(2) + p_frame(0, MESSAGE, b"m", hdr_fds=2, fds=1) + p_message(1, b"ok"),
    "online_twice": config(1) + rec(0, P_ONLINE),
    "listening_twice": config(2, 1) + rec(0, P_LISTENING, 0) + rec(0, P_LISTENING, 0),
    "no_such_listener": config(1, 1) + rec(0, P_LISTENING, 0xFF),
    "primary_kinds": config(2) + rec(0, P_CONNECTION, u16(0)) + rec(1, P_DISCONNECT),
    "ack_zero": config(1) + rec(0, P_ACK, 1, struct.pack("<I", 0)),
    "oversized": config(1) + p_raw(0, frame(MESSAGE, bytes(MAX_PAYLOAD + 1)), 0),
    # Exits with frames still queued: they are read after the death.
    "exit_queued": config(2)
    + rec(0, P_FLOOD, 50)
    + rec(0, P_EXIT, 3)
    + p_message(1, b"still here", 2)
    + rec(1, P_EXIT, 0),
    "violation_then_exit": config(1) + p_raw(0, b"bad") + rec(0, P_SLEEP, 20) + rec(0, P_EXIT, 5),
    "close": config(2) + p_message(0, b"bye") + rec(0, P_CLOSE) + p_message(0, b"unread") + p_message(1, b"x"),
    "shutwr": config(2) + p_message(0, b"bye", 1) + rec(0, P_SHUTWR) + rec(1, P_SHUTWR) + rec(1, P_EXIT, 7),
    # The zero-byte datagram race: a malformed frame, or end of file once the worker is gone.
    "empty_then_exit": config(2) + rec(0, P_EMPTY) + rec(0, P_EXIT, 1) + rec(1, P_EMPTY) + rec(1, P_SHUTWR),
    "empty_alive": config(1) + rec(0, P_EMPTY) + p_message(0, b"after"),
    # Short timeouts: worker 0 closes its channel and sleeps; its kill timer (30 ms) fires at a
    # tick while worker 1 sleeps 110 ms between its messages.
    "tick": config(2, 0, False, True) + rec(0, P_CLOSE) + rec(0, P_SLEEP, 20) * 4
    + p_message(1, b"before", 1) + rec(1, P_SLEEP, 0xFF) + p_message(1, b"after a tick", 2),
    # The shared schedule: workers hold the listeners; the primary checks them at ticks.
    "shared": config(2, 2, shared=True) + rec(0, P_LISTENING, 0) + rec(0, P_LISTENING, 1)
    + p_message(0, b"shared", 2) + rec(1, P_LISTENING, 1) + rec(1, P_LISTENING, 1),
    "shared_tick": config(3, 1, False, True, True) + rec(0, P_CLOSE) + rec(1, P_LISTENING, 0)
    + rec(1, P_SLEEP, 0xFF) + p_message(1, b"after", 1) + rec(2, P_EXIT, 2),
    "tick_fast_stop": config(3, 1, True, True) + rec(0, P_LISTENING, 0) + rec(1, P_SHUTWR)
    + rec(2, P_SLEEP, 0xFF) + rec(2, P_FDFLOOD, 8, 3),
}


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    for i, (name, (kind, payload, fds, flags)) in enumerate(sorted(FRAMES.items())):
        seq = 0x01020304 + i
        datagram = frame(kind, payload, fds, flags, seq)
        write("frame_decode", name, datagram)
        write("channel_recv", name, bytes([fds]) + datagram)
        write("frame_roundtrip", name, bytes([kind, flags, fds]) + struct.pack("<I", seq) + payload)
    # A few that the channel must refuse, to start near the interesting edges.
    write("channel_recv", "too_many_fds", bytes([10]) + frame(MESSAGE, b"x", 8))
    write("channel_recv", "oversized", bytes([0]) + frame(MESSAGE, bytes(MAX_PAYLOAD + 1)))
    write("channel_recv", "fd_mismatch", bytes([2]) + frame(CONNECTION, b"\0\0", 1))
    write("channel_recv", "empty", bytes([0]))
    for name, data in PRIMARY_PROTOCOL.items():
        write("primary_protocol", name, data)


if __name__ == "__main__":
    main()
