#!/usr/bin/env python3
"""The prober and the attack clients of bench/hostile.sh (python3, stdlib only).

Each mode runs for SECS seconds, writes progress to stderr and one JSON summary line to
stdout:

  prober     PORT SECS EXPECT      a new connection every 0.5-1 s: GET /version.txt, whose
                                   body must be the line EXPECT; share served and latency
  nonreaders PORT SECS N PATH      N clients send GET PATH and never read a byte
  slowreader PORT SECS PATH        one client reads PATH at 1 byte/s; how long the server
                                   kept the connection (its socket still owned by a process)
  idle       PORT SECS N           N connections that send nothing and reconnect when closed

Everything connects to 127.0.0.1.
"""

import asyncio
import json
import random
import resource
import socket
import sys
import time

HOST = "127.0.0.1"
# Connections being opened at once: more would only overflow the server's listen backlog
# and turn into SYN retries, which measure the kernel rather than the server.
CONNECT_AT_ONCE = 256
PROBE_TIMEOUT = 5.0


def log(msg):
    print(f"    [{sys.argv[1]}] {msg}", file=sys.stderr, flush=True)


def small_socket():
    """A non-blocking socket with a small receive buffer: a client that does not read then
    stops the server's writes after a few KiB, as a real slow client would."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    return s


def request(path, close=False):
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\n{extra}\r\n".encode()


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


async def prober(port, secs, expect):
    want = expect.encode()

    async def probe():
        started = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                writer.write(request("/version.txt", close=True))
                data = await reader.read()
            finally:
                writer.close()
        except OSError:
            return None
        head, _, body = data.partition(b"\r\n\r\n")
        ok = head.startswith(b"HTTP/1.1 200") and body.strip() == want
        return time.monotonic() - started if ok else None

    async def timed_probe():
        try:
            return await asyncio.wait_for(probe(), PROBE_TIMEOUT)
        except asyncio.TimeoutError:
            return None

    tasks = []
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        tasks.append(asyncio.create_task(timed_probe()))
        await asyncio.sleep(random.uniform(0.5, 1.0))
    results = await asyncio.gather(*tasks)
    served = [r * 1000 for r in results if r is not None]
    return {
        "probes": len(results),
        "served": len(served),
        "p50_ms": percentile(served, 50),
        "p99_ms": percentile(served, 99),
    }


async def nonreaders(port, secs, count, path):
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)
    held, failed = [], 0

    async def one():
        nonlocal failed
        s = small_socket()
        try:
            async with gate:
                await asyncio.wait_for(loop.sock_connect(s, (HOST, port)), 10)
                await loop.sock_sendall(s, request(path))
            held.append(s)
        except (OSError, asyncio.TimeoutError):
            failed += 1
            s.close()

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(count)))
    log(f"{len(held)} connected and asked for {path} in {time.monotonic() - started:.1f}s; never reading")
    await asyncio.sleep(max(0.0, secs - (time.monotonic() - started)))
    for s in held:
        s.close()
    return {"connected": len(held), "failed": failed}


def server_holds(server_port, client_port):
    """True while a process owns the server's end of the connection. /proc/net/tcp shows
    inode 0 for a socket its process has closed (the kernel may still be sending it)."""
    local = f"0100007F:{server_port:04X}"
    remote = f"0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                return fields[9] != "0"
    return False


async def slowreader(port, secs, path):
    loop = asyncio.get_running_loop()
    s = small_socket()
    await loop.sock_connect(s, (HOST, port))
    client_port = s.getsockname()[1]
    await loop.sock_sendall(s, request(path))
    started = time.monotonic()
    got, held_for, eof = 0, None, False
    while time.monotonic() - started < secs:
        await asyncio.sleep(1)
        if not eof:
            try:
                chunk = s.recv(1)
                got += len(chunk)
                eof = not chunk
            except BlockingIOError:
                pass
            except OSError:
                eof = True
        if held_for is None and not server_holds(port, client_port):
            held_for = time.monotonic() - started
            log(f"the server let go after {held_for:.1f}s ({got} bytes read)")
            break
    s.close()
    return {"held_s": held_for, "bytes_read": got, "gave_up_after_s": secs}


async def idle(port, secs, count):
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)
    opened = closed = failed = 0
    stop = time.monotonic() + secs

    async def one():
        nonlocal opened, closed, failed
        while time.monotonic() < stop:
            try:
                async with gate:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
            except (OSError, asyncio.TimeoutError):
                failed += 1
                await asyncio.sleep(0.5)
                continue
            opened += 1
            try:
                await asyncio.wait_for(reader.read(1), max(0.01, stop - time.monotonic()))
                closed += 1
            except OSError:
                closed += 1
            except asyncio.TimeoutError:
                pass
            writer.close()
            # Reconnect at once, with a little jitter so the clients do not move in step.
            await asyncio.sleep(random.uniform(0, 0.05))

    await asyncio.gather(*(one() for _ in range(count)))
    return {"connections_opened": opened, "closed_by_server": closed, "connect_failures": failed}


def main():
    if len(sys.argv) < 4 or sys.argv[1] not in ("prober", "nonreaders", "slowreader", "idle"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    mode, port, secs, rest = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
    # One descriptor per connection: use the whole hard limit (the caller raised it).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if mode == "prober":
        result = asyncio.run(prober(port, secs, rest[0]))
    elif mode == "nonreaders":
        result = asyncio.run(nonreaders(port, secs, int(rest[0]), rest[1]))
    elif mode == "slowreader":
        result = asyncio.run(slowreader(port, secs, rest[0]))
    else:
        result = asyncio.run(idle(port, secs, int(rest[0])))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
