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

With CAPTURE_FILE, every frame that crosses the switch is also written there (pcap, Ethernet),
except the data packets of RDMA reliable connections (RoCE v2, UDP port 4791, RC opcodes), which
are the bulk of the traffic and only carry what clients read and write: so the file holds the
connection setup (RDMA-CM's MADs with their private data), the control traffic (TCP) and
everything else, and stays small. It is flushed after every frame, so a test can read it while
the cluster runs, and stops growing at MAX_CAPTURE bytes.

usage: vm-hub.py HUB_SOCKET [CAPTURE_FILE]
"""

import os
import selectors
import socket
import struct
import sys
import time

MAX_QUEUED = 8 << 20
MAX_CAPTURE = 256 << 20
ROCE_V2_PORT = 4791


def is_rc_data(frame):
    """A RoCE v2 packet of a reliable connection (BTH opcodes 0x00-0x1f): data, not setup."""
    if len(frame) < 14 + 20 + 8 + 1 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return False
    ihl = (frame[14] & 0x0F) * 4
    udp = 14 + ihl
    if len(frame) < udp + 9:
        return False
    (dport,) = struct.unpack(">H", frame[udp + 2 : udp + 4])
    return dport == ROCE_V2_PORT and frame[udp + 8] < 0x20


class Capture:
    def __init__(self, path):
        self.file = open(path, "wb")
        # pcap: magic, version 2.4, no time zone, no accuracy, snapshot length, Ethernet.
        self.file.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        self.file.flush()
        self.size = 24

    def write(self, frame):
        if self.size + 16 + len(frame) > MAX_CAPTURE or is_rc_data(frame):
            return
        now = time.time()
        record = struct.pack("<IIII", int(now), int(now * 1e6) % 1000000, len(frame), len(frame))
        self.file.write(record + frame)
        self.file.flush()
        self.size += len(record) + len(frame)


class Port:
    def __init__(self, conn):
        self.conn = conn
        self.inbuf = bytearray()
        self.outbuf = bytearray()


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    path = sys.argv[1]
    capture = Capture(sys.argv[2]) if len(sys.argv) == 3 else None
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
                    if capture:
                        capture.write(frame)
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
