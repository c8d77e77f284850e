#!/usr/bin/env python3
"""Write a few valid batches to corpus/batch_decode/ (git-ignored) as a seed corpus.

Without seeds the fuzzer must first find a matching crc32c before it gets past the checksum.
Usage (from fuzz/): python3 gen_seeds.py
"""
import os
import struct

POLY = 0x82F63B78  # crc32c (Castagnoli), reflected
TABLE = []
for n in range(256):
    c = n
    for _ in range(8):
        c = (c >> 1) ^ POLY if c & 1 else c >> 1
    TABLE.append(c)


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


FLAG_PRODUCER = 0x0001


def batch(base: int, epoch: int, ts: int, records: list, producer=None) -> bytes:
    """`producer`, if given, is (producer_id, first_sequence): the 16-byte prefix of the payload."""
    payload = b"".join(struct.pack("<I", len(r)) + r for r in records)
    flags = 0
    if producer is not None:
        payload = struct.pack("<QQ", *producer) + payload
        flags = FLAG_PRODUCER
    # magic, crc, version, flags, record_count, base_offset, epoch, timestamp_us, payload_len, reserved
    header = struct.pack("<4sIHHIQQQII", b"RPLG", 0, 1, flags, len(records), base, epoch, ts, len(payload), 0)
    b = bytearray(header + payload)
    b[4:8] = struct.pack("<I", crc32c(bytes(b[8:])))
    return bytes(b)


assert crc32c(b"123456789") == 0xE3069283
SEEDS = {
    "one_empty": batch(0, 0, 0, [b""]),
    "one_small": batch(5, 1, 1, [b"hello"]),
    "two": batch(0x0102, 7, 99, [b"abcd", b"ef"]),
    "many": batch(1 << 40, 3, 1_700_000_000_000_000, [bytes([i]) * i for i in range(10)]),
    "trailing": batch(42, 2, 5, [b"x", b"yz"]) + b"\x00" * 16,
    # The top of the offset space: the last record is at u64::MAX - 1, next_offset is u64::MAX.
    "top_offsets": batch(2**64 - 3, 9, 9, [b"a", b"b"]),
    "producer": batch(7, 2, 3, [b"abc", b"de"], producer=(42, 1000)),
    # The last record's sequence is u64::MAX.
    "producer_top_sequence": batch(0, 1, 1, [b"x", b"y"], producer=(2**64 - 1, 2**64 - 2)),
}
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "batch_decode")
os.makedirs(out, exist_ok=True)
for name, data in SEEDS.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
print(f"wrote {len(SEEDS)} seeds to {out}")
