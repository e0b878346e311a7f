"""The FIB-SEM bridge: a ZeroMQ server beside the vendor software, and its client.

- ``wire``: envelopes, image frames and events as bytes (docs/bridge-protocol.md)
- ``errors``: the error table
- ``backend``: what an instrument driver implements
- ``server``: ``BridgeServer``, the command and event sockets over one backend
- ``record``: the on-disk idempotency record
- ``security``: CURVE keys and the loopback rule

Modules are imported on use; importing ``clemflow.bridge`` loads nothing heavy.
"""
