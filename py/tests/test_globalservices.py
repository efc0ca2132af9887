"""DragonHPC's global-services client (``dragon.globalservices.process``, ``.group``,
``.node``) and its descriptors, with real processes of the embedded runtime (one node) and
of 3 local nodes. The patterns are those of DragonHPC's ``examples/dragon_gs_client``: a
Python target started through ``create_with_argdata`` / ``get_create_message_with_argdata``
with DragonHPC's recipe, groups made from serialized create messages, joined by p_uid."""

import os
import signal
import subprocess
import sys
import textwrap

import cloudpickle
import pytest
from conftest import leftovers, snapshot
from dragon.exceptions import ProcessError
from dragon.globalservices import group, node, policy_eval, process
from dragon.infrastructure.group_desc import GroupDescriptor
from dragon.infrastructure.policy import Policy
from dragon.infrastructure.process_desc import ProcessDescriptor, ProcessOptions

HERE = os.path.dirname(os.path.abspath(__file__))
MAIN = "_dragon_native_python_process_main"
RECIPE = ["-c", f"from dragon.native.process import {MAIN}; {MAIN}()"]
ACTIVE, DEAD = ProcessDescriptor.State.ACTIVE, ProcessDescriptor.State.DEAD


def write_and_exit(path, text, code):
    with open(path, "w") as f:
        f.write(text)
    sys.exit(code)


def python_message(target, *args, user_name=""):
    argdata = cloudpickle.dumps((target, args, {}))
    return process.get_create_message_with_argdata(
        exe=sys.executable, run_dir=HERE, args=RECIPE, argdata=argdata, env=None, user_name=user_name
    )


def test_process_create_query_join_with_argdata(tmp_path):
    out = tmp_path / "out"
    argdata = cloudpickle.dumps((write_and_exit, (str(out), "hello", 3), {}))
    d = process.create_with_argdata(
        sys.executable, HERE, RECIPE, None, argdata=argdata, user_name="gs-writer"
    )
    assert isinstance(d, ProcessDescriptor) and d.p_uid > 0 and d.name == "gs-writer"
    assert process.join(d.p_uid, timeout=60) == 3
    assert out.read_text() == "hello"
    q = process.query("gs-writer")  # by name, after it ended: its exit code
    assert q.p_uid == d.p_uid and q.state is DEAD and q.ecode == 3
    assert d.p_uid in process.get_list()
    assert ProcessDescriptor.from_sdict(q.get_sdict()).ecode == 3
    with pytest.raises(ProcessError, match="already exists"):
        process.create(sys.executable, HERE, ["-c", "pass"], None, user_name="gs-writer")
    assert (
        process.create(sys.executable, HERE, ["-c", "pass"], None, user_name="gs-writer", soft=True).p_uid
        == d.p_uid
    )


def test_process_kill_multi_join_and_errors():
    sleeper = process.create("sleep", ".", ["60"], None, options=ProcessOptions(make_inf_channels=True))
    quick = process.create(sys.executable, ".", ["-c", "import sys; sys.exit(4)"], None)
    assert process.query(sleeper.p_uid).state is ACTIVE
    done, status = process.multi_join([sleeper.p_uid, quick.p_uid], timeout=60)  # any
    assert done == [(quick.p_uid, 4)], status
    assert process.join(sleeper.p_uid, timeout=0.1) is None  # still running: None
    none, status = process.multi_join([sleeper.p_uid, quick.p_uid], timeout=0.2, join_all=True)
    assert none is None and status[str(sleeper.p_uid)] == [process.JoinErrors.TIMEOUT.value, None]
    bad, _ = process.get_multi_join_failure_puids(status)
    assert bad == [(quick.p_uid, 4)]
    process.kill(sleeper.p_uid, signal.SIGTERM)
    done, _ = process.multi_join([sleeper.p_uid, quick.p_uid], join_all=True, timeout=60)
    assert sorted(done) == sorted([(sleeper.p_uid, -signal.SIGTERM), (quick.p_uid, 4)])
    process.kill(sleeper.p_uid)  # a dead process: nothing to do
    with pytest.raises(ProcessError, match="no process"):
        process.query("no-such-process")
    with pytest.raises(ProcessError, match="no process"):
        process.kill(10**15)
    with pytest.raises(ProcessError, match="zero processes"):
        process.multi_join([])
    with pytest.raises(ProcessError, match="not supported"):
        process.runtime_reboot(puids=[sleeper.p_uid])


def test_create_message_round_trips():
    msg = process.get_create_message_with_argdata(
        "prog",
        "/tmp",
        ["a", "b"],
        {"X": "1"},
        argdata=b"\x00\x01",
        user_name="n",
        policy=Policy(cpu_affinity=[0]),
    )
    back = process.ProcessCreateMessage.deserialize(msg.serialize())
    assert (back.exe, back.run_dir, back.args, back.env, back.user_name) == (
        "prog",
        "/tmp",
        ["a", "b"],
        {"X": "1"},
        "n",
    )
    assert back.options.argdata == b"\x00\x01" and back.policy.cpu_affinity == [0]
    with pytest.raises(TypeError):
        process.get_create_message_with_argdata("prog", ".", [], None, argdata="text")


def test_group_create_extend_kill_destroy(tmp_path):
    marks = [tmp_path / f"m{i}" for i in range(3)]
    items = [(1, python_message(write_and_exit, str(marks[0]), "a", 0).serialize())]
    items.append((2, process.get_create_message("sleep", ".", ["60"], None).serialize()))
    g = group.create(items=items, policy=policy_eval.Policy(), soft=False)
    assert isinstance(g, GroupDescriptor) and g.state == GroupDescriptor.State.ACTIVE
    assert [len(s) for s in g.sets] == [1, 2]
    assert all(m.error_code == GroupDescriptor.GroupMember.Errors.SUCCESS for s in g.sets for m in s)
    first = g.sets[0][0].desc.p_uid
    assert process.join(first, timeout=60) == 0 and marks[0].read_text() == "a"
    # create_add_to: one more Python member; add_to: a process made outside the group
    g = group.create_add_to(
        g.g_uid, [(1, python_message(write_and_exit, str(marks[1]), "b", 0))], policy=None
    )
    outsider = process.create("sleep", ".", ["60"], None)
    g = group.add_to(g.name, [outsider.p_uid])
    assert [len(s) for s in g.sets] == [1, 2, 1, 1]
    assert group.query(g.g_uid).get_sdict()["sets"][3][0]["uid"] == outsider.p_uid
    assert g.g_uid in group.get_list()
    g = group.remove_from(g.g_uid, [outsider.p_uid])
    assert [len(s) for s in g.sets] == [1, 2, 1]
    killed = group.kill(g.g_uid, signal.SIGKILL)
    sleepers = [m.desc.p_uid for m in killed.sets[1]]
    done, _ = process.multi_join(sleepers, join_all=True, timeout=60)
    assert sorted(c for _, c in done) == [-signal.SIGKILL] * 2
    gone = group.destroy(g.g_uid)
    assert gone.state == GroupDescriptor.State.DEAD
    assert all(m.desc.state is DEAD for s in gone.sets for m in s)
    with pytest.raises(group.GroupError):
        group.query(g.g_uid)
    assert process.query(outsider.p_uid).state is ACTIVE  # removed from the group: untouched
    process.kill(outsider.p_uid)
    assert process.join(outsider.p_uid, timeout=60) == -signal.SIGKILL
    with pytest.raises(group.GroupError, match="count"):
        group.create(items=[(-1, items[0][1])], policy=None)


def test_node_queries():
    from dragon.native.machine import System
    from dragon.utils import host_id

    descs = node.query_all()
    assert [d.h_uid for d in descs] == node.get_list() == list(System().nodes)
    me = node.query(host_id())
    assert me.h_uid == host_id() and me.num_cpus >= 1 and me.physical_mem > 0 and me.host_name
    assert node.query(me.name).h_uid == me.h_uid
    assert node.query_total_cpus() == sum(d.num_cpus for d in descs)
    with pytest.raises(node.NodeError):
        node.query("no-such-node")


THREE_NODES = """
import sys, os, cloudpickle
from dragon.globalservices import group, node, process, policy_eval
from dragon.infrastructure import process_desc
from dragon.utils import host_id

def hello():
    print("hello from", node.query(host_id()).name, flush=True)

if __name__ == "__main__":
    main = "_dragon_native_python_process_main"
    recipe = ["-c", f"from dragon.native.process import {main}; {main}()"]
    argdata = cloudpickle.dumps((hello, (), {}))
    msg = process.get_create_message_with_argdata(
        exe=sys.executable, run_dir=os.getcwd(), args=recipe, argdata=argdata, env=None)
    cpus = node.query_total_cpus() == 3 * os.cpu_count()
    print("nodes", len(node.query_all()), "cpus", cpus)
    g = group.create(items=[(6, msg.serialize())], policy=policy_eval.Policy(), soft=False)
    active = process_desc.ProcessDescriptor.State.ACTIVE
    puids = [m.desc.p_uid for s in g.sets for m in s if m.desc.state == active]
    done, _ = process.multi_join(puids, join_all=True, timeout=120)
    print("placements", sorted({m.placement for s in g.sets for m in s}), "codes", sorted(c for _, c in done))
    group.destroy(g.g_uid)
"""


def test_group_of_python_processes_over_three_local_nodes(tmp_path):
    """DragonHPC's group demo pattern on 3 local nodes: members go round robin over the
    nodes and each reports its node by name."""
    script = tmp_path / "demo.py"
    script.write_text(textwrap.dedent(THREE_NODES))
    dragon = os.path.join(os.path.dirname(sys.executable), "dragon")
    e = dict(os.environ)
    e.pop("DRAGON_RUNTIME", None)
    before = snapshot()
    r = subprocess.run(
        [dragon, "--local-nodes", "3", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=e,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nodes 3 cpus True" in r.stdout
    assert "placements [0, 1, 2] codes [0, 0, 0, 0, 0, 0]" in r.stdout, r.stdout
    assert len({ln for ln in r.stdout.splitlines() if ln.startswith("hello from")}) == 3, r.stdout
    assert leftovers(before) == []


def echo_twice(conn):
    for _ in range(2):
        conn.send(conn.recv() * 2)
    conn.send_bytes(b"x" * (1 << 20))
    conn.close()


def test_infrastructure_connection_pipe_with_a_process():
    """DragonHPC's ``dragon.infrastructure.connection.Pipe``: a duplex pipe to a process of
    the "dragon" start method (objects both ways, a 1 MiB message), then end of stream."""
    import multiprocessing

    from dragon.infrastructure.connection import Connection, Pipe, PipeOptions

    mine, theirs = Pipe(options=PipeOptions())
    assert isinstance(mine, Connection)
    p = multiprocessing.get_context("dragon").Process(target=echo_twice, args=(theirs,))
    p.start()
    theirs.close()
    mine.send([1, 2])
    assert mine.recv() == [1, 2, 1, 2]
    mine.send("ab")
    assert mine.recv() == "abab"
    assert mine.recv_bytes() == b"x" * (1 << 20)
    p.join(60)
    assert p.exitcode == 0
    with pytest.raises(EOFError):
        mine.recv()
    r, w = Pipe(duplex=False)
    w.send({"k": 1})
    assert r.poll(5) and r.recv() == {"k": 1}
    for c in (mine, r, w):
        c.close()
    with pytest.raises(ValueError, match="channels"):
        Pipe(channels=(1, 2))


def send_over(name, text):
    from dragon.channels import Channel
    from dragon.globalservices import channel as gschannel

    ch = Channel.attach(gschannel.join(name, timeout=60).sdesc)
    h = ch.sendh()
    h.open()
    h.send_bytes(text.encode(), timeout=60)
    h.close()
    ch.detach()


def test_channels_and_pools_through_global_services():
    """DragonHPC's ``globalservices.channel``/``.pool``: a pool made by name, a channel made
    in it and one in the node's default pool (``facts.default_pool_muid_from_index``), joined
    by name from another process that sends through it; reference counts; clear errors."""
    from dragon.channels import Channel
    from dragon.globalservices import channel as gschannel
    from dragon.globalservices import pool as gspool
    from dragon.infrastructure import facts
    from dragon.infrastructure.channel_desc import ChannelDescriptor, ChannelOptions
    from dragon.infrastructure.parameters import this_process
    from dragon.infrastructure.pool_desc import PoolDescriptor
    from dragon.managed_memory import MemoryPool

    pd = gspool.create(8 << 20, user_name="gs-test-pool")
    assert pd.state is PoolDescriptor.State.ACTIVE and gspool.query("gs-test-pool").m_uid == pd.m_uid
    assert gspool.create(8 << 20, user_name="gs-test-pool", soft=True).m_uid == pd.m_uid
    with pytest.raises(gspool.PoolError, match="exists"):
        gspool.create(1 << 20, user_name="gs-test-pool")
    assert MemoryPool.attach(pd.sdesc).muid == pd.m_uid
    default = facts.default_pool_muid_from_index(this_process.index)
    try:
        for m_uid, name in ((pd.m_uid, "gs-chan-a"), (default, "gs-chan-b")):
            cd = gschannel.create(m_uid, user_name=name)
            assert cd.state is ChannelDescriptor.State.ACTIVE and cd.name == name and cd.m_uid == m_uid
            p = process.create_with_argdata(
                sys.executable,
                HERE,
                RECIPE,
                None,
                argdata=cloudpickle.dumps((send_over, (name, name * 2), {})),
            )
            ch = Channel.attach(gschannel.query(name).sdesc)
            h = ch.recvh()
            h.open()
            assert h.recv_bytes(timeout=60) == (name * 2).encode()
            h.close()
            assert process.join(p.p_uid, timeout=60) == 0
            assert cd.c_uid in gschannel.get_list()
            gschannel.destroy(name)
            assert gschannel.query(cd.c_uid).state is ChannelDescriptor.State.DEAD
            with pytest.raises(gschannel.ChannelError):
                gschannel.query(name)  # the name is free again
        counted = gschannel.create(default, options=ChannelOptions(ref_count=True))
        assert gschannel.get_refcnt(counted.c_uid) == 1
        gschannel.query(counted.c_uid, inc_refcnt=True)
        assert gschannel.get_refcnt(counted.c_uid) == 2
        gschannel.release_refcnt(counted.c_uid)
        assert gschannel.query(counted.c_uid).state is ChannelDescriptor.State.ACTIVE
        gschannel.release_refcnt(counted.c_uid)
        assert gschannel.query(counted.c_uid).state is ChannelDescriptor.State.DEAD
        with pytest.raises(TimeoutError):
            gschannel.join("gs-never-made", timeout=0.05)
        with pytest.raises(gschannel.ChannelError, match="default pool"):
            gschannel.create(facts.default_pool_muid_from_index(this_process.index + 7))
        with pytest.raises(gschannel.ChannelError, match="no pool"):
            gschannel.create(424242)
    finally:
        assert gspool.destroy(pd.m_uid).state is PoolDescriptor.State.DEAD
    with pytest.raises(gspool.PoolError):
        gspool.query("gs-test-pool")


def test_this_process_parameters():
    from dragon.infrastructure.parameters import this_process
    from dragon.managed_memory import MemoryPool
    from dragon.utils import B64

    assert this_process.my_puid > 0 and this_process.index == 0 and this_process.pid == os.getpid()
    assert this_process.mode == "single" and this_process.num_gw_channels_per_node == 0
    assert this_process.inf_pd == this_process.default_pd
    assert MemoryPool.attach(B64.str_to_bytes(this_process.inf_pd)).size > 0
