"""Mutual TLS around a Flower 1.42 SuperLink, which cannot ask for client certificates itself.

flwr 1.42 serves its Fleet, Control and Runtime APIs on one port and builds its TLS servers without client
certificates; SuperNode authentication guards only the Fleet API, and the Control API's account login is the
enterprise edition's. So anyone who reaches the port can register a SuperNode key or submit a run. Here:

- the SuperLink listens on loopback only (its own `flower-superexec` connects there);
- `fedpt gate` is the only thing on the network: two listeners that each demand a client certificate from their
  own CA and pass on only their own API - device certificates reach `/v1/fleet/*`, operator certificates
  `/v1/control/*` - to the SuperLink over TLS;
- `fedpt-supernode` and `fedpt-flwr` are `flower-supernode` and `flwr` presenting the machine's certificate
  (`--client-cert`, `--client-key`), since their HTTP clients have no option for one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import ssl
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedpt.errors import FedptError, first_line
from fedpt.runtime import LOOPBACK, bounded_http, check_free, limit_head

log = logging.getLogger("fedpt.gate")

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
              b"transfer-encoding", b"upgrade", b"host"}


def allowed(api: str, method: str, raw_path: bytes, query: bytes) -> bool:
    """Only `POST /v1/<api>/<name>`, matched on the undecoded path, so no `..` or `%2F` reaches another API."""
    return method == "POST" and not query and re.fullmatch(rb"/v1/%s/[a-z0-9-]+" % api.encode(), raw_path) is not None


class Gate:
    """ASGI app for one listener: forwards the requests of one API to the SuperLink, refuses all others."""

    def __init__(self, api: str, superlink: str, context: ssl.SSLContext):
        self.api = api
        self.superlink = superlink
        self.context = context
        self.client = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        raw_path = scope.get("raw_path") or scope["path"].encode()
        if not allowed(self.api, scope["method"], raw_path, scope.get("query_string", b"")):
            log.warning("refused %s %s from %s: this listener serves /v1/%s/ only", scope["method"],
                        raw_path[:200].decode(errors="replace"), _peer(scope), self.api)
            await _reply(send, 403, f"fedpt gate: this listener serves POST /v1/{self.api}/* only\n")
            return
        await self._forward(scope, receive, send, raw_path.decode())

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        import httpx

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # no read timeout: `flwr log` streams for as long as a run lasts
                self.client = httpx.AsyncClient(base_url=self.superlink, verify=self.context,
                                                timeout=httpx.Timeout(None, connect=10.0))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: dict, receive: Callable, send: Callable, path: str) -> None:
        import httpx

        async def body():
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                yield message.get("body", b"")
                if not message.get("more_body"):
                    return

        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        request = self.client.build_request(scope["method"], path, headers=headers, content=body())
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            log.error("the SuperLink at %s did not answer: %s", self.superlink, first_line(e))
            await _reply(send, 502, "fedpt gate: the SuperLink did not answer\n")
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except (httpx.HTTPError, OSError) as e:  # the SuperLink or the client went away mid-stream
            log.warning("%s %s ended early: %s", scope["method"], path, first_line(e))
        finally:
            await response.aclose()


async def _reply(send: Callable, status: int, text: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": text.encode()})


def _peer(scope: dict) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


@dataclass
class Listener:
    """One of the gate's addresses, the API it passes on, and the CA whose certificates it admits."""

    api: str  # "fleet" or "control"
    address: str  # host:port
    client_ca: Path


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedptError(f"not a host:port address: {address!r}")
    return host.strip("[]"), int(port)


def _readable(path: Path, what: str) -> Path:
    if not Path(path).is_file():
        raise FedptError(f"{what} not found: {path}")
    return Path(path)


def run_gate(superlink: str, superlink_ca: Path, cert: Path, key: Path, listeners: list[Listener]) -> None:
    """Serve the listeners until SIGINT/SIGTERM; every check happens before anything listens."""
    import uvicorn

    host, _ = split_address(superlink)
    if host not in LOOPBACK:
        raise FedptError(f"the SuperLink must listen on loopback only, behind the gate; got {superlink}")
    if not listeners:
        raise FedptError("give at least one listener (--fleet and/or --control)")
    try:
        upstream = ssl.create_default_context(cafile=_readable(superlink_ca, "SuperLink CA certificate"))
    except ssl.SSLError as e:
        raise FedptError(f"cannot read the SuperLink CA certificate {superlink_ca}: {first_line(e)}") from None
    _check_pair(_readable(cert, "gate certificate"), _readable(key, "gate key"))

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self):  # the gate stops all its listeners on one signal, below
            yield

    servers = []
    for listener in listeners:
        if listener.api not in ("fleet", "control"):
            raise FedptError(f"a listener serves 'fleet' or 'control', not {listener.api!r}")
        lhost, lport = split_address(listener.address)
        check_free(lhost, lport)
        gate = limit_head(Gate(listener.api, f"https://{superlink}", upstream))
        config = uvicorn.Config(gate, host=lhost, port=lport,
                                ssl_certfile=str(cert), ssl_keyfile=str(key), ssl_cert_reqs=ssl.CERT_REQUIRED,
                                ssl_ca_certs=str(_readable(listener.client_ca, f"{listener.api} client CA")),
                                log_level="warning", access_log=False, ws="none", timeout_graceful_shutdown=5,
                                **bounded_http())
        servers.append(Server(config))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: [setattr(s, "should_exit", True) for s in servers])
        await asyncio.gather(*(s.serve() for s in servers))

    for listener in listeners:
        log.warning("gate: %s -> %s, /v1/%s/* for certificates of %s", listener.address, superlink, listener.api,
                    listener.client_ca)
    asyncio.run(main())


def _check_pair(cert: Path, key: Path) -> None:
    try:
        ssl.create_default_context().load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise FedptError(f"certificate {cert} and key {key} do not make a pair: {first_line(e)}") from None


def present_client_certificate(cert: Path, key: Path) -> None:
    """Make every TLS connection of flwr's HTTP clients in this process present `cert` (flwr 1.42 has no option)."""
    from flwr.supercore.protobuf import client as protobuf_client

    _check_pair(_readable(cert, "client certificate"), _readable(key, "client key"))
    original = protobuf_client.ProtobufClient.__init__

    def __init__(self, base_url: str, *, verify: ssl.SSLContext | bool | str = True, **kwargs) -> None:
        if verify is not False:  # plain HTTP (loopback, insecure) has no handshake to present it in
            if not isinstance(verify, ssl.SSLContext):
                verify = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            verify.load_cert_chain(cert, key)
        original(self, base_url, verify=verify, **kwargs)

    protobuf_client.ProtobufClient.__init__ = __init__


def _launch(program: str, run: Callable[[], object]) -> None:
    """Take --client-cert/--client-key (or FEDPT_CLIENT_CERT/FEDPT_CLIENT_KEY) off the command line, then run flwr."""
    import argparse

    parser = argparse.ArgumentParser(prog=program, add_help=False)
    parser.add_argument("--client-cert", default=os.environ.get("FEDPT_CLIENT_CERT"))
    parser.add_argument("--client-key", default=os.environ.get("FEDPT_CLIENT_KEY"))
    ours, rest = parser.parse_known_args(sys.argv[1:])
    try:
        if not ours.client_cert or not ours.client_key:
            raise FedptError(f"{program} needs --client-cert and --client-key (this machine's certificate for the "
                             "gate); without a gate, use the plain flwr command")
        if "--insecure" in rest:
            raise FedptError(f"{program} talks TLS to the gate: drop --insecure and give --root-certificates")
        present_client_certificate(Path(ours.client_cert), Path(ours.client_key))
    except FedptError as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.argv = [program, *rest]
    run()


def supernode() -> None:
    """`fedpt-supernode`: `flower-supernode` with this device's certificate."""
    from flwr.supernode.cli import flower_supernode

    _launch("fedpt-supernode", flower_supernode)


def flwr_cli() -> None:
    """`fedpt-flwr`: the `flwr` CLI with the operator's certificate."""
    from flwr.cli.app import app

    _launch("fedpt-flwr", app)
