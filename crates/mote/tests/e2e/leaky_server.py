"""A test helper for the soak check: a tiny HTTP server speaking the subset of mote serve's
protocol an embedding audit uses (model metadata, /v1/embeddings, /metrics with
process_resident_memory_bytes), which keeps LEAK bytes of every request forever — a
process that leaks a few KiB per request. It is a stand-in for a buggy server, not a
switch in the product.

usage: leaky_server.py MODEL_NAME DIGEST LEAK_BYTES   (prints "listening on http://HOST:PORT")
"""
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME, DIGEST, LEAK = sys.argv[1], sys.argv[2], int(sys.argv[3])
kept = []
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def send(self, code, body, content_type="application/json"):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.send_header("x-mote-model-digest", DIGEST)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == f"/v2/models/{NAME}":
            self.send(200, json.dumps({"name": NAME, "parameters": {"digest": DIGEST, "task": "text-embedding"},
                                       "inputs": [], "outputs": []}))
        elif self.path == "/metrics":
            self.send(200, f"process_resident_memory_bytes {rss_bytes()}\n", "text/plain")
        else:
            self.send(404, json.dumps({"error": {"message": "not found"}}))

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path != "/v1/embeddings":
            self.send(404, json.dumps({"error": {"message": "not found"}}))
            return
        texts = json.loads(body)["input"]
        texts = [texts] if isinstance(texts, str) else texts
        # The leak: bytes written (so resident), referenced forever.
        kept.append(bytes([len(kept) % 251]) * LEAK)
        data = [{"object": "embedding", "index": i, "embedding": [0.25] * 384} for i in range(len(texts))]
        self.send(200, json.dumps({"object": "list", "data": data, "model": NAME}))


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"listening on http://127.0.0.1:{server.server_address[1]}", file=sys.stderr, flush=True)
server.serve_forever()
