"""The chaincode service speaks the shim protocol as a peer expects: events sent, peer errors not ignored.

The test plays the peer's side of the stream for two transactions; it checks our fixes to
fabric-chaincode-python 2.5.4 (see clinfed_chaincode.server), not a Fabric network.
"""

from __future__ import annotations

import asyncio
import json

import grpc
from fabric_protos.peer import chaincode_pb2, chaincode_shim_pb2, chaincode_shim_pb2_grpc, proposal_pb2
from fabric_protos.peer import proposal_response_pb2

from clinfed.ledger.identity import Identity
from clinfed.ledger.proposal import build_proposal
from ledger_helpers import COORDINATOR, SITES

Msg = chaincode_shim_pb2.ChaincodeMessage


def transaction(msp: str, function: str, *args: str) -> Msg:
    built = build_proposal(creator=Identity(msp, b"").creator, channel="ch", chaincode="clinfed",
                           function=f"clinfed:{function}", args=args)
    return Msg(type=Msg.TRANSACTION, txid=built.tx_id, channel_id="ch",
               payload=chaincode_pb2.ChaincodeInput(args=list(built.args)).SerializeToString(),
               proposal=proposal_pb2.SignedProposal(proposal_bytes=built.proposal_bytes))


async def peer_session():
    from clinfed_chaincode.server import serve

    port = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.create_task(serve("clinfed:0123", "127.0.0.1:0", on_ready=port.set_result, stop=stop))
    to_chaincode: asyncio.Queue = asyncio.Queue()

    async def outgoing():
        while (message := await to_chaincode.get()) is not None:
            yield message

    seen = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{await port}") as channel:
        stream = chaincode_shim_pb2_grpc.ChaincodeStub(channel).Connect(outgoing())
        register = await stream.read()
        seen["register"] = chaincode_pb2.ChaincodeID.FromString(register.payload).name
        await to_chaincode.put(Msg(type=Msg.REGISTERED))
        await to_chaincode.put(Msg(type=Msg.READY))

        # 1. InitConsortium: the contract reads the (absent) registry, writes it, sets an event.
        tx = transaction(COORDINATOR, "InitConsortium", json.dumps({"coordinator_msp": COORDINATOR, "sites": SITES}))
        await to_chaincode.put(tx)
        requests = []
        while (message := await stream.read()).type != Msg.COMPLETED:
            requests.append(message.type)
            await to_chaincode.put(Msg(type=Msg.RESPONSE, txid=message.txid, channel_id=message.channel_id,
                                       payload=b""))
        seen["init_requests"], seen["init_completed"] = requests, message

        # 2. GetConsortium, with the peer refusing the read: the transaction must fail.
        await to_chaincode.put(transaction("Site1MSP", "GetConsortium"))
        message = await stream.read()
        assert message.type == Msg.GET_STATE
        await to_chaincode.put(Msg(type=Msg.ERROR, txid=message.txid, channel_id=message.channel_id,
                                   payload=b"ledger snapshot unavailable"))
        seen["error_completed"] = await stream.read()
        await to_chaincode.put(None)
        stream.cancel()
    stop.set()
    await server
    return seen


def test_chaincode_service_sends_events_and_fails_on_peer_errors():
    seen = asyncio.run(asyncio.wait_for(peer_session(), timeout=30))
    assert seen["register"] == "clinfed:0123"
    assert seen["init_requests"] == [Msg.GET_STATE, Msg.PUT_STATE]

    completed = seen["init_completed"]
    response = proposal_response_pb2.Response.FromString(completed.payload)
    assert response.status == 200
    assert completed.HasField("chaincode_event"), "the library drops events; our handler must send them"
    event = completed.chaincode_event
    assert (event.event_name, event.chaincode_id, event.tx_id) == ("ConsortiumInitialised", "clinfed:0123",
                                                                   completed.txid)
    assert json.loads(event.payload)["sites"] == SITES

    failed = proposal_response_pb2.Response.FromString(seen["error_completed"].payload)
    assert failed.status == 500
    assert "peer refused GetState: ledger snapshot unavailable" in failed.message
