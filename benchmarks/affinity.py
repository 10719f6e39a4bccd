"""CPU pinning for fair comparisons on CPU, and a record of which cores ran what.

On a 2-core machine a benchmark is only meaningful when each role has known cores: the
disaggregated cluster runs encoder + prefill on one core and decode on the other, the colocated
worker gets both, and the load generator stays off the decode core (``CoreLayout``).

Pinning a whole process means pinning every thread of it: ``sched_setaffinity(pid)`` on Linux
changes one thread only (torch's intra-op pool and a worker's model thread would keep their old
mask), so ``pin_process`` walks ``/proc/<pid>/task``. Threads created later inherit the mask of
the thread that creates them.

Ray actors are found by their process title, which Ray sets to ``ray::<ClassName>``
(``ray::DecodeWorker``; ``ray::DecodeWorker.generate`` while a method runs).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

ACTOR_TITLES = {"encoder": "EncoderWorker", "prefill": "PrefillWorker", "decode": "DecodeWorker",
                "colocated": "ColocatedWorker"}


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin_process(pid: int, cores: list[int]) -> int:
    """Pin every thread of ``pid`` to ``cores``; returns how many threads were pinned."""
    num = 0
    task_dir = Path(f"/proc/{pid}/task")
    tids = [int(t) for t in os.listdir(task_dir)] if task_dir.exists() else [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
            num += 1
        except (ProcessLookupError, PermissionError):  # the thread just ended
            pass
    return num


def pin_self(cores: list[int]) -> None:
    """Pin this process (all of its threads) to ``cores``."""
    pin_process(os.getpid(), cores)


def process_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def allowed_cores(pid: int) -> str:
    """``Cpus_allowed_list`` of ``pid``'s main thread, e.g. ``"0-1"``."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def descendants(root_pid: int) -> list[int]:
    """Every live process below ``root_pid`` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4; the name (field 2) may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def find_actors(root_pid: int) -> dict[str, list[int]]:
    """{role: [pid, ...]} of the worker actors below ``root_pid`` (a `tessera serve` process)."""
    found: dict[str, list[int]] = {}
    for pid in descendants(root_pid):
        title = process_title(pid)
        for role, cls in ACTOR_TITLES.items():
            if title == f"ray::{cls}" or title.startswith(f"ray::{cls}."):
                found.setdefault(role, []).append(pid)
    return found


@dataclass
class CoreLayout:
    """Which cores each role gets. ``client``: the load generator; ``router``: the `tessera serve`
    process (router, Ray driver and Ray's own daemons); ``vllm_compute``: the cores vLLM's compute
    thread binds to (``VLLM_CPU_OMP_THREADS_BIND``), inside ``vllm``."""

    client: list[int]
    router: list[int]
    encoder: list[int]
    prefill: list[int]
    decode: list[int]
    colocated: list[int]
    vllm: list[int]
    vllm_compute: list[int]
    notes: list[str] = field(default_factory=list)

    @classmethod
    def for_cores(cls, cores: list[int]) -> "CoreLayout":
        """2 cores: encoder + prefill + router + client on the first, decode alone on the second;
        colocated and vLLM get both. 3+: the client gets the last core to itself."""
        cores = sorted(cores)
        if len(cores) == 1:
            c = cores
            return cls(c, c, c, c, c, c, c, c, ["one core: every role shares it, ratios are not meaningful"])
        if len(cores) == 2:
            a, b = [cores[0]], [cores[1]]
            return cls(client=a, router=a, encoder=a, prefill=a, decode=b, colocated=cores, vllm=cores,
                       vllm_compute=b, notes=["2 cores: the load generator shares core "
                                              f"{cores[0]} with the router and encoder/prefill; decode has "
                                              f"core {cores[1]} to itself (vLLM's compute thread is bound to it)"])
        server, client = cores[:-1], [cores[-1]]
        front = [server[0]]
        heavy = server[:-1] if len(server) > 2 else front
        return cls(client=client, router=front, encoder=heavy, prefill=heavy, decode=[server[-1]],
                   colocated=server, vllm=server, vllm_compute=server[1:] if len(server) > 1 else server)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, items: list[str]) -> "CoreLayout":
        """``["router=1", "client=1", "colocated=0,1"]`` applied on top (ValueError names a bad item)."""
        roles = {k for k, v in asdict(self).items() if k != "notes"}
        changes: dict[str, list[int]] = {}
        for item in items:
            role, sep, cores = item.partition("=")
            try:
                changes[role.strip()] = [int(c) for c in cores.split(",") if c.strip()]
            except ValueError:
                changes[role] = []
            if not sep or role.strip() not in roles or not changes[role.strip()]:
                raise ValueError(f"--cores {item!r}: expected ROLE=CORE[,CORE...] with ROLE one of {sorted(roles)}")
        notes = self.notes + [f"overridden: {' '.join(items)}"] if items else self.notes
        return CoreLayout(**{**asdict(self), **changes, "notes": notes})

    def describe(self) -> str:
        def fmt(c: list[int]) -> str:
            return ",".join(map(str, c))

        return (f"client {fmt(self.client)}; disaggregated: router {fmt(self.router)}, encoder "
                f"{fmt(self.encoder)}, prefill {fmt(self.prefill)}, decode {fmt(self.decode)}; colocated worker "
                f"{fmt(self.colocated)} (router {fmt(self.router)}); vLLM {fmt(self.vllm)} (compute "
                f"{fmt(self.vllm_compute)})")
