"""Stream a consistent RDB snapshot out of a Redis server, counting its keys per logical database on the way.

It runs as the first stage of a backup chain (engines.redisdump.snapshot_stage), stdlib only (no Django, no
package import):

    python -I -S engines/rdbstream.py COUNTS.json  < settings.json  > dump.rdb

settings.json (host, port or socket, user, password, tls, ca_file…) arrives on stdin, so the password is never
in argv nor in the environment. The stage speaks the replication protocol itself, as `redis-cli --rdb -` does:
AUTH, `REPLCONF rdb-only 1` (Redis 7: no replication backlog kept for us), `REPLCONF capa eof` (the diskless
form, ended by a 40-byte marker, is accepted), then `SYNC`. The server forks and writes a point-in-time snapshot
of every logical database: consistent however busy the server is. The payload goes to stdout chunk by chunk
(memory stays flat) and is parsed on the way, which is why this is not redis-cli: the key counts come from the
snapshot itself, so the drill can compare them exactly (a DBSIZE taken before or after the snapshot differs
from it on a busy server and would fail good backups).

COUNTS.json, written only when the whole snapshot arrived: {"rdb_version", "redis_version", "keys": {"0": n},
"expiring": {"0": m}} — keys per logical database, and how many of them carry an expiry (a drill tolerates
those having expired since). A value type this parser does not know (a module's, a newer Redis's) does not fail
the backup: the rest streams through untouched and "keys" is null with the reason in "problem".

Exit status 0 only when the payload ended exactly as announced (length, or end marker) and the RDB's own end
opcode was seen: a server that disappears mid-transfer fails the chain, and nothing is stored.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

CHUNK = 1 << 20
TIMEOUT = 120  # seconds without a byte (the server sends a newline every second while it forks and saves)


class RdbError(Exception):
    pass


class Unsupported(Exception):
    """A part of the RDB this parser cannot skip: counting stops, streaming goes on."""


# --- the replication connection -----------------------------------------------------------------------------------
class Connection:
    def __init__(self, cfg: dict):
        where = cfg.get("socket") or f"{cfg.get('host')}:{cfg.get('port')}"
        self.where = where
        try:
            if cfg.get("socket"):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(cfg.get("connect_timeout", 10))
                sock.connect(cfg["socket"])
            else:
                sock = socket.create_connection((cfg["host"], int(cfg["port"])), timeout=cfg.get("connect_timeout", 10))
            if cfg.get("tls"):
                import ssl  # only for TLS: importing it costs a few milliseconds

                # The server's certificate and name are always checked (against ca_file, else the system's CAs).
                context = ssl.create_default_context(cafile=cfg.get("ca_file") or None)
                sock = context.wrap_socket(sock, server_hostname=cfg.get("host") or None)
        except OSError as exc:
            raise RdbError(f"cannot connect to Redis at {where}: {exc.strerror or exc}") from None
        sock.settimeout(cfg.get("timeout", TIMEOUT))
        self.sock = sock
        self.buf = b""

    def _recv(self) -> bytes:
        try:
            data = self.sock.recv(CHUNK)
        except TimeoutError:
            raise RdbError(f"Redis at {self.where} sent nothing for {self.sock.gettimeout():g} s") from None
        except OSError as exc:
            raise RdbError(f"the connection to Redis at {self.where} failed: {exc.strerror or exc}") from None
        return data

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            data = self._recv()
            if not data:
                raise RdbError(f"Redis at {self.where} closed the connection")
            self.buf += data
            if len(self.buf) > 1 << 16 and b"\n" not in self.buf:
                raise RdbError(f"Redis at {self.where} sent an over-long reply line")
        head, _, self.buf = self.buf.partition(b"\n")
        return head.rstrip(b"\r")

    def command(self, *args: str | bytes) -> bytes:
        """Send one command; its reply's first line (a bulk reply's content is read and returned too)."""
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            raw = arg.encode() if isinstance(arg, str) else arg
            parts += [f"${len(raw)}\r\n".encode(), raw, b"\r\n"]
        try:
            self.sock.sendall(b"".join(parts))
        except OSError as exc:
            raise RdbError(f"the connection to Redis at {self.where} failed: {exc.strerror or exc}") from None
        return self.line()

    def payload(self):
        """After SYNC: the RDB's bytes, in chunks, exactly as the server announced them."""
        while True:
            head = self.line()
            if head:  # empty lines are the server's keep-alives while it saves
                break
        if head.startswith(b"-"):
            raise RdbError(f"Redis at {self.where} refused SYNC: {_text(head[1:])}")
        if not head.startswith(b"$"):
            raise RdbError(f"Redis at {self.where} answered SYNC with {_text(head[:40])!r}")
        if head.startswith(b"$EOF:"):
            mark = head[5:]
            if len(mark) != 40:
                raise RdbError("malformed end marker in the SYNC reply")
            yield from self._until_mark(mark)
            return
        try:
            left = int(head[1:])
        except ValueError:
            raise RdbError(f"malformed SYNC reply {_text(head[:40])!r}") from None
        total = left
        if self.buf:
            first, self.buf = self.buf[:left], self.buf[left:]
            left -= len(first)
            yield first
        while left > 0:
            data = self._recv()
            if not data:
                raise RdbError(f"Redis at {self.where} closed the connection after {total - left} of {total} bytes "
                               "of the snapshot")
            data = data[:left]
            left -= len(data)
            yield data

    def _until_mark(self, mark: bytes):
        """The diskless form: the payload ends where the 40-byte marker appears (found anywhere in what arrived:
        a Redis older than 7 may send its replication stream right behind it)."""
        pending, self.buf = self.buf, b""
        while True:
            at = pending.find(mark)
            if at >= 0:
                if at:
                    yield pending[:at]
                return
            if len(pending) > len(mark):
                yield pending[:-len(mark)]
                pending = pending[-len(mark):]
            data = self._recv()
            if not data:
                raise RdbError(f"Redis at {self.where} closed the connection before the end of the snapshot")
            pending += data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def open_sync(cfg: dict) -> Connection:
    con = Connection(cfg)
    if cfg.get("password"):
        args = ["AUTH", cfg["user"], cfg["password"]] if cfg.get("user") else ["AUTH", cfg["password"]]
        reply = con.command(*args)
        if not reply.startswith(b"+"):
            # The server's words (WRONGPASS …) never repeat the password.
            raise RdbError(f"Redis at {con.where} refused the login: {_text(reply.lstrip(b'-'))}")
    con.command("REPLCONF", "rdb-only", "1")  # Redis < 7 answers an error: harmless, the snapshot is the same
    con.command("REPLCONF", "capa", "eof")
    return con


# --- reading the RDB while it passes through ----------------------------------------------------------------------
class Reader:
    """Pulls chunks from `chunks`, hands each to `out` as soon as it arrives, and lets the parser read from them."""

    def __init__(self, chunks, out):
        self.chunks, self.out = iter(chunks), out
        self.buf, self.pos = b"", 0

    def _pull(self) -> bytes:
        chunk = next(self.chunks, None)
        if chunk is None:
            raise RdbError("the snapshot ended before the RDB's end opcode (truncated)")
        self.out(chunk)
        return chunk

    def read(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            self.buf, self.pos = self.buf[self.pos:] + self._pull(), 0
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return data

    def byte(self) -> int:
        if self.pos < len(self.buf):
            self.pos += 1
            return self.buf[self.pos - 1]
        return self.read(1)[0]

    def skip(self, n: int) -> None:
        avail = len(self.buf) - self.pos
        while n > avail:
            n -= avail
            self.buf, self.pos = self._pull(), 0
            avail = len(self.buf)
        self.pos += n

    def drain(self) -> int:
        """Pass the rest through; the number of bytes that followed what the parser read."""
        extra = len(self.buf) - self.pos
        for chunk in self.chunks:
            self.out(chunk)
            extra += len(chunk)
        self.buf, self.pos = b"", 0
        return extra


def _length(r: Reader) -> int:
    b = r.byte()
    kind = b >> 6
    if kind == 0:
        return b & 0x3F
    if kind == 1:
        return ((b & 0x3F) << 8) | r.byte()
    if b == 0x80:
        return struct.unpack(">I", r.read(4))[0]
    if b == 0x81:
        return struct.unpack(">Q", r.read(8))[0]
    raise Unsupported(f"an encoded value 0x{b:02x} where a length belongs")


def _string(r: Reader, *, keep: bool = False) -> bytes:
    b = r.byte()
    if b >> 6 != 3:
        r.pos -= 1  # a plain length: read it again as one
        n = _length(r)
        if keep and n <= 4096:
            return r.read(n)
        r.skip(n)
        return b""
    enc = b & 0x3F
    if enc in (0, 1, 2):  # an integer of 1, 2 or 4 bytes
        raw = r.read(1 << enc)
        return str(int.from_bytes(raw, "little", signed=True)).encode() if keep else b""
    if enc == 3:  # LZF: compressed length, plain length, data
        clen = _length(r)
        _length(r)
        r.skip(clen)
        return b""
    raise Unsupported(f"unknown string encoding {enc}")


def _module_values(r: Reader) -> None:
    while True:
        op = _length(r)
        if op == 0:  # EOF
            return
        if op in (1, 2):
            _length(r)
        elif op == 3:
            r.skip(4)
        elif op == 4:
            r.skip(8)
        elif op == 5:
            _string(r)
        else:
            raise Unsupported(f"unknown module opcode {op}")


def _stream(r: Reader, kind: int) -> None:
    for _ in range(_length(r)):  # listpacks: node key, listpack
        _string(r)
        _string(r)
    for _ in range(3):  # length, last id (ms, seq)
        _length(r)
    if kind >= 19:  # first id, max deleted id, entries added
        for _ in range(5):
            _length(r)
    for _ in range(_length(r)):  # consumer groups
        _string(r)
        _length(r)
        _length(r)
        if kind >= 19:
            _length(r)  # entries read
        for _ in range(_length(r)):  # the group's pending entries: id, delivery time, delivery count
            r.skip(16 + 8)
            _length(r)
        for _ in range(_length(r)):  # consumers
            _string(r)
            r.skip(8)  # seen time
            if kind >= 21:
                r.skip(8)  # active time
            for _ in range(_length(r)):
                r.skip(16)


SINGLE_STRING = {0, 9, 10, 11, 12, 13, 16, 17, 20}  # a string, or one encoded blob (ziplist, listpack, intset…)


def _value(r: Reader, kind: int) -> None:
    if kind in SINGLE_STRING:
        _string(r)
    elif kind in (1, 2, 14):  # list, set, quicklist (v1): strings
        for _ in range(_length(r)):
            _string(r)
    elif kind == 3:  # zset (v1): member, score as a short string (253-255: nan, +inf, -inf)
        for _ in range(_length(r)):
            _string(r)
            n = r.byte()
            if n < 253:
                r.skip(n)
    elif kind == 4:  # hash: field, value
        for _ in range(_length(r) * 2):
            _string(r)
    elif kind == 5:  # zset (v2): member, binary double
        for _ in range(_length(r)):
            _string(r)
            r.skip(8)
    elif kind == 7:  # module (v2): module id, then self-describing values
        _length(r)
        _module_values(r)
    elif kind == 18:  # quicklist (v2): container kind, node
        for _ in range(_length(r)):
            _length(r)
            _string(r)
    elif kind in (15, 19, 21):
        _stream(r, kind)
    else:
        raise Unsupported(f"value type {kind} (a newer Redis's, or a module's)")


def parse(r: Reader) -> dict:
    """Walk the RDB; keys (and keys with an expiry) per logical database, the RDB and Redis versions."""
    magic = r.read(9)
    if magic[:5] != b"REDIS" or not magic[5:].isdigit():
        raise RdbError("the server's snapshot does not start like an RDB file")
    version = int(magic[5:])
    keys: dict[str, int] = {}
    expiring: dict[str, int] = {}
    result = {"rdb_version": version, "redis_version": "", "keys": keys, "expiring": expiring}
    db, expires = "0", False
    while True:
        op = r.byte()
        if op == 0xFF:  # EOF, then the CRC64 (checked by the server that loads it: the drill)
            if version >= 5:
                r.read(8)
            return result
        if op == 0xFE:  # SELECTDB
            db = str(_length(r))
            keys.setdefault(db, 0)
        elif op == 0xFD:  # EXPIRETIME (seconds)
            r.skip(4)
            expires = True
        elif op == 0xFC:  # EXPIRETIME_MS
            r.skip(8)
            expires = True
        elif op == 0xFB:  # RESIZEDB: size hints (our own count below is exact)
            _length(r)
            _length(r)
        elif op == 0xFA:  # AUX field
            name, value = _string(r, keep=True), _string(r, keep=True)
            if name == b"redis-ver":
                result["redis_version"] = _text(value)[:40]
        elif op == 0xF9:  # MODULE_AUX: module id, then its values
            _length(r)
            _module_values(r)
        elif op == 0xF8:  # IDLE
            _length(r)
        elif op == 0xF7:  # FREQ
            r.skip(1)
        elif op == 0xF5:  # FUNCTION2: a library's code
            _string(r)
        elif op >= 0xF0:
            raise Unsupported(f"opcode 0x{op:02x}")
        else:
            _string(r)  # the key
            _value(r, op)
            keys[db] = keys.get(db, 0) + 1
            if expires:
                expiring[db] = expiring.get(db, 0) + 1
            expires = False


# --- the stage ----------------------------------------------------------------------------------------------------
def _writer(fd: int):
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    return write


def run(cfg: dict, write) -> dict:
    con = open_sync(cfg)
    try:
        con.sock.sendall(b"*1\r\n$4\r\nSYNC\r\n")
        reader = Reader(con.payload(), write)
        try:
            result = parse(reader)
        except Unsupported as exc:
            reader.drain()
            return {"keys": None, "expiring": None, "problem": f"keys not counted: {exc}"}
        extra = reader.drain()
        if extra:
            result["problem"] = f"{extra} bytes followed the RDB's end opcode"
        return result
    finally:
        con.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: rdbstream.py COUNTS.json < settings.json > dump.rdb", file=sys.stderr)
        return 2
    try:
        cfg = json.loads(sys.stdin.buffer.read() or b"{}")
        result = run(cfg, _writer(sys.stdout.fileno()))
    except RdbError as exc:
        print(f"{exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    tmp = argv[1] + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(result, fh)
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
