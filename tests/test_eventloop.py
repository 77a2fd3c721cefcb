"""chatd.eventloop: uvloop, made safe for what aiopg and redis-py do when a
connection is lost (real sockets; the fault tests do the same end to end)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from chatd import eventloop

pytestmark = pytest.mark.skipif(eventloop.uvloop is None, reason="uvloop is not installed")


def _run(coro_fn):
    loop = eventloop.Loop()
    try:
        return loop.run_until_complete(coro_fn(loop))
    finally:
        loop.close()


def _reset(peer: socket.socket) -> None:
    """Close ``peer`` with a TCP reset, as PostgreSQL's end looks when it is killed."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


def test_a_descriptor_closed_under_its_poll_does_not_poison_its_number():
    async def scenario(loop):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            address = listener.getsockname()
            first = socket.create_connection(address)
            peer, _ = listener.accept()
            first.setblocking(False)
            number = first.fileno()
            woke = asyncio.Event()
            loop.add_reader(number, woke.set)
            _reset(peer)  # the poll reports an error; uvloop closes its handle
            await asyncio.wait_for(woke.wait(), 10)
            await asyncio.sleep(0.05)
            first.close()  # closed without remove_reader, as libpq does

            second = socket.create_connection(address)
            peer2, _ = listener.accept()
            second.setblocking(False)
            assert second.fileno() == number  # the number is given out again
            readable = asyncio.Event()
            loop.add_reader(second.fileno(), readable.set)  # uvloop alone: RuntimeError
            peer2.send(b"x")
            await asyncio.wait_for(readable.wait(), 10)
            loop.remove_reader(second.fileno())
            second.close()
            peer2.close()
            return True

    assert _run(scenario)


def test_writing_to_a_lost_connection_raises_an_oserror():
    async def scenario(loop):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            lost = asyncio.Event()

            class Protocol(asyncio.Protocol):
                def connection_lost(self, exc):
                    lost.set()

            connect = loop.create_connection(Protocol, *listener.getsockname())
            transport, _ = await connect
            peer, _ = listener.accept()
            transport.write(b"ping")
            _reset(peer)
            await asyncio.wait_for(lost.wait(), 10)
            # uvloop alone raises RuntimeError here, which redis-py does not expect.
            with pytest.raises(ConnectionResetError):
                transport.write(b"again")
            with pytest.raises(ConnectionResetError):
                transport.writelines([b"a", b"b"])
            assert transport.is_closing()  # everything else is the transport's own
            return True

    assert _run(scenario)


@pytest.mark.parametrize("which", ["uvloop", "asyncio"])
def test_run_uses_the_loop_it_is_asked_for(which):
    async def kind():
        return type(asyncio.get_running_loop())

    got = []

    async def main():
        got.append(await kind())

    eventloop.run(main(), which)
    assert (got[0] is eventloop.Loop) == (which == "uvloop")
