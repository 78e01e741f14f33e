"""What the hotline API takes and gives: request bodies validated with clear 4xx errors, and
response models so that the OpenAPI spec is complete."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# printable text only: PostgreSQL text refuses NUL, and control characters are never wanted
Text = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^[^\x00-\x1f\x7f]*$")]
ShortText = Annotated[Text, StringConstraints(min_length=1, max_length=200)]
LongText = Annotated[Text, StringConstraints(min_length=1, max_length=4000)]
Ident = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x20\x7f]{1,64}$")]
Category = Literal[
    "emergency_repair",
    "inspection",
    "complaint",
    "enquiry",
    "installation",
    "engineering",
    "chasing",
]
Priority = Literal["critical", "high", "normal", "low"]
Role = Literal["dispatcher", "call_taker", "engineer", "technician", "admin"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginIn(Strict):
    username: Annotated[str, StringConstraints(pattern=r"^[a-z0-9._-]{2,64}$")]
    password: Annotated[str, StringConstraints(min_length=1, max_length=256)]


class UserOut(BaseModel):
    username: str
    display_name: str
    role: str


class TokenOut(BaseModel):
    token: str
    expires_at: datetime
    user: UserOut


class TicketOut(BaseModel):
    id: int
    category: str
    priority: str
    status: str
    household_id: str | None
    address: str | None
    district: str | None
    device_id: str | None
    cause: str
    source: str
    summary: str
    department: str | None
    crew: str | None
    owner: str
    test_mode: bool
    repeats: int
    confidence: str
    opened_at: datetime
    on_site_due: datetime | None
    resolve_due: datetime
    due: datetime
    escalation_level: int
    incident_id: int | None
    is_incident: bool
    inhibited: bool
    valve_state: str | None
    on_site_breached: bool
    resolve_breached: bool
    cancel_reason: str | None
    updated_at: datetime
    households_under: int


class EventOut(BaseModel):
    id: int
    at: datetime
    actor: str
    kind: str
    alarm_id: int | None
    detail: dict[str, Any]


class ValveCommandOut(BaseModel):
    id: str
    device_id: str
    action: str
    requested_by: str
    requested_at: datetime
    sent_at: datetime | None
    status: str
    reason: str | None
    result_at: datetime | None


class DeviceOut(BaseModel):
    id: str
    kind: str
    meter_size: str | None
    test_mode: bool


class TicketDetailOut(TicketOut):
    events: list[EventOut]
    valve_commands: list[ValveCommandOut]
    devices: list[DeviceOut]


class CallTicketIn(Strict):
    category: Category
    summary: LongText
    cause: Ident | None = None
    priority: Priority | None = None
    household_id: Ident | None = None
    device_id: Ident | None = None
    caller_name: ShortText | None = None
    caller_phone: Annotated[str, StringConstraints(pattern=r"^[0-9+() -]{3,32}$")] | None = None


class CreatedOut(BaseModel):
    id: int
    joined: bool = Field(
        description="the call joined an open ticket for the same household and cause"
    )
    ticket: TicketOut


class ActionIn(Strict):
    department: ShortText | None = None
    crew: ShortText | None = None
    reason: LongText | None = None
    note: LongText | None = None


class NoteIn(Strict):
    text: LongText


class ValveIn(Strict):
    action: Literal["close_valve", "open_valve"]
    device_id: Ident | None = None
    reason: str | None = Field(None, max_length=500)  # written to the audit log


class ValveRequestedOut(BaseModel):
    command_id: str


class ActionRuleOut(BaseModel):
    starts: list[str]  # the ticket states the action is allowed in
    leads_to: str


class HouseholdOut(BaseModel):
    id: str
    district: str
    address: str
    phone: str | None
    devices: list[DeviceOut]
    open_tickets: list[TicketOut]


class EvidencePoint(BaseModel):
    ts: datetime
    value: float | None
    comm_lost: bool


class EvidenceOut(BaseModel):
    device_id: str
    kind: str
    field: str
    unit: str
    points: list[EvidencePoint]


class SilenceIn(Strict):
    household_id: Ident | None = None
    device_id: Ident | None = None
    reason: LongText
    minutes: int = Field(60, ge=1, le=60 * 24 * 30)


class SilenceOut(BaseModel):
    id: int
    household_id: str | None
    device_id: str | None
    reason: str
    created_by: str
    starts_at: datetime
    ends_at: datetime
    lifted_at: datetime | None


class UserIn(Strict):
    username: Annotated[str, StringConstraints(pattern=r"^[a-z0-9._-]{2,64}$")]
    display_name: ShortText
    role: Role
    password: Annotated[str, StringConstraints(min_length=8, max_length=256)]


class ServiceTimeOut(BaseModel):
    category: str
    on_site_minutes: int | None
    resolve_minutes: int


class ServiceTimeIn(Strict):
    on_site_minutes: int | None = Field(None, ge=1, le=60 * 24 * 30)
    resolve_minutes: int = Field(ge=1, le=60 * 24 * 90)


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    detail: dict[str, Any]


class ReportRow(BaseModel):
    ticket_id: int
    at: datetime
    detail: dict[str, Any]
    category: str
    priority: str
    status: str
    household_id: str | None
    district: str | None
    owner: str


class CategoryFigures(BaseModel):
    category: str
    opened: int
    resolved: int
    open: int
    breached: int


class ReportOut(BaseModel):
    day: str
    utc_offset_hours: float
    open_complaints: list[TicketOut]
    breaches: list[ReportRow]
    escalations: list[ReportRow]
    by_category: list[CategoryFigures]


class AlarmOut(BaseModel):
    id: int
    device_id: str
    household_id: str
    district: str
    rule: str
    severity: str
    confidence: str
    test_mode: bool
    raised_at: datetime
    cleared_at: datetime | None
    raise_value: float | None
    clear_value: float | None


class FailedOutboxRowOut(BaseModel):
    id: int
    alarm_id: int
    event: str
    failed_at: datetime
    error: str | None
    ticket_id: int | None  # the ticket a person looks at (None only if even that failed)
    ticket_status: str | None


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    database: bool
    live_feed: bool
    consoles: int
    stopped_tasks: list[str]  # background tasks down now (the supervisor starts them again)
    task_restarts: dict[str, int]
    failed_outbox_rows: list[int]  # outbox rows that failed in the last 24 h (each ticketed)
