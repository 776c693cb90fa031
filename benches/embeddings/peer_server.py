#!/usr/bin/env python3
"""The peer of the embeddings benchmark: sentence-transformers, in-process and behind HTTP.

Two modes, both on the CPU with torch intra-op threads = --threads (2 on the reference machine):

  serve         a minimal OpenAI-style /v1/embeddings server on the standard library's
                ThreadingHTTPServer (HTTP/1.1 keep-alive, one thread per connection). Each request
                is answered by exactly one `model.encode(inputs, batch_size=32)` call, under one
                lock (--concurrency lock, the default: requests are serialized, nothing is batched
                across requests) or without it (--concurrency free: concurrent encode calls share
                the two cores). GET /ready answers 200 once the model is loaded; the socket opens
                only after that, so "process start to /ready 200" includes imports and loading.
                Vectors go back as JSON floats or, with "encoding_format": "base64", as
                little-endian float32 bytes, the same wire format nstream uses.

  encode-bench  `model.encode(corpus, batch_size=B)` over the whole corpus (the best offline mode
                of sentence-transformers: its own length-sorted batching), best of --rounds after a
                warm-up; prints one JSON line and writes the embeddings (float32, row-major) to
                --dump for the correctness guard.

Runs in the venv that benches/embeddings/run.sh prepares (torch, sentence-transformers), with
HF_HUB_OFFLINE=1 and the weights that scripts/offline-models.sh lays out.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SERVED_NAME = "all-minilm-l6-v2"


def load_model(threads: int):
    import torch

    torch.set_num_threads(threads)
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(MODEL, device="cpu")
    model.eval()
    return model


def versions() -> dict:
    import torch
    import transformers
    import sentence_transformers

    return {
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "torch_threads": torch.get_num_threads(),
    }


def serve(args: argparse.Namespace) -> int:
    import numpy as np

    model = load_model(args.threads)
    model.encode(["warm up the model"], batch_size=32)
    lock = threading.Lock() if args.concurrency == "lock" else None
    info = versions()

    def encode(texts: list[str]):
        if lock is None:
            return model.encode(texts, batch_size=32, convert_to_numpy=True)
        with lock:
            return model.encode(texts, batch_size=32, convert_to_numpy=True)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Without TCP_NODELAY the headers and the body leave in two writes and the client's delayed
        # ACK adds ~40 ms to every answer: that would make the peer look slow for no good reason.
        disable_nagle_algorithm = True

        def log_message(self, *_args) -> None:  # quiet
            pass

        def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path in ("/ready", "/health"):
                self.reply(200, b"ready", "text/plain")
            elif self.path == "/versions":
                self.reply(200, json.dumps(info).encode())
            else:
                self.reply(404, b'{"error":"not found"}')

        def do_POST(self) -> None:
            if self.path != "/v1/embeddings":
                self.reply(404, b'{"error":"not found"}')
                return
            length = int(self.headers.get("content-length", "0"))
            request = json.loads(self.rfile.read(length))
            inputs = request["input"]
            if isinstance(inputs, str):
                inputs = [inputs]
            vectors = encode(inputs).astype(np.float32, copy=False)
            if request.get("encoding_format") == "base64":
                data = [
                    {"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
                    for i, v in enumerate(vectors)
                ]
            else:
                data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
            body = {"object": "list", "data": data, "model": SERVED_NAME, "usage": {"prompt_tokens": 0, "total_tokens": 0}}
            self.reply(200, json.dumps(body).encode())

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

    server = Server((args.host, args.port), Handler)
    print(f"peer listening on {args.host}:{args.port} ({args.concurrency})", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    return 0


def encode_bench(args: argparse.Namespace) -> int:
    import numpy as np

    with open(args.corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    model = load_model(args.threads)
    model.encode(texts[:64], batch_size=args.batch_size)
    times = []
    embeddings = None
    for _ in range(args.rounds):
        start = time.perf_counter()
        embeddings = model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
        times.append(time.perf_counter() - start)
    if args.dump:
        np.asarray(embeddings, dtype="<f4").tofile(args.dump)
    best = min(times)
    print(
        json.dumps(
            {
                "sentences": len(texts),
                "batch_size": args.batch_size,
                "rounds_seconds": [round(t, 4) for t in times],
                "best_seconds": round(best, 4),
                "sentences_per_second": round(len(texts) / best, 1),
                "versions": versions(),
            }
        )
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--concurrency", choices=["lock", "free"], default="lock")
    b = sub.add_parser("encode-bench")
    b.add_argument("--corpus", required=True)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--dump")
    args = parser.parse_args()
    return serve(args) if args.mode == "serve" else encode_bench(args)


if __name__ == "__main__":
    sys.exit(main())
