"""Policy (fields, enums, merge, context stack, inheritance) and machine (System, Node)."""

import os
import subprocess
import sys

import pytest
from dragon.infrastructure.policy import DRAGON_POLICY_CONTEXT_ENV, Policy, policy_env
from dragon.native import machine
from dragon.native.machine import Node, System


def test_policy_defaults_and_enums():
    p = Policy()
    assert p.placement is Policy.Placement.DEFAULT and p.host_id == -1
    assert p.cpu_affinity == [] and p.gpu_affinity == [] and p.refcounted is True
    assert [e.value for e in Policy.Placement] == [-5, -4, -3, -2, -1]
    assert (Policy.Distribution.ROUNDROBIN, Policy.Distribution.BLOCK) == (1, 2)
    assert Policy(placement=-3).placement is Policy.Placement.HOST_NAME
    with pytest.raises(ValueError):
        Policy(placement=7)
    with pytest.raises(TypeError):
        Policy(cpu_affinity=5)
    with pytest.raises(ValueError):
        Policy(gpu_affinity=[-1])
    assert Policy.from_sdict(Policy(host_name="n", cpu_affinity=[3, 1]).get_sdict()) == Policy(
        host_name="n", cpu_affinity=[3, 1]
    )


def test_merge_takes_set_fields_of_the_high_policy():
    low = Policy(host_name="a", cpu_affinity=[1])
    m = Policy.merge(low, Policy(host_name="b"))
    assert (m.host_name, m.cpu_affinity) == ("b", [1])
    g = Policy.global_policy()
    assert g.placement is Policy.Placement.ANYWHERE and g.wait_mode is Policy.WaitMode.IDLE


def test_context_stack_nests_and_unwinds():
    assert Policy.thread_policy() == Policy()
    with Policy(cpu_affinity=[0], host_name="a"):
        with Policy(gpu_affinity=[1]):
            t = Policy.thread_policy()
            assert (t.cpu_affinity, t.gpu_affinity, t.host_name) == ([0], [1], "a")
        assert Policy.thread_policy().gpu_affinity == []
    assert Policy.thread_policy() == Policy()


def test_children_inherit_the_policy_through_the_environment():
    env = dict(os.environ, **policy_env(Policy(cpu_affinity=[0], host_name="x")))
    code = (
        "from dragon.infrastructure.policy import Policy; "
        "p = Policy.thread_policy(); print(p.host_name, p.cpu_affinity)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["x", "[0]"]
    bad = dict(os.environ, **{DRAGON_POLICY_CONTEXT_ENV: "{not json"})
    r = subprocess.run([sys.executable, "-c", code], env=bad, capture_output=True, text=True)
    assert r.returncode != 0 and "PolicyError" in r.stderr


def test_system_and_node_describe_this_machine():
    s = System()
    assert s.nnodes == 1 and len(s.nodes) == 1
    n = Node(s.nodes[0])
    assert n.hostname == Node(n.hostname).hostname
    assert n.cpus == sorted(os.sched_getaffinity(0)) and n.num_cpus == len(n.cpus)
    assert n.physical_mem > 1 << 28
    assert n.is_primary and s.primary_node.h_uid == n.h_uid
    assert machine.cpu_count() == n.num_cpus and machine.current().h_uid == n.h_uid
    assert [p.host_name for p in s.hostname_policies()] == [n.hostname]
    with pytest.raises(ValueError):
        Node("no-such-host-anywhere")


def test_gpu_detection_override(monkeypatch):
    monkeypatch.setenv("DRAGON_GPUS", "nvidia:4")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    n = machine.current()
    assert (n.gpu_vendor, n.gpus, n.gpu_env_str) == ("nvidia", [0, 1, 2, 3], "CUDA_VISIBLE_DEVICES")
    assert [p.gpu_affinity for p in System().gpu_policies()] == [[0], [1], [2], [3]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert machine.current().gpus == [1, 3]
    monkeypatch.setenv("DRAGON_GPUS", "amd:0,2")
    assert (machine.current().gpu_vendor, machine.current().gpus) == ("amd", [0, 2])
    monkeypatch.setenv("DRAGON_GPUS", "none")
    assert machine.current().num_gpus == 0 and System().gpu_policies() == []
    monkeypatch.setenv("DRAGON_GPUS", "acme:2")
    with pytest.raises(ValueError):
        machine.current()


def test_topology_from_hwloc_or_sysfs():
    import shutil
    import subprocess

    from dragon.native import machine

    n = machine.current()
    assert n.cpus == sorted(os.sched_getaffinity(0)) and n.num_cpus == len(n.cpus)
    assert sorted(c for core in n.cores for c in core) == n.cpus
    assert n.numa_nodes and set(n.cpus) <= {c for _, cpus, _ in n.numa_nodes for c in cpus}
    assert n.physical_mem > 0
    has_hwloc = (
        shutil.which("pkg-config") and subprocess.run(["pkg-config", "--exists", "hwloc"]).returncode == 0
    )
    # make builds the wheel with hwloc whenever the machine has it (see the Makefile).
    assert n.topology_source == ("hwloc" if has_hwloc else "sysfs")
