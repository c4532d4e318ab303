#!/usr/bin/env python3
"""`kubectl port-forward` checked as a user checks it (e2e/real.sh, e2e/demo.sh).

  portforward.py serve PORT      the pod's HTTP server on 127.0.0.1:PORT: GET /x answers "served /x"
  portforward.py check PORT      through kubectl's local PORT: two connections at once, each
                                 answered by the pod's server (the first stays open, its request
                                 half sent, while the second is served)
  portforward.py refused PORT    through kubectl's local PORT to a pod port nobody listens on:
                                 the connection is closed without an answer
"""
import http.server
import socket
import sys

TIMEOUT = 20


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = f"served {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        print(format % args, flush=True)


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def read_all(conn):
    chunks = []
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def body_of(response, path):
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") or body != f"served {path}\n".encode():
        sys.exit(f"GET {path} through the forward answered {response!r}")
    return body.decode().strip()


def check(port):
    first = connect(port)
    first.sendall(b"GET /first HTTP/1.1\r\nHost: pod\r\n")
    second = connect(port)
    second.sendall(b"GET /second HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")
    answers = [body_of(read_all(second), "/second")]
    first.sendall(b"Connection: close\r\n\r\n")
    answers.append(body_of(read_all(first), "/first"))
    print("port-forward: " + ", ".join(answers) + " (two connections at once)")


def refused(port):
    conn = connect(port)
    conn.sendall(b"GET / HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")
    try:
        answer = read_all(conn)
    except ConnectionResetError:
        answer = b""
    if answer:
        sys.exit(f"a forward to a closed port answered {answer!r}")
    print("port-forward: the connection to a closed port was closed without an answer")


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("serve", "check", "refused"):
        sys.exit(__doc__)
    port = int(sys.argv[2])
    if sys.argv[1] == "serve":
        http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
    elif sys.argv[1] == "check":
        check(port)
    else:
        refused(port)


if __name__ == "__main__":
    main()
