"""Kafka evidence of one correlation: for each consuming step, does its topic exist, does its group
exist and how many members does it have, what has it committed against the record this
correlation produced into the topic, how far behind is it; and, for a step where a correlation
stopped without a consumer, which other groups consume its topic (a worker on a wrong group):
groups whose live members are assigned the topic's partitions (DescribeGroups, each member's
assignment decoded with aiokafka's consumer protocol structs) or that committed offsets on it.

Read-only admin requests (DescribeTopics, ListGroups, DescribeGroups, OffsetFetch, ListOffsets)
through the shared :class:`EvidenceSources` clients.
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocol, ConsumerProtocolMemberAssignment

from hoptrace.contract import PipelineSpec, Step

from .evidence_clients import EvidenceSources
from .records import GroupMember, KafkaFacts, RecordRef, SpanRecord
from .spanfacts import emitted_record, reports_ok, step_runs

#: Other consumer groups examined when looking for a worker running under a wrong group.
OTHER_GROUPS_LIMIT = 200
#: A group DescribeGroups reports in this state no longer exists.
_DEAD = "Dead"


class KafkaBase(NamedTuple):
    """What one round of admin requests says about the spec's consumed topics and groups."""

    #: partitions per consumed topic (None: the topic does not exist)
    partitions: dict[str, list[int] | None]
    #: (state, members) per existing group
    groups: dict[str, tuple[str, int]]
    #: committed offsets per partition, by step id
    committed: dict[str, dict[int, int]]
    #: end offsets of the consumed topics' partitions
    ends: dict[TopicPartition, int]


async def list_groups(admin: AIOKafkaAdminClient) -> list[str]:
    """Group ids on every broker, through aiokafka's public API (it asks for the cluster's
    metadata first, then each broker in turn)."""
    return [g[0] for g in await admin.list_consumer_groups()]


def _groups_described(responses: list[Any]) -> dict[str, tuple[str, int]]:
    """DescribeGroups responses -> {group: (state, members)} for groups that exist."""
    out: dict[str, tuple[str, int]] = {}
    for resp in responses:
        for g in getattr(resp, "groups", ()):
            error, gid, state, members = g[0], g[1], g[2], g[5]
            if error == 0 and gid and state != _DEAD:
                out[gid] = (state, len(members))
    return out


async def kafka_base(sources: EvidenceSources, spec: PipelineSpec) -> KafkaBase:
    """Topic partitions, group states and members, group committed offsets per consumed topic
    partition, end offsets of the consumed topics: the requests run concurrently."""
    admin, consumer = await sources.kafka()
    consuming = [s for s in spec.steps if s.consumes and s.group]
    topics = list(dict.fromkeys(s.consumes for s in consuming if s.consumes))
    groups_listed = asyncio.ensure_future(list_groups(admin))
    try:
        described = await admin.describe_topics(topics) if topics else []
    except BaseException:
        groups_listed.cancel()
        raise
    parts: dict[str, list[int] | None] = {t: None for t in topics}
    for t in described:
        if t.get("error_code") == 0:
            parts[t["topic"]] = sorted(p["partition"] for p in t.get("partitions", []))
    groups = [s.group for s in consuming if s.group]

    async def describe() -> dict[str, tuple[str, int]]:
        # DescribeGroups on a group the broker does not know, or on several groups at once,
        # returns bodies aiokafka 0.14 misreads with Kafka 4: list the groups first, then
        # describe each existing group in its own request (concurrently).
        known = set(await groups_listed)
        present = [g for g in groups if g in known]

        async def one(group: str) -> list[Any]:
            coord = await sources.coordinator(group)
            return await admin.describe_consumer_groups([group], group_coordinator_id=coord)

        out: dict[str, tuple[str, int]] = {}
        for responses in await asyncio.gather(*(one(g) for g in present)):
            out.update(_groups_described(responses))
        return out

    async def offsets(step: Step) -> tuple[str, dict[int, int]]:
        assert step.group and step.consumes
        tps = [TopicPartition(step.consumes, p) for p in parts.get(step.consumes) or []]
        if not tps:
            return step.id, {}
        coord = await sources.coordinator(step.group)
        got = await admin.list_consumer_group_offsets(
            step.group, group_coordinator_id=coord, partitions=tps
        )
        return step.id, {tp.partition: om.offset for tp, om in got.items() if om.offset >= 0}

    async def ends() -> dict[TopicPartition, int]:
        tps = [TopicPartition(t, p) for t, ps in parts.items() for p in ps or []]
        return dict(await consumer.end_offsets(tps)) if tps else {}

    state, ends_, *offs = await asyncio.gather(
        describe(), ends(), *(offsets(s) for s in consuming if parts.get(s.consumes))
    )
    return KafkaBase(parts, state, dict(offs), ends_)


def kafka_facts(
    spec: PipelineSpec, spans: tuple[SpanRecord, ...], base: KafkaBase
) -> dict[str, KafkaFacts]:
    """Per consuming step: its topic and group facts, placed against the record the step's
    emitter (``spec.emitter``) produced for this correlation."""
    out: dict[str, KafkaFacts] = {}
    ok_by_step = {
        sid: [s for s in rs if reports_ok(s)] for sid, rs in step_runs(spec, spans).items()
    }
    for step in spec.steps:
        if not step.consumes:
            continue
        emitter = spec.emitter(step.id)
        record: RecordRef | None = None
        if emitter is not None:
            record = emitted_record(emitter, ok_by_step.get(emitter.id, []), spans)
        exists = base.partitions.get(step.consumes) is not None
        group_state = base.groups.get(step.group) if step.group else None
        offs = base.committed.get(step.id, {})
        committed_at = end_at = None
        if record is not None and record.partition is not None:
            committed_at = offs.get(record.partition)
            end_at = base.ends.get(TopicPartition(step.consumes, record.partition))
        elif exists:
            end_at = sum(v for tp, v in base.ends.items() if tp.topic == step.consumes)
            committed_at = sum(offs.values()) if offs else None
        out[step.id] = KafkaFacts(
            topic=step.consumes,
            group=step.group,
            topic_exists=exists,
            group_exists=bool(group_state) or bool(offs),
            group_state=group_state[0] if group_state else None,
            group_members=group_state[1] if group_state else 0,
            record=record,
            committed_offset=committed_at,
            end_offset=end_at,
        )
    return out


def assigned(responses: list[Any], topic: str) -> list[GroupMember]:
    """The live members of the described groups assigned partitions of ``topic`` (consumer
    protocol groups only; an assignment that does not decode is skipped)."""
    out: list[GroupMember] = []
    for resp in responses:
        for g in getattr(resp, "groups", ()):
            error, gid, state, protocol_type, members = g[0], g[1], g[2], g[3], g[5]
            if error or state == _DEAD or protocol_type != ConsumerProtocol.PROTOCOL_TYPE:
                continue
            for member in members:
                _member_id, client_id, host, _metadata, raw = member[:5]
                try:
                    assignment = ConsumerProtocolMemberAssignment.decode(raw)
                except Exception:  # noqa: BLE001 - not a consumer assignment: not evidence
                    continue
                parts = sorted(p for t, ps in assignment.assignment if t == topic for p in ps)
                if parts:
                    out.append(GroupMember(gid, client_id, host, tuple(parts)))
    return out


class OtherGroups(NamedTuple):
    """Groups other than a step's own consuming its topic, and their live members there."""

    groups: tuple[str, ...]
    members: tuple[GroupMember, ...]


async def other_groups(sources: EvidenceSources, step: Step, partitions: list[int]) -> OtherGroups:
    """Groups other than the step's own that consume the step's topic: live members assigned its
    partitions (a group that joined and has committed nothing yet counts), or committed offsets
    on it. Each group is described in its own request (see ``kafka_base``)."""
    admin, _ = await sources.kafka()
    assert step.consumes
    topic = step.consumes
    listed = [g for g in await list_groups(admin) if g != step.group]
    # likeliest first: names derived from the expected group
    listed.sort(key=lambda g: (not (step.group and g.startswith(step.group)), g))
    tps = [TopicPartition(topic, p) for p in partitions]
    sem = asyncio.Semaphore(16)

    async def one(group: str) -> tuple[str, list[GroupMember], bool]:
        async with sem:
            coord = await sources.coordinator(group)
            described, got = await asyncio.gather(
                admin.describe_consumer_groups([group], group_coordinator_id=coord),
                admin.list_consumer_group_offsets(group, group_coordinator_id=coord, partitions=tps)
                if tps
                else asyncio.sleep(0, {}),
                return_exceptions=True,
            )
            live = assigned(described, topic) if isinstance(described, list) else []
            if isinstance(got, BaseException):
                if not live and isinstance(described, BaseException):
                    raise got
                got = {}
            return group, live, any(om.offset >= 0 for om in got.values())

    found = await asyncio.gather(*(one(g) for g in listed[:OTHER_GROUPS_LIMIT]))
    groups = tuple(g for g, live, committed in found if live or committed)
    members = tuple(m for _, live, _ in found for m in live)
    return OtherGroups(groups, members)
