"""The seed document's Distributed Dictionary example: a DDict spanning every node of the
runtime with 1 GiB per node, used by a few worker processes, then destroyed.

    dragon examples/seed_ddict.py        (or: python examples/seed_ddict.py)
"""

import numpy as np
from dragon.data.ddict import DDict
from dragon.native.machine import System
from dragon.native.process import ProcessTemplate
from dragon.native.process_group import ProcessGroup


def worker(d, i):
    d[f"result-{i}"] = np.full(1000, i, dtype=np.float64)


if __name__ == "__main__":
    alloc = System()
    num_nodes = int(alloc.nnodes)
    dict_mem_per_node = 1 * 1024**3  # ask for 1 GB per node, expressed in units of bytes
    # Note that the total_mem is the total memory across all the nodes
    dist_dict = DDict(managers_per_node=1, n_nodes=num_nodes, total_mem=num_nodes * dict_mem_per_node)

    grp = ProcessGroup()
    for i in range(4):
        grp.add_process(nproc=1, template=ProcessTemplate(target=worker, args=(dist_dict, i)))
    grp.init()
    grp.start()
    grp.join()
    grp.close()
    total = sum(dist_dict[f"result-{i}"].sum() for i in range(4))
    nodes = len({n.h_uid for n in dist_dict.manager_nodes})
    print(
        f"{len(dist_dict)} keys, total {total:.0f}, managers on {nodes} node(s), "
        f"stats: {dist_dict.stats[0].num_keys} keys in manager 0"
    )
    dist_dict.destroy()
