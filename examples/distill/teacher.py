#!/usr/bin/env python3
"""A local teacher for examples/distill: a small server speaking OpenAI's chat-completions API
that answers the order-extraction task correctly, by rules (orders.extract).

It stands in for GPT-4o or Azure OpenAI, which cannot be reached from every machine: with a real
key, point the teacher MegaModel of distill.yaml at the provider instead and run the same file.
It counts the requests it answers (GET /stats, and --count-file) so that tests can check that a
resumed run pays no teacher call twice.

Usage: teacher.py [--port 8765] [--api-key local-teacher] [--count-file FILE] [--delay SECONDS]
"""
import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import orders  # noqa: E402


class Teacher(BaseHTTPRequestHandler):
    api_key = "local-teacher"
    count_file = None
    delay = 0.0
    requests = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a killed run): nothing to answer

    def send_json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status, message, kind, code=None):
        self.send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": code}})

    def do_GET(self):
        if self.path == "/stats":
            self.send_json(200, {"chat_completions": Teacher.requests})
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": "order-teacher", "object": "model", "created": 0, "owned_by": "local"}]})
        else:
            self.error(404, f"no route {self.path}", "invalid_request_error")

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            return self.error(404, f"no route {self.path}", "invalid_request_error")
        if self.headers.get("Authorization") != f"Bearer {Teacher.api_key}":
            return self.error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            messages = body["messages"]
            question = next(m["content"] for m in reversed(messages) if m.get("role") == "user")
        except (ValueError, KeyError, StopIteration, TypeError):
            return self.error(400, "expected a JSON body with messages holding a user message",
                              "invalid_request_error")
        if Teacher.delay:
            time.sleep(Teacher.delay)
        if isinstance(question, list):
            question = " ".join(part.get("text", "") for part in question if isinstance(part, dict))
        with Teacher.lock:
            Teacher.requests += 1
            if Teacher.count_file:
                Path(Teacher.count_file).write_text(f"{Teacher.requests}\n")
        order = orders.extract(question)
        answer = json.dumps(order) if order else json.dumps({"error": "no order found"})
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(answer.split()),
                 "total_tokens": prompt_tokens + len(answer.split())}
        created, model = int(time.time()), body.get("model", "order-teacher")
        ident = f"chatcmpl-teacher-{Teacher.requests}"
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for delta, finish in (({"role": "assistant", "content": answer}, None), ({}, "stop")):
                chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            return
        self.send_json(200, {
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": "stop"}],
            "usage": usage,
        })


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed)")
    parser.add_argument("--api-key", default="local-teacher")
    parser.add_argument("--count-file", help="a file holding the number of answered requests")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer (tests)")
    args = parser.parse_args()
    Teacher.api_key, Teacher.count_file, Teacher.delay = args.api_key, args.count_file, args.delay
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Teacher)
    print(f"local teacher on http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
