"""Settings: YAML files under ``settings/`` and environment variables, loaded and validated once at start-up."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import jinja2
import jinja2.meta
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

PROJECT_DIR = Path(__file__).resolve().parents[2]
DEFAULT_SETTINGS_DIR = PROJECT_DIR / "settings"
DEFAULT_OUTPUT_DIR = PROJECT_DIR / "outputs"


class ConfigError(Exception):
    """A settings file or environment variable is missing or invalid; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    min: int
    max: int

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min > self.max:
            raise ValueError("min must not exceed max")
        return self


class ScenesDefaults(_Strict):
    character_characteristics: str
    number_of_scenes: int
    video_type: str
    video_characteristics: str
    camera_angle: str
    style: str | None = None  # a preset name from settings/styles/, or none


class ScenesLimits(_Strict):
    number_of_scenes: Range
    text_max_chars: PositiveInt


class ScenesSettings(_Strict):
    model: str
    temperature: float = Field(ge=0, le=2)
    malformed_reply_retries: int = Field(ge=0, le=5)
    timeout_seconds: PositiveFloat
    defaults: ScenesDefaults
    limits: ScenesLimits
    prompt: str

    @model_validator(mode="after")
    def _default_in_range(self) -> ScenesSettings:
        bounds = self.limits.number_of_scenes
        if not bounds.min <= self.defaults.number_of_scenes <= bounds.max:
            raise ValueError("defaults.number_of_scenes lies outside limits.number_of_scenes")
        return self


class ImagesDefaults(_Strict):
    number_of_images: int = 1
    aspect_ratio: str
    safety_filter_level: str
    person_generation: str
    output_format: str
    negative_prompt: str
    seed: int | None


class ImagesAllowed(_Strict):
    aspect_ratio: list[str] = Field(min_length=1)
    safety_filter_level: list[str] = Field(min_length=1)
    person_generation: list[str] = Field(min_length=1)
    output_format: list[Literal["png", "jpg", "webp"]] = Field(min_length=1)


class TextLimits(_Strict):
    text_max_chars: PositiveInt


class ImagesLimits(TextLimits):
    number_of_images: Range = Range(min=1, max=4)
    # Largest image a provider may return; a larger download is cut off and the request fails.
    output_max_bytes: PositiveInt = 20 * 1024 * 1024


class ImagesSettings(_Strict):
    model: str
    timeout_seconds: PositiveFloat
    poll_interval_seconds: PositiveFloat
    defaults: ImagesDefaults
    allowed: ImagesAllowed
    limits: ImagesLimits
    prompt: str

    @model_validator(mode="after")
    def _defaults_allowed(self) -> ImagesSettings:
        _check_defaults_allowed(self.defaults, self.allowed)
        bounds = self.limits.number_of_images
        if not 1 <= bounds.min <= self.defaults.number_of_images <= bounds.max <= 4:
            raise ValueError("defaults.number_of_images must lie inside limits.number_of_images, within 1..4")
        return self


class ReplicateVideoBackend(_Strict):
    model: str
    reference_image_aspect_ratios: list[str] = Field(min_length=1)
    reference_image_durations: list[PositiveInt] = Field(min_length=1)


class GeminiVideoBackend(_Strict):
    model: str
    person_generation: str
    resolution: str


class VideoBackends(_Strict):
    replicate: ReplicateVideoBackend
    gemini: GeminiVideoBackend


class VideosDefaults(_Strict):
    negative_prompt: str
    aspect_ratio: str
    duration: int
    generate_audio: bool
    seed: int | None


class VideosAllowed(_Strict):
    aspect_ratio: list[str] = Field(min_length=1)
    duration: list[PositiveInt] = Field(min_length=1)


class VideosLimits(_Strict):
    text_max_chars: PositiveInt
    full_prompt_max_chars: PositiveInt
    reference_image_max_bytes: PositiveInt
    reference_image_max_pixels: PositiveInt
    # Largest video (or lip-sync clip) a provider may return; a larger download is cut off and the job fails.
    output_max_bytes: PositiveInt = 256 * 1024 * 1024


class JobsSettings(_Strict):
    max_concurrent: PositiveInt
    timeout_seconds: PositiveFloat
    poll_interval_seconds: PositiveFloat
    request_timeout_seconds: PositiveFloat
    retry_attempts: int = Field(ge=0, le=20)
    retry_initial_delay_seconds: PositiveFloat
    retry_max_delay_seconds: PositiveFloat
    sse_ping_interval_seconds: PositiveFloat
    sse_retry_ms: int = Field(ge=0)
    sse_max_jobs_per_stream: int = Field(default=50, ge=1, le=500)
    webhook_safety_poll_seconds: PositiveFloat = 30.0
    # The largest deadline_seconds a job-creating request may ask for.
    max_deadline_seconds: PositiveFloat = 3600.0
    # Webhooks out (a job's webhook_url): each POST may take this long; a failed one is tried again after
    # retry_initial, doubling up to retry_max, until retry_seconds after the first attempt (then it is given up).
    webhook_timeout_seconds: PositiveFloat = 10.0
    webhook_retry_initial_seconds: PositiveFloat = 5.0
    webhook_retry_max_delay_seconds: PositiveFloat = 3600.0
    webhook_retry_seconds: PositiveFloat = 86400.0
    # Several processes (Redis store): a running job's lease lives this long without renewal (renewed every third
    # of it); a node looks for jobs abandoned by a dead node this often.
    lease_seconds: PositiveFloat = 30.0
    claim_interval_seconds: PositiveFloat = 5.0
    # Finished jobs (record, events, reference image, video) and old images and scenes are removed after this many
    # hours; 0 keeps everything. An expired job id answers 410 for as long again.
    retention_hours: float = Field(default=720.0, ge=0)


class PosterSettings(_Strict):
    """The poster (first frame, JPEG) made once with ffmpeg when a clip is stored: bounded work per clip."""

    max_side: int = Field(default=640, ge=16, le=4096)  # the poster fits in max_side x max_side pixels
    timeout_seconds: PositiveFloat = 20.0  # probe + frame, each; a clip that takes longer gets no poster
    concurrency: int = Field(default=2, ge=1, le=32)  # ffmpeg runs for posters at once per process


class VideosSettings(_Strict):
    default_backend: Literal["replicate", "gemini"]
    backends: VideoBackends
    defaults: VideosDefaults
    allowed: VideosAllowed
    limits: VideosLimits
    jobs: JobsSettings
    posters: PosterSettings = PosterSettings()
    video_rules_template: str

    @model_validator(mode="after")
    def _defaults_allowed(self) -> VideosSettings:
        _check_defaults_allowed(self.defaults, self.allowed)
        return self


class StylePreset(_Strict):
    """A director/style preset (``settings/styles/<name>.yaml``); its words are rendered into the scenes prompt."""

    label: str = Field(min_length=1, max_length=80)
    description: str = Field(min_length=1, max_length=400)
    camera: str = Field(min_length=1, max_length=600)
    palette: str = Field(min_length=1, max_length=600)
    pacing: str = Field(min_length=1, max_length=600)


STYLE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class SandboxSettings(_Strict):
    video_latency_seconds: float = Field(ge=0)
    image_latency_seconds: float = Field(ge=0)
    scenes_latency_seconds: float = Field(ge=0)
    # Outputs the built-in simulator renders at once (each may decode a reference image of up to 40 MP)
    max_concurrent_renders: int = Field(default=2, ge=1, le=32)


class ProjectsLimits(_Strict):
    scenes_max: PositiveInt
    versions_per_scene_max: int = Field(ge=2)
    text_max_chars: PositiveInt
    style_max_chars: PositiveInt
    min_scene_seconds: float = Field(gt=0)
    # Clips one assembly job may join (POST /assemble and a project's assemble).
    assembly_clips_max: PositiveInt = 48


class ProjectsSettings(_Strict):
    limits: ProjectsLimits
    # Seconds of the scene every new scene gets (one of videos.allowed.duration).
    default_scene_seconds: PositiveInt
    # The output frame rate scene windows are planned in (Veo renders 24 fps): every cut is a whole frame.
    frame_rate: float = Field(default=24.0, gt=0, le=120)


SyncMode = Literal["cut_off", "loop", "bounce", "silence", "remap"]  # sync/lipsync-2-pro's sync_mode values


class UnitRange(Range):
    min: float = Field(ge=0, le=1)  # type: ignore[assignment]
    max: float = Field(ge=0, le=1)  # type: ignore[assignment]


class LipsyncDefaults(_Strict):
    sync_mode: SyncMode
    temperature: float
    active_speaker: bool


class LipsyncAllowed(_Strict):
    sync_mode: list[SyncMode] = Field(min_length=1)
    temperature: UnitRange


class LipsyncLimits(_Strict):
    max_clip_seconds: PositiveFloat
    max_clip_bytes: PositiveInt
    ffmpeg_timeout_seconds: PositiveFloat
    ffmpeg_concurrency: int = Field(ge=1, le=32)
    # The shortest song window a request may ask for (a window of ~0 s once made ffmpeg cut the whole song).
    min_window_seconds: PositiveFloat = 0.5


class LipsyncSettings(_Strict):
    model: str = Field(min_length=3)
    defaults: LipsyncDefaults
    allowed: LipsyncAllowed
    limits: LipsyncLimits

    @model_validator(mode="after")
    def _defaults_allowed(self) -> LipsyncSettings:
        if self.defaults.sync_mode not in self.allowed.sync_mode:
            raise ValueError(
                f"defaults.sync_mode = {self.defaults.sync_mode!r} is not one of allowed.sync_mode "
                f"{self.allowed.sync_mode}"
            )
        bounds = self.allowed.temperature
        if not bounds.min <= self.defaults.temperature <= bounds.max:
            raise ValueError("defaults.temperature lies outside allowed.temperature")
        return self


class ModelPrice(_Strict):
    """What one model costs: the provider's list prices, summed over what a job used (its estimated cost)."""

    per_output_second: float = Field(default=0.0, ge=0)  # of video (or audio) produced
    # Veo bills a clip without audio less: when set, used for jobs with generate_audio false
    per_output_second_without_audio: float | None = Field(default=None, ge=0)
    per_image: float = Field(default=0.0, ge=0)  # each image produced
    per_prediction_second: float = Field(default=0.0, ge=0)  # the provider's reported run time (hardware billing)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    as_of: date  # when these prices were read from the provider's pricing page


class PricingSettings(_Strict):
    """``settings/pricing.yaml``: per model (``provider/name`` as jobs record it), its prices."""

    models: dict[str, ModelPrice] = Field(min_length=1)
    # GET /api/mv/usage: the longest range one report covers, and the most jobs it lists (else 400)
    report_max_days: int = Field(default=366, ge=1, le=3660)
    report_max_jobs: int = Field(default=10000, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _one_currency(self) -> PricingSettings:
        currencies = sorted({price.currency for price in self.models.values()})
        if len(currencies) > 1:  # budgets and usage totals add costs up: they must be in one currency
            raise ValueError(f"every model must be priced in one currency (found {', '.join(currencies)})")
        return self


class FfmpegSettings(_Strict):
    """The ffmpeg runs of jobs on one node (assembly runs; lip-sync cuts share the slots and limits)."""

    concurrency: int = Field(default=2, ge=1, le=32)
    memory_mb: int = Field(default=1024, ge=64)
    threads: int = Field(default=2, ge=1, le=64)
    timeout_base_seconds: PositiveFloat = 60.0
    timeout_seconds_per_output_second: float = Field(default=2.0, ge=0, allow_inf_nan=False)


class AssemblyLimits(_Strict):
    """What one assembly request may ask besides its clip count (``projects.limits.assembly_clips_max``)."""

    output_seconds_max: PositiveFloat = 600.0
    graph_clips_max: int = Field(default=4, ge=2, le=64)


class MediaSettings(_Strict):
    ffmpeg: FfmpegSettings = FfmpegSettings()
    assembly: AssemblyLimits = AssemblyLimits()


def _check_defaults_allowed(defaults: BaseModel, allowed: BaseModel) -> None:
    for name, choices in allowed:
        value = getattr(defaults, name)
        if value not in choices:
            raise ValueError(f"defaults.{name} = {value!r} is not one of allowed.{name} {choices}")


SETTINGS_FILES: dict[str, type[_Strict]] = {
    "scenes": ScenesSettings,
    "images": ImagesSettings,
    "videos": VideosSettings,
    "sandbox": SandboxSettings,
    "projects": ProjectsSettings,
    "lipsync": LipsyncSettings,
    "pricing": PricingSettings,
    "media": MediaSettings,
}

# Settings keys that hold Jinja2 templates, with sample values of the variables the code passes them: each template
# is compiled and rendered once with these at start-up, so a template naming another variable stops the start-up.
TEMPLATE_SAMPLES: dict[tuple[str, str], dict[str, Any]] = {
    ("scenes", "prompt"): {
        "idea": "an idea",
        "character_description": "a character",
        "character_characteristics": "calm",
        "number_of_scenes": 3,
        "video_type": "music video",
        "video_characteristics": "cinematic",
        "camera_angle": "eye level",
    },
    ("images", "prompt"): {"character_description": "a character", "aspect_ratio": "1:1"},
    ("videos", "video_rules_template"): {"prompt": "a scene", "aspect_ratio": "16:9", "duration": 8},
}
TEMPLATE_KEYS = set(TEMPLATE_SAMPLES)


def _env_bool(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"environment: {name}={raw!r} is not a boolean (use true or false)")


def _env_number(
    env: Mapping[str, str], name: str, default: float | None, kind: type = int, maximum: float | None = None
) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"environment: {name}={raw!r} is not a {kind.__name__}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"environment: {name}={raw!r} must be a finite number, not negative")
    if maximum is not None and value > maximum:
        raise ConfigError(f"environment: {name}={raw!r} must not exceed {maximum}")
    return value


def _env_at_least(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    value = _env_number(env, name, default, float)
    if value < minimum:
        raise ConfigError(f"environment: {name}={env.get(name, '').strip()!r} must be at least {minimum:g}")
    return value


def _public_base_url(raw: str | None) -> str | None:
    """``MV_PUBLIC_BASE_URL``: an absolute http(s) URL, kept without its trailing slash."""
    if raw is None:
        return None
    if not raw.startswith(("https://", "http://")) or " " in raw or "?" in raw or "#" in raw:
        raise ConfigError(f"environment: MV_PUBLIC_BASE_URL={raw!r} is not an http(s) base URL")
    return raw.rstrip("/")


STORAGE_SCHEMES = ("s3", "s3a", "gs", "az", "azure", "abfs", "abfss")
MAX_LINK_TTL_SECONDS = 7 * 86400  # SigV4 presigned URLs live at most 7 days


def _storage_url(raw: str | None) -> str | None:
    """``MV_STORAGE_URL``: ``s3://bucket[/prefix]``, ``gs://bucket[/prefix]`` or ``az://container[/prefix]`` (the
    schemes obstore builds a store from); refused at start-up rather than at the first write."""
    if raw is None:
        return None
    parts = urlsplit(raw)
    if parts.scheme.lower() not in STORAGE_SCHEMES or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(
            f"environment: MV_STORAGE_URL={raw!r} is not a storage URL such as s3://bucket/prefix, gs://bucket or "
            "az://container"
        )
    return raw.rstrip("/")


def _whsec(value: str | None, name: str) -> str | None:
    """A Standard Webhooks signing secret (``whsec_`` + base64 of at least 24 bytes), or ConfigError."""
    if value is None:
        return None
    prefix, _, key = value.partition("_")
    try:
        ok = prefix == "whsec" and len(base64.b64decode(key, validate=True)) >= 24
    except (ValueError, binascii.Error):
        ok = False
    if not ok:
        raise ConfigError(f"environment: {name} is not a whsec_<base64> signing secret of at least 24 bytes")
    return value


def _networks(items: tuple[str, ...], name: str) -> tuple[str, ...]:
    """CIDR networks (``10.0.0.0/8``, ``::1/128``), or ConfigError naming the bad one."""
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"environment: {name}: {item!r} is not a network (CIDR)") from None
    return items


def _env_list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list; blank items are dropped."""
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _env_choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> Any:
    raw = env.get(name, "").strip().lower() or choices[0]
    if raw not in choices:
        raise ConfigError(f"environment: {name}={raw!r} is not one of {', '.join(choices)}")
    return raw


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?")


DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_entry(scheme: str, host: str, port: int | None) -> str:
    """The normal form of an allowed output host, shared by the setting and its matcher
    (:mod:`mvserver.providers.outputs`): ``scheme://host:port`` (host lower-case, IPv6 in brackets, no trailing dot;
    ``*.`` in front for every subdomain)."""
    host = host.lower().rstrip(".")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme.lower()}://{host}:{port if port is not None else DEFAULT_PORTS[scheme.lower()]}"


_OUTPUT_HOST = re.compile(
    r"(?:(?P<scheme>https?)://)?(?P<host>(?:\*\.)?[a-z0-9-]+(?:\.[a-z0-9-]+)*\.?|\[[0-9a-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)


def _env_output_hosts(env: Mapping[str, str], name: str) -> tuple[str, ...] | None:
    """Comma-separated hosts provider outputs may be fetched from: ``replicate.delivery`` (https, port 443),
    ``*.replicate.delivery`` (its subdomains) or an origin ``http://127.0.0.1:8090``; None when unset. Each entry is
    normalised to ``scheme://host:port``."""
    entries = []
    for item in _env_list(env, name):
        match = _OUTPUT_HOST.fullmatch(item.rstrip("/").lower())
        port = int(match["port"]) if match and match["port"] else None
        if match is None or (port is not None and not 0 < port < 65536):
            raise ConfigError(
                f"environment: {name}: {item!r} is not a host such as replicate.delivery, "
                "*.replicate.delivery or http://127.0.0.1:8090"
            )
        entries.append(origin_entry(match["scheme"] or "https", match["host"], port))
    return tuple(entries) or None


def _env_origins(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list of exact origins (``scheme://host[:port]``); a wildcard is refused."""
    origins = tuple(part.rstrip("/").lower() for part in _env_list(env, name))
    for origin in origins:
        if not _ORIGIN.fullmatch(origin):
            raise ConfigError(
                f"environment: {name}: {origin!r} is not an origin such as https://app.example.com "
                "(no wildcards, paths or trailing text)"
            )
    return origins


@dataclass(frozen=True)
class EnvSettings:
    """Secrets and knobs from the environment (``.env`` is loaded into it by ``python -m mvserver``)."""

    gemini_api_key: str | None = None
    replicate_api_token: str | None = None
    vertex_api_key: str | None = None
    google_cloud_project: str | None = None
    google_cloud_location: str = "us-central1"
    debug: bool = False
    sandbox: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    output_dir: Path = DEFAULT_OUTPUT_DIR
    # Object storage instead of output_dir (None: the local directory): the store's URL; this node's scratch
    # directory for what ffmpeg must read as a local file (a size cap, least recently used out first); the lifetime
    # of presigned links; and whether artefacts are served by a redirect to such a link or through this server.
    storage_url: str | None = None
    scratch_dir: Path | None = None  # None: <temporary directory>/mvserver-scratch-<uid>-<port>
    scratch_max_bytes: int = 2048 * 1024 * 1024
    storage_link_ttl_seconds: int = 21600
    storage_delivery: Literal["redirect", "proxy"] = "redirect"
    settings_dir: Path = DEFAULT_SETTINGS_DIR
    max_body_bytes: int = 16 * 1024 * 1024
    max_audio_bytes: int = 50 * 1024 * 1024
    max_audio_seconds: float = 1200.0
    max_concurrent_uploads: int = 4  # upload_audio requests at once on this process
    upload_idle_seconds: float = 10.0  # an upload body may pause at most this long (and this is its slow-start grace)
    upload_min_bytes_per_second: float = 16384.0  # ... and must average at least this after the grace (0: no minimum)
    # Song analysis (beats, bars, sections) in worker processes: how many (0: off, scenes sized by length), the
    # seconds of a song analysed, each worker's address-space cap, the time limit per song, and how long an upload
    # or GET /api/mv/songs/{id} waits for it before answering ``pending``.
    analysis_workers: int = 1
    analysis_max_seconds: float = 1200.0
    analysis_memory_mb: int = 2048
    analysis_timeout_seconds: float = 60.0
    analysis_wait_seconds: float = 2.0
    header_timeout_seconds: float = 15.0  # a request's headers must arrive within this (0: no limit)
    max_concurrent_jobs: int | None = None
    sandbox_video_latency: float | None = None
    gemini_base_url: str | None = None
    vertex_base_url: str | None = None
    replicate_base_url: str | None = None
    replicate_output_hosts: tuple[str, ...] | None = None  # None: Replicate's delivery hosts (backends/outputs.py)
    public_base_url: str | None = None
    replicate_webhook_signing_key: str | None = None
    sandbox_webhooks: bool = True
    api_keys_file: Path | None = None
    url_signing_key: str | None = field(default=None, repr=False)
    signed_url_ttl_seconds: int = 3600
    cors_origins: tuple[str, ...] = ()
    metrics: bool = False
    log_format: Literal["text", "json"] = "text"
    allowed_hosts: tuple[str, ...] | None = None  # None: the listen host, localhost, 127.0.0.1 and [::1]
    redis_url: str | None = None
    redis_prefix: str = "mv:"
    stale_temp_seconds: float = 900.0  # an unowned temporary is removed only when older (and its node silent)
    webhook_signing_key: str | None = field(default=None, repr=False)  # signs webhooks out of keys-off jobs
    webhook_allowed_networks: tuple[str, ...] = ()  # CIDRs webhooks out may reach though private or loopback

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EnvSettings:
        """Read every ``MV_*`` knob and provider secret; blank values count as unset."""
        env = os.environ if env is None else env

        def text(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        return cls(
            gemini_api_key=text("GEMINI_API_KEY"),
            replicate_api_token=text("REPLICATE_API_TOKEN"),
            vertex_api_key=text("GOOGLE_VERTEX_API_KEY"),
            google_cloud_project=text("GOOGLE_CLOUD_PROJECT"),
            google_cloud_location=text("GOOGLE_CLOUD_LOCATION") or "us-central1",
            debug=_env_bool(env, "MV_DEBUG_MODE"),
            sandbox=_env_bool(env, "MV_SANDBOX"),
            host=text("MV_HOST") or "127.0.0.1",
            port=_env_number(env, "MV_PORT", 8080, maximum=65535),
            output_dir=Path(text("MV_OUTPUT_DIR") or DEFAULT_OUTPUT_DIR),
            storage_url=_storage_url(text("MV_STORAGE_URL")),
            scratch_dir=Path(scratch) if (scratch := text("MV_SCRATCH_DIR")) else None,
            scratch_max_bytes=int(_env_at_least(env, "MV_SCRATCH_MAX_MB", 2048.0, 1.0) * 1024 * 1024),
            storage_link_ttl_seconds=_env_number(
                env, "MV_STORAGE_LINK_TTL_SECONDS", 21600, maximum=MAX_LINK_TTL_SECONDS
            )
            or 21600,
            storage_delivery=_env_choice(env, "MV_STORAGE_DELIVERY", ("redirect", "proxy")),
            settings_dir=Path(text("MV_SETTINGS_DIR") or DEFAULT_SETTINGS_DIR),
            max_body_bytes=int(_env_number(env, "MV_MAX_BODY_MB", 16.0, float) * 1024 * 1024),
            max_audio_bytes=int(_env_number(env, "MV_MAX_AUDIO_MB", 50.0, float) * 1024 * 1024),
            max_audio_seconds=_env_number(env, "MV_MAX_AUDIO_SECONDS", 1200.0, float, maximum=86400) or 1200.0,
            max_concurrent_uploads=_env_number(env, "MV_MAX_CONCURRENT_UPLOADS", 4) or 4,
            upload_idle_seconds=_env_number(env, "MV_UPLOAD_IDLE_SECONDS", 10.0, float) or 10.0,
            upload_min_bytes_per_second=_env_number(env, "MV_UPLOAD_MIN_BYTES_PER_SECOND", 16384.0, float),
            analysis_workers=_env_number(env, "MV_ANALYSIS_WORKERS", 1, maximum=16),
            analysis_max_seconds=_env_number(env, "MV_ANALYSIS_MAX_SECONDS", 1200.0, float, maximum=86400) or 1200.0,
            analysis_memory_mb=_env_number(env, "MV_ANALYSIS_MEMORY_MB", 2048, maximum=1 << 20) or 2048,
            analysis_timeout_seconds=_env_number(env, "MV_ANALYSIS_TIMEOUT_SECONDS", 60.0, float) or 60.0,
            analysis_wait_seconds=_env_number(env, "MV_ANALYSIS_WAIT_SECONDS", 2.0, float, maximum=600),
            header_timeout_seconds=_env_number(env, "MV_HEADER_TIMEOUT_SECONDS", 15.0, float),
            max_concurrent_jobs=_env_number(env, "MV_MAX_CONCURRENT_JOBS", None) or None,
            sandbox_video_latency=_env_number(env, "MV_SANDBOX_VIDEO_SECONDS", None, float),
            gemini_base_url=text("MV_GEMINI_BASE_URL"),
            vertex_base_url=text("MV_VERTEX_BASE_URL"),
            replicate_base_url=text("MV_REPLICATE_BASE_URL"),
            replicate_output_hosts=_env_output_hosts(env, "MV_REPLICATE_OUTPUT_HOSTS"),
            public_base_url=_public_base_url(text("MV_PUBLIC_BASE_URL")),
            replicate_webhook_signing_key=text("MV_REPLICATE_WEBHOOK_SECRET"),
            sandbox_webhooks=_env_bool(env, "MV_SANDBOX_WEBHOOKS", True),
            api_keys_file=Path(keys_file) if (keys_file := text("MV_API_KEYS_FILE")) else None,
            url_signing_key=text("MV_URL_SIGNING_SECRET"),
            signed_url_ttl_seconds=_env_number(env, "MV_SIGNED_URL_TTL_SECONDS", 3600) or 3600,
            cors_origins=_env_origins(env, "MV_CORS_ORIGINS"),
            metrics=_env_bool(env, "MV_METRICS"),
            log_format=_env_choice(env, "MV_LOG_FORMAT", ("text", "json")),
            allowed_hosts=tuple(item.lower() for item in _env_list(env, "MV_ALLOWED_HOSTS")) or None,
            redis_url=text("MV_REDIS_URL"),
            redis_prefix=text("MV_REDIS_PREFIX") or "mv:",
            stale_temp_seconds=_env_at_least(env, "MV_STALE_TEMP_SECONDS", 900.0, 1.0),
            webhook_signing_key=_whsec(text("MV_WEBHOOK_SECRET"), "MV_WEBHOOK_SECRET"),
            webhook_allowed_networks=_networks(
                _env_list(env, "MV_WEBHOOK_ALLOWED_NETWORKS"), "MV_WEBHOOK_ALLOWED_NETWORKS"
            ),
        )

    @property
    def host_names(self) -> frozenset[str]:
        """Host names a request's ``Host`` header may name (without the port; IPv6 in brackets); the host of
        ``MV_PUBLIC_BASE_URL`` always, since that is how Replicate's webhooks address this server."""
        public = {urlsplit(self.public_base_url).hostname or ""} if self.public_base_url else set()
        public = {f"[{name}]" if ":" in name else name for name in public if name}  # Replicate calls it by this name
        if self.allowed_hosts is not None:
            return frozenset(self.allowed_hosts) | public
        listen = f"[{self.host}]" if ":" in self.host else self.host
        return frozenset({listen.lower(), "localhost", "127.0.0.1", "[::1]"}) | public

    @property
    def gemini_video_configured(self) -> bool:
        """Veo needs Vertex: an express-mode API key, or a project with application-default credentials."""
        return bool(self.vertex_api_key or self.google_cloud_project)


RENDERED_KEPT = 256  # settings templates' renders kept by Config.render (then forgotten all at once)


@dataclass(frozen=True)
class Config:
    """Everything the service reads at start-up."""

    env: EnvSettings
    scenes: ScenesSettings
    images: ImagesSettings
    videos: VideosSettings
    sandbox: SandboxSettings
    projects: ProjectsSettings
    lipsync: LipsyncSettings
    pricing: PricingSettings
    media: MediaSettings
    templates: dict[str, jinja2.Template] = field(repr=False)
    styles: dict[str, StylePreset] = field(default_factory=dict)  # name -> preset, sorted by name
    # settings key -> the variables its template names, and renders already made (see :meth:`render`)
    template_names: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    _rendered: dict[tuple[Any, ...], str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def debug(self) -> bool:
        return self.env.debug

    @property
    def max_concurrent_jobs(self) -> int:
        return self.env.max_concurrent_jobs or self.videos.jobs.max_concurrent

    @property
    def sandbox_video_latency(self) -> float:
        latency = self.env.sandbox_video_latency
        return self.sandbox.video_latency_seconds if latency is None else latency

    def render(self, key: str, **variables: Any) -> str:
        """Render the template stored at settings key ``key`` (e.g. ``"scenes.prompt"``).

        A settings template is a function of the variables it names, so its text is rendered once per distinct
        value of those (when they are plain values) and kept, at most :data:`RENDERED_KEPT`: the video rules name
        the aspect ratio and duration, not the prompt, and every video job would otherwise render them anew."""
        names = self.template_names.get(key)
        memo: tuple[Any, ...] | None = None
        if names is not None and all(isinstance(variables.get(n), (str, int, float, bool)) for n in names):
            memo = (key, *(variables[n] for n in names))
            if (kept := self._rendered.get(memo)) is not None:
                return kept
        try:
            text = self.templates[key].render(**variables).strip()
        except jinja2.UndefinedError as exc:  # a template names a variable the code does not pass
            raise ConfigError(f"template {key}: {exc.message}") from exc
        if memo is not None:
            if len(self._rendered) >= RENDERED_KEPT:
                self._rendered.clear()
            self._rendered[memo] = text
        return text

    def summary(self) -> dict[str, Any]:
        """The loaded parameters, for the start-up debug print (secrets shown only as set/unset)."""
        secrets = {
            "gemini_api_key",
            "replicate_api_token",
            "vertex_api_key",
            "replicate_webhook_signing_key",
            "url_signing_key",
            "redis_url",
            "webhook_signing_key",
        }
        env = {k: ("set" if v else "unset") if k in secrets else str(v) for k, v in vars(self.env).items()}
        return {
            "env": env,
            "scenes": self.scenes.model_dump(),
            "images": self.images.model_dump(),
            "videos": self.videos.model_dump(),
            "sandbox": self.sandbox.model_dump(),
            "styles": {name: preset.model_dump() for name, preset in self.styles.items()},
            "projects": self.projects.model_dump(),
            "lipsync": self.lipsync.model_dump(),
            "pricing": self.pricing.model_dump(mode="json"),
            "media": self.media.model_dump(),
        }


def package_templates() -> jinja2.Environment:
    """The templates shipped in ``mvserver/web/templates`` (Markdown export, demo page)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("mvserver.web", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(["html"]),
    )


def _template_environment() -> jinja2.Environment:
    return jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: settings file is missing") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the settings file: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        parts.append(f"{key}: {message}")
    return "; ".join(parts)


def load_config(env: EnvSettings | None = None) -> Config:
    """Load and validate every settings file and compile its templates; raise ConfigError naming file and key."""
    env = env or EnvSettings.from_env()
    loaded: dict[str, Any] = {}
    for name, model in SETTINGS_FILES.items():
        path = env.settings_dir / f"{name}.yaml"
        try:
            loaded[name] = model.model_validate(_read_yaml(path))
        except ValidationError as exc:
            raise ConfigError(f"{path}: {_describe(exc)}") from None
    templates: dict[str, jinja2.Template] = {}
    template_names: dict[str, tuple[str, ...]] = {}
    jinja = _template_environment()
    for (name, key), samples in sorted(TEMPLATE_SAMPLES.items()):
        path = env.settings_dir / f"{name}.yaml"
        source = getattr(loaded[name], key)
        try:
            template = jinja.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"{path}: {key}: template does not compile: {exc.message} (line {exc.lineno})") from None
        try:
            template.render(**samples)
        except jinja2.UndefinedError as exc:
            raise ConfigError(
                f"{path}: {key}: template uses an unknown variable: {exc.message} (known: {', '.join(samples)})"
            ) from None
        except Exception as exc:
            raise ConfigError(f"{path}: {key}: template does not render: {exc.__class__.__name__}: {exc}") from None
        templates[f"{name}.{key}"] = template
        template_names[f"{name}.{key}"] = tuple(sorted(jinja2.meta.find_undeclared_variables(jinja.parse(source))))
    styles = load_styles(env.settings_dir / "styles")
    default_style = loaded["scenes"].defaults.style
    if default_style is not None and default_style not in styles:
        raise ConfigError(
            f"{env.settings_dir / 'scenes.yaml'}: defaults.style: {default_style!r} is not one of the "
            f"presets in {env.settings_dir / 'styles'} {sorted(styles)}"
        )
    if loaded["projects"].default_scene_seconds not in loaded["videos"].allowed.duration:
        raise ConfigError(
            f"{env.settings_dir / 'projects.yaml'}: default_scene_seconds: not one of "
            f"videos.allowed.duration {loaded['videos'].allowed.duration}"
        )
    _check_priced(env.settings_dir / "pricing.yaml", loaded)
    return Config(env=env, templates=templates, styles=styles, template_names=template_names, **loaded)


def _check_priced(path: Path, loaded: dict[str, Any]) -> None:
    """Every model a job can run on needs a price, so no job's cost is unknown (local ffmpeg work costs nothing)."""
    videos = loaded["videos"].backends
    needed = {videos.replicate.model, videos.gemini.model, loaded["lipsync"].model}
    missing = sorted(needed - set(loaded["pricing"].models))
    if missing:
        raise ConfigError(f"{path}: models: no price for {', '.join(missing)}")


def load_styles(directory: Path) -> dict[str, StylePreset]:
    """Every ``<name>.yaml`` preset in ``directory`` (none if it does not exist); ConfigError names file and key."""
    styles: dict[str, StylePreset] = {}
    if not directory.is_dir():
        return styles
    for path in sorted(directory.glob("*.yaml")):
        if not STYLE_NAME.fullmatch(path.stem):
            raise ConfigError(f"{path}: a style file name must be 1-40 lower-case letters, digits, - or _")
        try:
            styles[path.stem] = StylePreset.model_validate(_read_yaml(path))
        except ValidationError as exc:
            raise ConfigError(f"{path}: {_describe(exc)}") from None
    return styles
