#!/usr/bin/env python3
"""Loopback HTTP proxy in front of moto_server (S3 + KMS on one port) for sealfs tests.

It forwards every request unchanged and
  * counts KMS calls by action (X-Amz-Target) and S3 calls by method,
  * counts request and response body bytes (what moved through the client),
  * injects faults on demand: a KMS action answered with an AWS error code
    (DisabledException, ThrottlingException, ...), an S3 method answered with an HTTP
    status (503 SlowDown, 500) or a dropped connection, optionally only for the first N
    matching calls, and an added delay,
  * on demand, drops the <ETag> elements from ListObjectsV2 answers, as some S3-compatible
    servers list without ETags.

Control API (on the same port, never forwarded):
  GET  /__proxy/counts            -> JSON counters
  POST /__proxy/reset             -> zero counters, clear faults
  POST /__proxy/fault  JSON body  -> {"match": "kms:Decrypt" | "s3:GET" | "s3:PUT" ...,
                                      "error": "DisabledException" | "503" | "drop",
                                      "times": N (optional, default forever),
                                      "delay": seconds (optional)}
  POST /__proxy/strip-list-etags  -> LIST answers lose their ETags (until reset)
Only 127.0.0.1 is ever bound or contacted.
"""
import argparse
import http.client
import http.server
import json
import re
import socket
import threading
import time

LOCK = threading.Lock()
STATE = {"counts": {}, "bytes_up": 0, "bytes_down": 0, "faults": [], "strip_list_etags": False}


def bump(name, n=1):
    STATE["counts"][name] = STATE["counts"].get(name, 0) + n


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream = None

    def log_message(self, *args):
        pass

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _reply(self, status, body, headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _control(self, body):
        path = self.path
        with LOCK:
            if path == "/__proxy/counts":
                out = dict(STATE["counts"])
                out["bytes_up"] = STATE["bytes_up"]
                out["bytes_down"] = STATE["bytes_down"]
                return self._reply(200, json.dumps(out).encode(), [("Content-Type", "application/json")])
            if path == "/__proxy/reset":
                STATE.update(counts={}, bytes_up=0, bytes_down=0, faults=[], strip_list_etags=False)
                return self._reply(200, b"{}")
            if path == "/__proxy/strip-list-etags":
                STATE["strip_list_etags"] = True
                return self._reply(200, b"{}")
            if path == "/__proxy/fault":
                STATE["faults"].append(json.loads(body or b"{}"))
                return self._reply(200, b"{}")
        return self._reply(404, b"unknown control path")

    def _fault_for(self, names):
        with LOCK:
            for f in STATE["faults"]:
                if f.get("match") in names and f.get("times", 1) != 0:
                    if "times" in f:
                        f["times"] -= 1
                    return f
        return None

    def _handle(self):
        body = self._body()
        if self.path.startswith("/__proxy/"):
            return self._control(body)
        target = self.headers.get("X-Amz-Target", "")
        if target.startswith("TrentService."):
            names = ["kms:" + target.split(".", 1)[1], "kms:*"]
        else:
            names = ["s3:" + self.command, "s3:*"]
            if self.command == "PUT" and "partNumber=" in self.path:
                names.insert(0, "s3:UploadPart")
            if self.command == "GET" and self.headers.get("Range"):
                names.insert(0, "s3:GET-range")
        with LOCK:
            for n in names[:-1]:
                bump(n)
            STATE["bytes_up"] += len(body)
        fault = self._fault_for(names)
        if fault:
            if fault.get("delay"):
                time.sleep(float(fault["delay"]))
            err = fault.get("error")
            if err == "drop":
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if err and err.isdigit():
                code = {"503": "SlowDown", "500": "InternalError"}.get(err, "Error")
                xml = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>injected</Message></Error>"
                return self._reply(int(err), xml.encode(), [("Content-Type", "application/xml")])
            if err:
                msg = json.dumps({"__type": err, "message": "injected by fault_proxy"}).encode()
                return self._reply(400, msg, [("Content-Type", "application/x-amz-json-1.1")])
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
        headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        with LOCK:
            STATE["bytes_down"] += len(data)
            if STATE["strip_list_etags"] and self.command == "GET" and "list-type=2" in self.path:
                data, n = re.subn(rb"<ETag>[^<]*</ETag>", b"", data)
                bump("s3:LIST-etags-stripped", n)
        conn.close()
        if self.command == "HEAD":
            # No body, but the upstream Content-Length is the object's size: pass it on.
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection"):
                    self.send_header(k, v)
            self.end_headers()
            return
        skip = ("transfer-encoding", "content-length", "connection")
        self._reply(resp.status, data, [(k, v) for k, v in resp.getheaders() if k.lower() not in skip])

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream-port", type=int, required=True)
    ap.add_argument("--port-file", required=True)
    args = ap.parse_args()
    Handler.upstream = ("127.0.0.1", args.upstream_port)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # Clients that hang up mid-request (a test killing sealfs) are expected, not errors.
    srv.handle_error = lambda request, client_address: None
    srv.daemon_threads = True
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(srv.server_address[1]))
    import os
    os.rename(args.port_file + ".tmp", args.port_file)
    srv.serve_forever()


if __name__ == "__main__":
    main()
