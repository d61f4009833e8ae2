"""The live-snapshot HTTP API of `serviceConfig` (docs/runtime.md, Live
snapshot): a server on the host:port of serviceConfig.address answering
any method under the path `/snapshot` with query
`dev_id=<id>&config=<new config path>`, in JSON, with overlaybd's status
codes and messages, so a client written for overlaybd works unchanged.

It finds nothing and changes nothing itself: `snapshot(dev_id, config)`
(the TCMU handler's) does the work, raising NoSuchDevice for an unknown
dev_id and any other exception when the snapshot failed.  The reason of a
failure goes to the log; the body keeps overlaybd's fixed text.
Not for: TLS, authentication, other paths.
"""
import http.server
import json
import logging
import socket
import threading
from urllib.parse import parse_qs, urlsplit

from tcmu_obd import service_config
from tcmu_obd.errors import ObdError, UsageError

log = logging.getLogger(__name__)

PATH = "/snapshot"
MAX_BODY = 1 << 20          # a request body is read and dropped (keep-alive); larger ones close the connection

MISSING = (400, {"success": False, "message": "Missing dev_id or config in snapshot request"})
NOT_FOUND = (404, {"success": False, "message": "Image file not found"})
# overlaybd's text, stray backtick included: clients may compare the message
FAILED = (500, {"success": False, "message": "Failed to create snapshot`"})
DONE = (200, {"success": True, "message": "Snapshot created successfully"})


class NoSuchDevice(ObdError):
    """No device served here has that dev_id."""


class SnapshotApi:
    """The server: start() binds (a bound port: UsageError naming
    serviceConfig.address) and serves in a thread; stop() closes it.
    port 0 (tests) takes a free port; `port` says which."""

    def __init__(self, host, port, snapshot, address_text=None):
        self.host, self.want_port = host, port
        self.snapshot = snapshot
        self.address_text = address_text or f"http://{host}:{port}"
        self.server = None
        self.thread = None

    @property
    def port(self):
        return self.server.server_address[1] if self.server else self.want_port

    def answer(self, path):
        """(status, JSON object) for a request path with its query."""
        parts = urlsplit(path)
        if not parts.path.startswith(PATH):
            return None
        q = parse_qs(parts.query)
        dev_id, config = (q.get("dev_id") or [""])[0], (q.get("config") or [""])[0]
        if not dev_id or not config:
            return MISSING
        try:
            self.snapshot(dev_id, config)
        except NoSuchDevice as e:
            log.error("snapshot dev_id=%s config=%s: %s", dev_id, config, e)
            return NOT_FOUND
        except Exception as e:          # noqa: BLE001 -- the client gets 500, the log the reason
            log.error("snapshot dev_id=%s config=%s failed: %s", dev_id, config, e,
                      exc_info=not isinstance(e, ObdError))
            return FAILED
        log.info("snapshot dev_id=%s config=%s: done", dev_id, config)
        return DONE

    def start(self):
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"       # keep-alive, as overlaybd's server

            def __getattr__(self, name):
                if name.startswith("do_"):      # any method
                    return self._any
                raise AttributeError(name)

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n > MAX_BODY:
                    self.close_connection = True
                elif n > 0:
                    self.rfile.read(n)
                got = api.answer(self.path)
                if got is None:
                    body = json.dumps({"success": False, "message": f"no handler for {self.path.split('?')[0]}; "
                                       f"the API is {PATH}?dev_id=&config="}).encode()
                    status = 404
                else:
                    status, obj = got
                    body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("snapshot api: " + fmt, *args)

        class Server(http.server.ThreadingHTTPServer):
            # no SO_REUSEPORT (overlaybd sets it): a second daemon on the port
            # must fail at start-up, not take half of the requests
            address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            daemon_threads = True

        try:
            self.server = Server((self.host, self.want_port), Handler)
        except OSError as e:
            raise UsageError(f"serviceConfig.address = {self.address_text!r}: cannot listen on "
                             f"{self.host}:{self.want_port}: {e.strerror or e}") from None
        self.thread = threading.Thread(target=self.server.serve_forever, name="obd-snapshot-api", daemon=True)
        self.thread.start()
        log.info("snapshot API on http://%s:%d%s", self.host, self.port, PATH)
        return self

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join()
            self.server = None


def start(service_cfg, snapshot):
    """The running SnapshotApi when serviceConfig.enable, else None."""
    sc = service_cfg.service_config
    if not sc.enable:
        return None
    try:
        host, port = service_config.service_address(sc.address)
    except ValueError as e:
        raise UsageError(f"{service_cfg.source or '<config>'}: serviceConfig.address = {sc.address!r}: {e}") from None
    return SnapshotApi(host, port, snapshot, sc.address).start()
