#!/usr/bin/env python3
"""vm-hub: the Ethernet switch between the VMs of vm-cluster, on unix datagram sockets only.

Each VM's qemu has `-netdev dgram` with its own socket (local) and this hub's socket (remote):
one datagram is one Ethernet frame. The hub learns which socket each source MAC came from and
forwards a frame to the socket of its destination MAC; broadcast, multicast and unknown
destinations go to every other VM. Nothing here touches an IP network: the frames never leave
this machine. A VM that was killed simply stops receiving (sends to it are dropped).

usage: vm-hub.py HUB_SOCKET VM_SOCKET...
"""

import os
import socket
import sys


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    hub_path, vms = sys.argv[1], sys.argv[2:]
    if os.path.exists(hub_path):
        os.unlink(hub_path)
    hub = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    hub.bind(hub_path)
    hub.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    where = {}  # source MAC -> the VM socket it came from
    dropped = 0
    while True:
        frame, src = hub.recvfrom(65536)
        if len(frame) < 14 or not src:
            continue
        dst_mac, src_mac = frame[0:6], frame[6:12]
        where[src_mac] = src
        if dst_mac[0] & 1 or dst_mac not in where:
            targets = [vm for vm in vms if vm != src]
        else:
            targets = [where[dst_mac]]
        for vm in targets:
            try:
                # Never block on a slow or dead VM: a switch drops what it cannot queue.
                hub.sendto(frame, socket.MSG_DONTWAIT, vm)
            except OSError:
                dropped += 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(0)
