"""The ProcessGroup example of the seed document (one process per GPU with CPU/GPU affinity).

Run: dragon examples/seed_process_group.py
"""

import os
import dragon
from dragon.infrastructure.policy import Policy
from dragon.native.machine import System, Node
from dragon.native.process_group import ProcessGroup
from dragon.native.process import ProcessTemplate

gpu_affinities = [[3], [2], [1], [0]]
cpu_affinities = [list(range(c, c + 8)) for c in range(0, 32, 8)]
num_gpus_per_node = 4


def hello_world(message):
    return f"Hello {message}"


if __name__ == "__main__":
    alloc = System()
    nodelist = alloc.nodes
    polaris_policies_for_gpus = []
    for node in nodelist:
        node_name = Node(node).hostname
        for i in range(num_gpus_per_node):
            pol = Policy(
                host_name=node_name,
                cpu_affinity=cpu_affinities[i],
                gpu_affinity=gpu_affinities[i],
                placement=Policy.Placement.HOST_NAME,
            )
            polaris_policies_for_gpus.append(pol)
    pg = ProcessGroup()
    for pol in polaris_policies_for_gpus:
        pg.add_process(
            nproc=1,
            template=ProcessTemplate(
                target=hello_world,
                args=("hello",),
                cwd=os.getcwd(),
                policy=pol,
            ),
        )
    pg.init()
    pg.start()
    pg.join()
    pg.close()
    for puid, code in pg.exit_status:
        print(f"process {puid} exited with {code}")
