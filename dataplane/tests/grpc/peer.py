"""Real gRPC servers and clients (grpcio) for dataplane/tests/grpc.rs.

  peer.py serve NAME   a server named NAME on 127.0.0.1:0; prints {"port": P}, then reads
                       one mode per line on stdin and answers "ok" ("connections"
                       answers how many client connections its Say calls came over,
                       "most" the most Say calls it served at once).
  peer.py serve NAME MAX  the same, allowing MAX concurrent streams per connection
  peer.py call ADDR N [--deadline S] [--concurrency C] [--stream K] [--upload K --gap S]
                       N calls over ONE channel (one HTTP/2 connection); prints a JSON summary.
                       --stream: server-streaming Count of K messages; --upload:
                       client-streaming Collect of K messages S seconds apart.

Messages are raw bytes (no generated code), shaped as examples/grpc/echo.proto's so that
`fleetlb backend --grpc` answers them too: Say's request is ignored and its answer is the
server's name; Count's request is CountRequest{n: K} and it answers K messages. Every answer carries the trailing metadata
`x-instance` (the server's name) and `x-deadline-ms` (the time the server was given, from
grpc-timeout; -1 when none).

Modes: ok (2 ms), steady (20 ms), slow (60 ms), hang (10 s), unavailable (UNAVAILABLE at once),
invalid (INVALID_ARGUMENT at once), exhausted (RESOURCE_EXHAUSTED at once), notserving (health check answers NOT_SERVING), stall (a
stream's first message at once, then 10 s before each next).
"""

import json
import sys
import threading
import time
from collections import Counter
from concurrent import futures

import grpc

DELAY = {"ok": 0.002, "steady": 0.02, "slow": 0.06, "hang": 10.0}


class Peer:
    def __init__(self, name):
        self.name = name
        self.mode = "ok"
        # The client addresses Say calls came from: one per HTTP/2 connection.
        self.peers = set()
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def trailers(self, context):
        left = context.time_remaining()
        ms = -1 if left is None or left > 1e6 else int(left * 1000)
        return (("x-instance", self.name), ("x-deadline-ms", str(ms)))

    def fail(self, context):
        if self.mode == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        if self.mode == "exhausted":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "message larger than max")
        if self.mode == "invalid":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad argument")

    def say(self, request, context):
        self.peers.add(context.peer())
        context.set_trailing_metadata(self.trailers(context))
        self.fail(context)
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(DELAY.get(self.mode, 0.002))
        with self.lock:
            self.now -= 1
        return self.name.encode()

    def count(self, request, context):
        context.set_trailing_metadata(self.trailers(context))
        self.fail(context)
        # CountRequest{n}: field 1, a varint below 128.
        k = request[1] if len(request) > 1 else 3
        for i in range(k):
            time.sleep(10.0 if self.mode == "stall" and i > 0 else DELAY.get(self.mode, 0.002))
            yield f"{self.name}:{i}".encode()

    def collect(self, requests, context):
        context.set_trailing_metadata(self.trailers(context))
        n = sum(1 for _ in requests)
        self.fail(context)
        return str(n).encode()

    def check(self, request, context):
        # HealthCheckResponse{status}: 1 SERVING, 2 NOT_SERVING.
        return b"\x08\x02" if self.mode == "notserving" else b"\x08\x01"


def serve(name, max_streams=None):
    p = Peer(name)
    options = [("grpc.max_concurrent_streams", max_streams)] if max_streams else []
    s = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=options)
    s.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "fleetlb.demo.Echo",
                {
                    "Say": grpc.unary_unary_rpc_method_handler(p.say),
                    "Count": grpc.unary_stream_rpc_method_handler(p.count),
                    "Collect": grpc.stream_unary_rpc_method_handler(p.collect),
                },
            ),
            grpc.method_handlers_generic_handler(
                "grpc.health.v1.Health",
                {"Check": grpc.unary_unary_rpc_method_handler(p.check)},
            ),
        )
    )
    port = s.add_insecure_port("127.0.0.1:0")
    s.start()
    print(json.dumps({"port": port}), flush=True)
    for line in sys.stdin:
        if line.strip() == "connections":
            print(len(p.peers), flush=True)
            continue
        if line.strip() == "most":
            print(p.most, flush=True)
            continue
        p.mode = line.strip()
        print("ok", flush=True)
    s.stop(0)


def call(addr, n, deadline, concurrency, stream, upload):
    channel = grpc.insecure_channel(addr)
    say = channel.unary_unary("/fleetlb.demo.Echo/Say")
    count = channel.unary_stream("/fleetlb.demo.Echo/Count")
    collect = channel.stream_unary("/fleetlb.demo.Echo/Collect")

    def messages(k, gap):
        for i in range(k):
            if i:
                time.sleep(gap)
            yield b"m"
    by_instance, codes = Counter(), Counter()
    out = {"details": [], "trailers": None, "messages": [], "elapsed_ms": []}
    lock = threading.Lock()

    def one(_):
        t = time.monotonic()
        msgs = []
        try:
            if stream:
                it = count(bytes([0x08, stream]), timeout=deadline)
                for m in it:
                    msgs.append(m.decode())
                md, code = it.trailing_metadata(), it.code()
            elif upload[0]:
                r, c = collect.with_call(messages(*upload), timeout=deadline)
                msgs, md, code = [r.decode()], c.trailing_metadata(), c.code()
            else:
                _, c = say.with_call(b"hi", timeout=deadline)
                msgs, md, code = [], c.trailing_metadata(), c.code()
        except grpc.RpcError as e:
            md, code = e.trailing_metadata() or (), e.code()
            with lock:
                out["details"].append(e.details())
        md = dict(md or ())
        with lock:
            codes[code.name] += 1
            out["elapsed_ms"].append(int((time.monotonic() - t) * 1000))
            if "x-instance" in md:
                by_instance[md["x-instance"]] += 1
                out["trailers"] = md
            out["messages"].extend(msgs)

    with futures.ThreadPoolExecutor(max_workers=concurrency) as ex:
        list(ex.map(one, range(n)))
    out["by_instance"] = by_instance
    out["codes"] = codes
    out["details"] = out["details"][:5]
    print(json.dumps(out))


def main():
    args = sys.argv[1:]
    if args[0] == "serve":
        serve(args[1], int(args[2]) if len(args) > 2 else None)
        return
    opts = {"--deadline": None, "--concurrency": "1", "--stream": "0", "--upload": "0", "--gap": "0"}
    rest = args[3:]
    for k, v in zip(rest[::2], rest[1::2]):
        opts[k] = v
    deadline = float(opts["--deadline"]) if opts["--deadline"] else None
    upload = (int(opts["--upload"]), float(opts["--gap"]))
    call(args[1], int(args[2]), deadline, int(opts["--concurrency"]), int(opts["--stream"]), upload)


if __name__ == "__main__":
    main()
