#!/usr/bin/env python3
"""vm-hub: the Ethernet switch between the VMs of vm-cluster, on one unix stream socket.

Each VM's qemu connects with `-netdev stream,addr.type=unix,addr.path=HUB_SOCKET`; qemu frames
every Ethernet frame with a 4-byte big-endian length. The hub learns which connection each source
MAC came from and forwards a frame to the connection of its destination MAC; broadcast, multicast
and unknown destinations go to every other VM. Stream sockets give backpressure, so nothing is
dropped while VMs keep up (a unix datagram queue holds only net.unix.max_dgram_qlen frames, 10
by default, and dropped bursts under load). A VM that stops reading (killed) gets at most
MAX_QUEUED bytes queued, then its frames are dropped, and its connection is closed when qemu dies.
Nothing here touches an IP network: the frames never leave this machine.

usage: vm-hub.py HUB_SOCKET
"""

import os
import selectors
import socket
import struct
import sys

MAX_QUEUED = 8 << 20


class Port:
    def __init__(self, conn):
        self.conn = conn
        self.inbuf = bytearray()
        self.outbuf = bytearray()


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    path = sys.argv[1]
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    ports = []
    where = {}  # source MAC -> Port

    def close(port):
        sel.unregister(port.conn)
        port.conn.close()
        ports.remove(port)
        for mac in [m for m, p in where.items() if p is port]:
            del where[mac]

    def send(port, frame):
        if len(port.outbuf) > MAX_QUEUED:
            return  # a VM that does not read: drop, as a switch would
        was_empty = not port.outbuf
        port.outbuf += struct.pack(">I", len(frame)) + frame
        if was_empty:
            sel.modify(port.conn, selectors.EVENT_READ | selectors.EVENT_WRITE, port)

    while True:
        for key, events in sel.select():
            if key.data is None:
                conn, _ = listener.accept()
                conn.setblocking(False)
                port = Port(conn)
                ports.append(port)
                sel.register(conn, selectors.EVENT_READ, port)
                continue
            port = key.data
            if events & selectors.EVENT_WRITE and port.outbuf:
                try:
                    sent = port.conn.send(port.outbuf)
                    del port.outbuf[:sent]
                except BlockingIOError:
                    pass
                except OSError:
                    close(port)
                    continue
                if not port.outbuf:
                    sel.modify(port.conn, selectors.EVENT_READ, port)
            if events & selectors.EVENT_READ:
                try:
                    data = port.conn.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    close(port)
                    continue
                port.inbuf += data
                while len(port.inbuf) >= 4:
                    (n,) = struct.unpack(">I", port.inbuf[:4])
                    if len(port.inbuf) < 4 + n:
                        break
                    frame = bytes(port.inbuf[4 : 4 + n])
                    del port.inbuf[: 4 + n]
                    if n < 14:
                        continue
                    dst, src = frame[0:6], frame[6:12]
                    where[src] = port
                    if dst[0] & 1 or dst not in where:
                        for other in ports:
                            if other is not port:
                                send(other, frame)
                    elif where[dst] is not port:
                        send(where[dst], frame)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(0)
