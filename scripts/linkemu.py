"""linkemu: a TCP proxy that emulates a slow, lossy network link (this machine has no `tc netem`).

    .venv/bin/python scripts/linkemu.py --listen 127.0.0.1:9001 --target 127.0.0.1:8001 \\
        --delay-ms 20 --jitter-ms 2 --rate-mbit 10 [--loss 0.01] [--seed N]

Clients connect to --listen; each connection is forwarded to --target, and every byte in EITHER
direction goes through the emulated link:

  --listen HOST:PORT   where to accept connections (PORT 0 picks a free port; the line printed
                       at start names the real one)
  --target HOST:PORT   the server to forward each connection to
  --delay-ms D         one-way delay added to every byte, each direction (RTT grows by 2*D)
  --jitter-ms J        uniform jitter in [-J, +J] per segment; never reorders bytes: a segment is
                       released no earlier than the one before it (total delay is clamped at 0)
  --rate-mbit R        bandwidth cap per direction, 0 = unlimited. A segment of n bytes occupies
                       the link for n*8/R seconds (a virtual clock, so a bulk transfer converges
                       to R); data queued behind it waits its turn
  --loss P             per-segment loss probability. A TCP proxy cannot drop bytes, so it emulates
                       what TCP does on a loss: the lost segment arrives one retransmission
                       timeout late, RTO = max(200 ms, 2 * base RTT) (Linux's minimum RTO), and
                       everything behind it waits (head-of-line blocking). Reads are cut into
                       segments of at most 1448 bytes (an Ethernet MSS) for this
  --seed N             seed the jitter/loss random generator, for repeatable runs
  --queue-segments K   at most K segments (K*1448 bytes) buffered per direction; beyond that the
                       proxy stops reading, so a fast sender gets ordinary TCP backpressure

A FIN is delayed like data: a half-close (EOF from one side) reaches the other side as a
write_eof after the bytes before it. If either side resets, or the target cannot be reached,
both connections are closed. Connection setup is not delayed. Once listening it prints
`linkemu listening on HOST:PORT -> HOST:PORT (...)`, flushed; SIGTERM or Ctrl-C stops it cleanly.

From Python: `server = await serve(listen_host, listen_port, target_host, target_port, LinkParams(...))`.
"""
import argparse
import asyncio
import random
import signal
import sys
from dataclasses import dataclass

from devices.address import parse_address

MSS = 1448  # bytes per emulated segment (1500-byte MTU minus IP/TCP headers with timestamps)
MIN_RTO_S = 0.2  # Linux TCP_RTO_MIN


@dataclass(frozen=True)
class LinkParams:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_mbit: float = 0.0  # 0 = unlimited
    loss: float = 0.0
    seed: int | None = None
    queue_segments: int = 1024

    @property
    def rto_s(self) -> float:
        return max(MIN_RTO_S, 2 * (2 * self.delay_ms / 1000))

    def describe(self) -> str:
        rate = f"{self.rate_mbit:g} Mbit/s" if self.rate_mbit > 0 else "unlimited"
        return f"delay {self.delay_ms:g} ms, jitter {self.jitter_ms:g} ms, rate {rate}, loss {self.loss:g}"


async def _read_side(reader: asyncio.StreamReader, queue: asyncio.Queue, link: LinkParams, rng: random.Random):
    """Read from one socket, cut into segments, stamp each with its release time, queue it."""
    loop = asyncio.get_running_loop()
    link_free = 0.0  # when the emulated link finishes serializing what is already on it
    last_release = 0.0  # release times never go backwards: no reordering within the stream
    while True:
        data = await reader.read(64 * 1024)  # b"" = EOF; it travels as an empty segment (a FIN)
        now = loop.time()
        for i in range(0, max(len(data), 1), MSS):
            seg = data[i:i + MSS]
            serialize = len(seg) * 8 / (link.rate_mbit * 1e6) if link.rate_mbit > 0 else 0.0
            link_free = max(link_free, now) + serialize
            delay = max(0.0, link.delay_ms + rng.uniform(-link.jitter_ms, link.jitter_ms)) / 1000
            release = link_free + delay
            if seg and link.loss > 0 and rng.random() < link.loss:
                release += link.rto_s  # lost, retransmitted after an RTO
            last_release = max(last_release, release)
            await queue.put((last_release, seg))  # blocks when the queue is full: backpressure
        if not data:
            return


async def _write_side(writer: asyncio.StreamWriter, queue: asyncio.Queue):
    """Wait for each segment's release time, write it; an empty segment is the EOF."""
    loop = asyncio.get_running_loop()
    pending = None  # a segment taken off the queue early that is not due yet
    while True:
        release, seg = pending if pending else await queue.get()
        pending = None
        if (wait := release - loop.time()) > 0:
            await asyncio.sleep(wait)
        if not seg:
            if writer.can_write_eof():
                writer.write_eof()
            await writer.drain()
            return
        writer.write(seg)
        while not queue.empty():  # also write every queued segment already due, then drain once
            pending = queue.get_nowait()
            if not pending[1] or pending[0] > loop.time():
                break
            writer.write(pending[1])
            pending = None
        await writer.drain()


async def _handle(client_r, client_w, target_host, target_port, link: LinkParams, rng: random.Random):
    try:
        target_r, target_w = await asyncio.wait_for(asyncio.open_connection(target_host, target_port), 10)
    except (OSError, asyncio.TimeoutError) as e:
        print(f"linkemu: cannot connect to {target_host}:{target_port}: {e!r}", file=sys.stderr, flush=True)
        client_w.transport.abort()
        return
    up, down = asyncio.Queue(link.queue_segments), asyncio.Queue(link.queue_segments)
    tasks = [
        asyncio.create_task(_read_side(client_r, up, link, rng)),
        asyncio.create_task(_write_side(target_w, up)),
        asyncio.create_task(_read_side(target_r, down, link, rng)),
        asyncio.create_task(_write_side(client_w, down)),
    ]
    clean = False
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        clean = all(not t.exception() for t in done) and len(done) == len(tasks)
    finally:  # both sides finished (half-closes both ways), or one failed, or we are shutting down
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (client_w, target_w):
            if clean:
                w.close()  # everything is flushed already
            else:
                w.transport.abort()  # a side went away: do not wait for a flush that never comes


async def serve(listen_host: str, listen_port: int, target_host: str, target_port: int,
                link: LinkParams) -> asyncio.Server:
    """Start the proxy on the running loop; close the returned server to stop accepting."""
    rng = random.Random(link.seed)

    async def on_connect(reader, writer):
        try:
            await _handle(reader, writer, target_host, target_port, link, rng)
        except asyncio.CancelledError:
            pass  # shutting down; a cancelled connection task would be logged as an error by asyncio

    return await asyncio.start_server(on_connect, listen_host, listen_port)


def _address(parser: argparse.ArgumentParser, text: str, what: str, listen: bool = False) -> tuple[str, int]:
    """--listen / --target HOST:PORT (port 0 only for --listen: the OS picks one), or exit 2 saying why."""
    try:
        return parse_address(text, what, listen=listen)
    except ValueError as err:
        parser.error(str(err))


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _probability(text: str) -> float:
    value = _non_negative(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}")
    return value


async def _main(args: argparse.Namespace) -> int:
    link = LinkParams(args.delay_ms, args.jitter_ms, args.rate_mbit, args.loss, args.seed, args.queue_segments)
    (lhost, lport), (thost, tport) = args.listen, args.target
    try:
        server = await serve(lhost, lport, thost, tport, link)
    except OSError as e:
        print(f"linkemu: cannot listen on {lhost}:{lport}: {e}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    port = server.sockets[0].getsockname()[1]
    print(f"linkemu listening on {lhost}:{port} -> {thost}:{tport} ({link.describe()})", flush=True)
    await stop.wait()
    server.close()  # stop accepting; asyncio.run then cancels the open connections, which abort
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--target", required=True, metavar="HOST:PORT")
    parser.add_argument("--delay-ms", type=_non_negative, default=0.0)
    parser.add_argument("--jitter-ms", type=_non_negative, default=0.0)
    parser.add_argument("--rate-mbit", type=_non_negative, default=0.0, help="0 = unlimited")
    parser.add_argument("--loss", type=_probability, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--queue-segments", type=int, default=1024)
    args = parser.parse_args()
    args.listen = _address(parser, args.listen, "--listen", listen=True)
    args.target = _address(parser, args.target, "--target")
    if args.queue_segments < 1:
        parser.error("argument --queue-segments: expected an integer >= 1")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
