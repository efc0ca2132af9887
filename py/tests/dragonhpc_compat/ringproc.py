"""A Python stand-in for DragonHPC's ``examples/dragon_core/ringproc`` (a C program on
DragonHPC's C API, which Dragon-RS does not offer), written on ``dragon.channels``, so that
the example's driver ``ring.py`` runs unchanged. Same command line and behaviour:

    ringproc <iterations> <cuid> <receive_from_channel_desc> [<send_to_channel_desc> <final_channel_desc>]

Without the last two, it makes its own channel (c_uid ``cuid``) in the node's default pool
and prints its base64 descriptor; it forwards ``iterations`` messages from the receive
channel to its send channel (the origin process sends the last one to the final channel).
"""

import os
import sys

import dragon.channels as dch
import dragon.managed_memory as dm
from dragon.utils import B64


def main(argv):
    if len(argv) < 4:
        print(
            "usage: ringproc <iterations> <cuid> <receive_from_channel_desc> "
            "[<send_to_channel_desc> <final_channel_desc>]",
            file=sys.stderr,
        )
        return 255
    if os.environ.get("RINGPROC_RUNTIME_FILE"):  # for the test: which runtime ran the ring
        with open(os.environ["RINGPROC_RUNTIME_FILE"], "a") as f:
            f.write(os.environ["DRAGON_RUNTIME"].split(":")[1] + "\n")
    iterations = int(argv[1])
    cuid = int(argv[2], 0)
    recv_h = dch.Channel.attach(B64.str_to_bytes(argv[3])).recvh()
    own = None
    final_h = None
    if len(argv) <= 4:
        own = dch.Channel(dm.MemoryPool.attach_default(), cuid)
        send_ch = own
        print(B64.bytes_to_str(own.serialize()), flush=True)
    else:
        send_ch = dch.Channel.attach(B64.str_to_bytes(argv[4]))
        final_h = dch.Channel.attach(B64.str_to_bytes(argv[5])).sendh()
        final_h.open()
        print(argv[4], flush=True)
    send_h = send_ch.sendh()
    send_h.open()
    recv_h.open()
    to = send_h
    for k in range(iterations):
        msg = recv_h.recv()
        if final_h is not None and k == iterations - 1:
            to = final_h
        to.send(msg, ownership=dch.transfer_ownership_on_send)
    send_h.close()
    recv_h.close()
    if own is not None:
        # The C program destroys its channel at once; a channel's destroy drops what is in
        # it, so this one first waits until the next process took the last message.
        own.poll(event_mask=dch.EventType.POLLEMPTY, timeout=60)
        own.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
