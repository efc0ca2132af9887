"""DragonHPC's ``dragon.globalservices.group``: groups of processes made from create
messages (``process.get_create_message``), extended, signalled and destroyed as one.

A group's membership is kept in the runtime's name registry (kind ``"group"``), so every
process of the runtime can query, extend or kill it by g_uid or name; member states are read
live from the process table each time.
"""

from __future__ import annotations

import json
import signal

from dragon.infrastructure.group_desc import GroupDescriptor
from dragon.infrastructure.policy import Policy
from dragon.infrastructure.process_desc import ProcessDescriptor

Member = GroupDescriptor.GroupMember
_made: list[int] = []  # g_uids of the groups this process made


class GroupError(Exception):
    """No such group, or a group operation failed."""


def _agent():
    from dragon import _runtime

    return _runtime.agent()


def _save(desc: GroupDescriptor) -> None:
    record = {
        "g_uid": desc.g_uid,
        "name": desc.name,
        "sets": [[m.uid for m in s] for s in desc.sets],
        "policy": desc.policy.get_sdict() if isinstance(desc.policy, Policy) else None,
    }
    _agent().register("group", str(desc.g_uid), json.dumps(record).encode(), replace=True)


def _g_uid(identifier: int | str) -> int:
    if isinstance(identifier, str):
        v = _agent().lookup("group-name", identifier)
        if v is None:
            raise GroupError(f"no group named {identifier!r}")
        return int(v)
    return int(identifier)


def _member(puid: int, state=None) -> Member:
    from dragon.globalservices import process

    try:
        d = process.query(puid)
    except Exception as e:
        return Member(
            state=ProcessDescriptor.State.DEAD, uid=puid, error_code=Member.Errors.FAIL, error_info=str(e)
        )
    return Member(
        state=state or d.state, uid=puid, placement=d.node, desc=d, error_code=Member.Errors.SUCCESS
    )


def query(identifier: int | str) -> GroupDescriptor:
    """The group's descriptor (members' states as they are now), by g_uid or name."""
    g = _g_uid(identifier)
    v = _agent().lookup("group", str(g))
    if v is None:
        raise GroupError(f"no group {identifier!r}")
    rec = json.loads(v)
    sets = [[_member(puid) for puid in s] for s in rec["sets"]]
    alive = any(
        m.desc is not None and m.desc.state is ProcessDescriptor.State.ACTIVE for s in sets for m in s
    )
    state = GroupDescriptor.State.ACTIVE if alive else GroupDescriptor.State.DEAD
    return GroupDescriptor(state=state, g_uid=g, name=rec["name"], sets=sets, policy=rec["policy"])


_mpi_groups: dict[int, object] = {}  # g_uid -> the ProcessGroup serving its MPI ranks


def _parse_items(items) -> list:
    from dragon.globalservices import process

    if not isinstance(items, (list, tuple)):
        raise GroupError("items must be a list of (count, create message) tuples")
    out = []
    for item in items:
        try:
            n, msg = item
        except (TypeError, ValueError):
            raise GroupError(f"an item must be (count, create message), not {item!r}") from None
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise GroupError(f"a count must be an int >= 0, not {n!r}")
        if not isinstance(msg, process.ProcessCreateMessage):
            msg = process.ProcessCreateMessage.deserialize(msg)
        out.append((n, msg))
    return out


def _create_mpi(items, policy) -> tuple[list[list[Member]], object]:
    """Items whose create messages ask for PMI: one MPI job, run as a
    ``ProcessGroup(pmi=...)`` (which places the ranks, serves them PMI/PMIx and ends them
    all when one aborts or fails); its processes are the group's members."""
    from dragon.globalservices import process
    from dragon.native.process import ProcessTemplate
    from dragon.native.process_group import ProcessGroup

    pg = ProcessGroup(pmi=items[0][1].pmi, policy=policy)
    for n, msg in items:
        if n:
            t = ProcessTemplate(msg.exe, tuple(msg.args), None, msg.run_dir, msg.env, policy=msg.policy)
            pg.add_process(nproc=n, template=t)
    pg.init()
    try:
        pg.start()
    except Exception as e:
        raise GroupError(f"starting the MPI group failed: {e}") from e
    with pg._lock:
        order = sorted(pg._ranks, key=pg._ranks.get)  # puids by rank: the items' order
    sets, i = [], 0
    for n, _ in items:
        sets.append([_member_of(process.query(puid)) for puid in order[i : i + n]])
        i += n
    return sets, pg


def _member_of(d) -> Member:
    """The member for a process descriptor."""
    return Member(state=d.state, uid=d.p_uid, placement=d.node, desc=d, error_code=Member.Errors.SUCCESS)


def _create_items(items, policy) -> list[list[Member]]:
    """Starts the processes of parsed ``(n, message)`` items, one set each."""
    from dragon.globalservices import process

    sets = []
    for n, msg in items:
        if msg.user_name and n > 1:
            raise GroupError(f"{n} processes cannot share the name {msg.user_name!r}")
        members = []
        for _ in range(n):
            try:
                d = process._launch(msg, group_policy=policy)
            except Exception as e:
                members.append(
                    Member(
                        state=ProcessDescriptor.State.DEAD, error_code=Member.Errors.FAIL, error_info=str(e)
                    )
                )
                continue
            members.append(_member_of(d))
        sets.append(members)
    return sets


def create(items, policy=None, user_name="", soft=False, pmix_ddict=None) -> GroupDescriptor:
    """Makes a group: for each ``(n, create message)`` of ``items``, ``n`` processes placed by
    their message's policy, else the group's ``policy``. ``user_name`` names the group
    (``soft``: an existing group of that name is returned). Members that fail to start are
    in ``sets`` with ``error_code`` FAIL."""
    a = _agent()
    if soft and not user_name:
        raise GroupError("soft=True needs a group name (user_name)")
    if user_name and a.lookup("group-name", user_name) is not None:
        if soft:
            return query(user_name)
        raise GroupError(f"a group named {user_name!r} exists already")
    parsed = _parse_items(items)
    mpi = [msg.pmi is not None for _, msg in parsed]
    if any(mpi) and not all(mpi):
        raise GroupError("a group's create messages either all ask for pmi (one MPI job) or none does")
    g = a.new_id("p_uid")
    name = user_name or f"dragon_group_{g}"
    a.register("group-name", name, str(g).encode())
    if parsed and all(mpi):
        try:
            sets, pg = _create_mpi(parsed, policy)
        except BaseException:
            a.unregister("group-name", name)
            raise
        _mpi_groups[g] = pg
    else:
        sets = _create_items(parsed, policy)
    desc = GroupDescriptor(state=GroupDescriptor.State.ACTIVE, g_uid=g, name=name, sets=sets, policy=policy)
    _save(desc)
    _made.append(g)
    return desc


def add_to(identifier: int | str, items) -> GroupDescriptor:
    """Adds existing processes (p_uids or names) to the group, as one new set."""
    from dragon.globalservices import process

    desc = query(identifier)
    members = []
    for ident in items:
        try:
            d = process.query(ident)
        except Exception as e:
            raise GroupError(f"cannot add {ident!r}: {e}") from None
        members.append(_member_of(d))
    desc.sets.append(members)
    _save(desc)
    return desc


def create_add_to(identifier: int | str, items, policy=None) -> GroupDescriptor:
    """Makes processes from ``(n, create message)`` items and adds them to the group."""
    desc = query(identifier)
    desc.sets.extend(_create_items(_parse_items(items), policy or desc.policy))
    desc.state = GroupDescriptor.State.ACTIVE
    _save(desc)
    return desc


def remove_from(identifier: int | str, items) -> GroupDescriptor:
    """Takes processes (p_uids or names) out of the group; they keep running."""
    from dragon.globalservices import process

    desc = query(identifier)
    gone = {process.query(i).p_uid for i in items}
    missing = gone - {m.uid for s in desc.sets for m in s}
    if missing:
        raise GroupError(f"processes {sorted(missing)} are not members of group {desc.g_uid}")
    desc.sets = [[m for m in s if m.uid not in gone] for s in desc.sets]
    desc.sets = [s for s in desc.sets if s]
    _save(desc)
    return desc


def destroy_remove_from(identifier: int | str, items) -> GroupDescriptor:
    """Takes processes out of the group and ends them (SIGKILL)."""
    from dragon.globalservices import process

    desc = remove_from(identifier, items)
    for i in items:
        process.kill(i, signal.SIGKILL)
        process.join(i)
    return desc


def kill(identifier: int | str, sig: int = signal.SIGKILL, hide_stderr: bool = False) -> GroupDescriptor:
    """Sends ``sig`` to every member still running; returns the group's descriptor."""
    from dragon.globalservices import process

    desc = query(identifier)
    for s in desc.sets:
        for m in s:
            if m.uid is not None and m.desc is not None and m.desc.state is ProcessDescriptor.State.ACTIVE:
                process.kill(m.uid, sig)
    return desc


def destroy(identifier: int | str) -> GroupDescriptor:
    """Ends every member (SIGKILL), waits for them and forgets the group."""
    from dragon.globalservices import process

    desc = kill(identifier, signal.SIGKILL)
    for s in desc.sets:
        for m in s:
            if m.uid is not None and m.desc is not None:
                process.join(m.uid)
    a = _agent()
    a.unregister("group", str(desc.g_uid))
    a.unregister("group-name", desc.name)
    return query_dead(desc)


def query_dead(desc: GroupDescriptor) -> GroupDescriptor:
    """The descriptor of a destroyed group: every member DEAD, with its exit code."""
    for s in desc.sets:
        for i, m in enumerate(s):
            s[i] = _member(m.uid) if m.uid is not None else m
    desc.state = GroupDescriptor.State.DEAD
    return desc


def get_list() -> list[int]:
    """The g_uids of the groups this process made that still exist."""
    return sorted(g for g in _made if _agent().lookup("group", str(g)) is not None)
