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
    servers list without ETags,
  * on demand, plays a hostile store (tests/hostile_store.rs): endless LIST pagination,
    a huge streamed body for some GETs, Range headers ignored, forged names in LISTs.

Control API (on the same port, never forwarded):
  GET  /__proxy/counts            -> JSON counters
  POST /__proxy/reset             -> zero counters, clear faults
  POST /__proxy/fault  JSON body  -> {"match": "kms:Decrypt" | "s3:GET" | "s3:PUT" ...,
                                      "error": "DisabledException" | "503" | "drop",
                                      "times": N (optional, default forever),
                                      "body": S (optional: only requests whose body holds
                                                 S, e.g. one KMS key id),
                                      "path": S (optional: only requests whose URL path
                                                 holds S, e.g. one object's name),
                                      "delay": seconds (optional),
                                      "rate": P (optional: each matching request with
                                                 probability P, for soak runs)}
  POST /__proxy/strip-list-etags  -> LIST answers lose their ETags (until reset)
  POST /__proxy/list-mode  JSON   -> {"endless": "fresh" | "same", "objects": N (default 0)}:
                                     every ListObjectsV2 is answered here, never forwarded,
                                     with IsTruncated=true, N objects named PREFIX/endless-I
                                     (48 bytes each) and a NextContinuationToken that is
                                     fresh and random each page ("fresh") or always the same
                                     ("same"). Counted as s3:LIST-endless.
  POST /__proxy/huge-get  JSON    -> {"suffix": ".sealfs-c14", "bytes": N}: a GET whose key
                                     ends with suffix is answered here with 200 and N bytes of
                                     zeros, streamed 1 MiB at a time (never held in memory)
                                     until the client hangs up. Counted as s3:GET-huge, the
                                     bytes actually written as huge_bytes_sent.
  POST /__proxy/ignore-range      -> GETs are forwarded without their Range header, so the
                                     store answers 200 with the whole object (s3:range-dropped)
  POST /__proxy/inject-list JSON  -> {"entries": [{"key": K, "size": N}, ...]}: the first page
                                     of every forwarded ListObjectsV2 whose prefix K starts
                                     with gains these <Contents> (keys XML-escaped, control
                                     characters as &#N;). Counted as s3:LIST-injected.
All of these last until /__proxy/reset. Only 127.0.0.1 is ever bound or contacted.
"""
import argparse
import html
import http.client
import http.server
import json
import random
import re
import secrets
import socket
import threading
import time
import urllib.parse

LOCK = threading.Lock()
RNG = random.Random()
CLEAN = {
    "faults": [],
    "strip_list_etags": False,
    "list_mode": None,
    "huge_get": None,
    "ignore_range": False,
    "dribble": 0,
    "inject_list": [],
    "huge_bytes_sent": 0,
}
STATE = {"counts": {}, "bytes_up": 0, "bytes_down": 0, **json.loads(json.dumps(CLEAN))}
LIST_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


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
                out["huge_bytes_sent"] = STATE["huge_bytes_sent"]
                return self._reply(200, json.dumps(out).encode(), [("Content-Type", "application/json")])
            if path == "/__proxy/reset":
                STATE.update(counts={}, bytes_up=0, bytes_down=0, **json.loads(json.dumps(CLEAN)))
                return self._reply(200, b"{}")
            if path == "/__proxy/strip-list-etags":
                STATE["strip_list_etags"] = True
                return self._reply(200, b"{}")
            if path == "/__proxy/list-mode":
                mode = json.loads(body or b"{}")
                if mode.get("endless") not in ("fresh", "same"):
                    return self._reply(400, b"endless: fresh or same")
                STATE["list_mode"] = mode
                return self._reply(200, b"{}")
            if path == "/__proxy/huge-get":
                spec = json.loads(body or b"{}")
                if not spec.get("suffix") or int(spec.get("bytes", 0)) <= 0:
                    return self._reply(400, b"suffix and bytes > 0 needed")
                STATE["huge_get"] = spec
                return self._reply(200, b"{}")
            if path == "/__proxy/dribble":
                n = int(json.loads(body or b"{}").get("bytes", 0))
                if n <= 0:
                    return self._reply(400, b"bytes > 0 needed")
                STATE["dribble"] = n
                return self._reply(200, b"{}")
            if path == "/__proxy/ignore-range":
                STATE["ignore_range"] = True
                return self._reply(200, b"{}")
            if path == "/__proxy/inject-list":
                STATE["inject_list"] = list(json.loads(body or b"{}").get("entries", []))
                return self._reply(200, b"{}")
            if path == "/__proxy/fault":
                STATE["faults"].append(json.loads(body or b"{}"))
                return self._reply(200, b"{}")
        return self._reply(404, b"unknown control path")

    def _fault_for(self, names, body=b""):
        with LOCK:
            for f in STATE["faults"]:
                if f.get("body") and f["body"].encode() not in body:
                    continue
                if f.get("path") and f["path"] not in urllib.parse.unquote(self.path.split("?")[0]):
                    continue
                if f.get("match") in names and f.get("times", 1) != 0:
                    if "rate" in f and RNG.random() >= float(f["rate"]):
                        continue
                    if "times" in f:
                        f["times"] -= 1
                    return f
        return None

    def _query(self):
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query, keep_blank_values=True)

    def _is_list(self):
        return self.command == "GET" and self._query().get("list-type") == ["2"]

    def _endless_list(self, mode):
        """One page of a listing that never ends (the mode's token rule)."""
        prefix = self._query().get("prefix", [""])[0]
        with LOCK:
            bump("s3:LIST-endless")
            page = STATE["counts"]["s3:LIST-endless"]
        token = secrets.token_hex(16) if mode["endless"] == "fresh" else "the-same-token-every-time"
        contents = "".join(
            f"<Contents><Key>{html.escape(prefix)}/endless-{page}-{i}</Key>"
            "<LastModified>2024-01-01T00:00:00.000Z</LastModified>"
            f'<ETag>"e{page}-{i}"</ETag><Size>48</Size><StorageClass>STANDARD</StorageClass></Contents>'
            for i in range(int(mode.get("objects", 0)))
        )
        xml = (
            f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{LIST_NS}">'
            f"<Name>bucket</Name><Prefix>{html.escape(prefix)}</Prefix>"
            f"<KeyCount>{int(mode.get('objects', 0))}</KeyCount><MaxKeys>1000</MaxKeys>"
            f"<IsTruncated>true</IsTruncated>{contents}"
            f"<NextContinuationToken>{token}</NextContinuationToken></ListBucketResult>"
        )
        # Headers and body leave as two writes: without NODELAY each page would wait out
        # the client's delayed ACK (~40 ms), and the page cap would take minutes to reach.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._reply(200, xml.encode(), [("Content-Type", "application/xml")])

    def _huge_get(self, n):
        """200 with n bytes of zeros, written 1 MiB at a time until the client hangs up."""
        with LOCK:
            bump("s3:GET-huge")
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.send_header("ETag", '"huge"')
        self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
        self.end_headers()
        block = bytes(1 << 20)
        sent = 0
        self.close_connection = True
        try:
            while sent < n:
                piece = block[: min(len(block), n - sent)]
                self.wfile.write(piece)
                sent += len(piece)
                with LOCK:
                    STATE["huge_bytes_sent"] += len(piece)
        except OSError:
            pass

    @staticmethod
    def _xml_key(key):
        out = html.escape(key, quote=False)
        return "".join(f"&#{ord(c)};" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in out)

    def _inject(self, data):
        """Adds the injected <Contents> to the first page of a LIST under a matching prefix."""
        q = self._query()
        if "continuation-token" in q:
            return data
        prefix = q.get("prefix", [""])[0]
        with LOCK:
            entries = [e for e in STATE["inject_list"] if e["key"].startswith(prefix)]
            if entries:
                bump("s3:LIST-injected", len(entries))
        if not entries:
            return data
        extra = "".join(
            f"<Contents><Key>{self._xml_key(e['key'])}</Key>"
            "<LastModified>2024-01-01T00:00:00.000Z</LastModified>"
            f'<ETag>"injected{i}"</ETag><Size>{int(e.get("size", 0))}</Size>'
            "<StorageClass>STANDARD</StorageClass></Contents>"
            for i, e in enumerate(entries)
        ).encode()
        at = data.rfind(b"</ListBucketResult>")
        return data if at < 0 else data[:at] + extra + data[at:]

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
        fault = self._fault_for(names, body)
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
        if not target.startswith("TrentService."):
            with LOCK:
                mode, huge = STATE["list_mode"], STATE["huge_get"]
                ignore_range, injecting = STATE["ignore_range"], bool(STATE["inject_list"])
            if mode and self._is_list():
                return self._endless_list(mode)
            key = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            if huge and self.command == "GET" and key.endswith(huge["suffix"]):
                return self._huge_get(int(huge["bytes"]))
        else:
            ignore_range = injecting = False
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        drop = ("transfer-encoding", "content-length")
        if ignore_range and self.command == "GET" and self.headers.get("Range"):
            drop += ("range",)
            with LOCK:
                bump("s3:range-dropped")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
        headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        with LOCK:
            STATE["bytes_down"] += len(data)
            if STATE["strip_list_etags"] and self.command == "GET" and "list-type=2" in self.path:
                data, n = re.subn(rb"<ETag>[^<]*</ETag>", b"", data)
                bump("s3:LIST-etags-stripped", n)
        if injecting and self._is_list():
            data = self._inject(data)
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
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in skip]
        with LOCK:
            dribble = STATE["dribble"]
        if dribble and self.command == "GET" and self.headers.get("Range") and resp.status == 206:
            return self._dribble(resp.status, data, headers, dribble)
        self._reply(resp.status, data, headers)

    def _dribble(self, status, body, headers, n):
        """The body in sends of n bytes, each on the wire at once (TCP_NODELAY) and a little
        apart, so the client reads it in many small pieces."""
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        sends = 0
        for at in range(0, len(body), n):
            self.wfile.write(body[at:at + n])
            sends += 1
            if sends % 8 == 0:
                time.sleep(0.0005)
        with LOCK:
            bump("s3:GET-dribbled")
            bump("s3:dribble-sends", sends)

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
