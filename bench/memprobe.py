"""Where an idle connection's memory goes: chatd in-process under tracemalloc.

python bench/memprobe.py            # serves on CHATPORT with the usual env
kill -USR1 <pid>                    # after opening N idle sockets: prints the
                                    # allocation growth since start-up, by line,
                                    # and the tasks and suspended coroutines
                                    # alive per socket (gc)

e.g. with bench/.kit (bench/kit.sh): node bench/.kit/load/bench.js --url
http://127.0.0.1:$CHATPORT --secret "$ACCESS_TOKEN_SECRET" --scenario conns
--hold 30, and the signal once the 2,000 sockets are open. tracemalloc counts
Python's allocations only (and slows chatd ~3x): the RSS per connection that
the conns scenario reports (with --pid, on a chatd without tracemalloc) is
the figure to compare with the peer.
"""

import asyncio
import gc
import inspect
import signal
import sys
import tracemalloc

from chatd import config
from chatd.server import Chatd, tune_gc


async def main() -> None:
    settings = config.load()
    daemon = Chatd(settings)
    await daemon.start()
    tune_gc()
    tracemalloc.start(8)
    base = tracemalloc.take_snapshot()

    def dump() -> None:
        snap = tracemalloc.take_snapshot()
        stats = snap.compare_to(base, "traceback")
        total = sum(s.size_diff for s in stats)
        sockets = len(daemon.sio.eio.sockets)
        print(
            f"sockets={sockets} growth={total / 1024:.0f} KiB "
            f"per socket={total / max(sockets, 1) / 1024:.1f} KiB",
            flush=True,
        )
        for s in stats[:25]:
            print(f"{s.size_diff / max(sockets, 1):8.0f} B/sock  count={s.count_diff}", flush=True)
            for line in s.traceback.format()[-6:]:
                print("      " + line, flush=True)
        per = max(sockets, 1)
        tasks = len(asyncio.all_tasks())
        coros = sum(
            1
            for o in gc.get_objects()
            if inspect.iscoroutine(o) and inspect.getcoroutinestate(o) == "CORO_SUSPENDED"
        )
        print(f"tasks={tasks} ({tasks / per:.2f} per socket) suspended coroutines={coros} "
              f"({coros / per:.2f} per socket)", flush=True)  # fmt: skip
        by_file = snap.compare_to(base, "filename")
        print("--- by file", flush=True)
        for s in by_file[:15]:
            print(f"{s.size_diff / max(sockets, 1):8.0f} B/sock  {s.traceback}", flush=True)

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
