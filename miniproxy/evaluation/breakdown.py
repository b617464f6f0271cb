# -*- test-case-name: tests.test_evaluation -*-
"""
Where the time goes: Figure 4's time to first byte taken apart with packet
captures on every device of the line.

C{python -m miniproxy.evaluation.breakdown [--runs N] [--quick] [--out
docs/evaluation] [--proxies 0,1,2,3] [--size 10] [--no-fast-open]}

The line and the proxies of Figure 4 (L{miniproxy.evaluation.figure4}),
flows of 10 KB (one window: the time to complete is the time to first byte
and a few segments), early and accept mode in turn.  Every device of every
host is captured (L{PacketCapture}: kernel timestamps on one clock), so
each flow's packets are seen leaving one host and arriving at the next.
Flows run one at a time, so the k-th connection on each link belongs to
the k-th flow.  For each flow:

  - B{links}: each traversal's one-way delay (a SYN leaving one end and
    arriving at the other, and the first byte of the answer back), less
    the configured delay: the delay line's own cost;
  - B{each proxy}: I{SYN to SYN} (the client's SYN arriving to the proxy's
    own SYN leaving: its reaction in early mode; a client-side round trip
    more in accept mode), I{request relay} (from the moment it could send
    the request, having both the request and its own handshake done, to
    sending it), I{response relay} (the first byte of the answer in, to
    out);
  - B{the ends}: the client's request delay (its SYN-ACK in, to its request
    out) and the server's answer delay (the request in, to the answer out);
  - B{replay}: the model's timeline (L{miniproxy.model}) with each of these
    measured medians put in where it happens: it should land on the
    measured TTFB, showing that these parts are the whole difference from
    the model.

The same for the Fast Open chains of L{miniproxy.evaluation.fastopen}
(mode C{tfo}; unless C{--no-fast-open}): there every SYN carries the
request, so a proxy's I{SYN to SYN} is its whole relay of the request, and
there is no separate request relay.

Outputs: C{breakdown.csv} (one row per flow and part) and C{breakdown.md}.
C{--from-csv} rebuilds the markdown from C{breakdown.csv} in C{--out},
without measuring.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import inlineCallbacks

from miniproxy.evaluation import report
from miniproxy.evaluation.common import (
    GAP,
    KB,
    MODEL_MODES,
    PROXIES,
    RATE,
    arguments,
    cells,
    proxyCountsFrom,
    readRows,
    runExperiment,
    runsFrom,
    setUpTransparent,
)
from miniproxy.evaluation.fastopen import setUpChain
from miniproxy.evaluation.figure4 import RTT, modesFor
from miniproxy.evaluation.packets import WireFlow, connections, inOrder
from miniproxy.evaluation.runner import (
    ACCEPT_PORT,
    CHAIN_LISTENER,
    EARLY_PORT,
    Bed,
    interleave,
    onBed,
)
from miniproxy.model import evenRTTs, ttfb
from miniproxy.testbed.topology import CLIENT_SIDE, SERVER_SIDE, LineTopology

RUNS = 10
QUICK_RUNS = 3
WARM_UP = 2
#: The flows' size, bytes.
SIZE = 10 * KB
NAME = "breakdown"
#: The file of its flows' parts, which C{--from-csv} reads.
FLOWS = f"{NAME}.csv"
PORTS = {"direct": EARLY_PORT, "early": EARLY_PORT, "accept": ACCEPT_PORT, "tfo": EARLY_PORT}
_ORDER = {"direct": 0, "early": 1, "accept": 2, "tfo": 3}


def linkPort(mode: str, link: int, hops: int) -> int:
    """
    The port a mode's flows connect to on a link: the server's, except
    between the proxies of a Fast Open chain (their explicit listeners).
    """
    if mode == "tfo" and 0 < link < hops - 1:
        return CHAIN_LISTENER
    return PORTS[mode]


def _ms(start: int | None, end: int | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start) / 1e6


def flowParts(
    chain: Sequence[tuple[WireFlow, WireFlow]],
    delays: Sequence[float],
) -> dict[str, float | None]:
    """
    The parts of one flow's time to first byte.

    @param chain: For each link, client's first: the connection as seen at
        the link's end nearer the client (leaving) and at its other end
        (arriving).
    @param delays: Each link's configured one-way delay, ms.
    @return: C{ttfb} (the client's SYN out to the first byte of the answer
        in, on its device), C{client} (its request delay), C{server} (its
        answer delay); for each link M{i}: C{linkI.out} and C{linkI.back}
        (the measured one-way delays towards the server, of the SYN, and
        back, of the answer's first byte, less the configured delay); for
        each proxy M{k}: C{pK.syn}, C{pK.request}, C{pK.response}; all ms.
    """
    parts: dict[str, float | None] = {}
    first, _ = chain[0]
    parts["ttfb"] = _ms(first.syn, first.firstData)
    parts["client"] = None if first.synData else _ms(first.synAck, first.request)
    _, last = chain[-1]
    parts["server"] = _ms(last.request, last.firstData)
    for i, ((near, far), delay) in enumerate(zip(chain, delays)):
        out = _ms(near.syn, far.syn)
        back = _ms(far.firstData, near.firstData)
        parts[f"link{i}.out"] = None if out is None else out - delay
        parts[f"link{i}.back"] = None if back is None else back - delay
    for k in range(1, len(chain)):
        arriving = chain[k - 1][1]
        leaving = chain[k][0]
        parts[f"p{k}.syn"] = _ms(arriving.syn, leaving.syn)
        could = None
        if arriving.request is not None and leaving.synAck is not None and not leaving.synData:
            could = max(arriving.request, leaving.synAck)
        parts[f"p{k}.request"] = _ms(could, leaving.request)
        parts[f"p{k}.response"] = _ms(leaving.firstData, arriving.firstData)
    return parts


def replay(parts: Mapping[str, float], delays: Sequence[float], mode: str) -> float:
    """
    The model's timeline of a flow's first byte with measured parts put in
    (see L{flowParts}): a link crossing takes its configured delay plus
    its measured extra, each proxy waits its measured SYN to SYN, request
    and response relay, the client and the server their delays.

    @param mode: C{early} or C{accept} (both use the measured SYN to SYN,
        which in accept mode holds the client-side handshake), C{direct},
        or C{tfo} (every SYN carries the request: each proxy's SYN to SYN
        is its relay of the request).
    @return: Milliseconds from the client's SYN to the first byte.
    """
    hops = len(delays)

    def out(i: int) -> float:
        return delays[i] + parts.get(f"link{i}.out", 0.0)

    def back(i: int) -> float:
        return delays[i] + parts.get(f"link{i}.back", 0.0)

    if mode == "tfo":
        first = sum(out(i) for i in range(hops)) + parts.get("server", 0.0)
        first += sum(parts.get(f"p{k}.syn", 0.0) for k in range(1, hops))
        first += sum(back(i) for i in range(hops))
        return first + sum(parts.get(f"p{k}.response", 0.0) for k in range(1, hops))
    synArrives = out(0)
    requestArrives = out(0) + back(0) + parts.get("client", 0.0) + out(0)
    for k in range(1, hops):
        synLeaves = synArrives + parts.get(f"p{k}.syn", 0.0)
        handshake = synLeaves + out(k) + back(k)
        requestLeaves = max(requestArrives, handshake) + parts.get(f"p{k}.request", 0.0)
        synArrives = synLeaves + out(k)
        requestArrives = requestLeaves + out(k)
    first = requestArrives + parts.get("server", 0.0)
    for k in range(hops - 1, -1, -1):
        first += back(k)
        if k > 0:
            first += parts.get(f"p{k}.response", 0.0)
    return first


def analyse(
    line: LineTopology,
    packets: Mapping[tuple[str, str], list[Any]],
    results: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """
    Take every measured flow apart.

    @param packets: The captures, by C{(host, device)}.
    @param results: The client's results (warm-up flows included), in
        order.
    @return: One row per flow: C{proxies}, C{mode}, C{run}, C{clientTtfb}
        (the client program's), and the parts of L{flowParts}.
    """
    names = line.names
    delays = [spec.directions[0].delay for spec in line.specs]
    rows = []
    hops = len(line.specs)
    for mode in PORTS:
        mine = [r for r in results if (r.get("tag") or {}).get("mode") == mode]
        if not mine:
            continue
        perLink = []
        for i in range(hops):
            port = linkPort(mode, i, hops)
            near = inOrder(connections(packets[names[i], line.interface(i, SERVER_SIDE)], port, True))
            far = inOrder(connections(packets[names[i + 1], line.interface(i + 1, CLIENT_SIDE)], port, False))
            perLink.append((near, far))
        for index, result in enumerate(mine):
            if result["tag"].get("warm") or not result.get("ok"):
                continue
            chain = []
            for near, far in perLink:
                if index >= len(near) or index >= len(far):
                    break
                chain.append((near[index], far[index]))
            if len(chain) != len(perLink) or chain[0][0].port != result.get("port"):
                raise RuntimeError(f"flow {index} of {mode} mode not found in every capture")
            row: dict[str, Any] = {
                "proxies": len(line.specs) - 1, "mode": mode, "run": result["tag"]["run"],
                "clientTtfb": result["ttfb"] * 1000,
            }
            row.update(flowParts(chain, delays))
            rows.append(row)
    return rows


@inlineCallbacks
def measure(
    reactor: Any,
    directory: str,
    proxyCounts: Sequence[int] = PROXIES,
    runs: int = RUNS,
    size: int = SIZE,
    rtt: float = RTT,
    rate: int | None = RATE,
    gap: float = GAP,
    fastOpen: bool = True,
    log: Callable[[str], None] = lambda line: None,
) -> Any:
    """
    Run the traced flows, one line per number of proxies (and one more per
    number of proxies for the Fast Open chains).

    @param fastOpen: Whether to trace the Fast Open chains too.
    @return: A L{Deferred} firing with the rows of L{analyse}.
    """
    rows: list[dict[str, Any]] = []
    lines = [(proxies, False) for proxies in proxyCounts]
    if fastOpen:
        lines += [(proxies, True) for proxies in proxyCounts]
    for proxies, chain in lines:
        line = LineTopology(proxies=proxies, rtt=rtt, rate=rate, ipv6=False)
        where = os.path.join(directory, f"proxies{proxies}{'-fastopen' if chain else ''}")
        os.makedirs(where, exist_ok=True)

        @inlineCallbacks
        def body(bed: Bed, proxies: int = proxies, chain: bool = chain) -> Any:
            captures = {}
            for i, node in enumerate(bed.line.nodes):
                for side in (CLIENT_SIDE, SERVER_SIDE):
                    if (i == 0 and side == CLIENT_SIDE) or (i == len(bed.line.nodes) - 1 and side == SERVER_SIDE):
                        continue
                    device = bed.line.interface(i, side)
                    captures[node.shortName, device] = bed.capture(node, device)
            modes = ["tfo"] if chain else modesFor(proxies)
            plan = cells(bed.line.serverAddress, modes, [size], proxies=proxies)
            flows = interleave(plan, runs, WARM_UP + (1 if chain else 0), seed=proxies)
            log(f"{NAME}: {proxies} proxies{', Fast Open' if chain else ''}: {len(flows)} flows")
            results = yield bed.runFlows(flows, gap)
            packets = {key: capture.read() for key, capture in captures.items()}
            lost = sum(capture.dropped for capture in captures.values())
            if lost:
                raise RuntimeError(f"the captures lost {lost} packets")
            return analyse(bed.line, packets, results)

        setUp = setUpChain if chain else setUpTransparent
        rows += yield onBed(reactor, line, where, setUp, body, fastOpen=chain)
    return rows


def summarise(rows: Sequence[Mapping[str, Any]], rtt: float = RTT, rate: int | None = RATE) -> list[dict[str, Any]]:
    """
    The median of every part per number of proxies and mode, the model's
    TTFB and the replay of the medians.
    """
    out = []
    keys = sorted({(r["proxies"], r["mode"]) for r in rows}, key=lambda k: (_ORDER[k[1]] == 3, k[0], _ORDER[k[1]]))
    for proxies, mode in keys:
        group = [r for r in rows if r["proxies"] == proxies and r["mode"] == mode]
        names = [k for k in group[0] if k not in ("proxies", "mode", "run")]
        medians = {
            name: report.summarise(r[name] for r in group if r.get(name) is not None).median
            for name in names
        }
        hops = proxies + 1
        delays = [rtt / (2 * hops)] * hops
        model = ttfb(evenRTTs(rtt / 1000, proxies), MODEL_MODES[mode], rate=rate) * 1000
        cell = {"proxies": proxies, "mode": mode, "flows": len(group), "model": model, **medians}
        cell["replay"] = replay(medians, delays, mode)
        out.append(cell)
    return out


def markdown(cellList: Sequence[Mapping[str, Any]], command: str, before: Mapping[str, str]) -> str:
    """
    The markdown report: one table of medians per number of proxies and
    mode.
    """
    notes = (
        "Medians in ms over the traced flows (10 KB, Figure 4's line and proxies), from "
        "kernel timestamps of captures on every device. *excess* is the measured TTFB less the "
        "model; *links* is the sum, over every link crossing on the way, of the crossing's "
        "measured delay less the configured one (out: a SYN; back: the answer's first byte); "
        "*SYN→SYN*, *request*, *response* are each proxy's (p1, p2, ...); *replay* is the "
        "model's timeline with these medians put in, to compare with the measured TTFB. Mode "
        "`tfo` is the Fast Open chain (every SYN carries the request: SYN→SYN is the whole "
        "relay of the request; the model is `Mode.TFO_ALL`)."
    )
    text = [report.preamble("Where the time goes: TTFB taken apart", command, before, notes)]
    table = []
    for c in cellList:
        proxies = c["proxies"]
        hops = proxies + 1
        linkOut = [c.get(f"link{i}.out") for i in range(hops)]
        linkBack = [c.get(f"link{i}.back") for i in range(hops)]

        def each(what: str) -> str:
            return " / ".join(report.ms(c.get(f"p{k}.{what}", float("nan")), 2)
                              for k in range(1, proxies + 1)) or "–"

        table.append((
            proxies, c["mode"], c["flows"],
            report.ms(c["ttfb"]), report.ms(c["clientTtfb"]), report.ms(c["model"]),
            report.ms(c["ttfb"] - c["model"], 2),
            " / ".join(report.ms(v, 2) for v in linkOut),
            " / ".join(report.ms(v, 2) for v in linkBack),
            each("syn"), each("request"), each("response"),
            report.ms(c["client"], 2), report.ms(c["server"], 2),
            report.ms(c["replay"]),
        ))
    text.append(report.markdownTable(
        ["proxies", "mode", "flows", "TTFB (wire)", "TTFB (client)", "model", "excess",
         "links out, extra", "links back, extra", "SYN→SYN", "request relay", "response relay",
         "client", "server", "replay"],
        table,
    ))
    return "\n".join(text)


COLUMNS_FIRST = ("proxies", "mode", "run", "clientTtfb", "ttfb", "client", "server")


def write(out: str, rows: Sequence[Mapping[str, Any]], command: str, before: Mapping[str, str]) -> list[str]:
    """
    Write the outputs into directory C{out}.

    @return: The paths written.
    """
    columns = list(COLUMNS_FIRST)
    for r in rows:
        columns += [k for k in r if k not in columns]
    return report.writeOutputs(out, NAME, [("", rows, columns)],
                               markdown(summarise(rows), command, before))


def main(argv: Sequence[str] | None = None) -> None:
    """
    C{python -m miniproxy.evaluation.breakdown}; C{--help} says more.
    """
    parser = arguments("python -m miniproxy.evaluation.breakdown",
                       "Figure 4's TTFB taken apart with packet captures.", FLOWS, RUNS,
                       quick=QUICK_RUNS, proxies=True)
    parser.add_argument("--size", type=float, default=SIZE / KB, help="flow size in KB (10)")
    parser.add_argument("--no-fast-open", action="store_true", help="skip the Fast Open chains")

    def measureAll(reactor: Any, directory: str, args: argparse.Namespace) -> Any:
        return measure(reactor, directory, proxyCounts=proxyCountsFrom(args), runs=runsFrom(args),
                       gap=args.gap, size=int(args.size * KB), fastOpen=not args.no_fast_open,
                       log=print)

    runExperiment(argv, parser, NAME, FLOWS,
                  lambda path: readRows(path, {"proxies": int, "mode": str, "run": int}),
                  measureAll, write)


if __name__ == "__main__":
    main()
