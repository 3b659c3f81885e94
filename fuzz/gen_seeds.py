#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/seeds/<target>/: valid frames of every kind,
built from the layout documented in src/frame.rs (16-byte little-endian header, then payload).

    python3 fuzz/gen_seeds.py      # from the repository root (or anywhere)

Seeds per target:
  frame_decode     one datagram per file
  channel_recv     one byte of fd count (the header's), then the datagram
  frame_roundtrip  the `arbitrary` layout of the target's Input: kind, flags, fds (one byte
                   each), seq (u32, little-endian), then the payload (the rest)
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


if __name__ == "__main__":
    main()
