"""Run the contract as a chaincode service (CCaaS) that Fabric peers connect to.

    CHAINCODE_ID=<package id> CHAINCODE_SERVER_ADDRESS=0.0.0.0:9999 python -m clinfed_chaincode.server

TLS (recommended): ``CHAINCODE_TLS_KEY`` and ``CHAINCODE_TLS_CERT`` name the server's PEM key and
certificate files, ``CHAINCODE_CLIENT_CA_CERT`` the CA that peers' client certificates must chain
to (mutual TLS). ``CHAINCODE_TLS_DISABLED=true`` serves in plaintext.

fabric-chaincode-python 2.5.4's own server has defects this module works around, using the
library's handler otherwise unchanged:

* events set with ``set_event`` are never sent to the peer: the COMPLETED message here carries
  the transaction's (last) event, as Fabric's Go shim does;
* an ERROR reply from the peer (to GetState, PutState, ...) is handed to the contract as if it
  were data: here it raises, so the transaction fails instead of acting on an error string;
* ``CORE_TLS_CLIENT_KEY_PATH``/``CORE_TLS_CLIENT_CERT_PATH`` are ignored: key and certificate are
  passed to the server explicitly;
* concurrent transactions write to the peer stream at the same time, which gRPC aio refuses
  (``GRPC_CALL_ERROR_TOO_MANY_OPERATIONS``) and the transaction then times out on the peer: here
  writes are serialised;
* ``start()`` calls ``asyncio.get_event_loop()``, which fails after an earlier ``asyncio.run()``:
  the server runs under ``asyncio.run`` here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import grpc

from . import _shim  # noqa: F401  (quiet import of the library first)
from . import new_chaincode

from fabric_chaincode_python.fabric_shim.handler import Handler  # noqa: E402
from fabric_chaincode_python.fabric_shim.response import ResponseCode  # noqa: E402
from fabric_chaincode_python.fabric_shim.stub import ChaincodeStub  # noqa: E402
from fabric_protos.peer import chaincode_pb2, chaincode_shim_pb2, chaincode_shim_pb2_grpc  # noqa: E402
from fabric_protos.peer import proposal_response_pb2  # noqa: E402

log = logging.getLogger("clinfed_chaincode.server")


class PeerError(Exception):
    """The peer answered a chaincode request with ERROR."""


class FixedHandler(Handler):
    """The library's handler with events sent and peer errors raised."""

    async def _Handler__ask_peer_and_listen(self, msg, action):  # overrides the library's private method
        reply = await Handler._Handler__ask_peer_and_listen(self, msg, action)
        if reply.type == chaincode_shim_pb2.ChaincodeMessage.ERROR:
            raise PeerError(f"peer refused {action}: {reply.payload.decode('utf-8', 'replace')}")
        return reply

    async def handle_stub_interaction(self, msg, action="Invoke"):
        cc_input = chaincode_pb2.ChaincodeInput.FromString(msg.payload)
        stub = ChaincodeStub(self, msg.channel_id, msg.txid, cc_input, msg.proposal)
        try:
            if (action or "").lower() == "init":
                response = await self.chaincode.init(stub)
            else:
                response = await self.chaincode.invoke(stub)
        except Exception as exc:  # noqa: BLE001 - any failure is the transaction's error response
            response = proposal_response_pb2.Response(status=ResponseCode.ERROR, message=str(exc))
        if not response or not response.status:
            response = proposal_response_pb2.Response(status=ResponseCode.ERROR,
                                                      message=f"chaincode {action} returned no response")
        completed = chaincode_shim_pb2.ChaincodeMessage(type=chaincode_shim_pb2.ChaincodeMessage.COMPLETED,
                                                        payload=response.SerializeToString(), txid=msg.txid,
                                                        channel_id=msg.channel_id)
        events = stub.get_events()
        if events and response.status < ResponseCode.ERRORTHRESHOLD:
            event = events[-1]  # Fabric keeps one event per transaction
            event.chaincode_id = self.chaincode_id.name
            completed.chaincode_event.CopyFrom(event)
        await self.context.write(completed)


class _SerialWrites:
    """The stream's context with one write at a time: the library handles each peer message in its
    own task, and gRPC aio refuses a second write while one is in flight
    (``GRPC_CALL_ERROR_TOO_MANY_OPERATIONS``), which loses that transaction's reply."""

    def __init__(self, context):
        self._context, self._lock = context, asyncio.Lock()

    async def write(self, message):
        async with self._lock:
            await self._context.write(message)

    def __getattr__(self, name):
        return getattr(self._context, name)


class ChaincodeService(chaincode_shim_pb2_grpc.ChaincodeServicer):
    def __init__(self, chaincode_id: str, chaincode):
        self._chaincode_id, self._chaincode = chaincode_id, chaincode

    async def Connect(self, request_iterator, context):
        handler = FixedHandler(self._chaincode_id, self._chaincode)
        try:
            await handler.chat_with_peer(request_iterator, _SerialWrites(context))
        except asyncio.CancelledError:
            log.info("peer stream closed")


def _pem(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as handle:
        return handle.read()


# Fabric peers ping their chaincode connection every 60 s (comm.DefaultKeepaliveOptions). gRPC's
# C core allows a ping without data only every 5 min and sends GOAWAY "too_many_pings" after two
# such strikes; that would drop an idle peer stream (preventive: not seen in our tests).
_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]
# gRPC's C core binds with SO_REUSEPORT by default: a second service on the same address would
# start silently and take part of the peers' connections. Here it fails to bind instead.
_SERVER_OPTIONS = [*_KEEPALIVE_OPTIONS, ("grpc.so_reuseport", 0)]


async def serve(chaincode_id: str, address: str, *, key: bytes | None = None, cert: bytes | None = None,
                client_ca: bytes | None = None, on_ready=None, stop: asyncio.Event | None = None,
                chaincode=None) -> None:
    """Serve the contract until ``stop`` is set (or the task is cancelled).

    With ``key`` and ``cert`` the server uses TLS; with ``client_ca`` also it requires peers'
    client certificates. Without key and cert it serves plaintext. ``on_ready(port)`` is called
    once it listens. ``chaincode`` replaces the clinfed contract (``new_chaincode()``).
    """
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    chaincode_shim_pb2_grpc.add_ChaincodeServicer_to_server(
        ChaincodeService(chaincode_id, chaincode or new_chaincode()), server)
    if key and cert:
        credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                                  require_client_auth=client_ca is not None)
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    await server.start()
    log.info("clinfed chaincode %s listening on %s (port %d, %s)", chaincode_id, address, port,
             "TLS" if key and cert else "plaintext")
    if on_ready is not None:
        on_ready(port)
    try:
        if stop is None:
            await server.wait_for_termination()
        else:
            await stop.wait()
    finally:
        await server.stop(3)


def main(chaincode=None) -> None:
    """Serve as the environment says (see the module's docstring); ``chaincode`` as in :func:`serve`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chaincode_id = os.environ.get("CHAINCODE_ID")
    address = os.environ.get("CHAINCODE_SERVER_ADDRESS")
    if not chaincode_id or not address:
        raise SystemExit("set CHAINCODE_ID (the installed package ID) and CHAINCODE_SERVER_ADDRESS (host:port)")
    plaintext = os.environ.get("CHAINCODE_TLS_DISABLED", "").lower() in ("1", "true", "yes")
    key, cert = _pem(os.environ.get("CHAINCODE_TLS_KEY")), _pem(os.environ.get("CHAINCODE_TLS_CERT"))
    if not plaintext and not (key and cert):
        raise SystemExit("set CHAINCODE_TLS_KEY and CHAINCODE_TLS_CERT (PEM files), or CHAINCODE_TLS_DISABLED=true")

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(chaincode_id, address, key=None if plaintext else key, cert=None if plaintext else cert,
                    client_ca=None if plaintext else _pem(os.environ.get("CHAINCODE_CLIENT_CA_CERT")), stop=stop,
                    chaincode=chaincode)

    asyncio.run(run())


if __name__ == "__main__":
    main()
