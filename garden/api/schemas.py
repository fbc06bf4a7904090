"""Response bodies of the local HTTP port. They are a public contract for apps and scripts: add
fields freely, never rename or remove one."""

from __future__ import annotations


from typing import Any, Literal

from pydantic import BaseModel, Field

from garden.host.governor import PauseState
from garden.protocol.reach import RelayLimitsSeen
from garden.protocol.records import ContributionTotals, GpuInfo, Role


class Health(BaseModel):
    status: str = "ok"


class Machine(BaseModel):
    cores: int
    ram_bytes: int
    gpu: GpuInfo | None = None


class Shaking(BaseModel):
    """This peer's shaking: why it takes no shards (memory, no teacher), and its state per mission."""

    blocked: str | None = None
    missions: dict[str, str] = Field(default_factory=dict)
    training_blocked: dict[str, str] = Field(
        default_factory=dict, description="missions this peer does not train, with the reason (memory)"
    )
    publish_errors: dict[str, str] = Field(
        default_factory=dict,
        description="missions whose last finished shard could not be stored or published yet (a full disk, a "
        "silent DHT), with the error; retried, and gone once a try works",
    )
    sampler_pid: int | None = Field(
        default=None, description="the process where this peer's teachers load and sample (None: not started)"
    )
    sampler_starts: int = Field(default=0, description="times it was started (more than once: it died and came back)")
    teachers_loaded: list[str] = Field(default_factory=list, description="the models it holds now")


class Serving(BaseModel):
    model: str
    layers: str | None = Field(description="START-END (half-open); None while loading or after a failure")
    throughput: float = Field(description="layer-tokens per second measured at start, one token at a time")
    sessions: int
    max_sessions: int
    tokens_served: int
    refused: dict[str, int] = Field(description="RPCs refused, by error code")
    error: str | None = None
    decode_steps: int = Field(0, description="one-token steps run (a token of a session through these layers)")
    decode_passes: int = Field(0, description="forward passes that ran them: concurrent sessions share passes")
    largest_batch: int = Field(0, description="the most sessions' steps one pass ran")


class Routing(BaseModel):
    """What this peer's generation client learned of a model's servers (``garden.inference.route``)."""

    model: str
    measured: int = Field(description="servers whose round trip or speed this peer measured (last 10 minutes)")
    spot_checks: dict[str, int] = Field(description="spot checks by outcome (agreed, disagreed, ...: --spot-check)")
    liars: dict[str, str] = Field(description="servers a spot check caught answering wrong hidden states, and how")


class Caps(BaseModel):
    """The owner's limits on this peer (``garden run --max-cpu ...``)."""

    max_cpu: float | None = Field(None, description="percent of the whole machine, daemon and children together")
    max_threads: int | None = Field(None, description="torch threads per process (from --max-cpu when not given)")
    max_memory: int | None = Field(None, description="bytes")
    max_disk: int | None = Field(None, description="bytes the data dir may take")
    max_upload_rate: int | None = Field(None, description="bytes per second")
    max_download_rate: int | None = Field(None, description="bytes per second")
    when: str = Field("always", description="always | idle")


class Resources(BaseModel):
    """What the peer uses now, against its caps."""

    cpu: float | None = Field(None, description="share of the machine (0..1) used by the daemon and its children, "
                              "last 10 s")  # fmt: skip
    held_s: float = Field(0.0, description="seconds work waited for the CPU cap")
    owner_load: float | None = Field(None, description="with --when idle: share of the machine other programs use")
    disk_bytes: int | None = Field(None, description="bytes the data dir takes")
    disk_pruned: int = Field(0, description="row sets and checkpoints pruned to stay under --max-disk")
    disk_note: str | None = Field(None, description="why the data dir is over --max-disk, if it is")


class PauseRequest(BaseModel):
    """``POST /pause``: the pause's length (none: until ``POST /resume``) and whether serving stops too."""

    for_s: float | None = Field(None, gt=0, le=366 * 86400, description="seconds; none: until resumed")
    serving: bool | None = Field(None, description="pause serving layers too (default: --pause-serving)")


class PauseReply(PauseState):
    working: str = Field(description="what the peer does now, in words")


class Contribution(BaseModel):
    """What this peer gave, kept in its store across restarts."""

    total: ContributionTotals
    missions: dict[str, ContributionTotals] = Field(description="by mission id")


class InviteReply(BaseModel):
    line: str = Field(description="what a newcomer passes to garden run --join")
    swarm: str
    peers: list[str] = Field(description="the addresses in it, to join through")
    leads: list[str] = Field(default_factory=list, description="peer ids the newcomer will trust as leads")


class Network(BaseModel):
    """Whether others can dial this peer, and how it takes part (``garden.net.reach``)."""

    reachability: Literal["public", "private", "unknown"] = Field(
        "unknown", description="public: others dial it; private: behind a NAT or firewall; unknown: not checked"
    )
    mode: Literal["direct", "relayed", "client"] = Field(
        "direct", description="direct: dialled at its addresses; relayed: through relays; client: dials out only"
    )
    addresses: list[str] = Field(default_factory=list, description="what others can use (relayed ones for private)")
    observed: list[str] = Field(default_factory=list, description="the IPs the checking peers saw it come from")
    relays: list[str] = Field(default_factory=list, description="relays it holds a slot on (private peers)")
    relay_service: bool = Field(False, description="it relays for private peers (public peers)")
    relay_limits: RelayLimitsSeen = Field(
        "", description="a relaying peer's probe of its own relay: garden's --relay-* limits serve, or libp2p's "
        "defaults (128 KiB a relayed connection, hivemind's p2pd start-up race lost at every start), or not known"
    )  # fmt: skip
    relay_check: str = Field("", description="that probe, in words")
    hole_punching: bool = Field(False, description="libp2p's DCUtR tries to turn relayed connections into direct ones")
    checked_by: dict[str, str] = Field(default_factory=dict, description="peer id -> what its reach check answered")
    note: str = ""


class Status(BaseModel):
    peer_id: str
    version: str
    uptime_s: float = Field(description="seconds since the daemon joined the swarm")
    roles: list[Role]
    skipped_roles: dict[str, str] = Field(description="roles this machine cannot take, with the reason")
    addresses: list[str] = Field(description="multiaddrs others can join through (empty in client mode)")
    peers: int = Field(description="peers seen in the swarm at the last refresh, this one included")
    joined: bool = Field(description="this peer's record has been stored in the DHT at least once")
    swarm: str
    client_mode: bool
    network: Network = Field(default_factory=lambda: Network(), description="whether others can dial this peer")
    announce_period_s: float = Field(description="seconds between announces of this peer's record")
    machine: Machine
    shaking: Shaking | None = None
    serving: list[Serving] = Field(default_factory=list, description="layer ranges this peer serves (--serve)")
    routing: list[Routing] = Field(default_factory=list, description="what generating here learned of the servers")
    paused: bool = Field(False, description="its owner paused it (garden pause)")
    pause: PauseState = Field(default_factory=PauseState)
    working: str = Field("working", description="working | paused | waiting: <why> | working (throttled ...)")
    caps: Caps = Field(default_factory=Caps)
    resources: Resources = Field(default_factory=Resources)
    contribution: ContributionTotals = Field(default_factory=ContributionTotals)
    protocol: int = Field(description="the peer-record protocol version this garden speaks")
    upgrade: str | None = Field(None, description="set when peers speak a newer protocol: what to do")
    incompatible_peers: int = Field(0, description="peers ignored because they speak another protocol version")


class Peer(BaseModel):
    peer_id: str
    version: str
    roles: list[Role]
    cores: int
    ram_bytes: int
    gpu: GpuInfo | None = None
    load: float
    addresses: list[str]
    client_mode: bool
    reachability: str = Field("unknown", description="public | private | unknown, as the peer announced it")
    last_seen: float = Field(description="DHT time (unix seconds) of the peer's latest announce")
    paused: bool = False
    working: str = ""
    contribution: ContributionTotals | None = None
    expires_in_s: float = Field(description="seconds until the record expires unless re-announced")
    is_self: bool


class Error(BaseModel):
    detail: str


# --- missions ------------------------------------------------------------------------------------------


class MissionCreate(BaseModel):
    """``POST /missions``: the mission file's content as JSON, and its prompts (``garden mission create``
    sends both). ``prompts`` may be left out when ``spec.prompts`` names a built-in set."""

    spec: dict[str, Any] = Field(description="the mission.toml keys and sections, as a JSON object")
    prompts: list[dict[str, Any]] | None = Field(
        default=None, description='prompt rows: {"prompt": ..., "reference": ..., "meta": {...}}'
    )


class ShardCounts(BaseModel):
    total: int
    done: int
    leased: int
    open: int


class StudentModel(BaseModel):
    """A mission's student that its lead published as a model of the swarm (``mission:<mission id>``)."""

    model: str = Field(description="mission:<mission id>: the reference every peer names it by")
    mission_id: str
    name: str = Field(description="the mission's name (mission:<name> works where unambiguous)")
    lead: str = Field(description="the lead's peer id, who published it")
    trusted: bool = Field(description="whether this peer works for its lead (--trust-lead; true without it)")
    epoch: int = Field(description="the checkpoint published (the lead vouched for it)")
    manifest_sha256: str = Field(description="the hash of its files' list: exactly these files are pulled")
    base: str = Field(description="the model the student started from")
    architecture: str
    parameters: int
    layers: int
    tokenizer: str = Field(description="the tokenizer's fingerprint")
    size: int = Field(description="bytes of its files")
    metrics: dict[str, float] = Field(
        description="the lead's evaluation on rows of the mission it holds: kl (KL(teacher || student)), nll, top1 "
        "(agreement with the teacher's top token), pref_acc (chosen over rejected), base_kl (the untrained "
        "student's KL), rows"
    )
    published: float = Field(description="when (the lead's clock, unix seconds)")
    local_path: str | None = Field(None, description="where this peer keeps its files, once pulled (first use)")


class MissionSummary(BaseModel):
    id: str
    name: str
    state: str = Field(
        description="its life: fetching (prompts not here yet) | shaking | training (every shard done) | trained (a "
        "checkpoint of its last epoch is announced) | published (its lead published the student as mission:<id>) | "
        "cancelled | not worked on here"
    )
    lead: str = Field(description="peer id of the lead, who signed the mission")
    trusted: bool = Field(True, description="whether this peer works for its lead (--trust-lead; true without it)")
    not_worked_on: str | None = Field(
        None, description="why this peer does not work on it: an untrusted lead, a model path from another peer"
    )
    created: float = Field(description="the lead's clock at signing (unix seconds)")
    prompts: int
    shards: ShardCounts
    rows: int = Field(description="rows of the shards done so far (winning attempts)")


class MissionPeer(BaseModel):
    peer_id: str
    has_prompts: bool = False
    row_sets: int = Field(default=0, description="row sets this peer announces holding")
    rows_held: int = 0
    shards_done: int = Field(default=0, description="shards whose winning attempt this peer sampled")
    leased: list[int] = Field(default_factory=list, description="shards this peer holds a live lease on")


class MissionWorkHere(BaseModel):
    """What this peer does for the mission."""

    state: str
    shards_shaken: int
    rows_shaken: int
    shards_lost: int
    replicated: int
    seconds_shaking: float
    publish_error: str | None = Field(None, description="the last failure to store or publish a finished shard")


class TrainPoint(BaseModel):
    """One point of a mission's training curve on this peer (the dashboard's charts)."""

    t: float = Field(description="unix time")
    epoch: int | None = None
    samples: int | None = None
    loss: float | None = None
    kl: float | None = None
    pref_acc: float | None = None


class MissionTraining(BaseModel):
    """This peer's share of training the mission's student (``garden.mission.training``)."""

    state: str = Field(description="waiting for rows | starting | loading state from peers | training | done | "
                       "stopped | failed | restarting in N s")  # fmt: skip
    epoch: int = Field(0, description="the swarm epoch this peer is at (target_batch_size rows each)")
    max_epochs: int = 0
    samples: int = Field(0, description="rows this peer trained on")
    samples_per_s: float = Field(0.0, description="this peer's training rate")
    peers: int = Field(0, description="trainers in the swarm's latest progress report")
    loss: float | None = None
    kl: float | None = None
    pref_acc: float | None = None
    skipped_steps: int = Field(0, description="steps with a non-finite loss or gradient: not applied, not sent")
    rows: int = Field(0, description="usable rows this peer trains on")
    rows_skipped: int = Field(0, description="stored rows refused (damaged) or left out (too long)")
    rows_held_out: int = Field(0, description="rows of the mission's held-out prompts: never trained on, the lead "
                               "measures checkpoints on them")
    loaded_state_at_epoch: int | None = Field(None, description="joined late: the epoch it loaded from peers")
    last_checkpoint: dict[str, Any] | None = None
    params_probe: list[float] | None = Field(
        None, description="sum, sum of squares and a weighted sum of the parameters: equal on peers in sync"
    )
    bytes_sent: int = Field(0, description="bytes this peer's trainer sent while averaging with peers")
    restarts: int = Field(0, description="times the daemon restarted a failed trainer")
    error: str | None = None
    pid: int | None = Field(None, description="the trainer worker's process (its last one, once it exited)")
    history: list[TrainPoint] = Field(default_factory=list, description="loss, KL and accuracy over time (last 500)")


class CheckpointInfo(BaseModel):
    """A checkpoint of a mission's student, as a peer announces it (``m/<id>/ckpt``)."""

    epoch: int
    peer_id: str = Field(description="the peer that holds and serves its files")
    size: int = Field(description="bytes of all its files")
    files: list[dict[str, Any]] = Field(description='[{"path": "model/...", "size": n, "sha256": ...}]')
    metrics: dict[str, float]
    created: float
    verified: bool = Field(False, description="its files are what the mission's lead (or a --trust-lead) vouched for")
    vouched_by: str | None = Field(None, description="the voucher's peer id, when verified")
    vouch_metrics: dict[str, float] = Field(default_factory=dict, description="what the voucher measured (kl: "
                                            "KL(teacher || student) on rows it holds, base_kl: the base student's)")


class PulledCheckpoint(CheckpointInfo):
    local_path: str = Field(description="where this peer keeps the pulled copy (a transformers directory)")


class Verification(BaseModel):
    """Other producers' winning row sets that this peer checked against the teacher (``verify_fraction`` of
    each one's rows; every row once its producer was refuted)."""

    verified: int = Field(0, description="row sets whose checked rows all held")
    refuted: int = Field(0, description="row sets with a row that failed: void here, their shards sampled again")
    pending: int = Field(0, description="winning row sets held here, produced elsewhere, not checked yet")
    rows_checked: int = 0
    producers_refuted: list[str] = Field(default_factory=list, description="their later results are ignored here")
    unconfirmed: int = Field(
        0, description="other peers' refutations not obeyed here: signed by peers this one does not trust, and "
        "their named row held when checked here (or this peer cannot check)"
    )


class MissionDetail(MissionSummary):
    peers: list[MissionPeer]
    student: StudentModel | None = Field(None, description="the published student (state published), mission:<id>")
    teachers: dict[str, int] = Field(description="rows per teacher reference, over the shards done")
    shards_per_s: float | None = Field(None, description="shards finished per second since the mission began")
    eta_s: float | None = Field(None, description="seconds until every shard is done at that rate")
    this_peer: MissionWorkHere
    verification: Verification = Field(default_factory=Verification)
    cancel_reason: str | None = None
    train: MissionTraining | None = Field(None, description="None: this peer does not train missions")
    spec: dict[str, Any]


# --- models served by the swarm --------------------------------------------------------------------------


class ServedSpan(BaseModel):
    peer_id: str
    start: int
    end: int = Field(description="half-open: layers start..end-1")
    throughput: float


class ModelLayers(BaseModel):
    """One model of the swarm: announced by some server (with which of its layers are covered), or a published
    student (``student``) that no server may serve yet."""

    model: str
    num_layers: int
    servers: int
    complete: bool = Field(description="every layer is served: the model can generate")
    missing: list[list[int]] = Field(description="[start, end) spans no server announces")
    spans: list[ServedSpan]
    student: StudentModel | None = Field(None, description="a mission's published student: where it came from")


class ModelPull(BaseModel):
    """``POST /models/pull``: a model reference to have on this machine (``mission:<id>``, a prefix, a name)."""

    model: str = Field(min_length=1, max_length=256)


class PulledModel(BaseModel):
    model: str = Field(description="the swarm's name for it")
    path: str | None = Field(None, description="where its files are (a transformers directory); None for a "
                             "reference that loads as it is (a hub id, builtin:...)")  # fmt: skip
